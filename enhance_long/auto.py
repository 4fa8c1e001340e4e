"""The original tool's "just import it" usage: ``import enhance_long.auto`` and every supported model loaded with
``from_pretrained`` afterwards comes back patched with the default enhancement (consistent dynamic NTK, alpha 2,
LogN on). Models of other types load untouched. ``enhance_long.remove(model)`` undoes it for one model.

    import enhance_long.auto  # noqa: F401
    model = AutoModelForCausalLM.from_pretrained("meta-llama/Llama-2-7b-chat-hf")
"""

from __future__ import annotations

import functools
import logging

from transformers import PreTrainedModel

from enhance_long.patch import SUPPORTED_MODEL_TYPES, apply

logger = logging.getLogger(__name__)

_stock_from_pretrained = PreTrainedModel.from_pretrained.__func__


@functools.wraps(_stock_from_pretrained)
def _from_pretrained(cls, *args, **kwargs):
    model = _stock_from_pretrained(cls, *args, **kwargs)
    if getattr(model.config, "model_type", None) in SUPPORTED_MODEL_TYPES and hasattr(model, "get_decoder"):
        apply(model)
        logger.info("enhance_long.auto: patched %s with the default enhancement", type(model).__name__)
    return model


if not getattr(PreTrainedModel.from_pretrained, "_enhance_long", False):
    _from_pretrained._enhance_long = True
    PreTrainedModel.from_pretrained = classmethod(_from_pretrained)
