"""Launching at cluster scale: deepspeed (multi-node without ssh), mpirun + mpi4py, two-node torchrun,
SLURM (the sbatch template under a stand-in srun), the shipped configs, and the launch mistakes.

Every launch is a real set of processes on 127.0.0.1 running a short IST job; each rank records what it
selected at every step (tests/launch_entry.py), and the ranks' records are compared. The quick start
under `deepspeed --num_gpus 2` is tests/test_job.py's. Only loopback addresses are used.
"""

from __future__ import annotations

import base64
import glob
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from distributed import free_port, run_ranks
from test_job import ROOT, VENV_BIN, _env

from ist_ds.core import ISTConfig
from ist_ds.core.errors import ISTLaunchError
from ist_ds.jobs.dist_env import discover
from ist_ds.jobs.launcher_env import expand_nodelist, first_slurm_host, tasks_on_node
from ist_ds.jobs.recipe import Recipe

PYTHON = os.path.join(VENV_BIN, "python")
ENTRY = "tests/launch_entry.py"
# DeepSpeed JIT-builds its CPU ops (the shared-memory collective, CPU Adam) into TORCH_EXTENSIONS_DIR.
# Checkouts with other virtual environments on one machine flip a shared directory's build between their
# include paths, and a rank then waits on the build lock for minutes (for ever, when a process holding it
# was killed). Jobs launched here use the virtual environment's own directory, as scripts/test.sh does,
# built once by the `deepspeed_ops` fixture.
EXT_DIR = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(sys.prefix, "torch_extensions")
# A short job: 6 steps of the quick start's tiny Llama (2 of 8 layers per step), importance updates at
# steps 3 and 6, 8 held-out examples.
SHORT = ["--config", "configs/quickstart.yaml", "--set", "training.max_steps=6", "--set", "data.num_train=200",
         "--set", "data.num_test=8", "--set", "data.max_eval_examples=8", "--set", "ist.update_interval=3",
         "--set", "training.log_every=3", "--set", "training.tensorboard=false", "--set", "training.progress=false",
         "--set", "backend.dist_timeout_s=120"]
LAUNCH_TIMEOUT = 420


