"""``ist-ds``: the command line.

``ist-ds train --config RECIPE.yaml [--set section.key=value ...] [--resume]`` runs a job under any
launcher; ``ist-ds check RECIPE.yaml [--world-size N]`` (or ``train --check``) validates a recipe
completely in seconds without training (ist_ds/jobs/preflight.py); ``ist-ds report RUN_DIR [RUN_DIR ...]
--out DIR`` renders plots and a Markdown summary of finished runs (docs/monitoring.md);
``python -m ist_ds.jobs.cli`` is the same. A mistake the user can fix ends with one ``ist-ds: error:``
line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import sys

from ist_ds.core.errors import ISTError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ist-ds", description="Importance-aware Sparse Tuning on DeepSpeed and FSDP2")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="run a fine-tuning job from a YAML recipe")
    train.add_argument("--config", help="the recipe YAML (default: the embedded quick start)")
    _recipe_options(train)
    train.add_argument("--check", action="store_true",
                       help="check the recipe as `ist-ds check` does and exit without training")
    train.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    check = sub.add_parser("check", help="validate a recipe completely without training (paths, model on the "
                                         "meta device, PEFT targets, batch arithmetic, DeepSpeed config)")
    check.add_argument("config", nargs="?", metavar="RECIPE",
                       help="the recipe YAML (default: the embedded quick start)")
    _recipe_options(check)
    report = sub.add_parser("report", help="plots and a Markdown summary of finished runs")
    report.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="a run's output_dir (event files, summary.json)")
    report.add_argument("--out", required=True, help="directory for the PNGs and report.md")
    report.add_argument("--label", dest="labels", action="append", default=None, metavar="NAME",
                        help="name of each run in the plots, in order (default: the directory names)")
    report.add_argument("--title", default="IST run report", help="heading of report.md")
    args = parser.parse_args(argv)

    if args.command == "report":
        return _report(args)
    if args.command == "train" and args.world_size is not None and not args.check:
        parser.error("--world-size goes with --check (a job takes its world size from the launcher)")
    if args.allow_fresh_start and not args.resume:
        parser.error("--allow-fresh-start goes with --resume")

    from ist_ds.jobs.recipe import Recipe

    try:
        recipe = Recipe.from_yaml(args.config) if args.config else Recipe()
        if args.overrides:
            recipe = recipe.with_overrides(args.overrides)
        if args.command == "check" or args.check:
            return _check(recipe, args)
        from ist_ds.jobs.runner import run

        run(recipe, resume=args.resume, allow_fresh_start=args.allow_fresh_start)
    except ISTError as e:
        message = " ".join(str(e).split())  # one line, whatever the message holds
        log = logging.getLogger("ist_ds")
        # The job's log (with its rank prefix) gets it too, once logging is set up and its stream is open
        # (a handler left by an earlier in-process run may write to a closed stream).
        if log.handlers and not any(getattr(getattr(h, "stream", None), "closed", False) for h in log.handlers):
            log.error("error: %s", message)
        print(f"ist-ds: error: {message}", file=sys.stderr)
        return 2
    return 0


def _recipe_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one recipe value (YAML syntax); repeatable")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the latest checkpoint in output_dir/checkpoints; an error when there "
                             "is none")
    parser.add_argument("--allow-fresh-start", action="store_true",
                        help="with --resume: start from step 0 when output_dir has no checkpoint yet (e.g. a "
                             "scheduler that always passes --resume)")
    parser.add_argument("--world-size", type=int, default=None, metavar="N",
                        help="check: the number of ranks to check the batch arithmetic for (default: WORLD_SIZE "
                             "from the environment, else 1)")


def _check(recipe, args: argparse.Namespace) -> int:
    """``ist-ds check``: every finding on stdout, every problem as one ``ist-ds: error:`` line on stderr."""
    import os

    from ist_ds.jobs.preflight import check_recipe

    world = args.world_size if args.world_size is not None else int(os.environ.get("WORLD_SIZE", "1"))
    found = check_recipe(recipe, world, resume=args.resume, allow_fresh_start=args.allow_fresh_start)
    for fact in found.facts:
        print(f"ok: {fact}")
    for problem in found.problems:
        print(f"ist-ds: error: {problem}", file=sys.stderr)
    if found.problems:
        print(f"{len(found.problems)} problem(s) in {args.config or 'the embedded quick start'} "
              f"at world size {world}", file=sys.stderr)
        return 2
    print(f"recipe {args.config or '(embedded quick start)'} is ready for {world} rank(s)")
    return 0


def _report(args: argparse.Namespace) -> int:
    from ist_ds.observe.console import setup_logging
    from ist_ds.observe.report import write_report

    setup_logging()
    log = logging.getLogger("ist_ds")
    try:
        written = write_report(args.run_dirs, args.out, labels=args.labels, title=args.title)
    except ISTError as e:
        print(f"ist-ds: error: {e}", file=sys.stderr)
        return 2
    for name, path in written.items():
        log.info("%-12s %s", name, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
