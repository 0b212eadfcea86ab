"""`fedlora run | eval | compare | tune | export | generate | report | costs`: the command line.

Heavy modules (torch, transformers, the config models that import them) are imported inside
the commands, so `fedlora --help` answers at once.
"""

from __future__ import annotations

import argparse
import errno
import sys
from pathlib import Path

from fedlora import __version__
from fedlora.cli_common import (
    config_options,
    print_summary,
    progress_options,
    resolve_run,
    run_options,
    study_options,
)
from fedlora.errors import ConfigError, one_line
from fedlora.flower.cli import add_parser as add_flower_parser

# Errors a user can fix (a bad config, data file or path), shown as one line with exit
# code 2. ConfigError (and DataError) messages name the field or file; the OS errors carry
# the path. Anything else is a bug and keeps its traceback.
INPUT_ERRORS = (ConfigError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)


def _cmd_run(args: argparse.Namespace) -> int:
    from fedlora.runtime.inprocess import Simulation

    run_dir, cfg = resolve_run(args)
    cfg.check_files()
    replay = None
    if args.replay:
        from fedlora.runtime.replay import Participation

        replay = Participation.read(Path(args.replay))
    summary = Simulation(cfg, run_dir, progress=not args.quiet, replay=replay).run(resume=bool(args.resume))
    print_summary(run_dir, summary)
    return 0


def _cmd_partition(args: argparse.Namespace) -> int:
    from fedlora.config import load_config, parse_overrides
    from fedlora.data.node_files import write_partitions

    cfg = load_config(args.config, parse_overrides(args.set))
    cfg.check_files()
    manifest = write_partitions(cfg, Path(args.out))
    for c in manifest["clients"]:
        print(f"client {c['client']}: {Path(args.out) / c['file']}  {c['examples']} examples  {c['label_counts']}")
    print(f"Flower config (nodes.local_data): {Path(args.out) / 'config.yaml'}; start node k with "
          f"--node-config 'partition-id=k num-partitions={manifest['num_clients']} data-file=<its file>'")
    return 0


