"""The few names that differ between the transformers releases evspec supports (5.17 to 5.x).

transformers renamed the decoder's `past_key_values` argument to `cache` within 5.x;
everything else evspec uses has one name across the supported range.
"""

from __future__ import annotations

import inspect

from transformers import LlamaModel

CACHE_KWARG = "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"
