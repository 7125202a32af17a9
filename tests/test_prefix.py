# pytest tests/test_prefix.py -q
"""Prefix-shared teacher forward (pmd.prefix) against the packed forward (pmd.rollout), on tiny-random."""

from __future__ import annotations

import functools

import pytest
import torch

from pmd.config import Config
from pmd.models import load_model_and_tokenizer
from pmd.prefix import (PrefixState, encode_prefix, grouped_prefix_completion_logits,
                        shared_prefix_completion_logits, tokens_fed)
from pmd.rollout import completion_logits, pack
from pmd.teacher import TeacherWeights
from pmd.loop import prepare_for_training

PAD = 0
FP32_ATOL = 1e-4
BF16_ATOL = 0.05  # on log-probs; measured max |diff| 0.0076 (fp32 logits: 1.1e-6)


@pytest.fixture(scope="module")
def model():
    m, _ = load_model_and_tokenizer("tiny-random", dtype=torch.float32)
    return m


def rand_ids(n: int, seed: int, vocab: int = 101) -> list[int]:
    return torch.randint(4, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def packed(forward, prefixes, completions, temperature=1.0):
    with torch.no_grad():
        return completion_logits(forward, pack(prefixes, completions, PAD), temperature)


def assert_close_on_tokens(got, want, completions, atol, logprobs=False):
    """Same shape, and close on every real completion token (padding columns are meaningless)."""
    assert got.shape == want.shape
    worst = 0.0
    for i, c in enumerate(completions):
        n = max(1, len(c))
        a, b = got[i, :n].float(), want[i, :n].float()
        if logprobs:
            a, b = a.log_softmax(-1), b.log_softmax(-1)
        worst = max(worst, (a - b).abs().max().item())
    assert worst <= atol, worst
    return worst


def test_shared_matches_packed_with_padding_and_temperature(model):
    prefix = rand_ids(40, 1)
    completions = [rand_ids(n, 10 + n) for n in (6, 1, 11, 3, 11, 8, 2, 9)]  # G=8, ragged
    with torch.no_grad():
        got = shared_prefix_completion_logits(model, prefix, completions, PAD, temperature=0.7)
    want = packed(model, [prefix] * 8, completions, temperature=0.7)
    assert_close_on_tokens(got, want, completions, FP32_ATOL)


@pytest.mark.parametrize("lengths", [(7,), (1,), (1, 1, 1)])
def test_single_row_and_one_token_completions(model, lengths):
    prefix = rand_ids(23, 2)
    completions = [rand_ids(n, 30 + i) for i, n in enumerate(lengths)]
    with torch.no_grad():
        got = shared_prefix_completion_logits(model, prefix, completions, PAD)
    want = packed(model, [prefix] * len(completions), completions)
    assert_close_on_tokens(got, want, completions, FP32_ATOL)


def test_repeated_calls_reuse_the_prefix_without_changing_it(model):
    prefix = rand_ids(31, 3)
    with torch.no_grad():
        state = encode_prefix(model, prefix)
        keys_before = [k.clone() for k in state.keys]
        first = shared_prefix_completion_logits(model, prefix, [rand_ids(5, 4), rand_ids(9, 5)], PAD, cache=state)
        # a different batch size and length in between must not leave anything behind
        shared_prefix_completion_logits(model, prefix, [rand_ids(12, 6)] * 3, PAD, cache=state)
        second = shared_prefix_completion_logits(model, prefix, [rand_ids(5, 4), rand_ids(9, 5)], PAD, cache=state)
        fresh = shared_prefix_completion_logits(model, prefix, [rand_ids(5, 4), rand_ids(9, 5)], PAD)
    assert torch.equal(first, second) and torch.equal(first, fresh)
    assert state.length == 31 and all(k.shape[2] == 31 for k in state.keys)
    assert all(torch.equal(a, b) for a, b in zip(keys_before, state.keys))
    with pytest.raises(ValueError):
        shared_prefix_completion_logits(model, prefix[:-1], [[5]], PAD, cache=state)


def test_grouped_prefixes_in_mixed_order(model):
    a, b, c, lone = rand_ids(30, 7), rand_ids(45, 8), rand_ids(12, 9), rand_ids(20, 10)
    prefixes = [a, b, a, c, b, lone, a, c, b]  # three shared prefixes (lengths differ) and one single row
    completions = [rand_ids(n, 50 + i) for i, n in enumerate((4, 9, 1, 6, 3, 7, 10, 2, 5))]
    with torch.no_grad():
        got = grouped_prefix_completion_logits(model, prefixes, completions, PAD, temperature=1.3)
    want = packed(model, prefixes, completions, temperature=1.3)
    assert_close_on_tokens(got, want, completions, FP32_ATOL)


def test_grouped_states_carry_a_prefix_across_micro_batches(model):
    a, b = rand_ids(25, 11), rand_ids(18, 12)
    completions = [rand_ids(n, 70 + i) for i, n in enumerate((5, 8, 3, 6))]
    states: dict = {}
    with torch.no_grad():
        first = grouped_prefix_completion_logits(model, [a, a, b], completions[:3], PAD, states=states)
        second = grouped_prefix_completion_logits(model, [a], completions[3:], PAD, states=states)  # 1 row, reused
    assert set(states) == {tuple(a)}  # b had one row: packed path, nothing encoded
    assert_close_on_tokens(first, packed(model, [a, a, b], completions[:3]), completions[:3], FP32_ATOL)
    assert_close_on_tokens(second, packed(model, [a], completions[3:]), completions[3:], FP32_ATOL)


def test_unshareable_cache_falls_back_to_the_packed_forward(model):
    prefix, completions = rand_ids(15, 13), [rand_ids(4, 14), rand_ids(6, 15)]
    with torch.no_grad():
        state = encode_prefix(model, prefix)
        plain = PrefixState(state.prefix_ids, state.last_logits, None, None)
        got = shared_prefix_completion_logits(model, prefix, completions, PAD, cache=plain)
    assert torch.equal(got, packed(model, [prefix] * 2, completions))


def test_lora_model_with_ema_teacher_weights(model):
    import copy

    peft_model = prepare_for_training(copy.deepcopy(model), Config())
    with torch.no_grad():
        torch.manual_seed(0)
        for n, p in peft_model.named_parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn_like(p))  # lora_B starts at 0: make the adapters matter
        teacher = TeacherWeights(peft_model, kind="ema", update_rate=0.5)
        for n, p in peft_model.named_parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn_like(p))
        teacher.update(peft_model)  # teacher = halfway: different from the live adapters
    forward = functools.partial(teacher.forward, peft_model)
    prefix = rand_ids(33, 16)
    completions = [rand_ids(n, 90 + i) for i, n in enumerate((5, 9, 2, 7))]
    with torch.no_grad():
        got = shared_prefix_completion_logits(forward, prefix, completions, PAD)
        grouped = grouped_prefix_completion_logits(forward, [prefix] * 4, completions, PAD)
    want = packed(forward, [prefix] * 4, completions)
    assert_close_on_tokens(got, want, completions, FP32_ATOL)
    assert torch.equal(got, grouped)
    live = packed(peft_model, [prefix] * 4, completions)
    assert (live[0, :5] - want[0, :5]).abs().max() > 1e-3  # the swapped weights were really used


def test_bf16_autocast_within_tolerance(model):
    """bf16 weights under bf16 autocast, as pmd trains: compare log-probs. Measured max |diff| 0.0076."""
    import copy

    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    prefix = rand_ids(60, 17)
    completions = [rand_ids(n, 110 + i) for i, n in enumerate((12, 3, 8, 12, 1, 6, 10, 5))]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = shared_prefix_completion_logits(bf16, prefix, completions, PAD)
        want = completion_logits(bf16, pack([prefix] * 8, completions, PAD))
    worst = assert_close_on_tokens(got, want, completions, BF16_ATOL, logprobs=True)
    print(f"bf16 max |logprob diff| = {worst:.4f}")


def test_tokens_fed():
    assert tokens_fed(100, [3, 5, 1], shared=False) == 3 * 105
    assert tokens_fed(100, [3, 5, 1], shared=True) == 100 + 3 * 4
