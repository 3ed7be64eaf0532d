"""slimlm: turn language models into small language models, and measure what each step costs and buys.

    from slimlm import compress, evaluate, run, load_model

`import slimlm` stays fast: the API (and torch) load on first use.
"""

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
