# pytest tests/test_config.py -q
"""Config parsing: defaults, YAML + key=value, errors that name the key and the valid choices."""

import pytest

from pmd import tasks
from pmd.config import Config, ConfigError, apply, build, help_text


def test_defaults_match_the_default_task():
    cfg = Config()
    # Empty task_params: the task's own defaults, which for the default task are pmd's (in pmd.tasks.reasoning).
    assert cfg.task == tasks.DEFAULT_TASK and cfg.task_params == {}


def test_another_task_does_not_inherit_the_default_tasks_parameters(tmp_path):
    # chain_sum's min_terms/max_digits would be rejected by leg_counting and ignored by humaneval.
    assert build(["task=leg_counting"]).task_params == {}
    assert build(["task=leg_counting", "task_params={min_animals: 2}"]).task_params == {"min_animals": 2}
    path = tmp_path / "c.yaml"
    path.write_text("task: basic_arithmetic\n")
    assert build([str(path), "task_params={max_terms: 3}"]).task_params == {"max_terms": 3}
    # Parameters the user chose stay with the task they chose them for, even when it changes later.
    assert build(["task_params={max_digits: 2}", "task=basic_arithmetic"]).task_params == {"max_digits": 2}
    assert build(["task=chain_sum"]).task_params == {}


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("method: grpo\nsteps: 7\ntask_params: {max_digits: 2}\n")
    cfg = build([str(path), "steps=9", "learning_rate=1e-4", "teacher_feedback=off"])
    assert (cfg.method, cfg.steps, cfg.learning_rate, cfg.teacher_feedback) == ("grpo", 9, 1e-4, "off")
    assert cfg.task_params == {"max_digits": 2}


@pytest.mark.parametrize("arg, words", [
    ("stpes=3", ["stpes", "steps"]),
    ("method=ppo", ["method", "grpo", "sdpo"]),
    ("teacher_model_kind=frozen", ["teacher_model_kind", "ema", "live", "base"]),
    ("steps=1.5", ["steps", "integer"]),
    ("steps=0", ["steps", ">= 1"]),
    ("distillation_alpha=1.5", ["distillation_alpha", "[0, 1]"]),
    ("use_feedback=maybe", ["use_feedback", "true or false"]),
    ("task_params=[1, 2]", ["task_params", "mapping"]),
    ("learning_rate=fast", ["learning_rate", "number"]),
    ("steps", ["key=value"]),
])
def test_errors_name_the_key(arg, words):
    with pytest.raises(ConfigError) as e:
        build([arg])
    for w in words:
        assert w in str(e.value)


def test_missing_yaml_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        build([str(tmp_path / "nope.yaml")])


def test_help_lists_every_key():
    text = help_text()
    for name in Config.__dataclass_fields__:
        assert f"  {name}=" in text


def test_a_renamed_key_in_an_old_config_still_means_what_it_meant():
    assert apply(Config(), {"use_feedback": "false"}).teacher_feedback == "off"
    assert apply(Config(), {"use_feedback": True}).teacher_feedback == "verbatim"
    with pytest.raises(ConfigError, match="use_feedback"):
        apply(Config(), {"use_feedback": "maybe"})
