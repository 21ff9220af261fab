"""What the checkpoint manifest costs: SHA-256 of a large checkpoint file against writing and reading it.

A checkpoint's files are hashed once when it is saved (``write_manifest``) and once when it is
loaded (``verify_checkpoint``), each rank hashing ``1 / world_size`` of the files. This script writes
one large ``torch.save`` file (default 1 GiB of fp32 values, an optimizer shard of a ~250M-parameter
model), then times, in the same run: the save itself (with ``fsync``), hashing it, and reading it back
with ``torch.load`` (the file is in the page cache for both, as it is right after a save). It prints the
hashing throughput and its cost as a fraction of the save and of the load.

    python bench/checkpoint_hash.py [--gib 1.0] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench.common import print_verdicts  # noqa: E402
from ist_ds.runtime.checkpoint import file_digest, safe_load  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--dir", default=tempfile.gettempdir())
    args = ap.parse_args()
    numel = int(args.gib * (1 << 30)) // 4
    data = {"exp_avg": torch.randn(numel // 2), "exp_avg_sq": torch.rand(numel - numel // 2)}
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        path = os.path.join(d, "zero_pp_rank_0_mp_rank_00_optim_states.pt")
        t = time.perf_counter()
        with open(path, "wb") as f:
            torch.save(data, f)
            f.flush()
            os.fsync(f.fileno())
        save_s = time.perf_counter() - t
        size = os.path.getsize(path)
        hashes = []
        for _ in range(3):
            t = time.perf_counter()
            file_digest(path)
            hashes.append(time.perf_counter() - t)
        hash_s = sorted(hashes)[1]
        t = time.perf_counter()
        safe_load(path)
        load_s = time.perf_counter() - t
    gib = size / (1 << 30)
    infos = [f"file {gib:.2f} GiB; save+fsync {save_s:.2f} s, torch.load {load_s:.2f} s, SHA-256 {hash_s:.2f} s "
             f"(median of 3) = {gib / hash_s:.2f} GiB/s on one core",
             f"hashing / save = {hash_s / save_s:.2f}; hashing / load = {hash_s / load_s:.2f}"]
    return print_verdicts([(f"hashing runs at >= 0.25 GiB/s ({gib / hash_s:.2f})", gib / hash_s >= 0.25)], infos)


if __name__ == "__main__":
    sys.exit(main())
