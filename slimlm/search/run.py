"""`slimlm search`'s entry: the target names the engine's format. GGUF (llama.cpp) is `driver.py`; compressed-tensors
(transformers, vLLM) is `ct_search.py`, on the same machinery."""

from __future__ import annotations

from pathlib import Path

from slimlm.errors import SlimlmError
from slimlm.settings import Constraints, EvalSettings, SearchSettings


def run_search(
    model: str,
    out: str | Path,
    constraints: Constraints,
    settings: SearchSettings,
    evaluation: EvalSettings,
    database_dir: str | Path | None = None,
    overwrite: bool = False,
    allow_pickle: bool = False,
    device: str | None = None,
    extra_budgets: tuple[str, ...] = (),
    export_front: bool = False,
):
    """Search `model` under `constraints` for `settings.target`; returns the driver's SearchResult (see
    `driver.run_gguf_search` for what DIR holds)."""
    if settings.target not in ("gguf", "compressed-tensors"):
        raise SlimlmError(
            f"unknown search target '{settings.target}'", "use --target gguf or --target compressed-tensors"
        )
    common = (model, Path(out), constraints, settings, evaluation, database_dir, overwrite, allow_pickle, device)
    if settings.target == "compressed-tensors":
        from slimlm.search.ct_search import run_ct_search

        return run_ct_search(*common, extra_budgets)
    from slimlm.search.driver import run_gguf_search

    return run_gguf_search(*common, extra_budgets, export_front)
