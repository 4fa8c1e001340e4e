"""enhance-long: stretch RoPE language models past their trained context, without training.

    import enhance_long
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")
    enhance_long.apply(model)                                  # consistent dynamic NTK, alpha=2, LogN on
    enhance_long.apply(model, rope="yarn", factor=4.0, logn=False)
    enhance_long.remove(model)                                 # back to the stock model, exactly

``import enhance_long.auto`` instead patches every supported model loaded with ``from_pretrained``;
``enhance_long.register_method`` adds a method of your own (README, *How to add a method*).
Importing this package has no side effects.
"""

from enhance_long.methods.catalog import register_method
from enhance_long.patch import DEFAULT_ROPE, METHODS, SUPPORTED_MODEL_TYPES, apply, describe, remove, trained_length

__all__ = [
    "DEFAULT_ROPE",
    "METHODS",
    "SUPPORTED_MODEL_TYPES",
    "apply",
    "describe",
    "register_method",
    "remove",
    "trained_length",
]
