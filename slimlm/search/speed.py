"""Decode speed and RAM constraints: need llama.cpp to measure the engine on this machine."""

from __future__ import annotations

from slimlm.errors import SlimlmError


def require_cost_model():
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        raise SlimlmError(
            "--min-decode-tps and --max-ram are measured in llama.cpp, which is not installed",
            "pip install -e '.[engines]' (compiles llama.cpp: ~20 min on 2 cores), or drop them to search on file size alone",
        ) from None
