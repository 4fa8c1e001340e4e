"""Greedy generation for the generation tasks: the same tokens as greedy decoding without a cache, whatever the
batch size, for the stock model and a patched one."""

import pytest
import torch
from conftest import TRAIN_LEN, tiny_model

import enhance_long
from enhance_long.tasks.generation import greedy, leading_special


def greedy_without_cache(model, ids, max_new_tokens, eos):
    ids = list(ids)
    start = len(ids)
    for _ in range(max_new_tokens):
        with torch.no_grad():
            token = int(model(torch.tensor([ids]), use_cache=False).logits[0, -1].argmax())
        ids.append(token)
        if token == eos:
            break
    return ids[start:]


def prompts(count: int = 5):
    g = torch.Generator().manual_seed(2)
    return [torch.randint(3, 97, (TRAIN_LEN - 5 + 7 * i,), generator=g).tolist() for i in range(count)]


@pytest.mark.parametrize("rope", ["none", "consistent_ntk", "self_extend"])
def test_batched_greedy_generation_equals_greedy_decoding_without_cache_at_any_batch_size(rope, tokenizer):
    model = enhance_long.apply(tiny_model(vocab_size=259, bos_token_id=1, eos_token_id=2), rope=rope, logn=True)
    eos = 70  # a token the random model emits now and then, so some rows stop early (at different steps)
    expected = [greedy_without_cache(model, ids, 2 * TRAIN_LEN, eos) for ids in prompts()]
    for batch_size in (1, 2, 5):
        got = greedy(
            model, tokenizer, prompts(), 2 * TRAIN_LEN, batch_size=batch_size, eos_token_id=eos, progress=False
        )
        assert got == expected, batch_size


def test_min_new_tokens_and_a_bad_batch_size(tokenizer):
    model = tiny_model(vocab_size=259, bos_token_id=1, eos_token_id=2)
    first = greedy_without_cache(model, prompts(1)[0], 1, eos=None)[0]
    assert len(greedy(model, tokenizer, prompts(1), 8, eos_token_id=first, min_new_tokens=3, progress=False)[0]) >= 3
    with pytest.raises(ValueError, match="task.batch_size=0 is invalid; it must be an integer >= 1"):
        greedy(model, tokenizer, prompts(1), 8, batch_size=0)


def test_leading_special_is_the_tokenizers_bos(tokenizer):
    assert leading_special(tokenizer) == [tokenizer.bos_token_id]


def shared_prompts(count: int = 4):
    g = torch.Generator().manual_seed(4)
    head = torch.randint(3, 97, (2 * TRAIN_LEN,), generator=g).tolist()  # past T: the prefix is scored past it too
    return [head + torch.randint(3, 97, (9,), generator=g).tolist() for _ in range(count)]


@pytest.mark.parametrize("rope", ["none", "consistent_ntk", "self_extend", "dynamic_ntk"])
def test_a_shared_prefix_is_prefilled_once_where_that_is_exact_and_changes_no_answer(rope, tokenizer):
    model = enhance_long.apply(tiny_model(vocab_size=259, bos_token_id=1, eos_token_id=2), rope=rope, logn=True)
    fed = []
    model.model.register_forward_pre_hook(lambda m, a, k: fed.append(k["input_ids"].numel()), with_kwargs=True)
    expected = greedy(model, tokenizer, shared_prompts(), 12, progress=False)
    full = sum(fed)
    for batch_size in (1, 2):
        fed.clear()
        got = greedy(model, tokenizer, shared_prompts(), 12, batch_size=batch_size, reuse_prefix=True, progress=False)
        assert got == expected, batch_size
        if batch_size == 1:  # the prefix went through once instead of four times (not at all where inexact)
            assert full - sum(fed) == (0 if rope == "dynamic_ntk" else 3 * 2 * TRAIN_LEN), rope
