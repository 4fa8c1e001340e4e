"""Passkey retrieval: find a random number hidden at a chosen depth of a long, repetitive filler.

The standard prompt (Mohtashami & Jaggi, 2023), built directly in token ids so that it is exactly ``ctx`` tokens
for the model's tokenizer::

    [BOS] TASK_DESCRIPTION  FILLER ... FILLER  NEEDLE  FILLER ... FILL  QUESTION
                            `---- depth ----'          `-- trimmed --'

The filler before the needle is a whole number of filler sentences (``depth`` of the filler budget, rounded);
the filler after it is trimmed to make the total exact. Each cell (length x depth) runs ``trials`` prompts with
keys drawn from ``random.Random(f"{seed}:{ctx}:{depth}:{trial}")``, decodes greedily through the patched model
and its KV cache, and counts an answer correct when the first number in the output equals the key.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig

from enhance_long.tasks.base import TaskEnv

TASK_DESCRIPTION = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there."
)
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"


def passkey(seed: int, ctx: int, depth: float, trial: int, digits: int) -> str:
    """The key of one trial: ``digits`` random digits (no leading zero), reproducible from the cell and trial."""
    rng = random.Random(f"{seed}:{ctx}:{depth}:{trial}")
    return str(rng.randint(10 ** (digits - 1), 10**digits - 1))


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _leading_special(tokenizer) -> list[int]:
    """The ids the tokenizer puts before a text on its own (Llama's BOS), so the prompt starts as usual."""
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = _encode(tokenizer, "a")
    return with_special[: len(with_special) - len(plain)] if with_special[-len(plain) :] == plain else []


def build_prompt(tokenizer, ctx: int, depth: float, key: str) -> list[int]:
    """Token ids of a passkey prompt of exactly ``ctx`` tokens with ``key`` at ``depth`` (0 = first, 1 = last)."""
    head = _leading_special(tokenizer) + _encode(tokenizer, TASK_DESCRIPTION)
    needle = _encode(tokenizer, NEEDLE.format(key=key))
    question = _encode(tokenizer, QUESTION)
    budget = ctx - len(head) - len(needle) - len(question)
    if budget < 0:
        raise ValueError(
            f"ctx={ctx} is too short for a passkey prompt, which needs {ctx - budget} tokens before any filler; "
            f"use ctx>={ctx - budget}"
        )
    unit = _encode(tokenizer, FILLER)
    filler = unit * (budget // len(unit) + 1)
    before = round(depth * budget / len(unit)) * len(unit)
    before = min(before, budget // len(unit) * len(unit))
    return head + filler[:before] + needle + filler[: budget - before] + question


def first_number(text: str) -> str | None:
    """The first run of digits in a model's answer (None if it gave no number)."""
    match = re.search(r"\d+", text)
    return match.group() if match else None


class Passkey:
    name = "passkey"
    uses_data = False  # the prompt is built in code; data=... does not change the result

    def cells(self, cfg, ctxs: Sequence[int]) -> list[dict]:
        return [{"ctx": int(ctx), "depth": float(depth)} for ctx in ctxs for depth in cfg.depths]

    @torch.inference_mode()
    def measure(self, env: TaskEnv, cell: dict) -> list[dict]:
        cfg, model, tokenizer = env.cfg, env.model, env.tokenizer
        ctx, depth = cell["ctx"], cell["depth"]
        generation = GenerationConfig(
            do_sample=False,
            max_new_tokens=cfg.max_new_tokens,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        device = model.get_input_embeddings().weight.device
        keys, outputs = [], []
        bar = tqdm(range(cfg.trials), desc=f"passkey ctx={ctx} depth={depth:g}", disable=not env.progress, leave=False)
        for trial in bar:
            key = passkey(env.seed, ctx, depth, trial, cfg.key_digits)
            ids = torch.tensor([build_prompt(tokenizer, ctx, depth, key)], device=device)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=generation)
            keys.append(key)
            outputs.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
        correct = sum(first_number(text) == key for key, text in zip(keys, outputs, strict=True))
        return [
            {
                **cell,
                "trials": cfg.trials,
                "correct": correct,
                "accuracy": correct / cfg.trials,
                "keys": keys,
                "outputs": outputs,
            }
        ]


TASK = Passkey()
