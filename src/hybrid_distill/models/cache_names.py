"""Transformers 5.24 renamed the decoding cache's argument and output field from `past_key_values` to `cache`
(the old names warn, and go in 5.40); these helpers use whichever name the installed version has."""
from __future__ import annotations

import inspect


def cache_keyword(model) -> str:
    """The name `model.forward` takes its cache under (look it up once, not per decoding step)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def output_cache(output):
    """The cache a forward returned."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values
