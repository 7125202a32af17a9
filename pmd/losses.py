"""Pure tensor-in / tensor-out loss functions for GRPO and self-distillation (SDPO / PMD).

Everything here is stateless: no trainer, no config objects, no hidden globals that change results. The trainer
composes these pieces; the tests check them against hand-written formulas and against TRL's SDPO reference.

Shape convention (suffixes on names, or shape comments):

* ``_T`` token positions, ``_V`` vocabulary, ``_K`` top-k support (``K+1`` with tail), ``_P``/``_G`` problems and
  the rollouts of one problem (CONTRIBUTING.md has the whole convention).
* ``[S, T]``: S sequences of whatever batch the caller passes (a micro-batch, usually), T positions.
* "``[...]``" means any leading shape, e.g. ``[S, T]``.

Precision: every function computes in at least float32 (bf16/fp16 inputs are upcast; float64 stays float64) and
returns tensors in that compute dtype.

Self-distillation at a response position t compares the student distribution p_S(. | x, y_<t) with the teacher
distribution p_T(. | c, y_<t) (same model or an EMA copy, conditioned on richer context c). The divergence is taken
on the *student's* top-k tokens:

1. :func:`topk_support` - student top-k token ids and the student's true log-probs there (full-vocab normaliser).
2. :func:`gather_logprobs` - the teacher's true log-probs at those ids. Only this ``[..., K]`` result has to be kept,
   so the teacher's ``[..., V]`` logits can be dropped right after its forward pass.
3. :func:`divergence_on_support` - either append a tail bucket (:func:`add_tail_bucket`) holding the mass outside the
   top-k, or renormalise both top-k sets, then :func:`generalized_jsd`.

:func:`topk_divergence` chains the three. The per-token result is then weighted by :func:`importance_weight`,
masked, and reduced with :func:`seq_mean_token_mean`.

GRPO (Dr.GRPO style, no std normalisation, no KL term) uses :func:`group_advantages`, :func:`grpo_token_loss` and
:func:`token_mean`. The reward-anchored objectives reuse them: :func:`route_rows` picks which rows take GRPO and
which take distillation (SRPO), :func:`signed_token_credit` turns a sequence advantage into per-token ones sized by
the teacher (RLSD).

Both reducers take an explicit denominator so that gradient accumulation is exact: with the denominator of the whole
mini-batch, the sum of the micro-batch losses equals the loss of the whole mini-batch.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "TAIL_LOGMASS_CAP",
    "LOG_RATIO_CLAMP",
    "token_logprobs",
    "gather_logprobs",
    "topk_support",
    "add_tail_bucket",
    "generalized_jsd",
    "divergence_on_support",
    "topk_divergence",
    "importance_weight",
    "group_advantages",
    "grpo_token_loss",
    "grpo_clip_fraction",
    "seq_mean_token_mean",
    "token_mean",
    "signed_token_credit",
    "unranked_distill_mask",
    "route_rows",
]

#: Upper bound on the log of the top-k mass before the tail is formed. Keeps log(1 - mass) finite (>= about -16.1)
#: when the top-k holds (numerically) all of the probability.
TAIL_LOGMASS_CAP = -1e-7

#: Log importance ratios are clamped to [-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP] before exponentiation.
LOG_RATIO_CLAMP = 20.0

# Low-precision logits are upcast to float32 in row chunks of at most this many elements when computing the
# full-vocabulary logsumexp, so without autograd the float32 temporary stays small (64 MiB).
_LSE_CHUNK_ELEMENTS = 1 << 24


# --------------------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------------------


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """Common floating dtype of ``tensors``, at least float32 (bf16/fp16 -> fp32, fp64 stays fp64)."""
    dtype = torch.float32
    for t in tensors:
        if t.is_floating_point():
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _is_full_vocab(topk: int | None, vocab_size: int) -> bool:
    if topk is None:
        return True
    if topk < 1:
        raise ValueError(f"topk must be a positive integer or None, got {topk}")
    return topk >= vocab_size


def _logsumexp_fp32(logits_V: Tensor) -> Tensor:
    """``logsumexp`` over the last axis in (at least) float32: ``[..., V] -> [...]``.

    Float32/float64 inputs go straight to :func:`torch.logsumexp`. Lower-precision inputs are upcast chunk by chunk
    over the leading rows, so that without autograd (e.g. a teacher under ``no_grad``) only one chunk exists in
    float32 at a time. Under autograd the result is identical; the backward keeps what it needs.
    """
    if logits_V.dtype in (torch.float32, torch.float64):
        return torch.logsumexp(logits_V, dim=-1)
    lead_shape = logits_V.shape[:-1]
    vocab = logits_V.shape[-1]
    rows_N_V = logits_V.reshape(-1, vocab)
    n_rows = rows_N_V.shape[0]
    rows_per_chunk = max(1, _LSE_CHUNK_ELEMENTS // max(vocab, 1))
    if n_rows <= rows_per_chunk:
        out_N = torch.logsumexp(rows_N_V.float(), dim=-1)
    else:
        out_N = torch.cat(
            [
                torch.logsumexp(rows_N_V[i : i + rows_per_chunk].float(), dim=-1)
                for i in range(0, n_rows, rows_per_chunk)
            ]
        )
    return out_N.reshape(lead_shape)


def _kl_terms(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Element-wise ``p * (log p - log q)``, defined as 0 wherever ``p == 0`` (also when ``log p = -inf``).

    Summed over the support this is KL(p || q). Masking the difference (instead of the product) keeps both the value
    and the gradient free of ``0 * inf`` NaNs for zero-probability entries.
    """
    p = log_p.exp()
    diff = torch.where(p > 0, log_p - log_q, torch.zeros((), dtype=log_p.dtype, device=log_p.device))
    return p * diff


