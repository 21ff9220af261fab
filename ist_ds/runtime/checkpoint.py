"""Checkpoint files that survive kills and refuse foreign code.

- **Publish last.** A checkpoint directory counts only once its IST state file exists and ``latest``
  names it. Ranks write their files, meet at a barrier, then rank 0 writes the IST state and replaces
  ``latest`` atomically (temporary file, ``fsync``, ``os.replace``). A kill at any moment leaves the
  previous ``latest`` pointing at a complete checkpoint.
- **Safe loading.** Every file is read with ``torch.load(weights_only=True)``: tensors, containers
  and plain numbers only, plus a short allowlist of DeepSpeed's own data classes. A checkpoint that
  would need any other class (i.e. pickled code) is refused with :class:`ISTCheckpointError`.
- **Exact resume.** Each rank saves its RNG states (torch, CUDA, Python's ``random``), so dropout
  and anything else random continues as if the run had never stopped.
- **Checksums.** Before ``latest`` names a checkpoint, a manifest (``manifest.json``) records the
  size and SHA-256 of every file in it: IST's own, and the engine's (DeepSpeed's, or DCP's shards).
  Loading verifies it first, as a collective (each rank hashes a share of the files and every rank
  learns every result), so a damaged file, even one only some rank would read, stops every rank with
  the same :class:`ISTCheckpointError` naming it, before anything is loaded or written. Hashing of
  the engine's files can be switched off (``ist.verify_engine_files: false``); IST's never.
- **One module.** Every backend (DeepSpeed, FSDP2, the Trainer integration) saves and loads through
  the functions here; the file names are defined here once.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import logging
import os
import random
import re
from typing import TYPE_CHECKING

import torch

from ist_ds.compat.deepspeed import checkpoint_safe_globals
from ist_ds.core.errors import ISTCheckpointError

if TYPE_CHECKING:
    from ist_ds.runtime.collectives import Collectives

logger = logging.getLogger(__name__)

LATEST = "latest"
IST_STATE_FILE = "ist_state.pt"
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 1
#: Files of a checkpoint that IST itself writes: always hashed and verified.
IST_FILE_PATTERNS = (IST_STATE_FILE, "rng_rank*.pt")
#: Temporary files of :func:`atomic_torch_save` / :func:`atomic_write_text` (``name.tmp.<pid>``).
_TMP_NAME = re.compile(r".+\.tmp\.\d+$")
_CHUNK = 8 << 20


def safe_load(path: str, map_location="cpu"):
    """``torch.load(path, weights_only=True)`` with DeepSpeed's data classes allowed; clear errors."""
    if not os.path.isfile(path):
        raise ISTCheckpointError(f"checkpoint file missing: {path}")
    try:
        with torch.serialization.safe_globals(checkpoint_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - every failure to read is the same user-facing problem
        if "Unsupported global" in str(e) or "weights_only" in str(e).lower() and "GLOBAL" in str(e):
            raise ISTCheckpointError(f"{path} contains pickled objects that are not plain data; refusing to load "
                                     f"it ({str(e).splitlines()[-1][:300]})") from e
        raise ISTCheckpointError(f"{path} cannot be read: it is truncated, corrupted or not a checkpoint "
                                 f"({type(e).__name__}: {str(e)[:300]})") from e


def atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path) or ".")


