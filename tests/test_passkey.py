"""Passkey: prompts of exactly ctx tokens, seeded keys, exact-match scoring, a real greedy run on a tiny model."""

import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from transformers import GenerationConfig

import enhance_long
from enhance_long.models import load_model
from enhance_long.tasks.base import TaskEnv
from enhance_long.tasks.passkey import (
    FILLER,
    NEEDLE,
    QUESTION,
    TASK,
    TASK_DESCRIPTION,
    PasskeyConfig,
    build_prompt,
    first_number,
    passkey,
)

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("ctx", [300, 301, 517, 2048, 4096])
@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 1.0])
def test_prompt_has_exactly_ctx_tokens_and_the_key_at_its_depth(tokenizer, ctx, depth):
    ids = build_prompt(tokenizer, ctx, depth, "48151")
    assert len(ids) == ctx
    assert ids[0] == tokenizer.bos_token_id
    text = tokenizer.decode(ids, skip_special_tokens=True)
    needle = NEEDLE.format(key="48151")
    assert text.startswith(TASK_DESCRIPTION) and text.count(needle) == 1 and text.endswith(QUESTION)
    filler = len(text) - len(TASK_DESCRIPTION) - len(needle) - len(QUESTION)  # byte tokenizer: 1 char = 1 token
    before = text.index(needle) - len(TASK_DESCRIPTION)
    assert abs(before / filler - depth) <= len(FILLER) / filler  # whole filler sentences: within one of them


def test_depth_orders_the_needle(tokenizer):
    places = [
        tokenizer.decode(build_prompt(tokenizer, 1000, d, "11111")).index("pass key is 11111") for d in (0, 0.5, 1)
    ]
    assert places[0] < places[1] < places[2]


def test_too_short_a_context_is_a_one_line_error(tokenizer):
    with pytest.raises(ValueError, match=r"ctx=100 is too short for a passkey prompt, which needs \d+ tokens"):
        build_prompt(tokenizer, 100, 0.5, "12345")


def test_keys_are_seeded_per_cell_and_trial():
    keys = [passkey(0, 4096, 0.5, trial, 5) for trial in range(20)]
    assert keys == [passkey(0, 4096, 0.5, trial, 5) for trial in range(20)]
    assert all(len(k) == 5 and k.isdigit() and k[0] != "0" for k in keys) and len(set(keys)) > 15
    assert passkey(1, 4096, 0.5, 0, 5) != passkey(0, 4096, 0.5, 0, 5) or passkey(1, 4096, 0.5, 1, 5) != keys[1]
    assert len(passkey(0, 8, 0.0, 0, 9)) == 9


@pytest.mark.parametrize(
    ("text", "number"), [(" 12345. Remember", "12345"), ("is 0042", "0042"), ("no idea", None), ("1234 5", "1234")]
)
def test_first_number(text, number):
    assert first_number(text) == number


class ReadingModel(torch.nn.Module):
    """A stand-in model that answers with the key it finds in the prompt (or a wrong one past ``blind_after``)."""

    def __init__(self, tokenizer, blind_after: int):
        super().__init__()
        self.tokenizer, self.blind_after = tokenizer, blind_after
        self.embed = torch.nn.Embedding(2, 2)
        self.generation_config = GenerationConfig()
        self.prompt_lengths = []

    def get_input_embeddings(self):
        return self.embed

    def generate(self, input_ids, attention_mask, do_sample, **settings):
        assert do_sample is False and attention_mask.shape == input_ids.shape
        outputs = []
        for ids in input_ids:
            self.prompt_lengths.append(len(ids))
            key = re.search(r"pass key is (\d+)", self.tokenizer.decode(ids)).group(1)
            answer = key if len(ids) <= self.blind_after else "99999"
            outputs.append(ids.tolist() + self.tokenizer(f" {answer}. Remember", add_special_tokens=False)["input_ids"])
        return torch.tensor(outputs)


def _env(model, tokenizer, tmp_path, **task):
    cfg = OmegaConf.merge(OmegaConf.structured(PasskeyConfig), task)
    return TaskEnv(model, tokenizer, cfg, None, tmp_path, seed=3, progress=False)


def test_accuracy_is_exact_match_of_the_key(tokenizer, tmp_path):
    model = ReadingModel(tokenizer, blind_after=512)
    env = _env(model, tokenizer, tmp_path, trials=3)
    cells = TASK.cells(env.cfg, [512, 1024])
    assert len(cells) == 10 and cells[0] == {"ctx": 512, "depth": 0.0}
    (near,) = TASK.measure(env, {"ctx": 512, "depth": 0.5})
    (far,) = TASK.measure(env, {"ctx": 1024, "depth": 0.5})
    assert (near["accuracy"], near["correct"], near["trials"]) == (1.0, 3, 3)
    assert (far["accuracy"], far["correct"]) == (0.0, 0)
    assert near["keys"] == [passkey(3, 512, 0.5, t, 5) for t in range(3)]
    assert model.prompt_lengths == [512] * 3 + [1024] * 3


def test_greedy_run_through_a_real_model(tmp_path):
    model, tokenizer = load_model(OmegaConf.load(ROOT / "conf/model/tiny_random.yaml"), attention="sdpa")
    env = _env(model, tokenizer, tmp_path, trials=2, max_new_tokens=4)
    first = TASK.measure(env, {"ctx": 300, "depth": 0.25})
    again = TASK.measure(env, {"ctx": 300, "depth": 0.25})
    assert first == again  # greedy decoding and seeded keys: reproducible
    row = first[0]
    assert row["trials"] == 2 and 0.0 <= row["accuracy"] <= 1.0 and len(row["outputs"]) == 2


def test_batches_give_the_same_answers_as_one_prompt_at_a_time(tmp_path):
    model, tokenizer = load_model(OmegaConf.load(ROOT / "conf/model/tiny_random.yaml"), attention="sdpa")
    enhance_long.apply(model, rope="consistent_ntk", bucket=8)
    one = TASK.measure(_env(model, tokenizer, tmp_path, trials=4, max_new_tokens=6), {"ctx": 300, "depth": 0.5})
    batched = _env(model, tokenizer, tmp_path, trials=4, max_new_tokens=6, batch_size=3)
    assert TASK.measure(batched, {"ctx": 300, "depth": 0.5}) == one