def _as_denominator(value: int | float | Tensor, like: Tensor) -> Tensor:
    """A positive scalar denominator tensor (clamped to >= 1) with ``like``'s dtype and device."""
    denom = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    return denom.clamp(min=1.0)


# --------------------------------------------------------------------------------------------------------------------
# log-probabilities
# --------------------------------------------------------------------------------------------------------------------


def gather_logprobs(logits_V: Tensor, ids_K: Tensor) -> Tensor:
    """True log-probabilities of the tokens ``ids_K`` under ``softmax(logits_V)``.

    Args:
        logits_V: ``[..., V]`` logits (any float dtype).
        ids_K: ``[..., K]`` integer token ids (same leading shape; a stride-0 ``expand`` is fine).

    Returns:
        ``[..., K]`` log-probs in float32 (float64 for float64 input), normalised with the FULL-vocabulary
        logsumexp, so they sum to the captured mass (<= 1), not to 1. Computed as ``gather - logsumexp`` without
        materialising a full ``log_softmax`` copy. Differentiable w.r.t. ``logits_V``.
    """
    dtype = _compute_dtype(logits_V)
    picked_K = logits_V.gather(-1, ids_K).to(dtype)
    return picked_K - _logsumexp_fp32(logits_V).to(dtype).unsqueeze(-1)


def token_logprobs(logits_V: Tensor, token_ids: Tensor) -> Tensor:
    """``log p(token)`` for one token per position: ``log_softmax(logits)`` gathered at ``token_ids``.

    Args:
        logits_V: ``[..., V]`` logits, e.g. ``[S, T, V]``.
        token_ids: ``[...]`` integer ids, e.g. ``[S, T]``.

    Returns:
        ``[...]`` float32 (or float64) log-probabilities, differentiable w.r.t. ``logits_V``.
    """
    return gather_logprobs(logits_V, token_ids.unsqueeze(-1)).squeeze(-1)


def topk_support(student_logits_V: Tensor, topk: int | None) -> tuple[Tensor, Tensor]:
    """The student's top-k token ids and the student's true log-probs on them.

    Args:
        student_logits_V: ``[..., V]`` student logits.
        topk: support size; ``None`` or ``topk >= V`` selects the whole vocabulary.

    Returns:
        ``(ids_K, student_logp_K)``, both ``[..., K]`` (``K = min(topk, V)``). ``ids_K`` is int64 and carries no
        gradient (the selection is not differentiable); ``student_logp_K`` is float32 and differentiable. With the
        whole vocabulary, ``ids_K`` is a stride-0 expanded ``arange(V)`` (no extra memory) and ``student_logp_K``
        is the full ``log_softmax``.
    """
    vocab = student_logits_V.shape[-1]
    if _is_full_vocab(topk, vocab):
        ids_V = torch.arange(vocab, device=student_logits_V.device).expand(student_logits_V.shape)
        logp_V = torch.log_softmax(student_logits_V.to(_compute_dtype(student_logits_V)), dim=-1)
        return ids_V, logp_V
    ids_K = torch.topk(student_logits_V.detach(), k=topk, dim=-1).indices
    return ids_K, gather_logprobs(student_logits_V, ids_K)


