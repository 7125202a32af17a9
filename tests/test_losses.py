# Run: python -m pytest tests/test_losses.py -q
"""Tests for pmd.losses: hand-written references, properties, and TRL's SDPO helpers as an independent oracle."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch

from pmd import losses as L

VOCAB = 50


@pytest.fixture(scope="module")
def trl_sdpo():
    """TRL's SDPO loss helpers (test-only dependency)."""
    return pytest.importorskip("trl.experimental.sdpo.loss_utils")


def _logits(*shape, scale=3.0, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen) * scale).to(dtype)


def _pair(seed=0, shape=(2, 5, VOCAB)):
    return _logits(*shape, seed=seed), _logits(*shape, seed=seed + 100)


# --------------------------------------------------------------------------------------------------------------------
# top-k divergence vs TRL
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("add_tail", [True, False])
@pytest.mark.parametrize("topk", [1, 5, 20])
def test_topk_divergence_matches_trl(trl_sdpo, alpha, add_tail, topk):
    student, teacher = _pair(seed=topk)
    s_ours = student.clone().requires_grad_(True)
    t_ours = teacher.clone().requires_grad_(True)
    s_ref = student.clone().requires_grad_(True)
    t_ref = teacher.clone().requires_grad_(True)

    ours = L.topk_divergence(s_ours, t_ours, topk=topk, alpha=alpha, add_tail=add_tail)
    ref = trl_sdpo.compute_topk_self_distillation_loss(
        s_ref, t_ref, distillation_topk=topk, distillation_alpha=alpha, distillation_add_tail=add_tail
    )
    assert ours.shape == (2, 5)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)

    weights = torch.rand(2, 5, generator=torch.Generator().manual_seed(7))
    (ours * weights).sum().backward()
    (ref * weights).sum().backward()
    torch.testing.assert_close(s_ours.grad, s_ref.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(t_ours.grad, t_ref.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("topk", [None, VOCAB, VOCAB + 7])
def test_full_vocab_matches_trl_full_logits(trl_sdpo, alpha, topk):
    student, teacher = _pair(seed=3)
    s_ours = student.clone().requires_grad_(True)
    s_ref = student.clone().requires_grad_(True)
    for add_tail in (True, False):  # irrelevant for the full vocabulary; must not NaN
        s_ours.grad = None
        s_ref.grad = None
        ours = L.topk_divergence(s_ours, teacher, topk=topk, alpha=alpha, add_tail=add_tail)
        ref = trl_sdpo.compute_full_logit_self_distillation_loss(s_ref, teacher, distillation_alpha=alpha)
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
        ours.sum().backward()
        ref.sum().backward()
        assert torch.isfinite(s_ours.grad).all()
        torch.testing.assert_close(s_ours.grad, s_ref.grad, rtol=1e-4, atol=1e-6)


def _tie_free_bf16_logits(shape, seed):
    """bf16 logits with distinct values per row (multiples of 1/8, exact in bf16), so top-k has no ties."""
    gen = torch.Generator().manual_seed(seed)
    rows = [torch.randperm(shape[-1], generator=gen) for _ in range(math.prod(shape[:-1]))]
    values = (torch.stack(rows).float() - shape[-1] / 2) * 0.125
    return values.reshape(shape).to(torch.bfloat16)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("add_tail", [True, False])
def test_topk_divergence_bf16(trl_sdpo, alpha, add_tail):
    shape = (2, 5, VOCAB)
    student = _tie_free_bf16_logits(shape, seed=1)
    teacher = _logits(*shape, seed=2, dtype=torch.bfloat16)
    kwargs = dict(distillation_topk=10, distillation_alpha=alpha, distillation_add_tail=add_tail)

    s_bf16 = student.clone().requires_grad_(True)
    ours = L.topk_divergence(s_bf16, teacher, topk=10, alpha=alpha, add_tail=add_tail)
    assert ours.dtype == torch.float32  # computed in fp32

    # Same values upcast: our bf16 path is exactly the fp32 computation.
    s_fp32 = student.float().requires_grad_(True)
    ref_fp32 = trl_sdpo.compute_topk_self_distillation_loss(s_fp32, teacher.float(), **kwargs)
    torch.testing.assert_close(ours, ref_fp32, rtol=1e-5, atol=1e-6)

    ours.sum().backward()
    ref_fp32.sum().backward()
    assert s_bf16.grad.dtype == torch.bfloat16
    torch.testing.assert_close(s_bf16.grad.float(), s_fp32.grad, rtol=2e-2, atol=1e-3)

    # TRL itself computes in bf16: close, not equal.
    ref_bf16 = trl_sdpo.compute_topk_self_distillation_loss(student, teacher, **kwargs)
    torch.testing.assert_close(ours, ref_bf16.float(), rtol=5e-2, atol=2e-2)


def test_composable_pieces_equal_topk_divergence():
    student, teacher = _pair(seed=11)
    student.requires_grad_(True)
    for alpha in (0.0, 0.3, 1.0):
        for add_tail in (True, False):
            ids_K, student_logp_K = L.topk_support(student, 8)
            with torch.no_grad():  # the trainer keeps only [.., K] of the teacher
                teacher_logp_K = L.gather_logprobs(teacher, ids_K)
            piecewise = L.divergence_on_support(student_logp_K, teacher_logp_K, alpha=alpha, add_tail=add_tail)
            direct = L.topk_divergence(student, teacher, topk=8, alpha=alpha, add_tail=add_tail)
            torch.testing.assert_close(piecewise, direct, rtol=0, atol=0)
            g1 = torch.autograd.grad(piecewise.sum(), student)[0]
            g2 = torch.autograd.grad(direct.sum(), student)[0]
            torch.testing.assert_close(g1, g2, rtol=0, atol=0)


@pytest.mark.parametrize("alpha", [0.0, 0.4, 1.0])
@pytest.mark.parametrize("add_tail", [True, False])
def test_gradcheck_float64(alpha, add_tail):
    student = _logits(2, 2, 8, seed=15).double().requires_grad_(True)
    teacher = _logits(2, 2, 8, seed=16).double().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda s, t: L.topk_divergence(s, t, topk=3, alpha=alpha, add_tail=add_tail), (student, teacher)
    )


def test_topk_support_and_gather():
    student, teacher = _pair(seed=5)
    ids_K, logp_K = L.topk_support(student, 4)
    assert ids_K.shape == logp_K.shape == (2, 5, 4)
    assert not ids_K.requires_grad
    expected_ids = student.topk(4, dim=-1).indices
    assert torch.equal(ids_K, expected_ids)
    torch.testing.assert_close(logp_K, student.log_softmax(-1).gather(-1, expected_ids))
    torch.testing.assert_close(L.gather_logprobs(teacher, ids_K), teacher.log_softmax(-1).gather(-1, ids_K))
    # captured mass <= 1
    assert (logp_K.logsumexp(-1) <= 1e-6).all()

    ids_V, logp_V = L.topk_support(student, None)
    assert ids_V.shape == (2, 5, VOCAB)
    torch.testing.assert_close(logp_V, student.log_softmax(-1))
    with pytest.raises(ValueError):
        L.topk_support(student, 0)


# --------------------------------------------------------------------------------------------------------------------
# hand-written references on tiny distributions
# --------------------------------------------------------------------------------------------------------------------

P_S = [0.5, 0.3, 0.2]
P_T = [0.2, 0.5, 0.3]


def _kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def _logits_of(p):
    return torch.tensor([math.log(x) for x in p], dtype=torch.float64) + 1.234  # shift: logits, not log-probs


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0, 0.3])
def test_hand_reference_full_vocab(alpha):
    if alpha == 0.0:
        expected = _kl(P_T, P_S)
    elif alpha == 1.0:
        expected = _kl(P_S, P_T)
    else:
        mix = [(1 - alpha) * s + alpha * t for s, t in zip(P_S, P_T)]
        expected = (1 - alpha) * _kl(P_S, mix) + alpha * _kl(P_T, mix)
    got = L.topk_divergence(_logits_of(P_S), _logits_of(P_T), topk=None, alpha=alpha)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(expected, rel=1e-10, abs=1e-12)
    # float32 path
    got32 = L.topk_divergence(_logits_of(P_S).float(), _logits_of(P_T).float(), topk=None, alpha=alpha)
    assert got32.item() == pytest.approx(expected, rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_hand_reference_top2(alpha):
    # student's top-2 are ids 0, 1
    tail_s = [0.5, 0.3, 0.2]
    tail_t = [0.2, 0.5, 0.3]  # teacher mass on ids 0, 1 and the rest
    renorm_s = [0.5 / 0.8, 0.3 / 0.8]
    renorm_t = [0.2 / 0.7, 0.5 / 0.7]

    def jsd(p, q):
        if alpha == 0.0:
            return _kl(q, p)
        if alpha == 1.0:
            return _kl(p, q)
        mix = [(1 - alpha) * a + alpha * b for a, b in zip(p, q)]
        return (1 - alpha) * _kl(p, mix) + alpha * _kl(q, mix)

    s, t = _logits_of(P_S), _logits_of(P_T)
    with_tail = L.topk_divergence(s, t, topk=2, alpha=alpha, add_tail=True)
    without_tail = L.topk_divergence(s, t, topk=2, alpha=alpha, add_tail=False)
    assert with_tail.item() == pytest.approx(jsd(tail_s, tail_t), rel=1e-9)
    assert without_tail.item() == pytest.approx(jsd(renorm_s, renorm_t), rel=1e-9)


def test_add_tail_bucket_by_hand():
    logp = torch.log(torch.tensor([[0.5, 0.3], [0.6, 0.4]], dtype=torch.float64))
    out = L.add_tail_bucket(logp)
    assert out.shape == (2, 3)
    torch.testing.assert_close(out.exp(), torch.tensor([[0.5, 0.3, 0.2], [0.6, 0.4, 1e-7]], dtype=torch.float64))


# --------------------------------------------------------------------------------------------------------------------
# properties
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.0, 0.25, 0.5, 1.0])
@pytest.mark.parametrize("topk,add_tail", [(None, True), (5, True), (5, False), (30, True)])
def test_nonnegative_and_zero_on_equal(alpha, topk, add_tail):
    student, teacher = _pair(seed=21)
    d = L.topk_divergence(student, teacher, topk=topk, alpha=alpha, add_tail=add_tail)
    assert (d >= -1e-6).all()
    assert (d > 1e-4).any()
    same = L.topk_divergence(student, student.clone(), topk=topk, alpha=alpha, add_tail=add_tail)
    torch.testing.assert_close(same, torch.zeros_like(same), rtol=0, atol=1e-6)
    # shifting logits by a per-row constant changes nothing
    shifted = L.topk_divergence(student + 5.0, teacher - 2.0, topk=topk, alpha=alpha, add_tail=add_tail)
    torch.testing.assert_close(shifted, d, rtol=1e-4, atol=1e-5)


