"""Rank-aware logging for jobs: rank 0 speaks to the user, other ranks only warn."""

from __future__ import annotations

import logging
import sys


class _RankFilter(logging.Filter):
    def __init__(self, rank: int, world: int) -> None:
        super().__init__()
        self.prefix = f"[rank {rank}/{world}] " if world > 1 else ""

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank_prefix = self.prefix
        return True


def setup_logging(rank: int = 0, world_size: int = 1, level: int = logging.INFO) -> None:
    """INFO and up from ist_ds on rank 0 (stdout), WARNING and up on the other ranks (stderr)."""
    root = logging.getLogger("ist_ds")
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler(sys.stdout if rank == 0 else sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(rank_prefix)s%(message)s", "%H:%M:%S"))
    handler.addFilter(_RankFilter(rank, world_size))
    root.addHandler(handler)
    root.setLevel(level if rank == 0 else logging.WARNING)
    root.propagate = False