# --------------------------------------------------------------------------------------------------------------------
# divergences
# --------------------------------------------------------------------------------------------------------------------


def add_tail_bucket(logp_K: Tensor) -> Tensor:
    """Append one bucket with the probability mass outside a top-k support.

    ``logp_K`` are true log-probs (full-vocab normaliser) of ``K`` tokens, summing to the captured mass ``P <= 1``.
    The appended entry is ``log(1 - P)`` computed as ``log(-expm1(min(logsumexp(logp_K), TAIL_LOGMASS_CAP)))``, so
    the result is a proper ``(K+1)``-way distribution whose tail stays finite (about ``log 1e-7``) even when the
    top-k holds numerically all of the mass.

    Args:
        logp_K: ``[..., K]`` log-probs.

    Returns:
        ``[..., K+1]`` log-probs in float32 (float64 for float64 input).
    """
    logp_K = logp_K.to(_compute_dtype(logp_K))
    log_mass = torch.logsumexp(logp_K, dim=-1, keepdim=True).clamp(max=TAIL_LOGMASS_CAP)
    tail_logp = torch.log(-torch.expm1(log_mass))
    return torch.cat([logp_K, tail_logp], dim=-1)


def generalized_jsd(student_logp: Tensor, teacher_logp: Tensor, alpha: float) -> Tensor:
    """alpha-generalised Jensen-Shannon divergence between two distributions given as log-probs.

    Same alpha convention as TRL's GKD ``beta`` / SDPO ``distillation_alpha`` (p_S student, p_T teacher):

    * ``alpha == 0``: forward KL, ``sum p_T (log p_T - log p_S)``;
    * ``alpha == 1``: reverse KL, ``sum p_S (log p_S - log p_T)``;
    * otherwise, with ``M = (1 - alpha) p_S + alpha p_T`` (formed in log space),
      ``(1 - alpha) KL(p_S || M) + alpha KL(p_T || M)``.

    The mixture form tends to 0 as alpha -> 0 or 1, hence the two KL special cases. Zero-probability entries
    contribute 0 (``0 log 0 = 0``).

    Args:
        student_logp: ``[..., S]`` normalised log-probs of the student over some support of size S.
        teacher_logp: ``[..., S]`` normalised log-probs of the teacher over the same support.
        alpha: in ``[0, 1]``.

    Returns:
        ``[...]`` divergence, summed over the last (support) axis.
    """
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    dtype = _compute_dtype(student_logp, teacher_logp)
    log_s = student_logp.to(dtype)
    log_t = teacher_logp.to(dtype)
    if alpha == 0.0:
        terms = _kl_terms(log_t, log_s)
    elif alpha == 1.0:
        terms = _kl_terms(log_s, log_t)
    else:
        log_m = torch.logaddexp(log_s + math.log1p(-alpha), log_t + math.log(alpha))
        terms = (1.0 - alpha) * _kl_terms(log_s, log_m) + alpha * _kl_terms(log_t, log_m)
    return terms.sum(dim=-1)


def divergence_on_support(
    student_logp_K: Tensor,
    teacher_logp_K: Tensor,
    *,
    alpha: float,
    add_tail: bool = True,
) -> Tensor:
    """Divergence between two models restricted to a shared top-k support.

    Args:
        student_logp_K: ``[..., K]`` student true log-probs on the support (from :func:`topk_support`).
        teacher_logp_K: ``[..., K]`` teacher true log-probs on the same ids (from :func:`gather_logprobs`).
        alpha: see :func:`generalized_jsd`.
        add_tail: if True, append the leftover-mass bucket to both (``K+1``-way distributions, approximating the
            full-vocabulary divergence); if False, renormalise both top-k sets (divergence of the top-k conditionals).
            When the support is the whole vocabulary both choices are harmless (the tail is ~1e-7 in both models),
            but :func:`topk_divergence` skips them altogether.

    Returns:
        ``[...]`` per-token divergence.
    """
    if add_tail:
        student_logp_K = add_tail_bucket(student_logp_K)
        teacher_logp_K = add_tail_bucket(teacher_logp_K)
    else:
        student_logp_K = torch.log_softmax(student_logp_K.to(_compute_dtype(student_logp_K)), dim=-1)
        teacher_logp_K = torch.log_softmax(teacher_logp_K.to(_compute_dtype(teacher_logp_K)), dim=-1)
    return generalized_jsd(student_logp_K, teacher_logp_K, alpha)


