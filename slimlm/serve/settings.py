"""Defaults of `slimlm chat` and `slimlm serve`, declared once and torch-free (the CLI builds its help from them)."""

from __future__ import annotations

DEFAULT_HOST = "127.0.0.1"  # localhost only unless the user asks
DEFAULT_PORT = 8080  # llama-server's
DRAFT_TOKENS = 4  # tokens the draft proposes per target forward
MAX_QUEUE = 64  # requests waiting for the model before the server answers 503
COMPARE_KL_TOKENS = 64  # greedy tokens of the base scored through both models by `chat --compare`
