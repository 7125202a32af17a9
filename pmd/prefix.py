"""Teacher forwards that encode a shared prompt prefix once (docs/method.md §13).

Under PMD every rollout of a problem is scored by the teacher under the same long prompt (the memory context),
and only the G completions differ. Packing G copies of prefix+completion (`pmd.rollout.pack`) recomputes that
prefix G times. Here the prefix goes through the model once, with batch size 1, keeping its keys and values;
then the G right-padded completions run as one batch whose attention reads those keys and values, broadcast
along the batch. Tokens fed to the model drop from G*(P+R) to P + G*(R-1).

The logits are the ones `completion_logits(forward, pack([prefix]*G, completions, pad_id))` returns, column for
column: column 0 (which predicts completion token 0) is the prefix's last-position logit, column j > 0 comes from
completion token j-1. The last completion token predicts nothing that is scored, so it is never fed, and only
completion positions reach the LM head. Columns past a row's length (padding) are meaningless, as in
`completion_logits`; mask them.

The prefix cache is read-only: its layers hand the attention `cat(prefix, new)` without storing the new states
(`_ReadOnlyPrefixLayer`). So one encoded prefix (`PrefixState`) can serve any number of calls and micro-batches
and is never mutated: no deep copy, no crop, and the batch-1 keys and values are broadcast (a stride-0 `expand`),
not repeated in memory. A model whose cache is not a plain full-attention `DynamicLayer` stack (sliding window,
linear attention) falls back to the ordinary packed forward.

`forward` is the model or any callable with its keyword interface, e.g. `functools.partial(teacher.forward,
model)` (weights swapped with `torch.func.functional_call`) or a PEFT-wrapped model. The teacher calls it under
`torch.no_grad()`; the student calls it with gradients (the expand and cat are differentiable, so each row's
gradient reaches the shared prefix computation and the prefix's gradient is the sum over its rows, as in the
packed forward). A `PrefixState` must be used under the same weights and dtype it was encoded with, and one
with a graph only until the backward that frees it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from pmd.rollout import completion_logits, pack


@dataclass
class PrefixState:
    """One encoded prefix: its ids, its last-position logits, and its keys/values (batch 1) per layer.

    `keys`/`values` are None when the model's cache cannot be shared; the calls then use the packed forward.
    """

    prefix_ids: tuple[int, ...]
    last_logits: torch.Tensor  # (1, V), not divided by any temperature
    keys: list[torch.Tensor] | None  # per layer, (1, kv_heads, P, head_dim)
    values: list[torch.Tensor] | None

    @property
    def length(self) -> int:
        return len(self.prefix_ids)

    @property
    def shareable(self) -> bool:
        return self.keys is not None


class _ReadOnlyPrefixLayer(DynamicLayer):
    """A cache layer that prepends a fixed prefix to whatever the attention adds, and remembers nothing new."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, batch: int):
        super().__init__()
        self.keys, self.values = keys, values  # (1, H, P, D); get_seq_length/get_mask_sizes read P from these
        self.batch = batch
        self.device = keys.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        keys = self.keys.to(key_states.dtype).expand(self.batch, -1, -1, -1)
        values = self.values.to(value_states.dtype).expand(self.batch, -1, -1, -1)
        return torch.cat([keys, key_states], dim=-2), torch.cat([values, value_states], dim=-2)

    def crop(self, tokens_to_remove: int) -> None:  # nothing was appended, so nothing to remove
        return None

    def reset(self) -> None:  # let go of the shared tensors; never zero them (other calls still read them)
        self.keys = self.values = None
        self.is_initialized = False

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.batch *= repeats

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.batch = len(indices)


class _ReadOnlyPrefixCache(DynamicCache):
    def __init__(self, state: PrefixState, batch: int):
        Cache.__init__(self, layers=[_ReadOnlyPrefixLayer(k, v, batch) for k, v in zip(state.keys, state.values)])


def encode_prefix(forward, prefix_ids: list[int], device: torch.device | str = "cpu") -> PrefixState:
    """Run the prefix once (batch 1) and keep what the completions need: its keys/values and last logits."""
    if not prefix_ids:
        raise ValueError("the shared prefix is empty")
    ids = torch.tensor([list(prefix_ids)], dtype=torch.long, device=device)
    out = forward(input_ids=ids, attention_mask=torch.ones_like(ids),
                  position_ids=torch.arange(ids.shape[1], device=device)[None], use_cache=True, logits_to_keep=1)
    cache = getattr(out, "cache", None)
    keys = values = None
    layers = getattr(cache, "layers", None)
    # only a stack of plain full-attention layers holds exactly the prefix's keys/values, position by position
    if layers and all(type(layer) is DynamicLayer and layer.get_seq_length() == ids.shape[1] for layer in layers):
        keys = [layer.keys for layer in layers]
        values = [layer.values for layer in layers]
    return PrefixState(tuple(int(t) for t in prefix_ids), out.logits[:, -1, :], keys, values)


