"""Greedy generation for the generation tasks (passkey, LongBench, RULER): many prompts through the patched model
and its KV cache, ``task.batch_size`` at a time.

Prompts are grouped by length (longest first, so a batch pads little) and left-padded with an attention mask, as
``generate`` expects. A row's tokens do not depend on what else is in its batch: every method computes a padded
row as the row alone (``tests/test_batches.py``), except ``dynamic_ntk``, whose base follows the batch's longest
row by design (transformers' behaviour); run it at ``task.batch_size=1`` where that matters.

Prompts that share leading ids (a cell's trials: the same task text and haystack up to the first needle) can share
their prefill: with ``reuse_prefix``, when the model scores a prefix as it scores it alone (``patch.prefix_exact``:
every method but ``dynamic_ntk`` and the ``per_forward`` schedule), the common prefix goes through the model once and
each batch of equal-length prompts continues from a copy of its KV cache. Greedy answers are those of full prefills
(to float rounding); what it saves is ``(prompts - 1) x prefix`` tokens of prefill.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from enhance_long.patch import prefix_exact


def leading_special(tokenizer) -> list[int]:
    """The ids the tokenizer puts before a text on its own (Llama's BOS), so a prompt built in ids starts as usual."""
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    return with_special[: len(with_special) - len(plain)] if with_special[-len(plain) :] == plain else []


def pad_id(model, tokenizer) -> int:
    """The padding id: the tokenizer's, else the model's, else the end-of-sequence id."""
    for candidate in (tokenizer.pad_token_id, model.generation_config.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return candidate
    raise ValueError("the tokenizer has neither a pad nor an end-of-sequence token; set tokenizer.pad_token_id")


def stop_ids(model, eos_token_id) -> list[int]:
    """The ids generation stops at: ``eos_token_id`` (an id or a list), else the model's own."""
    configured = model.generation_config.eos_token_id if eos_token_id is None else eos_token_id
    return [configured] if isinstance(configured, int) else list(configured or ())


@torch.inference_mode()
def greedy(
    model,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    batch_size: int = 1,
    eos_token_id: int | list[int] | None = None,
    min_new_tokens: int = 0,
    desc: str = "generate",
    progress: bool = True,
    reuse_prefix: bool = False,
) -> list[list[int]]:
    """Each prompt's greedy continuation: at most ``max_new_tokens`` ids, ending with the first end-of-sequence id
    if one came (``eos_token_id``: the model's own when None), after at least ``min_new_tokens``. ``reuse_prefix``:
    prefill the prompts' common prefix once where that is exact (the module docstring)."""
    if batch_size < 1:
        raise ValueError(f"task.batch_size={batch_size} is invalid; it must be an integer >= 1, e.g. 4")
    device = getattr(model, "device", None) or model.get_input_embeddings().weight.device
    pad, stops = pad_id(model, tokenizer), stop_ids(model, eos_token_id)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out: list[list[int]] = [[] for _ in prompts]
    batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    prefix = _prefix_cache(model, prompts, device) if reuse_prefix and len(prompts) > 1 else None
    for batch in tqdm(batches, desc=desc, disable=not progress, leave=False):
        width = max(len(prompts[i]) for i in batch)
        ids = torch.tensor([[pad] * (width - len(prompts[i])) + list(prompts[i]) for i in batch], device=device)
        mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in batch], device=device)
        extra = {}
        if prefix is not None and all(len(prompts[i]) == width for i in batch):  # unpadded: the prefix lines up
            extra["cache"] = copy.deepcopy(prefix)
            if len(batch) > 1:
                extra["cache"].batch_repeat_interleave(len(batch))
        generated = model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=False,
            num_beams=1,
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
            pad_token_id=pad,
            use_cache=True,
            **({} if eos_token_id is None else {"eos_token_id": stops}),  # else the model's own
            **extra,
        )
        for row, index in enumerate(batch):
            out[index] = _until_stop(generated[row, width:].tolist(), stops)
    return out


def common_prefix(prompts: Sequence[Sequence[int]]) -> int:
    """How many leading ids every prompt shares."""
    first, n = prompts[0], min(len(p) for p in prompts)
    for position in range(n):
        if any(p[position] != first[position] for p in prompts):
            return position
    return n


@torch.inference_mode()
def _prefix_cache(model, prompts: Sequence[Sequence[int]], device) -> DynamicCache | None:
    """The KV cache of the prompts' common prefix (one row), or None where reusing it would not be exact or save
    nothing. At least one id of every prompt stays for ``generate`` to feed."""
    shared = min(common_prefix(prompts), min(len(p) for p in prompts) - 1)
    if shared < 1 or not prefix_exact(model):
        return None
    cache = DynamicCache(config=model.config)
    model(input_ids=torch.tensor([list(prompts[0][:shared])], device=device), cache=cache, use_cache=True)
    return cache


def _until_stop(tokens: list[int], stops: list[int]) -> list[int]:
    """The tokens up to and including the first stop id: a finished row of a batch is padded after it."""
    for position, token in enumerate(tokens):
        if token in stops:
            return tokens[: position + 1]
    return tokens
