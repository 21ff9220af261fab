#!/usr/bin/env python
"""Check a DeepSpeed hostfile (and a recipe) and print the command to type on each node.

    python launch/multinode_plan.py --hostfile launch/hostfile.example --master_addr node-a \\
        -- launch/train.py --config configs/paper_llama7b_lora.yaml

It reads the hostfile with DeepSpeed's own parser (``fetch_hostfile``, ``parse_inclusion_exclusion``,
``--num_nodes``/``--num_gpus`` trimming), so it sees exactly the nodes and ranks ``deepspeed`` would
launch, and it stops with a clear message where ``deepspeed`` would not:

- a hostfile that does not exist (``deepspeed`` then silently trains on the local machine only);
- a line without ``slots=N``, duplicate hosts, a file with no nodes (DeepSpeed's messages);
- ``--num_nodes`` / ``--num_gpus`` asking for more than the hostfile lists (``deepspeed`` quietly
  launches fewer), ``--include`` / ``--exclude`` naming unknown hosts or slots;
- a world size that does not divide the recipe's ``training.global_batch_size`` (checked with the
  ``--config`` found after ``--``, with its ``--set`` overrides).

Then it prints three equivalent ways to start the job: the one ``deepspeed`` command (pdsh + ssh), the
``deepspeed --no_ssh --node_rank N`` command to type on each node when there is no ssh, and the
per-node command DeepSpeed's pdsh runner executes (``deepspeed.launcher.launch --world_info ...``).
Exit status 0 when the plan is sound, 2 with the reason otherwise. Nothing is started.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class PlanError(Exception):
    """The hostfile, the selection flags or the recipe cannot make a job."""


def read_hostfile(path: str) -> "dict[str, int]":
    """Hosts and slots, in order, parsed by DeepSpeed; a missing file is an error here."""
    from deepspeed.launcher.runner import fetch_hostfile

    if not os.path.isfile(path):
        raise PlanError(f"hostfile {path!r} does not exist; deepspeed would ignore it and train on this machine "
                        "only (fix the path, or drop --hostfile for a single-node run)")
    try:
        pool = fetch_hostfile(path)
    except ValueError as e:
        raise PlanError(f"hostfile {path!r}: {e}. Each line must read '<host> slots=<N>' (comments start "
                        "with #)") from None
    zero = [host for host, slots in pool.items() if slots < 1]
    if zero:
        raise PlanError(f"hostfile {path!r}: {', '.join(zero)} has slots=0; give every node at least one slot "
                        "or remove it")
    return pool


def active_resources(pool: "dict[str, int]", include: str = "", exclude: str = "", num_nodes: int = -1,
                     num_gpus: int = -1) -> "dict[str, list[int]]":
    """The nodes and local slots ``deepspeed`` would use, with DeepSpeed's own filters."""
    from deepspeed.launcher.runner import apply_num_nodes_and_gpus, parse_inclusion_exclusion

    if (num_nodes > 0 or num_gpus > 0) and (include or exclude):
        raise PlanError("--num_nodes/--num_gpus cannot be combined with --include/--exclude (deepspeed refuses it)")
    if num_nodes > len(pool):
        raise PlanError(f"--num_nodes {num_nodes} but the hostfile lists {len(pool)} node(s): "
                        f"{', '.join(pool)}; add the missing nodes (deepspeed would launch on fewer)")
    too_small = [f"{h} (slots={s})" for h, s in pool.items() if num_gpus > s]
    if too_small:
        raise PlanError(f"--num_gpus {num_gpus} is more than the hostfile gives {', '.join(too_small)}; "
                        "raise slots= or lower --num_gpus")
    try:
        resources = parse_inclusion_exclusion(pool, include, exclude)
    except ValueError as e:
        raise PlanError(f"--include/--exclude: {e}") from None
    resources = apply_num_nodes_and_gpus(resources, num_nodes, num_gpus)
    if not resources:
        raise PlanError("the hostfile and --include/--exclude leave no node to run on")
    return resources


