"""Transformers 5.24 renamed the decoding cache's argument and output field from `past_key_values` to `cache`
(the old names warn, and go in 5.40); these helpers use whichever name the installed version has."""
from __future__ import annotations

import inspect


def cache_argument(model, cache) -> dict:
    """`{name: cache}` for `model(...)`, under the name its forward takes."""
    parameters = inspect.signature(model.forward).parameters
    return {"cache" if "cache" in parameters else "past_key_values": cache}


def output_cache(output):
    """The cache a forward returned."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values
