# pytest tests/test_config_bounds.py -q
"""Every value the config accepts works: each numeric key at each extreme it accepts runs a short pmd run on the
tiny model to the end (checkpoints, evaluation, report), or the config refuses it with a message naming the key."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from pmd.config import Config, ConfigError, apply
from pmd.loop import train

# Candidates tried from the bottom up: the first one the config accepts is the key's lower extreme.
LOW = (-1.0, 0, 1e-3, 1)
RUN = dict(model="tiny-random", method="pmd", steps=2, problems_per_step=2, group_size=2, max_new_tokens=6,
           train_problems=4, eval_problems=2, eval_samples=1, micro_batch_size=2, threads=1, embedder="hashing",
           behavior_every=1, teacher_feedback="verbatim")


def accepted(key: str, value) -> bool:
    try:
        apply(Config(), {**RUN, key: value})
        return True
    except ConfigError:
        return False


def extremes() -> list[tuple[str, object]]:
    out = []
    hints = typing.get_type_hints(Config)
    for f in dataclasses.fields(Config):
        tp = hints[f.name]
        if tp not in (int, float):
            continue
        low = next((v for v in LOW if accepted(f.name, tp(v))), None)
        if low is not None:
            out.append((f.name, tp(low)))
        if tp is float and accepted(f.name, 1.0) and not accepted(f.name, 1.0 + 1e-6):  # a [.., 1] key
            out.append((f.name, 1.0))
    return out


def test_the_bounds_are_found():
    found = extremes()
    for extreme in [("save_every", 0), ("eval_every", 0), ("steps", 1), ("seed", 0), ("distillation_alpha", 0.0),
                    ("distillation_alpha", 1.0), ("l3_min_sim", -1.0), ("distillation_is_clip", 1.0)]:
        assert extreme in found
    assert not any(value < 0 for key, value in found if key not in ("l3_min_sim", "l3_cluster_similarity",
                                                                   "dedup_threshold"))


@pytest.mark.parametrize("key,value", extremes(), ids=lambda x: str(x))
def test_each_accepted_extreme_runs_to_the_end(tmp_path, key, value):
    run = train(apply(Config(), {**RUN, key: value, "output_dir": str(tmp_path / "run")}))
    assert (run / "summary.json").exists() and (run / "final" / "config.json").exists()
    assert list((run / "checkpoints").iterdir())