def shared_prefix_completion_logits(forward, prefix_ids: list[int], completions: list[list[int]], pad_id: int,
                                    temperature: float = 1.0, *, cache: PrefixState | None = None,
                                    device: torch.device | str = "cpu") -> torch.Tensor:
    """Logits that predict each completion token after one shared prefix: (b, R, V), R = longest completion.

    Equal (up to floating-point reordering) to `completion_logits(forward, pack([prefix_ids] * b, completions,
    pad_id), temperature)`. `cache`: the prefix already encoded by `encode_prefix` with the same forward, reused
    as is (it is never modified); without it the prefix is encoded here.
    """
    if cache is None:
        cache = encode_prefix(forward, prefix_ids, device)
    elif cache.prefix_ids != tuple(prefix_ids):
        raise ValueError("`cache` was encoded from a different prefix")
    if not cache.shareable:
        return completion_logits(forward, pack([list(prefix_ids)] * len(completions), completions, pad_id)
                                 .to(device), temperature)
    b, P = len(completions), cache.length
    R = max(1, max(len(c) for c in completions))
    first = cache.last_logits[:, None, :].expand(b, 1, -1)  # predicts completion token 0 of every row
    if R == 1:
        logits = first
    else:
        # feed completion tokens 0..R-2: token j's output predicts token j+1; the last token predicts nothing
        ids = torch.full((b, R - 1), pad_id, dtype=torch.long)
        mask = torch.zeros((b, P + R - 1), dtype=torch.long)
        device = cache.last_logits.device
        mask[:, :P] = 1
        for i, c in enumerate(completions):
            fed = c[:R - 1]
            if fed:
                ids[i, :len(fed)] = torch.tensor(fed, dtype=torch.long)
            mask[i, P:P + len(fed)] = 1
        positions = torch.arange(P, P + R - 1, device=device)[None].expand(b, -1)
        ids, mask = ids.to(device), mask.to(device)
        out = forward(input_ids=ids, attention_mask=mask, position_ids=positions,
                      cache=_ReadOnlyPrefixCache(cache, b), use_cache=True, logits_to_keep=0)
        rest = out.logits
        logits = torch.cat([first.to(rest.dtype), rest], dim=1)
    return logits / temperature if temperature != 1.0 else logits


def grouped_prefix_completion_logits(forward, prefixes: list[list[int]], completions: list[list[int]], pad_id: int,
                                     temperature: float = 1.0, *, states: dict | None = None,
                                     min_rows: int = 2, device: torch.device | str = "cpu") -> torch.Tensor:
    """`completion_logits` for a micro-batch whose rows share a few distinct prefixes: (B, R, V), rows in order.

    Rows are grouped by identical prefix; a prefix used by at least `min_rows` rows gets one shared forward
    (`shared_prefix_completion_logits`), the remaining rows go through one ordinary packed forward together.
    R is the micro-batch's longest completion; a group's shorter block is zero-padded on the right.

    `states`: an optional dict (prefix tuple -> PrefixState) the caller keeps across micro-batches of the same
    teacher weights, so a prefix whose rows are split over several micro-batches is encoded once. A prefix
    already in it is shared even when only one row uses it here. Clear it whenever the teacher weights change.
    """
    if len(prefixes) != len(completions):
        raise ValueError("one prefix per completion")
    B = len(prefixes)
    R = max(1, max(len(c) for c in completions))
    rows_by_prefix: dict[tuple[int, ...], list[int]] = {}
    for i, p in enumerate(prefixes):
        rows_by_prefix.setdefault(tuple(p), []).append(i)

    blocks: list[tuple[list[int], torch.Tensor]] = []
    singles: list[int] = []
    for key, rows in rows_by_prefix.items():
        known = states is not None and key in states
        if len(rows) < min_rows and not known:
            singles += rows
            continue
        state = states[key] if known else encode_prefix(forward, list(key), device)
        if states is not None:
            states[key] = state
        blocks.append((rows, shared_prefix_completion_logits(forward, list(key), [completions[i] for i in rows],
                                                             pad_id, temperature, cache=state)))
    if singles:
        batch = pack([prefixes[i] for i in singles], [completions[i] for i in singles], pad_id).to(device)
        blocks.append((singles, completion_logits(forward, batch, temperature)))

    first = blocks[0][1]
    if len(blocks) == 1 and blocks[0][0] == list(range(B)) and first.shape[1] == R:  # nothing to reorder
        return first
    out = first.new_zeros((B, R, first.shape[-1]))
    for rows, logits in blocks:
        out[rows, :logits.shape[1]] = logits.to(out.dtype)
    return out


def tokens_fed(prefix_len: int, completion_lens: list[int], shared: bool) -> int:
    """Sequence positions the model computes for one group: packed (b*(P+R)) or prefix-shared (P + b*(R-1))."""
    b, R = len(completion_lens), max(1, max(completion_lens))
    return prefix_len + b * (R - 1) if shared else b * (prefix_len + R)