def _cmd_costs(args: argparse.Namespace) -> int:
    from fedlora.config import PAPER_CLIENT_RANKS
    from fedlora.costs import architecture_shapes, method_cost_rows

    ranks = [int(r) for r in args.ranks.split(",")] if args.ranks else PAPER_CLIENT_RANKS
    if any(r < 1 for r in ranks):
        raise ConfigError("config error: --ranks: ranks must be >= 1")
    targets = args.targets.split(",") if args.targets else None
    shapes = architecture_shapes(args.arch, targets)
    total = args.total_params or shapes.total_params
    print(f"architecture {args.arch}: {shapes.total_params:,} parameters, "
          f"{len(shapes.modules)} target modules, client ranks {ranks}")
    if args.total_params:
        print(f"cost denominator overridden: {total:,}")
    print(f"{'method':<28} {'client-side cost %':>18}  what each client trains and uploads")
    for method, what, pct in method_cost_rows(shapes, ranks, total):
        print(f"{method:<28} {pct:>17.4f}%  {what}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from fedlora.config import load_config, parse_overrides
    from fedlora.runtime.evaluation import evaluate_command

    if args.repeat < 1:
        raise ConfigError("config error: --repeat: must be >= 1")
    cfg = load_config(args.config, parse_overrides(args.set))
    cfg.check_files()
    evaluate_command(cfg, Path(args.run) if args.run else None, args.repeat, Path(args.out) if args.out else None)
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from fedlora.compare import parse_methods, parse_seeds, run_comparison

    methods, seeds = parse_methods(args.methods), parse_seeds(args.seeds)
    out = Path(args.out or f"runs/compare-{Path(args.config).stem}")
    if args.target is not None and not 0 < args.target <= 1:
        raise ConfigError(f"config error: --target: accuracy in (0, 1], got {args.target}")
    runs = run_comparison(Path(args.config), methods, seeds, out, args.set, progress=not args.quiet,
                          target=args.target, reference=args.reference)
    print((out / "comparison.md").read_text())
    print(f"comparison directory: {out}")
    failed = [r for r in runs if r.error]
    return 1 if failed else 0


def _cmd_tune(args: argparse.Namespace) -> int:
    from fedlora.compare import parse_methods, parse_seeds
    from fedlora.tune import read_grid, run_tuning

    methods, test_seeds = parse_methods(args.methods), parse_seeds(args.seeds)
    grid = read_grid(args.grid, methods)
    if args.validation_examples < 1:
        raise ConfigError("config error: --validation-examples: must be >= 1")
    out = Path(args.out or f"runs/tune-{Path(args.config).stem}")
    command = run_tuning(Path(args.config), methods, grid, out, args.validation_examples, args.seed,
                         test_seeds, args.set, progress=not args.quiet, allow_edge=args.allow_edge)
    print((out / "tuning.md").read_text())
    print(f"tuning directory: {out}")
    print(f"next, the chosen settings at {len(test_seeds)} seeds on the test set:\n  {command}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from fedlora.export import export_run

    run_dir = Path(args.run_dir)
    if args.rank is not None and args.rank < 1:
        raise ConfigError("config error: --rank: must be >= 1")
    suffix = "" if args.rank is None else f"-r{args.rank}"
    out = Path(args.out or run_dir / f"export-{args.format}{suffix}")
    info = export_run(run_dir, args.format, out, args.rank, args.base)
    print(f"wrote {info['format']} to {info['out']}: {info['modules']} modules, ranks {info['ranks']}")
    if args.rank is not None:
        print(f"relative error of the rank-{args.rank} update: {info['relative_error']:.3e}")
    if args.format == "peft":
        written = " (written there: the base as the run trained on it)" if info["base_written"] else ""
        print(f"base model: {info['base']}{written}")
        if not info["base_exact"]:
            print("note: not the exact weights the run trained on (a GGUF's unquantised original): "
                  "logits differ slightly; --base local writes the exact base")
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from fedlora.generate import generate

    print(generate(Path(args.run_dir), args.prompt, args.max_new_tokens, args.temperature, args.top_p,
                   args.seed, args.raw, args.device))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from fedlora.compare import rebuild_comparison
    from fedlora.publish import publish
    from fedlora.report import write_report

    path = Path(args.run_dir)
    if args.target is not None and not 0 < args.target <= 1:
        raise ConfigError(f"config error: --target: accuracy in (0, 1], got {args.target}")
    if any(path.glob("seed_*/*/metrics.jsonl")):  # a `fedlora compare` directory
        rebuild_comparison(path, args.target, args.reference)
        print(f"wrote {path / 'comparison.md'} and its figures from the runs' metrics")
    else:
        if args.reference is not None:
            raise ConfigError(f"config error: --reference: only for a comparison directory, and {path} is one run")
        print(f"wrote {write_report(path)}")
    if args.publish is not None:
        files, size = publish(path, Path(args.publish))
        print(f"published {files} files ({size / 1e6:.1f} MB: configs, metrics, per-item records, "
              f"tables, figures; no checkpoints) to {args.publish}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedlora", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"fedlora {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    quiet = progress_options()
    run = sub.add_parser("run", help="run a federated fine-tuning in one process", parents=[
        run_options("YAML config (see configs/)", "runs/<method>-<time>",
                    "continue an interrupted run (verified first); with --set federation.rounds=N, extend it"),
        quiet])
    run.add_argument("--replay", metavar="RUN_DIR", help="take part as the clients of a recorded run did (a Flower "
                     "run with failures): same config and seed give its final adapter")
    run.set_defaults(func=_cmd_run)

    part = sub.add_parser("partition", help="write each client's partition as its own data file (for real nodes)",
                          parents=[config_options("YAML config (the whole dataset, as for `fedlora run`)")])
    part.add_argument("--out", required=True, help="a new folder: client_NNN.jsonl, config.yaml, manifest.json")
    part.set_defaults(func=_cmd_partition)

    ev = sub.add_parser("eval", help="evaluate the untuned model (or a run's final model) on a config's test set / MMLU",
                        parents=[config_options("YAML config: its data and evaluation sections (with --run: its "
                                                "model, lora and algorithm must be the run's)")])
    ev.add_argument("--run", metavar="RUN_DIR", help="evaluate this run's final global model instead")
    ev.add_argument("--repeat", type=int, default=1, help="repeat N times; report the median time")
    ev.add_argument("--out", help="write the results as JSON here")
    ev.set_defaults(func=_cmd_eval)

    methods_config = "YAML config (its `methods:` mapping gives per-method options)"
    cmp = sub.add_parser("compare", help="run several methods on identical partitions and budgets", parents=[
        config_options(methods_config, "override a config field for every method (repeatable)"),
        study_options("comparison", "compare", "0", "comma-separated seeds, e.g. 0,1,2"), quiet])
    cmp.add_argument("--target", type=float, help="accuracy for the time-to-accuracy table "
                     "(default: 0.95 × the lowest best accuracy over the methods)")
    cmp.add_argument("--reference", default="fedit",
                     help="method the paired differences and p-values are taken against (default fedit; "
                     "skipped when it did not run)")
    cmp.set_defaults(func=_cmd_compare)

    tune = sub.add_parser("tune", help="choose every method's lr and settings on a validation split, equal budgets",
                          parents=[config_options(methods_config, "override a config field for the tuning runs "
                                                  "and the printed test command (the test budget is the "
                                                  "tuning budget), e.g. threads=1"),
                                   study_options("tuning", "tune", "0,1,2", "seeds of the printed test-set compare command"),
                                   quiet])
    tune.add_argument("--grid", help="YAML: lr: [client lrs] (default 1e-3, 3e-3, 1e-2), "
                      "settings: {method: [{option: value}, ...]}, max_settings: N (the same cap for every method)")
    tune.add_argument("--validation-examples", type=int, default=200,
                      help="examples carved off the training pool to choose by (default 200)")
    tune.add_argument("--seed", type=int, default=0, help="seed of the tuning runs")
    tune.add_argument("--allow-edge", action="store_true",
                      help="write tuned.yaml even when a chosen lr is an end of the grid (flagged in tuning.md)")
    tune.set_defaults(func=_cmd_tune)

    exp = sub.add_parser("export", help="a finished run as a PEFT adapter or a merged model")
    exp.add_argument("run_dir")
    exp.add_argument("--format", choices=["peft", "merged"], default="peft")
    exp.add_argument("--rank", type=int, help="SVD-compress the update to this rank (prints the error)")
    exp.add_argument("--out", help="output folder (default RUN_DIR/export-<format>[-r<R>])")
    exp.add_argument("--base", choices=["auto", "local", "hub"], default="auto",
                     help="peft: the adapter's base model: `local` writes it to OUT/base (exact); `hub` "
                     "names the hub original; `auto` (default): the run's hub name or folder when that is "
                     "exactly its base, else local")
    exp.set_defaults(func=_cmd_export)

    gen = sub.add_parser("generate", help="text from a finished run's model")
    gen.add_argument("run_dir")
    gen.add_argument("--prompt", required=True, help="an instruction (chat template where the tokenizer has "
                     "one), or a classification run's text to classify")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; > 0: sample")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (with --temperature > 0)")
    gen.add_argument("--seed", type=int, default=0, help="seed of the sampling")
    gen.add_argument("--raw", action="store_true", help="send the prompt as typed (no template)")
    gen.add_argument("--device", help="auto | cpu | cuda | cuda:N | mps (default: the run's model.device)")
    gen.set_defaults(func=_cmd_generate)

    rep = sub.add_parser("report", help="markdown report with figures of one run, or a comparison's "
                         "tables and figures rebuilt from its runs' metrics (no training)")
    rep.add_argument("run_dir", help="a run directory, or a `fedlora compare` output directory")
    rep.add_argument("--target", type=float, help="comparison: accuracy for time-to-accuracy "
                     "(default: the recorded command's --target, else as in compare)")
    rep.add_argument("--reference", help="comparison: the method paired differences are taken against "
                     "(default: the recorded command's --reference, else fedit)")
    rep.add_argument("--publish", metavar="DEST", help="then copy what a citation needs (configs, "
                     "environments, partitions, metrics, summaries, per-item records, tables, figures; "
                     "no checkpoints or merges) into DEST, e.g. docs/NAME, keeping the tree")
    rep.set_defaults(func=_cmd_report)

    costs = sub.add_parser("costs", help="client-side cost %% of each method for an architecture")
    costs.add_argument("--arch", default="gpt2", help="gpt2 | tinyllama | qwen2.5-3b | hub name | folder")
    costs.add_argument("--targets", help="comma-separated target modules (default: the paper's)")
    costs.add_argument("--ranks", help="comma-separated client ranks (default: the paper's 64,32,16,16,8,8,4,4,4,4)")
    costs.add_argument("--total-params", type=int,
                       help="denominator override (the paper divides by 124M / 1.1B / 3B)")
    costs.set_defaults(func=_cmd_costs)

    add_flower_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from fedlora.runtime.progress import setup_logging

    setup_logging()
    try:
        return args.func(args)
    except INPUT_ERRORS as err:
        print(one_line(err), file=sys.stderr)
        return 2
    except OSError as err:  # a write outside atomic_write (figures, exports) on a full disk
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(f"disk full: could not write {err.filename or 'a file'}; free some space and retry", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