def topk_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    topk: int | None,
    alpha: float,
    add_tail: bool = True,
) -> Tensor:
    """Per-token self-distillation divergence on the student's top-k support.

    ``topk_support -> gather_logprobs(teacher) -> divergence_on_support``. With ``topk=None`` or ``topk >= V``
    this is the exact full-vocabulary :func:`generalized_jsd` (no tail, no renormalisation).

    Args:
        student_logits: ``[..., V]`` student logits on (x, y_<t).
        teacher_logits: ``[..., V]`` teacher logits on (c, y_<t); gradients flow to it too if it requires grad.
        topk: support size or ``None`` for the full vocabulary.
        alpha: 0 forward KL, 1 reverse KL, in between the generalised JSD (see :func:`generalized_jsd`).
        add_tail: tail bucket (True) or renormalised top-k (False); ignored for the full vocabulary.

    Returns:
        ``[...]`` per-token divergence (float32), before importance weighting, masking and aggregation.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student and teacher logits must have the same shape, got {tuple(student_logits.shape)} "
            f"and {tuple(teacher_logits.shape)}"
        )
    ids_K, student_logp_K = topk_support(student_logits, topk)
    if _is_full_vocab(topk, student_logits.shape[-1]):
        teacher_logp_V = torch.log_softmax(teacher_logits.to(_compute_dtype(teacher_logits)), dim=-1)
        return generalized_jsd(student_logp_K, teacher_logp_V, alpha)
    teacher_logp_K = gather_logprobs(teacher_logits, ids_K)
    return divergence_on_support(student_logp_K, teacher_logp_K, alpha=alpha, add_tail=add_tail)


# --------------------------------------------------------------------------------------------------------------------
# importance sampling, GRPO
# --------------------------------------------------------------------------------------------------------------------


def importance_weight(logp: Tensor, old_logp: Tensor, clip: float | None = 2.0) -> Tensor:
    """Detached, clipped token-level importance ratio ``min(exp(clamp(logp - old_logp, -20, 20)), clip)``.

    Multiply a per-token loss by it to correct for the policy having moved since the rollout was sampled
    (``old_logp`` = log-probs of the sampled tokens at rollout time). No gradient flows through the weight.

    Args:
        logp: ``[...]`` current log-probs of the sampled tokens.
        old_logp: ``[...]`` rollout-time log-probs of the same tokens.
        clip: upper bound on the ratio; ``None`` leaves it unclipped.

    Returns:
        ``[...]`` float32 weights with ``requires_grad=False``.
    """
    dtype = _compute_dtype(logp, old_logp)
    with torch.no_grad():
        log_ratio = (logp.detach().to(dtype) - old_logp.detach().to(dtype)).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        weight = log_ratio.exp()
        if clip is not None:
            weight = weight.clamp(max=float(clip))
    return weight


def group_advantages(rewards: Tensor, group_size: int) -> Tensor:
    """Group-relative advantages ``A_i = r_i - mean(r of its group)`` (Dr.GRPO: no std normalisation).

    Args:
        rewards: ``[P * G]`` rewards, the G completions of each prompt stored consecutively.
        group_size: G.

    Returns:
        ``[P * G]`` float32 advantages (each group sums to 0).
    """
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    flat = rewards.reshape(-1).to(_compute_dtype(rewards))
    if flat.numel() % group_size != 0:
        raise ValueError(f"{flat.numel()} rewards cannot be split into groups of {group_size}")
    groups_P_G = flat.view(-1, group_size)
    return (groups_P_G - groups_P_G.mean(dim=-1, keepdim=True)).reshape(-1)


def _ratio_and_advantages(logp: Tensor, old_logp: Tensor, advantages: Tensor) -> tuple[Tensor, Tensor]:
    dtype = _compute_dtype(logp, old_logp, advantages)
    logp = logp.to(dtype)
    adv = advantages.detach().to(dtype)
    if adv.dim() == logp.dim() - 1:
        adv = adv.unsqueeze(-1)  # per-sequence [S] -> [S, 1]
    log_ratio = (logp - old_logp.detach().to(dtype)).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return log_ratio.exp(), adv


def grpo_token_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
) -> Tensor:
    """PPO-style clipped surrogate per token: ``-min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)``.

    ``r = exp(logp - old_logp)`` (log-ratio clamped to +-20). With ``old_logp = logp.detach()`` the ratio is 1
    and the gradient is the plain policy gradient ``-A * grad logp``. ``old_logp`` and ``advantages`` are treated
    as constants. No KL term.

    Args:
        logp: ``[S, T]`` current log-probs of the sampled tokens (differentiable).
        old_logp: ``[S, T]`` rollout-time log-probs.
        advantages: ``[S]`` per-sequence advantages (or already ``[S, T]``).
        eps_low: lower clip range.
        eps_high: upper clip range (asymmetric, "clip-higher").

    Returns:
        ``[S, T]`` per-token loss (unmasked; reduce with :func:`token_mean`).
    """
    ratio, adv = _ratio_and_advantages(logp, old_logp, advantages)
    clipped_ratio = ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    return -torch.minimum(ratio * adv, clipped_ratio * adv)


def grpo_clip_fraction(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
) -> Tensor:
    """Fraction of valid tokens whose surrogate is clipped (gradient zeroed) - a detached scalar metric.

    A token is clipped when ``A > 0`` and ``r > 1 + eps_high``, or ``A < 0`` and ``r < 1 - eps_low``.
    Arguments as in :func:`grpo_token_loss`; ``mask`` is ``[S, T]`` 0/1 (bool or numeric). Returns 0 if the mask
    is empty.
    """
    with torch.no_grad():
        ratio, adv = _ratio_and_advantages(logp.detach(), old_logp, advantages)
        clipped = ((adv > 0) & (ratio > 1.0 + eps_high)) | ((adv < 0) & (ratio < 1.0 - eps_low))
        keep = torch.broadcast_to(mask != 0, clipped.shape)
        n_clipped = (clipped & keep).sum().to(ratio.dtype)
        return n_clipped / _as_denominator(keep.sum(), ratio)


# --------------------------------------------------------------------------------------------------------------------
# reward-anchored objectives
# --------------------------------------------------------------------------------------------------------------------


def signed_token_credit(advantages: Tensor, teacher_logp: Tensor, student_logp: Tensor, clip: float = 2.0) -> Tensor:
    """Per-token advantages whose sign comes from the reward and whose size comes from the teacher (after RLSD,
    arXiv 2604.03128): ``A_t = A * clamp(exp(sign(A) * (log p_T(y_t) - log p_S(y_t))), 1/clip, clip)``.

    In a passing rollout (A > 0) the tokens the teacher finds likelier than the student get more credit; in a
    failing one (A < 0) the tokens the teacher finds less likely get more blame. The weight is detached and
    bounded, so the update never points against the reward and never exceeds ``clip`` times GRPO's.

    Args:
        advantages: ``[S]`` sequence advantages (group-relative).
        teacher_logp: ``[S, T]`` the teacher's log-probs of the sampled tokens (with its context).
        student_logp: ``[S, T]`` the student's log-probs of the same tokens.
        clip: the weight's bound, >= 1.

    Returns:
        ``[S, T]`` detached float32 per-token advantages, for :func:`grpo_token_loss`.
    """
    if clip < 1:
        raise ValueError(f"clip must be >= 1, got {clip}")
    dtype = _compute_dtype(advantages, teacher_logp, student_logp)
    with torch.no_grad():
        adv = advantages.detach().to(dtype).unsqueeze(-1)
        log_ratio = teacher_logp.detach().to(dtype) - student_logp.detach().to(dtype)
        weight = (torch.sign(adv) * log_ratio).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).exp()
        return adv * weight.clamp(1.0 / clip, clip)


def unranked_distill_mask(mask: Tensor, advantages: Tensor, stopped: Tensor, answer: Tensor | None = None) -> Tensor:
    """The tokens that `distill_unranked` distils: those of rollouts the reward cannot rank (advantage 0: every
    rollout of their group scored the same, so GRPO and signed credit give them no gradient), without the
    end-of-sequence token of a rollout that stopped.

    Memory is what PMD has that GRPO lacks on such a group: insights written at an earlier visit, a pass stored
    then. The stop is left out because a teacher reading memory without a solution lowers p(EOS) where the
    student stopped (0.6-0.7 nats on SmolLM2-135M, README Results), which would teach the student to run on.

    Args:
        mask: ``[S, T]`` completion tokens (1) and padding (0).
        advantages: ``[S]`` group advantages.
        stopped: ``[S]`` bool, the completion ends with its EOS token (it was not cut at the length limit).
        answer: optional ``[S, T]`` mask of the tokens of the final answer (`distill_unranked_tokens=answer`):
            only those are kept.

    Returns:
        ``[S, T]`` float mask.
    """
    if answer is not None:
        mask = mask * answer.to(mask.dtype)
    unranked = (advantages == 0).to(mask.dtype)[:, None]
    lengths = mask.sum(dim=-1).long()  # completions are left-aligned: the last real token is at length - 1
    last = torch.zeros_like(mask)
    has_stop = stopped.bool() & (lengths > 0)
    last[has_stop, lengths[has_stop] - 1] = 1
    return mask * unranked * (1 - last)


def route_rows(passed: Tensor, has_teacher: Tensor) -> tuple[Tensor, Tensor]:
    """Which rows learn by GRPO and which by distillation (after SRPO, arXiv 2604.02288): a failing rollout whose
    teacher has a context is distilled toward it; every other rollout (passing, or without a teacher signal)
    keeps its GRPO term, so the reward still sets the direction where no teacher can.

    Args:
        passed: ``[S]`` bool, the rollout passed.
        has_teacher: ``[S]`` bool, its teacher has a context.

    Returns:
        ``(grpo_rows, distill_rows)``: two ``[S]`` float 0/1 masks, disjoint, covering every row.
    """
    distill = (~passed.bool()) & has_teacher.bool()
    return (~distill).float(), distill.float()


# --------------------------------------------------------------------------------------------------------------------
# aggregation
# --------------------------------------------------------------------------------------------------------------------


def _masked(per_token_loss: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    loss = per_token_loss.to(_compute_dtype(per_token_loss))
    keep = torch.broadcast_to(mask != 0, loss.shape)
    # where (not multiply) so that inf/NaN at masked positions cannot leak into the value.
    return torch.where(keep, loss, torch.zeros((), dtype=loss.dtype, device=loss.device)), keep


def seq_mean_token_mean(
    per_token_loss: Tensor,
    mask: Tensor,
    num_sequences: int | float | Tensor | None = None,
) -> Tensor:
    """Token-mean within each sequence, then mean over sequences (SDPO aggregation).

    Args:
        per_token_loss: ``[S, T]`` (or ``[..., T]``).
        mask: 0/1 mask broadcastable to it, normally ``response_mask * self_distillation_mask[:, None]``.
            A sequence with no valid token contributes 0 but still counts in the denominator.
        num_sequences: denominator. ``None`` uses this batch's number of sequences; pass the number of sequences
            of the whole mini-batch when the mini-batch is split into micro-batches, so that the micro-batch losses
            sum to the mini-batch loss.

    Returns:
        Scalar loss. With an all-zero mask this is a zero still attached to ``per_token_loss``'s graph.
    """
    masked, keep = _masked(per_token_loss, mask)
    tokens_per_seq = keep.sum(dim=-1).clamp(min=1).to(masked.dtype)
    per_seq = masked.sum(dim=-1) / tokens_per_seq
    if num_sequences is None:
        num_sequences = per_seq.numel()
    return per_seq.sum() / _as_denominator(num_sequences, masked)


def token_mean(
    per_token_loss: Tensor,
    mask: Tensor,
    num_tokens: int | float | Tensor | None = None,
) -> Tensor:
    """Mean over all valid tokens (GRPO aggregation).

    Args:
        per_token_loss: ``[S, T]`` (any shape).
        mask: 0/1 mask broadcastable to it.
        num_tokens: denominator. ``None`` counts this batch's valid tokens; pass the number of valid tokens of the
            whole mini-batch when splitting it into micro-batches, so that the micro-batch losses sum to the
            mini-batch loss. Clamped to >= 1.

    Returns:
        Scalar loss. With an all-zero mask this is a zero still attached to ``per_token_loss``'s graph.
    """
    masked, keep = _masked(per_token_loss, mask)
    if num_tokens is None:
        num_tokens = keep.sum()
    return masked.sum() / _as_denominator(num_tokens, masked)
