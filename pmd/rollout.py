"""Sampling completions and laying them out as training batches.

Layout used everywhere in pmd (as TRL does): prompts are LEFT-padded and completions RIGHT-padded, so every
completion starts at the same column. A forward pass then only needs logits for the last R+1 positions
(`logits_to_keep`), and the student and a teacher with a different (longer) prompt score the same
completion tokens column by column.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch


@dataclass
class Packed:
    """A batch of prompt+completion sequences. B sequences, P prompt columns, R completion columns."""

    input_ids: torch.Tensor  # (B, P+R)
    attention_mask: torch.Tensor  # (B, P+R)
    position_ids: torch.Tensor  # (B, P+R), counting from the first real token of each row
    completion_ids: torch.Tensor  # (B, R)
    completion_mask: torch.Tensor  # (B, R) 1 on real completion tokens

    @property
    def completion_len(self) -> int:
        return self.completion_ids.shape[1]

    def to(self, device) -> "Packed":
        return Packed(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.position_ids,
                                                self.completion_ids, self.completion_mask)))


def pack(prompts: list[list[int]], completions: list[list[int]], pad_id: int) -> Packed:
    """Left-pad prompts, right-pad completions, concatenate."""
    assert len(prompts) == len(completions)
    B = len(prompts)
    P = max(len(p) for p in prompts)
    R = max(1, max(len(c) for c in completions))
    input_ids = torch.full((B, P + R), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, P + R), dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        input_ids[i, P - len(p):P] = torch.tensor(p, dtype=torch.long)
        attention_mask[i, P - len(p):P] = 1
        if c:
            input_ids[i, P:P + len(c)] = torch.tensor(c, dtype=torch.long)
            attention_mask[i, P:P + len(c)] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return Packed(input_ids, attention_mask, position_ids, input_ids[:, P:], attention_mask[:, P:])


def completion_logits(forward, batch: Packed, temperature: float = 1.0) -> torch.Tensor:
    """Logits that predict each completion token: (B, R, V). Only the last R+1 positions hit the LM head.

    `forward` is the model, or any callable with its keyword interface (the teacher's weight swap).
    """
    R = batch.completion_len
    out = forward(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                position_ids=batch.position_ids, logits_to_keep=R + 1, use_cache=False)
    logits = out.logits[:, :-1, :]
    return logits / temperature if temperature != 1.0 else logits


def encode_chat(tokenizer, messages: list[dict]) -> list[int]:
    """Chat-template a conversation and tokenize it, ready for the assistant's reply."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def rollout_id(step: int, index: int) -> str:
    """A rollout's id in rollouts.jsonl and in memory provenance: step-index within the step."""
    return f"{step}-{index}"


def answer_token_mask(tokenizer, completion_ids: list[int], answer: str | None) -> list[bool]:
    """Which completion tokens spell `answer` (the last place it appears in the decoded text): the tokens
    whose decoded characters overlap it. All False when there is no answer or it is not in the text."""
    flags = [False] * len(completion_ids)
    if not answer:
        return flags
    # the text after each token, decoded as the rollout's text was (special tokens skipped)
    ends = [len(tokenizer.decode(completion_ids[:k + 1], skip_special_tokens=True)) for k in range(len(completion_ids))]
    start = tokenizer.decode(completion_ids, skip_special_tokens=True).rfind(answer)
    if start < 0:
        return flags
    stop = start + len(answer)
    begin = 0
    for k, end in enumerate(ends):
        flags[k] = begin < stop and end > start and end > begin
        begin = end
    return flags


def sample_seed(*parts) -> int:
    """A 63-bit seed for one row's random stream, from e.g. ("rollout", run seed, step, problem, sample)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[int]], *, max_new_tokens: int, temperature: float,
             top_p: float, greedy: bool, batch_size: int, seeds: list[int] | None = None,
             stop_ids: set[int] | None = None, prompt_cache: dict | None = None) -> tuple[list[list[int]], list[bool]]:
    """Sample one completion per prompt (repeat a prompt G times for a group), batched, with a KV cache.

    Returns the completion token ids (trimmed after EOS, which is kept) and whether each finished with EOS.
    Sampling needs one seed per prompt: each row draws from its own generator, so its completion does not
    depend on the other rows of its batch, the batch size, or which process generates it (`sample_seed`).
    `stop_ids` end a row like EOS does (and are kept), e.g. every token that contains a newline.
    `prompt_cache`: a dict the caller keeps across calls under the same weights; the keys/values of every prompt
    are kept in it, and a later prompt that starts like a kept one only runs its new tokens (the reflector
    writes field after field on top of one long prompt).
    """
    if not greedy and (seeds is None or len(seeds) != len(prompts)):
        raise ValueError("sampling needs one seed per prompt (see sample_seed)")
    eos_ids = _eos_ids(model, tokenizer) | (stop_ids or set())
    completions: list[list[int]] = []
    finished: list[bool] = []
    for start in range(0, len(prompts), batch_size):
        ids, done = _decode(model, prompts[start:start + batch_size], tokenizer.pad_token_id, eos_ids,
                            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, greedy=greedy,
                            seeds=None if greedy else seeds[start:start + batch_size], prompt_cache=prompt_cache)
        completions += ids
        finished += done
    return completions, finished


def _decode(model, prompts: list[list[int]], pad_id: int, eos_ids: set[int], *, max_new_tokens: int,
            temperature: float, top_p: float, greedy: bool,
            seeds: list[int] | None = None, prompt_cache: dict | None = None) -> tuple[list[list[int]], list[bool]]:
    """Token-by-token decoding that drops finished rows from the batch and the KV cache.

    `model.generate` keeps computing every row until the longest one stops; with completions of very different
    lengths (a few tokens to `max_new_tokens`) most of that work is padding. Here a row leaves the batch as
    soon as it emits EOS, so the cost follows the tokens actually generated.
    """
    b, P = len(prompts), max(len(p) for p in prompts)
    attention_mask = torch.zeros((b, P), dtype=torch.long)
    for i, p in enumerate(prompts):
        attention_mask[i, P - len(p):] = 1
    device = next(model.parameters()).device
    attention_mask = attention_mask.to(device)
    eos = torch.tensor(sorted(eos_ids), dtype=torch.long, device=device)
    generators = None if greedy else [torch.Generator(device=device).manual_seed(s) for s in seeds]
    out_ids: list[list[int]] = [[] for _ in range(b)]
    done = [False] * b
    rows = torch.arange(b, device=device)  # original index of each row still in the batch
    cache, logits = _prefill(model, prompts, pad_id, attention_mask, prompt_cache)
    next_pos = torch.tensor([len(p) for p in prompts], dtype=torch.long, device=device)
    for t in range(max_new_tokens):
        alive = rows.tolist()
        tokens = _sample(logits.float(), temperature, top_p, greedy,
                         None if greedy else [generators[r] for r in alive])
        for r, tok in zip(alive, tokens.tolist()):
            out_ids[r].append(tok)
        stopped = torch.isin(tokens, eos)
        for r in rows[stopped].tolist():
            done[r] = True
        if t == max_new_tokens - 1 or bool(stopped.all()):
            break
        if bool(stopped.any()):  # drop finished rows from the batch and the cache
            keep = (~stopped).nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            rows, tokens, next_pos, attention_mask = rows[keep], tokens[keep], next_pos[keep], attention_mask[keep]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(rows), 1)], dim=1)
        logits = model(input_ids=tokens[:, None], attention_mask=attention_mask, position_ids=next_pos[:, None],
                       cache=cache, use_cache=True).logits[:, -1, :]
        next_pos = next_pos + 1
    return out_ids, done


def _prefill(model, prompts: list[list[int]], pad_id: int, attention_mask: torch.Tensor,
             known: dict | None = None):
    """Run the left-padded prompts through the model: (KV cache, last-position logits (b, V)).

    A group repeats its prompt G times; each distinct prompt is encoded once (batch 1) and its keys/values are
    copied into the rows that use it, so the prompt is computed once per group, not G times. With `known`
    (prompt tuple -> per-layer (keys, values), see `generate`'s prompt_cache), a prompt starts from the longest
    prefix it shares with a kept one and its keys/values are kept in turn. Models whose cache is not a stack of
    plain full-attention layers, and batches without repeats or `known`, take one batched forward.
    """
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    b, P = attention_mask.shape
    device = attention_mask.device
    rows_of: dict[tuple[int, ...], list[int]] = {}
    for i, p in enumerate(prompts):
        rows_of.setdefault(tuple(p), []).append(i)
    cache = DynamicCache(config=model.config)
    if (len(rows_of) < b or known is not None) and all(type(layer) is DynamicLayer for layer in cache.layers):
        keys = values = logits = None
        for prompt, rows in rows_of.items():
            n = len(prompt)
            start, kept = _longest_known_prefix(known or {}, prompt)
            one = DynamicCache(config=model.config)
            for index, (k, v) in enumerate(kept):  # read-only: the first update stores, later ones concatenate
                one.update(k[:, :, :start], v[:, :, :start], index)
            out = model(input_ids=torch.tensor([prompt[start:]], device=device),
                        attention_mask=torch.ones(1, n, device=device, dtype=torch.long),
                        position_ids=torch.arange(start, n, device=device)[None], cache=one, use_cache=True,
                        logits_to_keep=1)
            layers = out.cache.layers
            if known is not None:
                known[prompt] = [(layer.keys, layer.values) for layer in layers]
            if keys is None:  # (b, heads, P, head_dim); left padding stays zero: the attention mask hides it
                keys = [layer.keys.new_zeros(b, layer.keys.shape[1], P, layer.keys.shape[3]) for layer in layers]
                values = [layer.values.new_zeros(b, layer.values.shape[1], P, layer.values.shape[3])
                          for layer in layers]
                logits = out.logits.new_empty(b, out.logits.shape[-1])
            for k, v, layer in zip(keys, values, layers):
                k[rows, :, P - n:] = layer.keys
                v[rows, :, P - n:] = layer.values
            logits[rows] = out.logits[0, -1]
        for index, (k, v) in enumerate(zip(keys, values)):
            cache.update(k, v, index)
        return cache, logits
    input_ids = torch.full((b, P), pad_id, dtype=torch.long)
    for i, p in enumerate(prompts):
        input_ids[i, P - len(p):] = torch.tensor(p, dtype=torch.long)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask, position_ids=position_ids,
                   cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1, :]
    return cache, logits


def _longest_known_prefix(known: dict, prompt: tuple[int, ...]) -> tuple[int, list]:
    """(length, per-layer keys/values) of the longest start `prompt` shares with a kept prompt; at least its
    last token is left to run, which gives the logits that predict the first new token."""
    best, best_kv = 0, []
    for other, kv in known.items():
        n = 0
        limit = min(len(other), len(prompt) - 1)
        while n < limit and other[n] == prompt[n]:
            n += 1
        if n > best:
            best, best_kv = n, kv
    return best, best_kv


def _sample(logits_V: torch.Tensor, temperature: float, top_p: float, greedy: bool,
            generators: list[torch.Generator] | None = None) -> torch.Tensor:
    """Next token per row: argmax, or temperature + nucleus (top-p) sampling, row i drawing from generators[i].

    Sampling is a race of exponential clocks (the Gumbel-max trick): the token is argmax_v p_v / E_v with
    E_v ~ Exp(1) drawn from the row's own generator, which picks v with probability p_v. A row's token then
    depends only on its own logits and generator, never on the other rows; and the tiny differences in logits
    that another batch composition causes can change it only when the two best p_v / E_v nearly tie
    (inverse-CDF sampling would flip at any of the V cumulative boundaries).
    """
    if greedy:
        return logits_V.argmax(-1)
    probs = torch.softmax(logits_V / temperature, dim=-1)
    if top_p < 1.0:
        probs = nucleus(probs, top_p)
    V = probs.shape[-1]
    # E = -log U with U uniform in [0, 1) (`exponential_` draws the same law, ~8x slower on CPU). U = 0, which a
    # float32 draw hits once in 2**24, gives E = inf: that token sits this race out. (-log(1 - U) would give
    # E = 0 there and let a token of probability 1e-30 win, once per ~110 tokens at a 151k vocabulary.)
    uniforms = torch.stack([torch.rand(V, device=probs.device, generator=g) for g in generators])
    clocks = -torch.log(uniforms)
    return (probs / clocks).argmax(-1)


def nucleus(probs: torch.Tensor, top_p: float, candidates: int = 64) -> torch.Tensor:
    """`probs` (b, V) with every token outside its row's nucleus set to 0: the smallest set of most probable
    tokens whose mass reaches `top_p`, taken in descending order (a token is kept while the mass before it is
    <= top_p).

    Sorting all V probabilities of every row at every decoded token cost more than the model's output layer at
    a 152k vocabulary (benchmarks/sampling.py). The nucleus of a trained model at top-p 0.95 is usually a few
    tokens, so the rows are first cut to their `candidates` most probable tokens (`topk`, one pass over V);
    only a row whose nucleus does not fit in them is sorted in full. Same result as the full sort (which of
    several exactly equal probabilities at the nucleus boundary is kept may differ, as between two sorts).
    """
    k = min(candidates, probs.shape[-1])
    top, order = probs.topk(k, dim=-1)  # sorted, descending
    outside = top.cumsum(-1) - top > top_p
    fits = outside[:, -1] if k < probs.shape[-1] else torch.ones_like(outside[:, -1])
    out = torch.zeros_like(probs).scatter_(-1, order, top.masked_fill(outside, 0.0))
    if not bool(fits.all()):  # a flat row: its nucleus reaches past the candidates
        wide = (~fits).nonzero().squeeze(1)
        full, full_order = probs[wide].sort(dim=-1, descending=True)
        full = full.masked_fill(full.cumsum(-1) - full > top_p, 0.0)
        out[wide] = torch.zeros_like(full).scatter_(-1, full_order, full)
    return out


def _eos_ids(model, tokenizer) -> set[int]:
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, list) else [ids]) if ids is not None else set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


class SamplingCopy:
    """A plain (no adapters, no autocast) copy of the policy in the compute dtype, used for sampling.

    Sampling runs one small forward per token, where LoRA's extra matmuls and autocast's per-op dispatch cost
    more than the model itself on CPU. So, like trainers that sample with an inference engine (vLLM in TRL and
    verl), pmd samples from a copy whose weights are refreshed after every update: LoRA deltas merged in
    float32 and rounded once to the compute dtype. The trainable weights are never touched by the merge.
    """

    def __init__(self, base_model: torch.nn.Module):
        import copy

        # a plain transformers model, as loaded: no `.to(dtype)`, which would also round float32 buffers such
        # as the rotary frequencies and change every logit
        self.model = copy.deepcopy(base_model)
        self.model.requires_grad_(False)
        self.model.eval()

    @torch.no_grad()
    def sync(self, policy: torch.nn.Module) -> None:
        """Copy the policy's current weights in (merging LoRA adapters, if any)."""
        target = dict(self.model.named_parameters())
        for name, module in policy.named_modules():
            if hasattr(module, "get_delta_weight") and hasattr(module, "base_layer"):  # a LoRA layer
                merged = module.base_layer.weight.float()
                for adapter in module.active_adapters:
                    merged = merged + module.get_delta_weight(adapter).float()
                target[_plain_name(name) + ".weight"].copy_(merged)
        for name, p in policy.named_parameters():
            plain = _plain_name(name)
            if p.requires_grad and plain in target and "lora_" not in name:  # full fine-tuning
                target[plain].copy_(p)


def _plain_name(peft_name: str) -> str:
    """`base_model.model.model.layers.0.q_proj.base_layer` -> `model.layers.0.q_proj` (transformers names)."""
    name = peft_name.removeprefix("base_model.model.")
    return name.replace(".base_layer", "")
