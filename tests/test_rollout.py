# pytest tests/test_rollout.py -q
"""Sampling loop and batch layout, on the tiny random model (offline)."""

from __future__ import annotations

import pytest
import torch

from pmd.models import load_model_and_tokenizer
from pmd.rollout import SamplingCopy, _decode, _sample, completion_logits, generate, nucleus, pack, sample_seed


def tiny():
    return load_model_and_tokenizer("tiny-random", dtype=torch.float32)


def hf_greedy(model, prompt, max_new, eos):
    out = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=max_new, do_sample=False,
                         eos_token_id=eos, pad_token_id=0)[0, len(prompt):].tolist()
    return out[:out.index(eos) + 1] if eos in out else out


def test_greedy_decode_matches_generate_with_rows_stopping_early():
    model, tok = tiny()
    prompts = [tok(t)["input_ids"] for t in ["12 + 7 =", "a much longer prompt here: 3 + 4 =", "x", "99-1"]]
    # pick as EOS a token that some rows emit early, so rows leave the batch at different steps
    free_run = [hf_greedy(model, p, 12, eos=-1) for p in prompts]
    eos = free_run[0][3]
    ids, done = _decode(model, prompts, tok.pad_token_id, {eos}, max_new_tokens=12, temperature=1.0, top_p=1.0,
                        greedy=True)
    expected = [hf_greedy(model, p, 12, eos) for p in prompts]
    assert ids == expected
    assert done == [eos in e for e in expected] and any(done) and not all(len(e) == 12 for e in expected)


def test_sampling_is_seeded():
    model, tok = tiny()
    prompts = [tok("5 + 5 =")["input_ids"]] * 4
    seeds = [sample_seed("test", i) for i in range(4)]
    runs = [_decode(model, prompts, tok.pad_token_id, {tok.eos_token_id}, max_new_tokens=8, temperature=1.0,
                    top_p=1.0, greedy=False, seeds=seeds)[0] for _ in range(2)]
    assert runs[0] == runs[1]
    assert len({tuple(r) for r in runs[0]}) > 1  # one stream per row: the same prompt gets different samples


def test_a_row_samples_the_same_tokens_alone_or_in_any_batch():
    """Each row draws from its own generator, so batching (and hence sharding rows across processes) does not
    change what it samples: the padding and batch shape move float32 logits only by rounding."""
    model, tok = tiny()
    texts = ["12 + 7 =", "a much longer prompt here: 3 + 4 =", "x", "99-1", "5 + 5 =", "7 * 8 = ?"]
    prompts = [tok(t)["input_ids"] for t in texts]
    seeds = [sample_seed("rollout", 0, 1, i, 0) for i in range(len(prompts))]
    digits = {tok(d)["input_ids"][0] for d in "0123456789"}  # rows stop at a digit: they leave the batch early
    options = dict(max_new_tokens=16, temperature=1.0, top_p=0.95, greedy=False, stop_ids=digits)
    together, done = generate(model, tok, prompts, batch_size=8, seeds=seeds, **options)
    alone = [generate(model, tok, [p], batch_size=1, seeds=[s], **options)[0][0] for p, s in zip(prompts, seeds)]
    backwards, _ = generate(model, tok, prompts[::-1], batch_size=4, seeds=seeds[::-1], **options)
    assert together == alone == backwards[::-1]
    assert any(done) and not all(done)  # rows left the batch at different steps