def atomic_torch_save(obj, path: str) -> None:
    """``torch.save`` to a temporary file, ``fsync``, atomic rename: a reader sees all or nothing."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path) or ".")


def remove_stale_tmp(directory: str) -> list[str]:
    """Remove the temporary files a killed save left in ``directory`` and its direct sub-directories
    (the checkpoint directories).

    Call it on one rank while no other rank is writing (after a barrier). Returns the removed paths.
    """
    removed = []
    if not os.path.isdir(directory):
        return removed
    dirs = [directory] + [e.path for e in os.scandir(directory) if e.is_dir(follow_symlinks=False)]
    for d in dirs:
        for entry in os.scandir(d):
            if entry.is_file(follow_symlinks=False) and _TMP_NAME.match(entry.name):
                with contextlib.suppress(OSError):
                    os.remove(entry.path)
                    removed.append(entry.path)
    if removed:
        logger.info("removed %d temporary file(s) left by an interrupted save, e.g. %s", len(removed), removed[0])
    return removed


def _fsync_dir(directory: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def publish_latest(save_dir: str, tag: str) -> None:
    atomic_write_text(os.path.join(save_dir, LATEST), tag)


def read_latest(load_dir: str) -> str | None:
    """The tag ``latest`` names, or None when there is no checkpoint yet; errors for a broken one."""
    path = os.path.join(load_dir, LATEST)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        tag = f.read().strip()
    if not tag:
        raise ISTCheckpointError(f"{path} is empty")
    for required in (IST_STATE_FILE, MANIFEST_FILE):
        if not os.path.isfile(os.path.join(load_dir, tag, required)):
            raise ISTCheckpointError(f"{path} names {tag!r}, which is not a complete checkpoint "
                                     f"(no {required} in {os.path.join(load_dir, tag)})")
    return tag


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def rng_file(rank: int) -> str:
    return f"rng_rank{rank}.pt"


# ---------------------------------------------------------------------------------------- manifest
def is_ist_file(relpath: str) -> bool:
    """True for the files IST writes itself (their verification cannot be switched off)."""
    name = os.path.basename(relpath)
    return any(fnmatch.fnmatch(name, pat) for pat in IST_FILE_PATTERNS)


def file_digest(path: str) -> str:
    """SHA-256 of a file, read in 8 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            chunk = f.read(_CHUNK)
            if not chunk:
                break
            h.update(chunk)
    return h.hexdigest()


def _listing(tag_dir: str) -> list[str]:
    """Every file of a checkpoint directory, relative and sorted (not the manifest, not temporaries)."""
    out = []
    for root, _dirs, files in os.walk(tag_dir):
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), tag_dir)
            if rel == MANIFEST_FILE or _TMP_NAME.match(name):
                continue
            out.append(rel)
    return sorted(out)


def _local_comm():
    from ist_ds.runtime.collectives import LocalCollectives

    return LocalCollectives()


def write_manifest(tag_dir: str, comm: Collectives | None = None, hash_engine_files: bool = True) -> dict:
    """Hash every file of ``tag_dir`` and write ``manifest.json`` there (rank 0). A collective.

    Call it on every rank once every file of the checkpoint is written (after a barrier) and before
    ``latest`` is published. Rank 0's listing is used; each rank hashes every ``world_size``-th file
    of it. With ``hash_engine_files=False`` the engine's files are recorded by size only.
    """
    comm = comm or _local_comm()
    comm.gather_objects(None)  # a barrier: every rank has finished writing its files
    files = comm.gather_objects(_listing(tag_dir) if comm.rank == 0 else None)[0]
    mine = {}
    for i, rel in enumerate(files):
        if i % comm.world_size != comm.rank:
            continue
        path = os.path.join(tag_dir, rel)
        ist_file = is_ist_file(rel)
        digest = file_digest(path) if (ist_file or hash_engine_files) else None
        mine[rel] = {"size": os.path.getsize(path), "sha256": digest, "ist": ist_file}
    entries = {}
    for part in comm.gather_objects(mine):
        entries.update(part)
    manifest = {"format": MANIFEST_FORMAT, "files": {rel: entries[rel] for rel in files}}
    if comm.rank == 0:
        atomic_write_text(os.path.join(tag_dir, MANIFEST_FILE), json.dumps(manifest, indent=1, sort_keys=True))
    return manifest


def _read_manifest(tag_dir: str) -> dict:
    path = os.path.join(tag_dir, MANIFEST_FILE)
    if not os.path.isfile(path):
        raise ISTCheckpointError(f"{tag_dir} has no {MANIFEST_FILE}: the checkpoint is incomplete (its save was "
                                 "interrupted) or was written by a version of ist_ds without checksums")
    try:
        with open(path) as f:
            manifest = json.load(f)
        files = manifest["files"]
        if manifest.get("format") != MANIFEST_FORMAT or not isinstance(files, dict):
            raise ValueError(f"unsupported manifest format {manifest.get('format')!r}")
        return manifest
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ISTCheckpointError(f"{path} is damaged ({type(e).__name__}: {str(e)[:200]})") from None


