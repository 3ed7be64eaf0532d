"""One forward of a transformers model over its KV cache, as every decode loop here runs it (the chat/serve loop,
speculative decoding, the acceptance measurement), with transformers' renamed cache keyword handled once."""

from __future__ import annotations

import functools
import inspect


def forward(model, ids: list[int], cache) -> object:
    """Logits (len(ids), V) of `ids` appended to what `cache` holds (a fresh context when `cache` is None)."""
    import torch

    with torch.inference_mode():
        input_ids = torch.tensor([ids], device=model.device)
        return model(input_ids, **{_cache_keyword(type(model)): cache}, use_cache=cache is not None).logits[0]


@functools.cache
def _cache_keyword(model_class: type) -> str:
    """transformers 5.24 renamed `past_key_values` to `cache` (the old name warns); 5.23 knows only the old one."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"
