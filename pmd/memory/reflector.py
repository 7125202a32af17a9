"""Who writes the reflections: a model that turns a prompt into text (docs/method.md §11).

    reflector=policy                        the current policy (default; PMD's self-reflection). Under
                                            freeze=reflector: the initial weights instead.
    reflector=local:<model>                 another local model (packaged name, folder or HF id)
    reflector=openai:<base_url>#<model>     an OpenAI-compatible chat endpoint (vLLM, llama.cpp server, ...);
                                            the key comes from $PMD_REFLECTOR_API_KEY or $OPENAI_API_KEY

A reflector returns one string per prompt, or None where the call failed (timeout, HTTP error): failures
are counted by the caller and never stop training. Local models write the answer field by field (`fields`:
each marker such as "STRATEGY:" is put in the model's mouth and it writes one line), which small models
need to keep to the format: SmolLM2-135M wrote no parseable line in 4 of 4 free samples, and with only the
first marker prefilled it often copied the prompt's format description or rambled past the line budget.
Endpoints get the instruction only. Local sampling draws from one seeded generator per prompt and field,
so reflection neither depends on nor disturbs the training random stream.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from pmd.rollout import encode_chat, generate, sample_seed


class LocalReflector:
    """Samples from a local causal LM. `model` is a callable returning the model to use right now (the
    policy's sampling copy changes after every update).

    With `fields`, the answer is written one field at a time: each field's prefix (e.g. "STRATEGY:") is put
    in the model's mouth and it writes until a newline (or another stop character). A small model then
    cannot drift out of the format, and a field costs only the tokens of one line.
    """

    def __init__(self, model: Callable[[], torch.nn.Module], tokenizer, *, temperature: float,
                 max_new_tokens: int, batch_size: int):
        self.model = model
        self.tokenizer = tokenizer
        self.temperature = temperature
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self._stops: dict[str, set[int]] = {}

    def __call__(self, prompts: list[str], seed: int, prefill: str = "",
                 fields: list[tuple[str, str]] | None = None) -> list[str | None]:
        """One answer per prompt. `fields`: [(prefix, stop characters)], written in order (see the class)."""
        if not prompts:
            return []
        fields = fields or [(prefill, "")]
        answers = ["" for _ in prompts]
        heads = [encode_chat(self.tokenizer, [{"role": "user", "content": p}]) for p in prompts]
        model, kept = self.model(), {}  # later fields start from the keys/values of the earlier ones
        for f, (prefix, stops) in enumerate(fields):
            answers = [a + prefix for a in answers]
            ids = [h + self.tokenizer(a, add_special_tokens=False)["input_ids"] for h, a in zip(heads, answers)]
            out, _ = generate(model, self.tokenizer, ids, max_new_tokens=self.max_new_tokens,
                              temperature=self.temperature, top_p=1.0, greedy=False, batch_size=self.batch_size,
                              seeds=[sample_seed("reflect", seed, i, f) for i in range(len(ids))],
                              stop_ids=self._stop_ids(stops), prompt_cache=kept)
            texts = self.tokenizer.batch_decode(out, skip_special_tokens=True)
            answers = [a + _cut(t, stops) for a, t in zip(answers, texts)]
        return answers

    def _stop_ids(self, stops: str) -> set[int]:
        """Vocabulary ids whose text contains any stop character (computed once per stop set)."""
        if not stops:
            return set()
        if stops not in self._stops:
            vocab = self.tokenizer.convert_ids_to_tokens(list(range(len(self.tokenizer))))
            texts = [self.tokenizer.convert_tokens_to_string([t]) if t is not None else "" for t in vocab]
            self._stops[stops] = {i for i, t in enumerate(texts) if any(c in t for c in stops)}
        return self._stops[stops]


class OpenAIReflector:
    """POSTs each prompt to `<base_url>/chat/completions`. Errors become None (counted as reflect errors)."""

    def __init__(self, base_url: str, model: str, *, temperature: float, max_new_tokens: int,
                 timeout: float = 60.0):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.temperature = temperature
        self.max_new_tokens = max_new_tokens
        self.timeout = timeout
        key = os.environ.get("PMD_REFLECTOR_API_KEY") or os.environ.get("OPENAI_API_KEY")
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}

    def __call__(self, prompts: list[str], seed: int, prefill: str = "",
                 fields: list[tuple[str, str]] | None = None) -> list[str | None]:
        import requests

        out: list[str | None] = []
        for i, prompt in enumerate(prompts):
            body = {"model": self.model, "messages": [{"role": "user", "content": prompt}],
                    "temperature": self.temperature, "max_tokens": self.max_new_tokens, "seed": seed + i}
            try:
                response = requests.post(self.url, json=body, headers=self.headers, timeout=self.timeout)
                response.raise_for_status()
                out.append(response.json()["choices"][0]["message"]["content"])
            except (requests.RequestException, ValueError, KeyError, IndexError, TypeError):
                out.append(None)
        return out


def _cut(text: str, stops: str) -> str:
    """Text up to (not including) the first stop character."""
    cut = min((i for i in (text.find(c) for c in stops) if i >= 0), default=len(text))
    return text[:cut]


def make_reflector(spec: str, *, policy: Callable[[], torch.nn.Module], tokenizer, load_model, temperature: float,
                   max_new_tokens: int, batch_size: int):
    """The reflector `spec` names. `policy()` returns the model that reflects by default (the current policy's
    sampling copy), `load_model(spec)` loads another local model with its tokenizer."""
    kind, where, name = parse_reflector_spec(spec)
    options = {"temperature": temperature, "max_new_tokens": max_new_tokens}
    if kind == "openai":
        return OpenAIReflector(where, name, **options)
    if kind == "local":
        model, local_tokenizer = load_model(where)
        return LocalReflector(lambda: model, local_tokenizer, batch_size=batch_size, **options)
    return LocalReflector(policy, tokenizer, batch_size=batch_size, **options)


def parse_reflector_spec(spec: str) -> tuple[str, str, str]:
    """'policy' | 'local:<model>' | 'openai:<url>#<model>' -> (kind, location, model name)."""
    if spec == "policy":
        return "policy", "", ""
    if spec.startswith("local:") and len(spec) > len("local:"):
        return "local", spec[len("local:"):], ""
    if spec.startswith("openai:"):
        url, sep, model = spec[len("openai:"):].partition("#")
        if url and sep and model:
            return "openai", url, model
    raise ValueError(f"reflector={spec!r}: valid forms are policy, local:<model>, openai:<base_url>#<model>")