def test_alpha_symmetries_full_vocab():
    student, teacher = _pair(seed=31)
    jsd_st = L.topk_divergence(student, teacher, topk=None, alpha=0.5)
    jsd_ts = L.topk_divergence(teacher, student, topk=None, alpha=0.5)
    torch.testing.assert_close(jsd_st, jsd_ts, rtol=1e-5, atol=1e-6)
    assert (jsd_st <= math.log(2) + 1e-6).all()  # JSD is bounded by log 2
    fwd = L.topk_divergence(student, teacher, topk=None, alpha=0.0)
    rev_swapped = L.topk_divergence(teacher, student, topk=None, alpha=1.0)
    torch.testing.assert_close(fwd, rev_swapped, rtol=1e-5, atol=1e-6)
    # generalized JSD with alpha, swapped arguments -> 1 - alpha
    a = L.generalized_jsd(student.log_softmax(-1), teacher.log_softmax(-1), 0.3)
    b = L.generalized_jsd(teacher.log_softmax(-1), student.log_softmax(-1), 0.7)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError):
        L.generalized_jsd(a, b, 1.5)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_finite_when_topk_holds_almost_all_mass(alpha):
    student = torch.full((2, 3, VOCAB), -40.0)
    student[..., :3] = torch.tensor([30.0, 29.0, 28.5])
    teacher = torch.full((2, 3, VOCAB), -40.0)
    teacher[..., :3] = torch.tensor([28.0, 30.0, 29.0])
    teacher[0, 0, :3] = torch.tensor([30.0, 29.0, 28.5])  # one position where they agree
    student.requires_grad_(True)
    for topk in (3, 4):
        d = L.topk_divergence(student, teacher, topk=topk, alpha=alpha, add_tail=True)
        assert torch.isfinite(d).all()
        assert d[0, 0].abs() < 1e-6
        (grad,) = torch.autograd.grad(d.sum(), student)
        assert torch.isfinite(grad).all()


