"""slimlm: turn language models into small language models, and measure what each step costs and buys.

    from slimlm import compress, evaluate, run, load_model

`import slimlm` stays fast: the API (and torch) load on first use.
"""

import os

# PyTorch's CPU allocator puts tensors of 2 MB and more on transparent huge pages when this is set. Without it,
# every large activation is fresh memory that faults in 4 KB at a time on first touch: an RMSNorm over
# 64 × 512 × 576 floats took 120 ms, 40 ms with it (2-core CPU box). torch reads the variable once, at its
# first allocation, so it is set here, before slimlm imports torch; THP_MEM_ALLOC_ENABLE=0 turns it off.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

__version__ = "0.1.0"
__all__ = ["SlimlmError", "compress", "evaluate", "load_model", "load_recipe", "run"]


def __getattr__(name: str):
    if name in ("compress", "evaluate", "run"):
        from slimlm import api

        return getattr(api, name)
    if name == "load_model":
        from slimlm.models.load import load_model

        return load_model
    if name == "load_recipe":
        from slimlm.recipes import load_recipe

        return load_recipe
    if name == "SlimlmError":
        from slimlm.errors import SlimlmError

        return SlimlmError
    raise AttributeError(f"module 'slimlm' has no attribute {name!r}")
