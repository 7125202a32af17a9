# pytest tests/test_base_eval.py -q
"""The initial model's evaluation is computed once per key and reused by the runs that share it."""

from __future__ import annotations

import json

from pmd.config import Config, apply, fields
from pmd.experiments import base_eval
from pmd.runlog import RunDir
from pmd import loop as train_mod
from pmd.loop import train
from test_train import TINY


def test_training_only_keys_are_config_keys():
    assert base_eval.TRAINING_ONLY <= set(fields()), base_eval.TRAINING_ONLY - set(fields())


def test_the_keys_only_pmds_teacher_and_memory_read_are_training_only():
    """A key documented as pmd's own ("pmd: ...") acts on the teacher or the memory, after step 0: a new one
    left out of TRAINING_ONLY would make every arm that sets it recompute the initial evaluation."""
    pmd_only = {name for name, spec in Config.__dataclass_fields__.items()
                if spec.metadata.get("help", "").startswith(("pmd:", "pmd,"))}
    assert pmd_only and pmd_only <= base_eval.TRAINING_ONLY, pmd_only - base_eval.TRAINING_ONLY


def test_key_ignores_the_arm_and_sees_everything_that_changes_the_evaluation():
    base = Config().to_dict()
    key = base_eval.cache_key(base, world=1)
    for arm in [{"method": "pmd", "memory_levels": ["experience"]}, {"method": "sdpo", "freeze": "memory"},
                {"reflector": "local:x", "learning_rate": 1e-3, "output_dir": "elsewhere"}]:
        assert base_eval.cache_key({**base, **arm}, world=1) == key
    for change in [{"seed": 1}, {"model": "tiny-random"}, {"eval_samples": 8}, {"max_new_tokens": 9},
                   {"threads": 3}, {"task_params": {"max_digits": 2}}, {"a_future_key": 1}]:
        assert base_eval.cache_key({**base, **change}, world=1) != key, change
    assert base_eval.cache_key(base, world=2) != key


def test_store_and_load_round_trip_and_a_bad_file_is_a_miss(tmp_path):
    config = {**Config().to_dict(), "base_eval_cache": str(tmp_path)}
    path = base_eval.cache_path(config, 1)
    assert base_eval.load(path) is None and base_eval.cache_path(Config().to_dict(), 1) is None
    base_eval.store(path, config, {"eval/accuracy": 0.25, "eval/n": 4})
    assert base_eval.load(path) == {"eval/accuracy": 0.25, "eval/n": 4}
    path.write_text("{not json")
    assert base_eval.load(path) is None


def test_fields_are_stored_and_read_with_todays_names(tmp_path):
    path = tmp_path / "key.json"
    base_eval.store(path, {}, {"eval_accuracy": 0.25, "eval_n": 4})  # a trainer still writing the flat names
    assert json.loads(path.read_text())["eval"] == {"eval/accuracy": 0.25, "eval/n": 4}
    path.write_text(json.dumps({"eval": {"eval_accuracy": 0.5, "eval_accuracy_greedy": 0.4}}))  # written before
    assert base_eval.load(path) == {"eval/accuracy": 0.5, "eval/accuracy_greedy": 0.4}


def test_a_second_arm_reads_the_first_arms_initial_evaluation(tmp_path, monkeypatch):
    shared = {**TINY, "steps": 1, "base_eval_cache": str(tmp_path / "base_eval")}
    first = train(apply(Config(), {**shared, "method": "grpo", "output_dir": str(tmp_path / "grpo")}))
    assert "eval/cached" not in RunDir(first).metrics()[0]
    [stored] = (tmp_path / "base_eval").glob("*.json")
    data = json.loads(stored.read_text())
    data["eval"]["eval/accuracy"] = 0.42  # a value only the cache can produce (a random model scores 0)
    stored.write_text(json.dumps(data))

    initial_evaluations = []
    evaluate = train_mod.evaluate_run

    def counting(run, step):
        initial_evaluations.extend([run.cfg.output_dir] if step == 0 else [])
        return evaluate(run, step)

    monkeypatch.setattr(train_mod, "evaluate_run", counting)
    second = train(apply(Config(), {**shared, "method": "sdpo", "output_dir": str(tmp_path / "sdpo")}))
    row = RunDir(second).metrics()[0]
    assert row["eval/cached"] is True and row["eval/accuracy"] == 0.42 and initial_evaluations == []
    other_seed = train(apply(Config(), {**shared, "method": "sdpo", "seed": 1, "output_dir": str(tmp_path / "s1")}))
    assert "eval/cached" not in RunDir(other_seed).metrics()[0] and initial_evaluations == [str(other_seed)]