@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_teacher_zero_probability_is_finite(alpha):
    """A teacher that masks some vocabulary entries with -inf: forward KL and JSD stay finite (0 log 0 = 0)."""
    student, teacher = _pair(seed=41)
    teacher[..., :10] = float("-inf")
    student.requires_grad_(True)
    for topk in (None, 15):
        d = L.topk_divergence(student, teacher, topk=topk, alpha=alpha, add_tail=True)
        assert torch.isfinite(d).all()
        (grad,) = torch.autograd.grad(d.sum(), student)
        assert torch.isfinite(grad).all()


# --------------------------------------------------------------------------------------------------------------------
# token log-probs
# --------------------------------------------------------------------------------------------------------------------


def test_token_logprobs_fp32_and_grad():
    logits = _logits(3, 4, VOCAB, seed=51).requires_grad_(True)
    ids = torch.randint(0, VOCAB, (3, 4), generator=torch.Generator().manual_seed(1))
    got = L.token_logprobs(logits, ids)
    ref = logits.log_softmax(-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(got, ref)
    g1 = torch.autograd.grad(got.sum(), logits)[0]
    g2 = torch.autograd.grad(ref.sum(), logits)[0]
    torch.testing.assert_close(g1, g2)


def test_token_logprobs_bf16_chunked(monkeypatch):
    monkeypatch.setattr(L, "_LSE_CHUNK_ELEMENTS", 2 * VOCAB + 3)  # force several chunks (2 rows each)
    logits = _logits(3, 5, VOCAB, seed=52, dtype=torch.bfloat16)
    ids = torch.randint(0, VOCAB, (3, 5), generator=torch.Generator().manual_seed(2))
    leaf = logits.clone().requires_grad_(True)
    got = L.token_logprobs(leaf, ids)
    assert got.dtype == torch.float32
    ref = logits.float().log_softmax(-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    got.sum().backward()
    assert leaf.grad.dtype == torch.bfloat16 and torch.isfinite(leaf.grad.float()).all()
    # gather_logprobs with K > 1 through the chunked path
    ids_K = torch.randint(0, VOCAB, (3, 5, 4), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(L.gather_logprobs(logits, ids_K), logits.float().log_softmax(-1).gather(-1, ids_K))


def test_trl_free_module():
    tree = ast.parse(Path(L.__file__).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            assert not any(a.name.split(".")[0] == "trl" for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert (node.module or "").split(".")[0] != "trl"


# --------------------------------------------------------------------------------------------------------------------
# importance sampling
# --------------------------------------------------------------------------------------------------------------------


def test_importance_weight_by_hand_and_vs_trl(trl_sdpo):
    log_ratio = torch.tensor([math.log(0.5), 0.0, math.log(1.5), math.log(3.0), 30.0, -50.0])
    old = torch.randn(6, generator=torch.Generator().manual_seed(0))
    logp = (old + log_ratio).requires_grad_(True)
    w = L.importance_weight(logp, old)
    assert not w.requires_grad and w.grad_fn is None
    expected = torch.tensor([0.5, 1.0, 1.5, 2.0, 2.0, math.exp(-20.0)])
    torch.testing.assert_close(w, expected, rtol=1e-5, atol=0)
    torch.testing.assert_close(L.importance_weight(logp, old, clip=None)[4], torch.tensor(math.exp(20.0)))

    per_token = torch.rand(6, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    ours = per_token * w
    ref = trl_sdpo.apply_importance_sampling_clipping(per_token, logp, old, 2.0)
    torch.testing.assert_close(ours, ref)
    # weight is a constant: gradient reaches only the per-token loss, never logp
    ours.sum().backward()
    torch.testing.assert_close(per_token.grad, expected, rtol=1e-5, atol=0)
    assert logp.grad is None


# --------------------------------------------------------------------------------------------------------------------
# GRPO
# --------------------------------------------------------------------------------------------------------------------


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 3.0])
    adv = L.group_advantages(rewards, 4)
    torch.testing.assert_close(adv, torch.tensor([0.5, -0.5, -0.5, 0.5, -0.75, -0.75, -0.75, 2.25]))
    torch.testing.assert_close(L.group_advantages(torch.ones(6), 3), torch.zeros(6))  # no std: flat stays 0
    torch.testing.assert_close(L.group_advantages(rewards, 1), torch.zeros(8))
    with pytest.raises(ValueError):
        L.group_advantages(rewards, 3)


def test_grpo_on_policy_is_policy_gradient():
    logits = _logits(3, 4, VOCAB, seed=61).requires_grad_(True)
    ids = torch.randint(0, VOCAB, (3, 4), generator=torch.Generator().manual_seed(4))
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    adv = torch.tensor([0.7, -1.2, 0.3])

    logp = L.token_logprobs(logits, ids)
    per_token = L.grpo_token_loss(logp, logp.detach(), adv)
    torch.testing.assert_close(per_token, -adv[:, None].expand(3, 4))  # ratio 1
    (grad,) = torch.autograd.grad(L.token_mean(per_token, mask), logits)

    logp2 = L.token_logprobs(logits, ids)
    pg = (-(adv[:, None] * logp2) * mask).sum() / mask.sum()
    (grad_ref,) = torch.autograd.grad(pg, logits)
    torch.testing.assert_close(grad, grad_ref)


def test_grpo_clipping_off_policy():
    # four tokens: (ratio, advantage) in the four quadrants
    ratios = torch.tensor([[1.5, 1.5, 0.5, 0.5]])
    adv_tok = torch.tensor([[1.0, -1.0, -1.0, 1.0]])
    logp = torch.zeros(1, 4, requires_grad=True)
    old = logp.detach() - ratios.log()
    per_token = L.grpo_token_loss(logp, old, adv_tok)
    torch.testing.assert_close(per_token, torch.tensor([[-1.28, 1.5, 0.8, -0.5]]))
    per_token.sum().backward()
    # d/dlogp of -r*A is -r*A where unclipped; 0 where the clipped branch is active
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, 1.5, 0.0, -0.5]]))

    frac = L.grpo_clip_fraction(logp, old, adv_tok, torch.ones(1, 4))
    assert frac.item() == pytest.approx(0.5)
    assert L.grpo_clip_fraction(logp, old, adv_tok, torch.tensor([[1, 0, 0, 1]])).item() == pytest.approx(0.5)
    assert L.grpo_clip_fraction(logp, old, adv_tok, torch.zeros(1, 4)).item() == 0.0
    # custom eps: ratio 1.5 inside [0.4, 1.6] -> nothing clipped on those tokens
    assert L.grpo_clip_fraction(logp, old, adv_tok, torch.ones(1, 4), eps_low=0.6, eps_high=0.6).item() == 0.0


