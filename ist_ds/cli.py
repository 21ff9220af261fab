"""``ist-ds``: the command line.

``ist-ds train --config RECIPE.yaml [--set section.key=value ...] [--resume]`` runs a job under any
launcher; ``ist-ds report RUN_DIR [RUN_DIR ...] --out DIR`` renders plots and a Markdown summary of
finished runs (docs/monitoring.md); ``python -m ist_ds.cli`` is the same.
"""

from __future__ import annotations

import argparse
import logging
import sys

from ist_ds.errors import ISTError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ist-ds", description="Importance-aware Sparse Tuning on DeepSpeed and FSDP2")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="run a fine-tuning job from a YAML recipe")
    train.add_argument("--config", help="the recipe YAML (default: the embedded quick start)")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override one recipe value (YAML syntax); repeatable")
    train.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    train.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    report = sub.add_parser("report", help="plots and a Markdown summary of finished runs")
    report.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="a run's output_dir (event files, summary.json)")
    report.add_argument("--out", required=True, help="directory for the PNGs and report.md")
    report.add_argument("--label", dest="labels", action="append", default=None, metavar="NAME",
                        help="name of each run in the plots, in order (default: the directory names)")
    report.add_argument("--title", default="IST run report", help="heading of report.md")
    args = parser.parse_args(argv)

    if args.command == "report":
        return _report(args)

    from ist_ds.recipe import Recipe

    try:
        recipe = Recipe.from_yaml(args.config) if args.config else Recipe()
        if args.overrides:
            recipe = recipe.with_overrides(args.overrides)
        if args.command == "train":
            from ist_ds.runner import run

            run(recipe, resume=args.resume)
    except ISTError as e:
        logging.getLogger("ist_ds").error("error: %s", e)
        print(f"ist-ds: error: {e}", file=sys.stderr)
        return 2
    return 0


def _report(args: argparse.Namespace) -> int:
    from ist_ds.console import setup_logging
    from ist_ds.report import write_report

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