def test_repeated_prompts_are_encoded_once_with_the_same_result(monkeypatch):
    """A group's G copies of a prompt are prefilled once (batch 1) and their keys/values copied to the G rows;
    the cache and first logits equal those of the batched, left-padded prefill, so greedy decoding is equal."""
    import pmd.rollout

    model, tok = tiny()
    texts = ["12 + 7 =", "a much longer prompt here: 3 + 4 =", "x"]
    prompts = [tok(t)["input_ids"] for t in texts for _ in range(3)]
    b, P = len(prompts), max(len(p) for p in prompts)
    mask = torch.zeros(b, P, dtype=torch.long)
    for i, p in enumerate(prompts):
        mask[i, P - len(p):] = 1
    forwards = []
    real_forward = model.forward
    monkeypatch.setattr(model, "forward", lambda **kw: forwards.append(kw["input_ids"].shape) or real_forward(**kw))
    shared_cache, shared_logits = pmd.rollout._prefill(model, prompts, tok.pad_token_id, mask)
    assert forwards == [(1, len(tok(t)["input_ids"])) for t in texts]  # one batch-1 forward per distinct prompt
    # the reference: one batched forward over the left-padded prompts
    ids = torch.full((b, P), tok.pad_token_id)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = torch.tensor(p)
    out = real_forward(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                       use_cache=True, logits_to_keep=1)
    torch.testing.assert_close(shared_logits, out.logits[:, -1], atol=1e-5, rtol=1e-4)
    for shared, packed in zip(shared_cache.layers, out.cache.layers):
        real = mask.bool()  # padded positions differ (zeros vs pad-token states) and are never attended
        torch.testing.assert_close(shared.keys.transpose(1, 2)[real], packed.keys.transpose(1, 2)[real],
                                   atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(shared.values.transpose(1, 2)[real], packed.values.transpose(1, 2)[real],
                                   atol=1e-5, rtol=1e-4)
    ids_shared, _ = _decode(model, prompts, tok.pad_token_id, {tok.eos_token_id}, max_new_tokens=8,
                            temperature=1.0, top_p=1.0, greedy=True)
    assert ids_shared == [hf_greedy(model, p, 8, tok.eos_token_id) for p in prompts]


def test_prompt_cache_runs_only_the_new_tokens_of_a_longer_prompt(monkeypatch):
    """The reflector's second field extends its first prompt: with a prompt cache only the new tokens run, and
    the completions equal those computed from scratch."""
    model, tok = tiny()
    first = [tok(t)["input_ids"] for t in ["Reflect on 12 + 7 = 19. STRATEGY:", "x y z. STRATEGY:"]]
    second = [p + tok(" add the ones first. LESSON:")["input_ids"] for p in first]
    options = dict(max_new_tokens=6, temperature=1.0, top_p=1.0, greedy=True, batch_size=8)
    plain = [generate(model, tok, prompts, **options)[0] for prompts in (first, second)]
    kept = {}
    cached = [generate(model, tok, first, prompt_cache=kept, **options)[0]]
    prefills = []
    real_forward = model.forward
    monkeypatch.setattr(model, "forward", lambda **kw: (kw["input_ids"].shape[1] > 1 and prefills.append(
        tuple(kw["input_ids"].shape))) or real_forward(**kw))
    cached.append(generate(model, tok, second, prompt_cache=kept, **options)[0])
    assert cached == plain
    assert set(kept) == {tuple(p) for p in first + second}
    # the second call ran, per prompt, only the tokens its first prompt did not have
    assert prefills == [(1, len(b) - len(a)) for a, b in zip(first, second)]


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    n = 4000
    draws = _sample(probs.log().expand(n, -1), 1.0, 1.0, greedy=False,
                    generators=[torch.Generator().manual_seed(i) for i in range(n)])
    assert torch.allclose(torch.bincount(draws, minlength=4) / n, probs, atol=0.03)


def test_tokens_of_negligible_probability_are_never_sampled_from_a_large_vocabulary():
    # A float32 uniform is exactly 0 with probability 2**-24; over a 151k-token vocabulary that happens once
    # in ~110 draws. A clock E = -log1p(-U) = 0 there once made a token of probability 1e-30 win the race,
    # so about one token in a hundred was junk (a stray Thai or Cyrillic token inside generated code).
    V, n, chunk = 151_936, 1500, 100  # chunks of rows keep the peak memory small; each row has its own generator
    logits = torch.full((chunk, V), -80.0)
    logits[:, :3] = torch.tensor([2.0, 1.0, 0.0])
    draws = torch.cat([_sample(logits, 1.0, 1.0, greedy=False,
                               generators=[torch.Generator().manual_seed(i) for i in range(start, start + chunk)])
                       for start in range(0, n, chunk)])
    assert int((draws >= 3).sum()) == 0
    assert set(draws.tolist()) == {0, 1, 2}


def test_top_p_keeps_the_smallest_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    draws = {int(_sample(logits, 1.0, 0.7, greedy=False, generators=[torch.Generator().manual_seed(i)]))
             for i in range(300)}
    assert draws == {0, 1}  # 0.5 alone < 0.7, 0.5 + 0.3 >= 0.7
    assert int(_sample(logits, 1.0, 1.0, greedy=True)) == 0


def test_pack_aligns_completions_and_scores_them():
    model, tok = tiny()
    prompts, completions = [[5, 6, 7], [8]], [[9, 10], [11, 12, 13]]
    batch = pack(prompts, completions, pad_id=0)
    assert batch.completion_ids.tolist() == [[9, 10, 0], [11, 12, 13]]
    assert batch.completion_mask.tolist() == [[1, 1, 0], [1, 1, 1]]
    logits = completion_logits(model, batch)
    # row 1 alone, unpadded: the same logits for its completion tokens
    alone = model(input_ids=torch.tensor([[8, 11, 12, 13]])).logits[0, :-1]
    assert torch.allclose(logits[1], alone, atol=1e-5)


def test_sampling_copy_matches_the_lora_policy():
    from peft import LoraConfig, get_peft_model

    model, tok = tiny()
    copy = SamplingCopy(model)
    policy = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)
    copy.sync(policy)
    x = torch.randint(4, 100, (2, 9))
    assert torch.allclose(policy(input_ids=x).logits, copy.model(input_ids=x).logits, atol=1e-4)


def test_sampling_copy_keeps_float32_buffers():
    """Casting the copy to bf16 would round the rotary frequencies and change every logit."""
    model, _ = load_model_and_tokenizer("tiny-random", dtype=torch.bfloat16)
    copy = SamplingCopy(model)
    buffers = dict(copy.model.named_buffers())
    for name, b in model.named_buffers():
        assert b.dtype == buffers[name].dtype and torch.equal(b, buffers[name]), name
    x = torch.randint(4, 100, (2, 9))
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, copy.model(input_ids=x).logits)


def full_sort_nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Reference: sort every row in full, keep a token while the mass before it is <= top_p."""
    ordered, order = probs.sort(dim=-1, descending=True)
    ordered = ordered.masked_fill(ordered.cumsum(-1) - ordered > top_p, 0.0)
    return torch.zeros_like(probs).scatter_(-1, order, ordered)


@pytest.mark.parametrize("vocab", [7, 64, 5000])
def test_the_nucleus_from_candidates_equals_the_full_sort(vocab):
    """Peaked rows (nucleus within the candidates) and flat ones (it reaches past them: the full-sort fallback),
    mixed in one batch."""
    generator = torch.Generator().manual_seed(vocab)
    logits = torch.randn(24, vocab, generator=generator)
    logits[:12] *= 12.0  # peaked
    logits[20:] = 0.01 * logits[20:]  # nearly uniform
    probs = torch.softmax(logits, dim=-1)
    for top_p in (0.1, 0.5, 0.95, 0.999):
        got = nucleus(probs, top_p, candidates=16)
        assert torch.equal(got, full_sort_nucleus(probs, top_p))
        assert ((got > 0).sum(-1) >= 1).all()