def test_grpo_matches_trl_formula():
    gen = torch.Generator().manual_seed(9)
    logp = (torch.randn(4, 6, generator=gen) * 0.3 - 2).requires_grad_(True)
    old = logp.detach() + torch.randn(4, 6, generator=gen) * 0.3
    adv = torch.randn(4, generator=gen)
    coef_1 = torch.exp(logp - old)
    coef_2 = coef_1.clamp(0.8, 1.28)
    ref = -torch.min(coef_1 * adv[:, None], coef_2 * adv[:, None])
    torch.testing.assert_close(L.grpo_token_loss(logp, old, adv), ref)


# --------------------------------------------------------------------------------------------------------------------
# aggregation
# --------------------------------------------------------------------------------------------------------------------


def test_seq_mean_token_mean_denominator_counts_masked_sequences():
    loss = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0], [9.0, 9.0, 9.0, 9.0]], requires_grad=True)
    response = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    sd_mask = torch.tensor([1.0, 1.0, 0.0])
    got = L.seq_mean_token_mean(loss, response * sd_mask[:, None])
    assert got.item() == pytest.approx((2.0 + 5.5 + 0.0) / 3)
    got.backward()
    torch.testing.assert_close(
        loss.grad, torch.tensor([[1 / 9, 1 / 9, 1 / 9, 0], [1 / 6, 1 / 6, 0, 0], [0, 0, 0, 0]])
    )
    assert L.token_mean(loss, response).item() == pytest.approx((6 + 11 + 36) / 9)


