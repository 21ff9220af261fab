#!/usr/bin/env python
"""launch/train.py for the launcher tests, plus a per-rank record of what each rank trained.

Every rank writes ``$IST_TEST_DUMP_DIR/rank<R>.json`` at the end: its summary, its launcher
variables, and the layers it selected at every step (from the IST controller), so a test can compare
ranks started on different "nodes". Without ``IST_TEST_DUMP_DIR`` it is exactly launch/train.py.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ist_ds.runtime.controller as controller  # noqa: E402
import ist_ds.jobs.runner as runner  # noqa: E402
from ist_ds.jobs.cli import main  # noqa: E402

DUMP = os.environ.get("IST_TEST_DUMP_DIR")
SELECTIONS: list[list[int]] = []

if DUMP:
    _start, _after, _run = controller.ISTController.start, controller.ISTController.after_optimizer_step, runner.run

    def start(self):
        selected = _start(self)
        SELECTIONS.append(list(selected))
        return selected

    def after_optimizer_step(self):
        selected = _after(self)
        SELECTIONS.append(list(selected))
        return selected

    def run(recipe, *args, **kwargs):
        summary = _run(recipe, *args, **kwargs)
        keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "NODE_RANK",
                "GROUP_RANK")
        record = {"summary": summary, "selections": SELECTIONS, "env": {k: os.environ.get(k) for k in keys}}
        os.makedirs(DUMP, exist_ok=True)
        with open(os.path.join(DUMP, f"rank{os.environ['RANK']}.json"), "w") as f:
            json.dump(record, f)
        return summary

    controller.ISTController.start = start
    controller.ISTController.after_optimizer_step = after_optimizer_step
    runner.run = run

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