def _spec(name: str, path: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def launch_env(**extra) -> dict:
    """The test environment without any inherited launcher variables, loopback only."""
    env = {k: v for k, v in _env().items()
           if not re.match(r"(RANK|WORLD_SIZE|LOCAL_RANK|LOCAL_WORLD_SIZE|MASTER_ADDR|MASTER_PORT|NODE_RANK|"
                           r"TORCHELASTIC_.*|SLURM_.*|OMPI_.*|PMI_.*|PMIX_.*)$", k)}
    env.update(GLOO_SOCKET_IFNAME="lo", TOKENIZERS_PARALLELISM="false", TORCH_EXTENSIONS_DIR=EXT_DIR)
    env.update({k: str(v) for k, v in extra.items()})
    return env


@pytest.fixture(scope="module")
def deepspeed_ops():
    """DeepSpeed's CPU ops built in EXT_DIR (seconds when they are; about a minute each when not)."""
    if torch.cuda.is_available():
        return
    code = ("from deepspeed.ops.op_builder.cpu import CPUAdamBuilder, ShareMemCommBuilder\n"
            "for builder in (ShareMemCommBuilder(), CPUAdamBuilder()):\n    builder.load(verbose=False)\n")
    proc = subprocess.Popen([PYTHON, "-c", code], cwd=ROOT, env=launch_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=1800)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the compiler too, not only python
        proc.wait()
        pytest.fail(f"building DeepSpeed's CPU ops in {EXT_DIR} took over 30 min; if no build is running, delete "
                    f"any 'lock' file left in its subdirectories")
    assert proc.returncode == 0, out[-4000:]


def start(cmd: list[str], env: dict, log) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def finish(procs: list[subprocess.Popen], timeout: float = LAUNCH_TIMEOUT) -> list[int]:
    """Wait for every process (and its process group); kill all of them on timeout."""
    deadline = time.monotonic() + timeout
    try:
        return [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait()


def run_logged(cmds: list[tuple[list[str], dict]], tmp_path, name: str, timeout: float = LAUNCH_TIMEOUT):
    """Start the commands together, wait for all; returns (return codes, logs, wall seconds)."""
    logs = [tmp_path / f"{name}{i}.log" for i in range(len(cmds))]
    t0 = time.monotonic()
    files = [open(path, "w") for path in logs]
    try:
        rcs = finish([start(cmd, env, f) for (cmd, env), f in zip(cmds, files)], timeout)
    finally:
        for f in files:
            f.close()
    return rcs, [path.read_text() for path in logs], time.monotonic() - t0


def ranks_agree(dump_dir, world: int = 2, steps: int = 6) -> list[dict]:
    """Load each rank's record and check that all ranks trained the same layers with the same scores."""
    records = [json.loads((dump_dir / f"rank{r}.json").read_text()) for r in range(world)]
    first = records[0]
    assert len(first["selections"]) == steps + 1  # the first step's selection, then one after each step
    assert all(len(sel) == 2 for sel in first["selections"])  # 2 of 8 layers per step
    for rec in records:
        assert rec["summary"]["world_size"] == world and rec["summary"]["steps"] == steps
        assert rec["selections"] == first["selections"]
        for key in ("scores", "selection_counts", "train_losses", "eval_loss"):
            assert rec["summary"][key] == first["summary"][key], key
    assert sum(first["summary"]["selection_counts"]) == 2 * steps
    assert any(s != 0 for s in first["summary"]["scores"])  # the importance updates ran
    assert sorted(int(rec["env"]["RANK"]) for rec in records) == list(range(world))
    return records


def tail(logs: list[str]) -> str:
    return "\n".join(f"--- log {i} ---\n{text[-4000:]}" for i, text in enumerate(logs))


# ------------------------------------------------------------------------------------ SLURM node lists
@pytest.mark.parametrize("nodelist, hosts", [
    ("node[01-04,07]", ["node01", "node02", "node03", "node04", "node07"]),
    ("gpu-a[3-4],gpu-b1", ["gpu-a3", "gpu-a4", "gpu-b1"]),
    ("n1", ["n1"]),
    ("a,b", ["a", "b"]),
    ("node[8-11]", ["node8", "node9", "node10", "node11"]),
    ("node[098-101]", ["node098", "node099", "node100", "node101"]),
    ("c[1,3,5]", ["c1", "c3", "c5"]),
    ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),
    ("gpu-[1-2]-ib,login", ["gpu-1-ib", "gpu-2-ib", "login"]),
    ("x[7]", ["x7"]),
])
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("nodelist", ["", "node[01-", "node01]", "node[3-1]", "node[a-b]", "a,,b", "n[1-2][", "n[[1]]"])
def test_expand_nodelist_rejects(nodelist):
    with pytest.raises(ISTLaunchError):
        expand_nodelist(nodelist)


def test_first_slurm_host_without_scontrol():
    if shutil.which("scontrol"):
        pytest.skip("scontrol is installed: the fallback parser is not used")
    assert first_slurm_host("gpu-a[3-4],gpu-b1") == "gpu-a3"
    assert first_slurm_host("node[01-04,07]") == "node01"


def test_tasks_on_node():
    assert [tasks_on_node("2(x3),1", i) for i in range(4)] == [2, 2, 2, 1]
    assert tasks_on_node("8", 0) == 8
    with pytest.raises(ISTLaunchError, match="SLURM_NODEID=4"):
        tasks_on_node("2(x3),1", 4)


# ------------------------------------------------------------------------------------ rank discovery
def test_discover_slurm():
    env = discover({"SLURM_PROCID": "13", "SLURM_NTASKS": "16", "SLURM_LOCALID": "5", "SLURM_NODEID": "1",
                    "SLURM_TASKS_PER_NODE": "8(x2)", "SLURM_JOB_NODELIST": "gpu-a[3-4]", "SLURM_JOB_ID": "123456"})
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["LOCAL_WORLD_SIZE"]) == ("13", "16", "5", "8")
    assert env["MASTER_ADDR"] == "gpu-a3" and env["MASTER_PORT"] == str(10000 + 123456 % 22768)
    # The default port stays below Linux's default ephemeral range (32768-60999) for every job id.
    ports = {int(discover({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_NODELIST": "a1",
                           "SLURM_JOB_ID": str(j)})["MASTER_PORT"]) for j in range(0, 10 ** 6, 997)}
    assert min(ports) >= 10000 and max(ports) < 32768 and len(ports) > 900
    assert env["NODE_RANK"] == "1"
    # srun's step variables win over the allocation's; explicit MASTER_ADDR/PORT win over both.
    env = discover({"SLURM_PROCID": "1", "SLURM_NTASKS": "64", "SLURM_STEP_NUM_TASKS": "2",
                    "SLURM_JOB_NODELIST": "a[1-9]", "SLURM_STEP_NODELIST": "a[4-5]", "MASTER_ADDR": "10.0.0.1",
                    "MASTER_PORT": "1234"})
    assert (env["WORLD_SIZE"], env["MASTER_ADDR"], env["MASTER_PORT"]) == ("2", "10.0.0.1", "1234")
    assert discover({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_STEP_NODELIST": "a[4-5]"})["MASTER_ADDR"] == "a4"


def test_discover_mpi_and_precedence():
    ompi = {"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
            "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999"}
    env = discover(dict(ompi))
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["LOCAL_WORLD_SIZE"]) == ("3", "4", "1", "2")
    # mpirun inside an sbatch allocation: the batch step's SLURM_PROCID=0 must not win.
    env = discover(dict(ompi, SLURM_PROCID="0", SLURM_NTASKS="8", SLURM_JOB_NODELIST="n[1-2]"))
    assert (env["RANK"], env["WORLD_SIZE"], env["MASTER_ADDR"]) == ("3", "4", "127.0.0.1")
    # MPICH / Intel MPI (Hydra)
    env = discover({"PMI_RANK": "2", "PMI_SIZE": "3", "MPI_LOCALRANKID": "0", "MASTER_ADDR": "h", "MASTER_PORT": "1"})
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == ("2", "3", "0")
    # torchrun / deepspeed variables are taken as they are.
    env = discover({"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "5",
                    "OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "1"})
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == ("1", "2", "0")
    # one plain process: loopback and a free port, not a fixed one another job may hold
    env = discover({})
    assert (env["RANK"], env["WORLD_SIZE"], env["MASTER_ADDR"]) == ("0", "1", "127.0.0.1")
    assert env["MASTER_PORT"].isdigit()


@pytest.mark.parametrize("env, needle", [
    ({"SLURM_PROCID": "0", "SLURM_JOB_NODELIST": "n1"}, "SLURM_NTASKS"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"}, "SLURM_JOB_NODELIST"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK=2 does not fit WORLD_SIZE=2"),
    ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x'"),
    ({"OMPI_COMM_WORLD_RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, "OMPI_COMM_WORLD_SIZE"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "n[1-"}, "unbalanced"),
])
def test_discover_errors(env, needle):
    with pytest.raises(ISTLaunchError, match=re.escape(needle)):
        discover(env)


def test_stuck_join_is_reported_with_the_stale_build_lock(tmp_path):
    """A process killed while loading a JIT-built DeepSpeed op leaves its build lock behind, and every later
    load waits forever; joining the job is bounded and names the lock to delete."""
    from torch.utils.file_baton import FileBaton

    from ist_ds.jobs.dist_env import _deadline

    lock = tmp_path / "lock"
    lock.touch()
    t0 = time.monotonic()
    with pytest.raises(ISTLaunchError, match=f"build lock {re.escape(str(lock))}.*delete"):
        with _deadline(1.0, "rank 0 of 2 did not finish joining the job"):
            FileBaton(str(lock), wait_seconds=0.05).wait()
    assert time.monotonic() - t0 < 10


def test_mpi4py_agrees_on_master_under_mpirun(tmp_path):
    """mpirun without MASTER_ADDR/PORT: the ranks agree via mpi4py; one host means 127.0.0.1."""
    # ist_ds and ist_ds.core as bare namespaces: the launcher code without torch (fast under load). Each
    # rank writes its own file: mpirun's forwarded stdout can interleave the two ranks' lines.
    probe = ("import json, os, sys, types\n"
             "for name in ('ist_ds', 'ist_ds.core'):\n"
             "    pkg = types.ModuleType(name); pkg.__path__ = [name.replace('.', '/')]; sys.modules[name] = pkg\n"
             "from ist_ds.jobs.dist_env import discover\n"
             "e = discover()\n"
             "keys = ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT')\n"
             f"with open(os.path.join({str(tmp_path)!r}, 'probe' + e['RANK'] + '.json'), 'w') as f:\n"
             "    json.dump({k: e[k] for k in keys}, f)\n")
    cmd = ["mpirun", "-n", "2", "--allow-run-as-root", "--oversubscribe", "--bind-to", "none", "--mca", "btl",
           "self,vader", "--mca", "oob_tcp_if_include", "lo", PYTHON, "-c", probe]
    proc = subprocess.run(cmd, cwd=ROOT, env=launch_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    seen = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("probe*.json"))]
    assert [e["RANK"] for e in seen] == ["0", "1"] and all(e["WORLD_SIZE"] == "2" for e in seen), proc.stdout + proc.stderr
    assert {e["MASTER_ADDR"] for e in seen} == {"127.0.0.1"}
    assert len({e["MASTER_PORT"] for e in seen}) == 1  # rank 0's free port, broadcast


# ------------------------------------------------------------------------------------ hostfiles
@pytest.fixture(scope="module")
def plan_module():
    return _spec("multinode_plan", "launch/multinode_plan.py")


def test_example_hostfile_parses_with_deepspeed(plan_module):
    from deepspeed.launcher.runner import fetch_hostfile, parse_inclusion_exclusion

    pool = fetch_hostfile(os.path.join(ROOT, "launch/hostfile.example"))
    assert dict(pool) == {"node-a": 8, "node-b": 8}
    assert dict(parse_inclusion_exclusion(pool, "node-b:0,1", "")) == {"node-b": [0, 1]}
    assert plan_module.active_resources(pool, num_gpus=4) == {"node-a": [0, 1, 2, 3], "node-b": [0, 1, 2, 3]}


@pytest.mark.parametrize("text, flags, needle", [
    (None, [], "does not exist; deepspeed would ignore it"),
    ("node-a slots=8\nnode-b\n", [], "bad entry: node-b"),
    ("# nothing but comments\n\n", [], "empty or not formatted correctly"),
    ("node-a slots=8\nnode-a slots=8\n", [], "multiple entries for node-a"),
    ("node-a slots=8\nnode-b slots=0\n", [], "node-b has slots=0"),
    ("node-a slots=8\nnode-b slots=8\n", ["--num_nodes", "3"], "--num_nodes 3 but the hostfile lists 2"),
    ("node-a slots=8\nnode-b slots=4\n", ["--num_gpus", "8"], "node-b (slots=4)"),
    ("node-a slots=8\nnode-b slots=8\n", ["--include", "node-c"], "Hostname 'node-c' not found in hostfile"),
    ("node-a slots=2\nnode-b slots=2\n", ["--include", "node-a:5"], "No slot '5' specified on host 'node-a'"),
    ("node-a slots=8\nnode-b slots=8\nnode-c slots=8\n", [], "24 ranks do not divide training.global_batch_size=16"),
])
def test_hostfile_mistakes(plan_module, tmp_path, capsys, text, flags, needle):
    hostfile = tmp_path / "hostfile"
    if text is not None:
        hostfile.write_text(text)
    rc = plan_module.plan(["--hostfile", str(hostfile), "--master_addr", "node-a", *flags, "--",
                           "launch/train.py", "--config", os.path.join(ROOT, "configs/paper_llama7b_lora.yaml")])
    err = capsys.readouterr().err
    assert rc == 2 and needle in err, err


def test_multinode_plan_commands(plan_module, capsys):
    """The per-node commands: pdsh's remote command, one per node rank, world info from the hostfile."""
    recipe = os.path.join(ROOT, "configs/paper_llama7b_lora.yaml")
    rc = plan_module.plan(["--hostfile", os.path.join(ROOT, "launch/hostfile.example"), "--master_addr", "node-a",
                           "--master_port", "29555", "--", "launch/train.py", "--config", recipe])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "2 node(s), 16 rank(s)" in out and "global batch 16 = micro batch 1 x 16 ranks x 1" in out
    assert "--no_ssh --node_rank 1" in out
    cmds = plan_module.launch_commands({"node-a": list(range(8)), "node-b": list(range(8))}, "node-a", 29555,
                                       "launch/train.py", ["--config", recipe])
    for rank, cmd in enumerate(cmds):
        assert f"--node_rank={rank}" in cmd and "--master_addr=node-a" in cmd and "--master_port=29555" in cmd
        world_info = next(a for a in cmd if a.startswith("--world_info="))
        assert json.loads(base64.urlsafe_b64decode(world_info.split("=", 1)[1])) == \
            {"node-a": list(range(8)), "node-b": list(range(8))}
        assert cmd[-3:] == ["launch/train.py", "--config", recipe]


def test_deepspeed_openmpi_launcher_command():
    """What `deepspeed --launcher openmpi --hostfile ...` runs: one mpirun over the hostfile, no MASTER_ADDR
    exported (the ranks find it with mpi4py, see launcher_env)."""
    from deepspeed.launcher.multinode_runner import OpenMPIRunner
    from deepspeed.launcher.runner import encode_world_info, fetch_hostfile, parse_args

    hostfile = os.path.join(ROOT, "launch/hostfile.example")
    pool = fetch_hostfile(hostfile)
    args = parse_args(["--hostfile", hostfile, "--launcher", "openmpi", "--launcher_args",
                       "--mca btl_tcp_if_include ib0", "launch/train.py", "--config", "configs/paper_llama7b_lora.yaml"])
    resources = {h: list(range(n)) for h, n in pool.items()}
    runner = OpenMPIRunner(args, encode_world_info(resources), pool)
    cmd = runner.get_cmd({}, resources)
    assert cmd[:5] == ["mpirun", "-n", "16", "-hostfile", hostfile]
    assert "eth0" not in cmd and cmd[cmd.index("btl_tcp_if_include") + 1] == "ib0"
    assert not any(a.startswith("MASTER_") for a in cmd)
    assert cmd[-3:] == ["launch/train.py", "--config", "configs/paper_llama7b_lora.yaml"]


# ------------------------------------------------------------------------------------ shipped configs
# configs/*.yaml read by something other than the job runner's Recipe: file name -> (script, reader).
# None any more: every recipe, FSDP2's included, is a Recipe (one format for every backend).
OTHER_YAML_READERS: dict = {}
DS_CONFIGS = [f"configs/ds_zero{s}.json" for s in range(4)] + ["configs/ds_zero2_offload.json",
                                                               "configs/ds_zero3_offload.json"]


def test_every_shipped_config_loads():
    """Every file in configs/ is read by what reads it, so none rots: recipes by Recipe.from_yaml, other YAML by
    its script's loader, every JSON's ist block by ISTConfig, and the ds_*.json files through the job runner
    (the "auto" values filled) into DeepSpeed's own config parser."""
    from deepspeed.runtime.config import DeepSpeedConfig

    from ist_ds.jobs.adapters import deepspeed_config

    files = sorted(glob.glob(os.path.join(ROOT, "configs", "*")))
    names = {os.path.basename(p) for p in files}
    assert {"quickstart.yaml", "paper_llama7b_lora.yaml", "paper_llama7b_dora.yaml"} <= names
    assert {os.path.basename(p) for p in DS_CONFIGS} <= names
    for path in files:
        name = os.path.basename(path)
        if name.endswith((".yaml", ".yml")):
            if name in OTHER_YAML_READERS:
                script, reader = OTHER_YAML_READERS[name]
                cfg = getattr(_spec(name.split(".")[0] + "_reader", script), reader)(path)
                ISTConfig.from_dict(cfg["ist"])
            else:
                Recipe.from_yaml(path)
        elif name.endswith(".json"):
            raw = json.load(open(path))
            if "ist" in raw:
                ISTConfig.from_dict(raw["ist"])
        else:
            pytest.fail(f"configs/{name}: no reader known for this file; add one to this test")
    for rel in DS_CONFIGS:
        path = os.path.join(ROOT, rel)
        raw = json.load(open(path))
        assert isinstance(raw.get("ist"), dict), path
        stage = int(re.search(r"zero(\d)", path).group(1))
        assert raw["zero_optimization"]["stage"] == stage, path
        assert ("offload_optimizer" in raw["zero_optimization"]) == ("offload" in path), path
        # As a recipe's backend.deepspeed_config: the "auto" values are filled and DeepSpeed accepts the result.
        recipe = Recipe.from_dict({"backend": {"deepspeed_config": path, "offload_optimizer": "offload" in path}})
        filled = deepspeed_config(recipe, world_size=1, total_steps=100, on_cpu=True)
        assert "auto" not in json.dumps(filled), path
        assert filled["ist"] == raw["ist"]
        ds = DeepSpeedConfig({k: v for k, v in filled.items() if k != "ist"})
        assert ds.zero_optimization_stage == stage and ds.train_batch_size == 16
    fsdp = Recipe.from_yaml(os.path.join(ROOT, "configs/fsdp_ist.yaml"))
    assert fsdp.backend.name == "fsdp" and fsdp.backend.reshard_after_forward is True
    assert fsdp.model.config["num_hidden_layers"] == 8 and fsdp.ist.optimizer_state == "drop"
    # The paper's setting, as stated in the recipes.
    for method in ("lora", "dora"):
        r = Recipe.from_yaml(os.path.join(ROOT, f"configs/paper_llama7b_{method}.yaml"))
        assert r.peft.method == method and (r.peft.r, r.peft.alpha) == (32, 64)
        assert r.peft.target_modules == ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
        assert (r.training.lr, r.training.global_batch_size, r.training.epochs, r.data.cutoff_len) == (2e-4, 16, 3, 256)
        assert r.model.dtype == "bfloat16" and r.backend.name == "deepspeed" and r.backend.zero_stage == 2
        assert r.model.path and r.data.train.endswith("commonsense_170k.json")
        assert r.ist == ISTConfig()  # the paper's defaults
        filled = deepspeed_config(r, world_size=16, total_steps=100, on_cpu=False)
        assert filled["bf16"] == {"enabled": True} and filled["gradient_accumulation_steps"] == 1


def test_readme_own_loop_config_builds_no_jit_op():
    """The README's own-loop DeepSpeed config must not send a CPU user into a minutes-long JIT build of
    fused_adam: its AdamW says torch_adam (or the README would have to pre-build the op)."""
    import ast

    readme = open(os.path.join(ROOT, "README.md")).read()
    block = re.search(r"ds_config = (\{.*?\n\})", readme, re.S)
    assert block, "the README's own-loop example lost its ds_config"
    config = ast.literal_eval(block.group(1))
    optimizer = config["optimizer"]
    assert optimizer["type"].lower() in ("adam", "adamw") and optimizer["params"].get("torch_adam") is True
    assert "ist" in config


def _train_shipped_ds_configs(rank, world, paths, ext_dir):
    os.environ["TORCH_EXTENSIONS_DIR"] = ext_dir
    import ist_ds
    from ist_ds.jobs.dist_env import init_distributed
    from ist_ds.jobs.adapters import deepspeed_config
    from test_deepspeed import make_data, make_model

    init_distributed("deepspeed", backend="gloo", timeout_s=120)
    data = make_data(32)
    out = {}
    for path in paths:
        recipe = Recipe.from_dict({"backend": {"deepspeed_config": path, "offload_optimizer": "offload" in path},
                                   "training": {"micro_batch_size": 2, "global_batch_size": 4, "lr": 1e-2,
                                                "warmup_steps": 1}})
        cfg = deepspeed_config(recipe, world, total_steps=4, on_cpu=True)
        cfg["ist"] = dict(cfg["ist"], train_layers=2, update_interval=2, scoring_batch_size=4)
        engine, *_ = ist_ds.initialize(model=make_model(), config=cfg, scoring_data=data)
        for step in range(4):
            shard = data[(step * world + rank) * 2:(step * world + rank + 1) * 2]
            batch = {k: torch.stack([ex[k] for ex in shard]) for k in shard[0]}
            engine.backward(engine(**batch).loss)
            engine.step()
        c = engine.ist.controller
        out[path] = {"stage": engine.zero_optimization_stage(), "optimizer": type(engine.basic_optimizer).__name__,
                     "selected": c.selected_layers, "scores": c.scores.tolist(), "steps": c.step}
        engine.destroy()
    return out


def test_shipped_deepspeed_configs_train(deepspeed_ops, tmp_path):
    """Each ds_*.json, completed by the job runner, trains 4 IST steps on 2 forked ranks (ZeRO-Offload with
    DeepSpeedCPUAdam); both ranks agree."""
    paths = [os.path.join(ROOT, p) for p in DS_CONFIGS]
    results = run_ranks(_train_shipped_ds_configs, 2, paths, EXT_DIR, timeout=600)
    assert results[0] == results[1]
    for path, got in results[0].items():
        assert got["stage"] == int(re.search(r"zero(\d)", path).group(1)) and got["steps"] == 4
        assert got["optimizer"] == ("DeepSpeedCPUAdam" if "offload" in path else "AdamW"), (path, got)
        assert any(s != 0 for s in got["scores"])


def test_launch_scripts_parse():
    for path in ("launch/mpirun_train.sh", "launch/torchrun_node.sh", "launch/slurm_train.sbatch"):
        proc = subprocess.run(["bash", "-n", path], cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == 0, (path, proc.stderr)
    sbatch = open(os.path.join(ROOT, "launch/slurm_train.sbatch")).read()
    assert "#SBATCH --ntasks-per-node" in sbatch and "srun " in sbatch


# ------------------------------------------------------------------------------------ real launches
def test_deepspeed_two_nodes_without_ssh(deepspeed_ops, tmp_path, plan_module):
    """`deepspeed --hostfile H --no_ssh --node_rank N` on two "nodes" (both on 127.0.0.1): the per-node
    launch DeepSpeed's pdsh runner would start over ssh, started by hand."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    port, dump = free_port(), tmp_path / "dump"
    env = launch_env(IST_TEST_DUMP_DIR=dump)
    user = [ENTRY, *SHORT, "--set", f"output_dir={tmp_path / 'out'}"]
    cmds = [([os.path.join(VENV_BIN, "deepspeed"), "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(n),
              "--master_addr", "127.0.0.1", "--master_port", str(port), *user], env) for n in (0, 1)]
    rcs, logs, wall = run_logged(cmds, tmp_path, "node")
    assert rcs == [0, 0], tail(logs)
    records = ranks_agree(dump)
    assert {rec["env"]["MASTER_ADDR"] for rec in records} == {"127.0.0.1"}
    # Each node ran exactly the command pdsh would have run there.
    expected = plan_module.launch_commands({"node-a": [0], "node-b": [0]}, "127.0.0.1", port, ENTRY, user[1:])
    keys = ("--world_info", "--node_rank", "--master_addr", "--master_port")
    for n, log in enumerate(logs):
        ran = shlex.split(re.search(r"cmd = (.*)", log).group(1))
        assert ran[ran.index("-m") + 1] == expected[n][expected[n].index("-m") + 1] == "deepspeed.launcher.launch"
        assert sorted(a for a in ran if a.startswith(keys)) == sorted(a for a in expected[n] if a.startswith(keys))
        assert ran[-len(user):] == user == expected[n][-len(user):]
    print(f"deepspeed two nodes: {wall:.0f} s")


def test_mpirun_two_ranks(deepspeed_ops, tmp_path):
    """launch/mpirun_train.sh: Open MPI ranks, MASTER_ADDR=127.0.0.1 exported with -x, the port agreed via
    mpi4py; ZeRO-1 from configs/ds_zero1.json (whose ist block is used)."""
    dump = tmp_path / "dump"
    env = launch_env(NP=2, ENTRY=ENTRY, PYTHON=PYTHON, MASTER_ADDR="127.0.0.1", IST_TEST_DUMP_DIR=dump,
                     MPIRUN_ARGS="--oversubscribe --mca btl self,vader --mca oob_tcp_if_include lo")
    cmd = ["bash", "launch/mpirun_train.sh", *SHORT, "--set", "training.max_steps=10", "--set", "ist={}",
           "--set", "backend.deepspeed_config=configs/ds_zero1.json", "--set", f"output_dir={tmp_path / 'out'}"]
    rcs, logs, wall = run_logged([(cmd, env)], tmp_path, "mpirun")
    assert rcs == [0], tail(logs)
    records = ranks_agree(dump, steps=10)
    assert {rec["env"]["MASTER_ADDR"] for rec in records} == {"127.0.0.1"}
    assert len({rec["env"]["MASTER_PORT"] for rec in records}) == 1
    assert "IST on DeepSpeed (ZeRO stage 1)" in logs[0]
    print(f"mpirun: {wall:.0f} s")


def test_torchrun_two_nodes(deepspeed_ops, tmp_path):
    """Two torchrun agents (--nnodes 2 --nproc_per_node 1, node_rank 0 and 1) meeting at a c10d rendezvous on
    127.0.0.1, through launch/torchrun_node.sh; ZeRO-3 from configs/ds_zero3.json."""
    port, dump = free_port(), tmp_path / "dump"
    args = [*SHORT, "--set", "training.max_steps=10", "--set", "ist={}", "--set",
            "backend.deepspeed_config=configs/ds_zero3.json", "--set", f"output_dir={tmp_path / 'out'}"]
    cmds = []
    for n in (0, 1):
        env = launch_env(NNODES=2, NPROC_PER_NODE=1, RDZV_ENDPOINT=f"127.0.0.1:{port}", RDZV_ID=f"t{port}",
                         LOCAL_ADDR="127.0.0.1", ENTRY=ENTRY, PYTHON=PYTHON, IST_TEST_DUMP_DIR=dump,
                         TORCHRUN_ARGS=f"--node_rank {n} --rdzv_conf is_host={1 - n}")
        cmds.append((["bash", "launch/torchrun_node.sh", *args], env))
    rcs, logs, wall = run_logged(cmds, tmp_path, "node")
    assert rcs == [0, 0], tail(logs)
    records = ranks_agree(dump, steps=10)
    assert {rec["env"]["MASTER_ADDR"] for rec in records} == {"127.0.0.1"}
    assert sorted(rec["env"]["GROUP_RANK"] for rec in records) == ["0", "1"]  # one rank on each "node"
    assert "IST on DeepSpeed (ZeRO stage 3)" in "".join(logs)
    print(f"torchrun two nodes: {wall:.0f} s")


FAKE_SRUN = """#!{python}
# srun stand-in: record the command line, then start --nodes x --ntasks-per-node tasks of the program on
# this machine with the variables srun sets.
import json, os, subprocess, sys, time
args = sys.argv[1:]
opts = {{}}
while args and args[0].startswith("-"):
    key, _, value = args.pop(0).partition("=")
    opts[key] = value
with open(os.environ["FAKE_SRUN_RECORD"], "w") as f:
    json.dump({{"opts": opts, "program": args, "cwd": os.getcwd(), "MASTER_PORT": os.environ.get("MASTER_PORT"),
               "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}}, f)
per = int(opts["--ntasks-per-node"])
n = int(opts["--nodes"]) * per
procs = [subprocess.Popen(args, env=dict(os.environ, SLURM_PROCID=str(i), SLURM_LOCALID=str(i), SLURM_NODEID="0",
                                         SLURM_STEP_ID="0", SLURM_STEP_NUM_TASKS=str(n), SLURM_STEP_NUM_NODES="1",
                                         SLURM_NTASKS=str(n), SLURM_TASKS_PER_NODE=str(per),
                                         SLURM_STEP_NODELIST=os.environ["SLURM_JOB_NODELIST"],
                                         SLURM_STEP_TASKS_PER_NODE=str(per)))
         for i in range(n)]
rc = 0
while procs:
    for p in list(procs):
        if p.poll() is not None:
            procs.remove(p)
            if p.returncode and not rc:  # --kill-on-bad-exit
                rc = p.returncode
                for q in procs:
                    q.terminate()
    time.sleep(0.2)
sys.exit(rc)
"""


def _bindable_port(low: int, high: int) -> int:
    """A port in [low, high) that nothing listens on right now."""
    import random
    import socket

    for port in random.Random().sample(range(low, high), 200):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    pytest.skip(f"no free port in [{low}, {high})")


def test_slurm_sbatch_under_srun(deepspeed_ops, tmp_path):
    """launch/slurm_train.sbatch, submitted from another directory, with an allocation of 1 node x "2 GPUs"
    (SLURM_GPUS_PER_NODE=gpu:2, no task count in the environment) and an srun stand-in (no SLURM here): the
    script finds the repository, starts nodes x GPUs-per-node tasks with --cpus-per-task passed explicitly,
    picks MASTER_PORT below the ephemeral range from the job id; the ranks take MASTER_ADDR from
    SLURM_JOB_NODELIST (the fallback parser: no scontrol). The recipe is configs/fsdp_ist.yaml through
    launch/train.py (FSDP2, so the torch path of init_distributed runs too)."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "srun").write_text(FAKE_SRUN.format(python=PYTHON))
    (bindir / "srun").chmod(0o755)
    ephemeral_low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    if ephemeral_low <= 20100:
        pytest.skip(f"this machine's ephemeral ports start at {ephemeral_low}")
    port = _bindable_port(20000, min(ephemeral_low, 30000))
    job_id = 7 * (ephemeral_low - 10000) + port - 10000  # the script's port: 10000 + job id % (ephemeral_low - 10000)
    elsewhere = tmp_path / "submitted_from"
    elsewhere.mkdir()
    dump, record = tmp_path / "dump", tmp_path / "srun.json"
    env = launch_env(SLURM_JOB_ID=job_id, SLURM_JOB_NODELIST="localhost", SLURM_JOB_NUM_NODES=1,
                     SLURM_GPUS_PER_NODE="gpu:2", SLURM_CPUS_PER_TASK=1, SLURM_PROCID=0,
                     SLURM_SUBMIT_DIR=elsewhere, PYTHON=PYTHON, ENTRY=os.path.join(ROOT, ENTRY),
                     IST_TEST_DUMP_DIR=dump, FAKE_SRUN_RECORD=record)
    env["PATH"] = f"{bindir}{os.pathsep}{env['PATH']}"
    args = [a.replace("configs/quickstart.yaml", os.path.join(ROOT, "configs/fsdp_ist.yaml")) for a in SHORT]
    cmd = ["bash", os.path.join(ROOT, "launch/slurm_train.sbatch"), *args, "--set", "output_dir=out"]
    rcs, logs, wall = run_logged([(cmd, env)], tmp_path, "sbatch")
    assert rcs == [0], tail(logs)
    srun = json.loads(record.read_text())
    assert srun["opts"]["--nodes"] == "1" and srun["opts"]["--ntasks-per-node"] == "2"
    assert srun["opts"]["--cpus-per-task"] == "1" and srun["OMP_NUM_THREADS"] == "1"
    assert srun["cwd"] == str(elsewhere) and srun["MASTER_PORT"] == str(port) and port < ephemeral_low
    records = ranks_agree(dump)
    for rec in records:
        e = rec["env"]
        assert (e["MASTER_ADDR"], e["MASTER_PORT"]) == ("localhost", str(port))
        assert e["LOCAL_RANK"] == e["RANK"] and e["LOCAL_WORLD_SIZE"] == "2" and e["NODE_RANK"] == "0"
    assert records[0]["summary"]["backend"] == "fsdp" and records[0]["summary"]["world_size"] == 2
    assert (elsewhere / "out" / "summary.json").exists()  # relative paths are read from the submission directory
    print(f"sbatch + srun: {wall:.0f} s")


# ------------------------------------------------------------------------------------ launch mistakes
def test_world_size_not_dividing_the_batch_fails_at_launch(deepspeed_ops, tmp_path):
    """`deepspeed --num_gpus 2` with a global batch of 12 and micro batch 4: both ranks stop with the fix."""
    cmd = [os.path.join(VENV_BIN, "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), "launch/train.py",
           *SHORT, "--set", "training.global_batch_size=12", "--set", f"output_dir={tmp_path / 'out'}"]
    rcs, logs, wall = run_logged([(cmd, launch_env())], tmp_path, "ds")
    assert rcs[0] != 0, tail(logs)
    assert "global_batch_size=12 is not divisible by micro_batch_size=4 x world size 2" in logs[0], tail(logs)
    assert "use a multiple of 8" in logs[0]
    assert not (tmp_path / "out" / "summary.json").exists()
    print(f"batch error: {wall:.0f} s")


def test_unreachable_master_and_missing_peer_time_out(deepspeed_ops, tmp_path):
    """A rank whose master never answers, and a master whose peer never comes: each fails after
    backend.dist_timeout_s with the address in the message, not a hang."""
    timeout_s = 5
    dead_port, lonely_port = free_port(), free_port()
    base = ["launch/train.py", *SHORT, "--set", f"backend.dist_timeout_s={timeout_s}",
            "--set", f"output_dir={tmp_path / 'out'}"]
    cmds = [([PYTHON, *base], launch_env(RANK=1, WORLD_SIZE=2, LOCAL_RANK=0, MASTER_ADDR="127.0.0.1",
                                         MASTER_PORT=dead_port)),
            ([PYTHON, *base], launch_env(RANK=0, WORLD_SIZE=2, LOCAL_RANK=0, MASTER_ADDR="127.0.0.1",
                                         MASTER_PORT=lonely_port))]
    rcs, logs, wall = run_logged(cmds, tmp_path, "rank", timeout=240)
    assert rcs == [2, 2], tail(logs)
    unreachable = re.search(r"rank 1 could not reach the master at 127\.0\.0\.1:(\d+) within 5 s \(waited ([\d.]+) s",
                            logs[0])
    assert unreachable and int(unreachable.group(1)) == dead_port, tail(logs)
    assert float(unreachable.group(2)) <= timeout_s + 2
    lonely = re.search(r"rank 0 of 2 could not form the job with the master at 127\.0\.0\.1:(\d+) "
                       r"\(gave up after (\d+) s, timeout 5 s\)", logs[1])
    assert lonely and int(lonely.group(1)) == lonely_port, tail(logs)
    assert int(lonely.group(2)) <= timeout_s + 5
    print(f"timeouts: {wall:.0f} s")


def test_mismatched_ist_config_across_nodes_fails_fast(deepspeed_ops, tmp_path):
    """Two ranks started with different ist.seed (one config per node, edited on one node only): the
    agreement check of the IST setup stops both at initialize with ISTAgreementError naming the key,
    within the timeout."""
    port = free_port()
    cmds = [([PYTHON, "launch/train.py", *SHORT, "--set", f"ist.seed={seed}", "--set", "backend.dist_timeout_s=60",
              "--set", f"output_dir={tmp_path / 'out'}"],
             launch_env(RANK=rank, WORLD_SIZE=2, LOCAL_RANK=rank, MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
            for rank, seed in ((0, 0), (1, 1))]
    rcs, logs, wall = run_logged(cmds, tmp_path, "rank", timeout=300)
    assert all(rc != 0 for rc in rcs), tail(logs)
    for log in logs:
        assert "ISTAgreementError: the IST setup differs across ranks (ist.seed)" in log, tail(logs)
        assert "ist.seed: rank 0: 0, rank 1: 1" in log, tail(logs)
    assert not (tmp_path / "out" / "summary.json").exists()
    print(f"agreement error: {wall:.0f} s")