def test_masked_positions_cannot_leak_inf():
    loss = torch.tensor([[1.0, float("inf")], [float("nan"), 3.0]], requires_grad=True)
    mask = torch.tensor([[1, 0], [0, 1]])
    assert L.seq_mean_token_mean(loss, mask).item() == pytest.approx(2.0)
    assert L.token_mean(loss, mask).item() == pytest.approx(2.0)


@pytest.mark.parametrize("reducer", [L.seq_mean_token_mean, L.token_mean])
def test_all_zero_mask_returns_attached_zero(reducer):
    logits = _logits(2, 3, VOCAB, seed=71).requires_grad_(True)
    per_token = L.topk_divergence(logits, _logits(2, 3, VOCAB, seed=72), topk=5, alpha=0.5)
    out = reducer(per_token, torch.zeros(2, 3))
    assert out.item() == 0.0
    assert out.grad_fn is not None
    out.backward()
    torch.testing.assert_close(logits.grad, torch.zeros_like(logits))


def test_micro_batches_sum_to_full_batch():
    gen = torch.Generator().manual_seed(81)
    loss = torch.rand(6, 7, generator=gen).requires_grad_(True)
    mask = (torch.rand(6, 7, generator=gen) > 0.4).int()
    mask[2] = 0  # a fully masked sequence
    splits = [(0, 2), (2, 5), (5, 6)]

    full_seq = L.seq_mean_token_mean(loss, mask)
    micro_seq = sum(L.seq_mean_token_mean(loss[a:b], mask[a:b], num_sequences=6) for a, b in splits)
    torch.testing.assert_close(micro_seq, full_seq)

    n_tokens = int(mask.sum())
    full_tok = L.token_mean(loss, mask)
    micro_tok = sum(L.token_mean(loss[a:b], mask[a:b], num_tokens=n_tokens) for a, b in splits)
    torch.testing.assert_close(micro_tok, full_tok)
    # tensor denominators (e.g. all-reduced counts) work too
    micro_tok_t = sum(L.token_mean(loss[a:b], mask[a:b], num_tokens=mask.sum()) for a, b in splits)
    torch.testing.assert_close(micro_tok_t, full_tok)

    # accumulated gradients match the full-batch gradient
    (g_full,) = torch.autograd.grad(full_seq + full_tok, loss)
    for a, b in splits:
        part = L.seq_mean_token_mean(loss[a:b], mask[a:b], 6) + L.token_mean(loss[a:b], mask[a:b], n_tokens)
        part.backward()
    torch.testing.assert_close(loss.grad, g_full)