def check_recipe(user_args: "list[str]", world_size: int) -> "str | None":
    """Check the recipe named by ``--config`` in ``user_args`` against the world size; a summary line."""
    if "--config" not in user_args:
        return None
    sys.path.insert(0, ROOT)
    from ist_ds.core.errors import ISTError
    from ist_ds.jobs.recipe import Recipe

    i = user_args.index("--config")
    overrides = [user_args[j + 1] for j, a in enumerate(user_args[:-1]) if a == "--set"]
    try:
        recipe = Recipe.from_yaml(user_args[i + 1]).with_overrides(overrides)
    except ISTError as e:
        raise PlanError(f"recipe: {e}") from None
    t = recipe.training
    if t.global_batch_size % (t.micro_batch_size * world_size):
        raise PlanError(f"{world_size} ranks do not divide training.global_batch_size={t.global_batch_size} with "
                        f"micro_batch_size={t.micro_batch_size}: use a global batch that is a multiple of "
                        f"{t.micro_batch_size * world_size}, a smaller micro batch, or another number of GPUs")
    acc = t.global_batch_size // (t.micro_batch_size * world_size)
    return (f"recipe {user_args[i + 1]}: global batch {t.global_batch_size} = micro batch {t.micro_batch_size} x "
            f"{world_size} ranks x {acc} accumulation step(s)")


def launch_commands(resources: "dict[str, list[int]]", master_addr: str, master_port: int,
                    user_script: str, user_args: "list[str]") -> "list[list[str]]":
    """Per node, the command DeepSpeed's pdsh runner executes there (pdsh's %n replaced by the node rank)."""
    from deepspeed.launcher.multinode_runner import PDSHRunner
    from deepspeed.launcher.runner import encode_world_info, parse_args

    args = parse_args(["--master_addr", master_addr, "--master_port", str(master_port), user_script, *user_args])
    runner = PDSHRunner(args, encode_world_info(resources))
    cmd, _, _ = runner.get_cmd(dict(os.environ), resources)
    remote = cmd[cmd.index("-w") + 2:]  # after "pdsh -S -f N -w hosts": exports; cd; python -u -m ...
    remote = [part for part in remote if part.strip()]
    return [[part.replace("%n", str(rank)) for part in remote] for rank in range(len(resources))]


def plan(argv: "list[str] | None" = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     usage="%(prog)s --hostfile FILE --master_addr HOST [options] -- SCRIPT [ARGS]")
    parser.add_argument("--hostfile", required=True)
    parser.add_argument("--master_addr", required=True, help="rank 0's node, as every node reaches it")
    parser.add_argument("--master_port", type=int, default=29500)
    parser.add_argument("--num_nodes", type=int, default=-1)
    parser.add_argument("--num_gpus", type=int, default=-1)
    parser.add_argument("--include", default="")
    parser.add_argument("--exclude", default="")
    parser.add_argument("script", nargs=argparse.REMAINDER, help="-- launch/train.py --config RECIPE [...]")
    args = parser.parse_args(argv)
    script = args.script[1:] if args.script[:1] == ["--"] else args.script
    if not script:
        parser.error("name the training script after --, e.g. -- launch/train.py --config RECIPE.yaml")
    try:
        pool = read_hostfile(args.hostfile)
        resources = active_resources(pool, args.include, args.exclude, args.num_nodes, args.num_gpus)
        world = sum(len(slots) for slots in resources.values())
        recipe_line = check_recipe(script[1:], world)
    except PlanError as e:
        print(f"multinode_plan: error: {e}", file=sys.stderr)
        return 2

    print(f"hostfile {args.hostfile}: {len(resources)} node(s), {world} rank(s); master {args.master_addr}:"
          f"{args.master_port}")
    first = 0
    for rank, (host, slots) in enumerate(resources.items()):
        print(f"  node_rank {rank}  {host}: {len(slots)} rank(s), global ranks {first}-{first + len(slots) - 1}")
        first += len(slots)
    if recipe_line:
        print(recipe_line)
    selection = []
    for flag in ("num_nodes", "num_gpus"):
        if getattr(args, flag) > 0:
            selection += [f"--{flag}", str(getattr(args, flag))]
    for flag in ("include", "exclude"):
        if getattr(args, flag):
            selection += [f"--{flag}", getattr(args, flag)]
    common = ["deepspeed", "--hostfile", args.hostfile, *selection, "--master_addr", args.master_addr,
              "--master_port", str(args.master_port)]
    print("\nWith pdsh and passwordless ssh, on any node:")
    print("  " + shlex.join(common + script))
    print("\nWithout ssh, on each node (same directory and environment everywhere):")
    for rank, host in enumerate(resources):
        cmd = common[:3] + ["--no_ssh", "--node_rank", str(rank)] + common[3:] + script
        print(f"  {host}$ " + shlex.join(cmd))
    print("\nWhat deepspeed's pdsh runner executes on each node:")
    for host, cmd in zip(resources, launch_commands(resources, args.master_addr, args.master_port, script[0],
                                                    script[1:])):
        print(f"  {host}$ " + " ".join(cmd))
    return 0


if __name__ == "__main__":
    sys.exit(plan())