def _verify_file(tag_dir: str, rel: str, entry, verify_engine_files: bool) -> str | None:
    """None when the file matches its manifest entry, else what is wrong with it."""
    path = os.path.join(tag_dir, rel)
    try:
        size, digest = int(entry["size"]), entry.get("sha256")
    except (KeyError, TypeError, ValueError):
        return f"{path}: its entry in {MANIFEST_FILE} is damaged"
    if not os.path.isfile(path):
        return f"{path} is missing"
    actual = os.path.getsize(path)
    if actual != size:
        return f"{path} is truncated or corrupted: {actual} bytes, the manifest says {size}"
    if digest is not None and (is_ist_file(rel) or verify_engine_files):
        if file_digest(path) != digest:
            return f"{path} is corrupted: its SHA-256 differs from the one in {MANIFEST_FILE}"
    return None


def verify_checkpoint(tag_dir: str, comm: Collectives | None = None, verify_engine_files: bool = True) -> None:
    """Check every file of a checkpoint against its manifest, on every rank together. A collective.

    Each rank reads the manifest and checks every ``world_size``-th file; the findings are gathered,
    so either every rank returns or every rank raises the same :class:`ISTCheckpointError` naming
    the damaged files. ``verify_engine_files=False`` skips hashing the engine's files (sizes are
    still compared); IST's own files are always hashed.
    """
    comm = comm or _local_comm()
    problems: list[str] = []
    try:
        files = _read_manifest(tag_dir)["files"]
        for i, rel in enumerate(sorted(files)):
            if i % comm.world_size == comm.rank:
                problem = _verify_file(tag_dir, rel, files[rel], verify_engine_files)
                if problem:
                    problems.append(problem)
        if comm.rank == 0 and not any(is_ist_file(rel) and os.path.basename(rel) == IST_STATE_FILE
                                      for rel in files):
            problems.append(f"{os.path.join(tag_dir, MANIFEST_FILE)} does not list {IST_STATE_FILE}")
    except ISTCheckpointError as e:
        problems.append(str(e))
    except OSError as e:
        problems.append(f"{tag_dir} cannot be read ({e})")
    found = sorted({p for part in comm.gather_objects(problems) for p in part})
    if found:
        shown = "\n  ".join(found[:10]) + (f"\n  ... and {len(found) - 10} more" if len(found) > 10 else "")
        raise ISTCheckpointError(f"checkpoint {tag_dir} failed verification; nothing was loaded:\n  {shown}")


def check_world_size(tag_dir: str, saved: int | None, current: int) -> None:
    """Refuse a DeepSpeed ZeRO checkpoint written by another number of data-parallel ranks.

    ZeRO's optimizer files are partitioned per rank; DeepSpeed itself can load them only at the world
    size that wrote them. ``saved`` is the world size recorded in the IST state; for checkpoints
    without it, the number of ``*zero_pp_rank_<r>_*`` files is used.
    """
    zero = [n for n in os.listdir(tag_dir) if "zero_pp_rank_" in n]
    if not zero:
        return  # stage 0 without a ZeRO optimizer: nothing is partitioned
    if saved is None:
        ranks = set()
        for name in zero:
            with contextlib.suppress(ValueError, IndexError):
                ranks.add(int(name.split("zero_pp_rank_")[1].split("_")[0]))
        saved = len(ranks) or None
    if saved is not None and int(saved) != current:
        raise ISTCheckpointError(
            f"{tag_dir} was written by {saved} data-parallel ranks and this run has {current}. DeepSpeed's ZeRO "
            "checkpoints load only at the world size that wrote them; convert it first with DeepSpeed's "
            "universal checkpoint conversion (python -m deepspeed.checkpoint.ds_to_universal --input_folder "
            f"{tag_dir} --output_folder <dir>), or resume with {saved} ranks")
