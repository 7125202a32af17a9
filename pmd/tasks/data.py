"""Shared plumbing for dataset-backed tasks: reading rows, checking parameters, splitting problems.

Rows come from a JSONL file (`path`), or from a Hugging Face dataset (`dataset`, with optional `config`
and `split`; a local folder written by `Dataset.save_to_disk` or holding data files also works). Errors
name the file and the 1-based row, so a malformed dataset is easy to fix.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
from pathlib import Path

Row = dict


class DataError(ValueError):
    """A dataset that cannot be used as given (the message names the file and row)."""


def check_params(task: str, params: dict, allowed: dict[str, str]) -> None:
    """Raise a ValueError naming an unknown parameter, with a suggestion and the valid list."""
    for key in params:
        if key not in allowed:
            close = difflib.get_close_matches(key, list(allowed), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"Unknown parameter {key!r} for task {task!r}.{hint} "
                             f"Valid parameters: {', '.join(sorted(allowed))}.")


def source_params_help() -> dict[str, str]:
    return {
        "path": "JSONL file with one problem per line",
        "dataset": "Hugging Face dataset id, or a local dataset folder",
        "config": "dataset configuration name (with dataset)",
        "split": "dataset split to read (with dataset; default train)",
        "limit": "read at most this many rows",
        "rows": "the rows themselves, given in-process (pmd.train(dataset=...))",
    }


def load_rows(params: dict, task: str) -> tuple[list[Row], str]:
    """(rows, source name) from `path`, `dataset` or in-process `rows`. Each row gets `_row`, its 1-based
    position."""
    if params.get("rows"):
        return [{**row, "_row": i + 1} for i, row in enumerate(params["rows"])], "dataset"
    path, dataset = params.get("path"), params.get("dataset")
    if bool(path) == bool(dataset):
        raise ValueError(f"task {task!r} needs exactly one of task_params path=FILE.jsonl or dataset=NAME")
    limit = params.get("limit")
    if path:
        rows = read_jsonl(path, limit)
        source = str(path)
    else:
        rows = read_hf(dataset, params.get("config"), params.get("split") or "train", limit)
        source = f"{dataset}[{params.get('split') or 'train'}]"
    if not rows:
        raise DataError(f"{source}: no rows")
    return rows, source


def read_jsonl(path: str | os.PathLike, limit: int | None = None) -> list[Row]:
    file = Path(path).expanduser()
    if not file.is_file():
        raise DataError(f"{path}: no such file")
    rows = []
    if file.suffix == ".json" and file.read_text(encoding="utf-8").lstrip().startswith("["):
        try:
            items = json.loads(file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise DataError(f"{path}: invalid JSON ({error.msg} at line {error.lineno})") from None
        for number, row in enumerate(items, 1):
            if not isinstance(row, dict):
                raise DataError(f"{path}: row {number}: expected a JSON object, got {type(row).__name__}")
            rows.append({**row, "_row": number})
        return rows[: int(limit)] if limit else rows
    with file.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}: row {number}: invalid JSON ({error.msg} at column {error.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}: row {number}: expected a JSON object, got {type(row).__name__}")
            row["_row"] = number
            rows.append(row)
            if limit and len(rows) >= int(limit):
                break
    return rows


def read_hf(name: str, config: str | None, split: str, limit: int | None = None) -> list[Row]:
    import datasets

    folder = Path(name).expanduser()
    if folder.is_dir() and ((folder / "dataset_info.json").exists() or (folder / "state.json").exists()):
        loaded = datasets.load_from_disk(str(folder))
        if isinstance(loaded, datasets.DatasetDict):
            loaded = loaded[split]
    else:
        try:
            loaded = datasets.load_dataset(str(folder) if folder.is_dir() else name, name=config, split=split)
        except Exception as error:  # hub unreachable, unknown split, ...
            raise DataError(f"{name}: could not load the dataset ({type(error).__name__}: {error})") from error
    rows = []
    for number, row in enumerate(loaded, 1):
        row = dict(row)
        row["_row"] = number
        rows.append(row)
        if limit and len(rows) >= int(limit):
            break
    return rows


def first_key(row: Row, keys: tuple[str, ...]):
    for key in keys:
        if key in row and row[key] not in (None, ""):
            return row[key]
    return None


def row_id(row: Row, task: str) -> str:
    value = first_key(row, ("id", "task_id", "question_id", "problem_id", "idx"))
    return str(value) if value is not None else f"{task}/{row['_row']}"


def check_unique_ids(ids: list[str], source: str) -> None:
    seen: dict[str, int] = {}
    for i, pid in enumerate(ids, 1):
        if pid in seen:
            raise DataError(f"{source}: row {i}: duplicate id {pid!r} (also row {seen[pid]})")
        seen[pid] = i


def in_eval_split(key: str, eval_fraction: float, salt: str = "") -> bool:
    """Deterministic, seed-independent problem-level split by a hash of `key`."""
    digest = hashlib.sha256(f"{salt}{key}".encode()).hexdigest()
    return int(digest[:12], 16) / float(1 << 48) < eval_fraction


def json_safe(value):
    """A JSON-serialisable copy (dataset rows may hold tuples, numpy scalars, bytes)."""
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        if isinstance(value, dict):
            return {str(k): json_safe(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [json_safe(v) for v in value]
        if hasattr(value, "item"):
            try:
                return value.item()
            except Exception:  # noqa: BLE001
                pass
        return str(value)


def split_problems(items: list, split: str, n: int, in_eval, mode: str = "holdout") -> list:
    """The first `n` items of a split. mode holdout: disjoint by `in_eval(item)`; shared: every item in both."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    if n <= 0:
        return []
    if mode == "shared":
        chosen = list(items)
    else:
        chosen = [it for it in items if in_eval(it) == (split == "eval")]
    return chosen[:n]