def test_end_to_end_sdpo_loss_gradient_accumulation():
    """Top-k divergence x IS weight, seq-mean-token-mean over micro-batches == full batch (values and grads)."""
    student = _logits(4, 6, VOCAB, seed=91).requires_grad_(True)
    teacher = _logits(4, 6, VOCAB, seed=92)
    ids = torch.randint(0, VOCAB, (4, 6), generator=torch.Generator().manual_seed(5))
    old_logp = L.token_logprobs(student.detach(), ids) + 0.5 * torch.randn(4, 6, generator=torch.Generator().manual_seed(6))
    mask = torch.ones(4, 6)
    mask[1, 4:] = 0
    mask = mask * torch.tensor([1.0, 1.0, 0.0, 1.0])[:, None]

    def loss_fn(rows, denom):
        s = student[rows]
        per_token = L.topk_divergence(s, teacher[rows], topk=7, alpha=1.0)
        w = L.importance_weight(L.token_logprobs(s, ids[rows]), old_logp[rows])
        return L.seq_mean_token_mean(per_token * w, mask[rows], denom)

    full = loss_fn(slice(0, 4), None)
    (g_full,) = torch.autograd.grad(full, student)
    total = 0.0
    for rows in (slice(0, 1), slice(1, 4)):
        part = loss_fn(rows, 4)
        part.backward()
        total = total + part.detach()
    torch.testing.assert_close(total, full.detach())
    torch.testing.assert_close(student.grad, g_full)
