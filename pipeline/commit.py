"""The output's commit protocol, so that readers never see a half-written run.

A run writes everything under `_staging/<run_id>/` in the final layout, moves the files into place
and then writes its manifest `_runs/<run_id>.json` (one object PUT, atomic on S3 and locally).
Only files listed in a manifest are committed: files in place without one are debris of a run that
was interrupted while moving, and the next run deletes them before it starts.
"""

from __future__ import annotations

import contextlib
import json
import posixpath
import uuid
from datetime import datetime, timezone

import pyarrow.dataset as pads

from pipeline.storage import Location

RUNS_DIR, STAGING_DIR, LOCK_FILE = "_runs", "_staging", "_lock.json"


def new_run_id(now: datetime | None = None) -> str:
    now = now or datetime.now(timezone.utc)
    return f"{now:%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"


def manifests(root: Location) -> list[dict]:
    """Committed runs, oldest first."""
    runs_dir = root.join(RUNS_DIR)
    if not root.fs.exists(runs_dir.path):
        return []
    paths = sorted(p for p in root.fs.ls(runs_dir.path, detail=False) if p.endswith(".json"))
    return [json.loads(root.fs.cat_file(p)) for p in paths]


def committed_files(root: Location) -> list[str]:
    """Paths (relative to the root) of every committed file."""
    return [f for m in manifests(root) for f in m["files"]]


def _all_files(root: Location) -> list[str]:
    if not root.fs.exists(root.path):
        return []
    return [posixpath.relpath(p, root.path) for p in root.fs.find(root.path)]


def remove_uncommitted(root: Location) -> list[str]:
    """Delete files no manifest lists (debris of interrupted runs); return what was deleted."""
    committed = set(committed_files(root))
    debris = [
        f for f in _all_files(root)
        if f not in committed and not f.startswith(f"{RUNS_DIR}/") and f != LOCK_FILE
    ]  # fmt: skip
    for f in debris:
        root.fs.rm(root.join(f).path)
    return debris


def commit(root: Location, run_id: str, manifest: dict) -> list[str]:
    """Move the run's staged files into place, then write its manifest; return the committed files."""
    staging = root.join(STAGING_DIR, run_id)
    staged = [posixpath.relpath(p, staging.path) for p in root.fs.find(staging.path)] if root.fs.exists(staging.path) else []
    for relative in staged:
        target = root.join(relative)
        root.fs.makedirs(posixpath.dirname(target.path), exist_ok=True)
        root.fs.mv(staging.join(relative).path, target.path)
    write_manifest(root, {**manifest, "run_id": run_id, "files": sorted(staged)})
    if root.fs.exists(staging.path):
        root.fs.rm(staging.path, recursive=True)
    return sorted(staged)


def write_manifest(root: Location, manifest: dict) -> None:
    """The commit point of a run: until this object exists, none of the run's files count."""
    root.fs.makedirs(root.join(RUNS_DIR).path, exist_ok=True)
    root.fs.pipe_file(root.join(RUNS_DIR, f"{manifest['run_id']}.json").path, json.dumps(manifest, indent=1).encode())


class OutputLocked(RuntimeError):
    """Another run holds the output's lock."""


@contextlib.contextmanager
def run_lock(root: Location, run_id: str, ttl_hours: float):
    """Keep overlapping runs off one output: a lock object naming the holder, taken over when stale.

    Not a consensus protocol (S3 has no atomic create here); schedulers should also forbid overlap.
    """
    lock = root.join(LOCK_FILE)
    if root.fs.exists(lock.path):
        holder = json.loads(root.fs.cat_file(lock.path))
        age_h = (datetime.now(timezone.utc) - datetime.fromisoformat(holder["since"])).total_seconds() / 3600
        if age_h < ttl_hours:
            raise OutputLocked(
                f"run {holder['run_id']} has held {root.url()} for {age_h:.1f} h (lock {lock.url()}); "
                f"it is taken over after output.lock_ttl_hours={ttl_hours}"
            )
    root.fs.makedirs(root.path, exist_ok=True)
    root.fs.pipe_file(lock.path, json.dumps({"run_id": run_id, "since": datetime.now(timezone.utc).isoformat()}).encode())
    try:
        yield
    finally:
        root.fs.rm(lock.path)


def drop_runs_before(root: Location, run_id: str) -> None:
    """Overwrite mode: remove every earlier run's files and manifest once `run_id` is committed."""
    for m in manifests(root):
        if m["run_id"] < run_id:
            for f in m["files"]:
                root.fs.rm(root.join(f).path)
            root.fs.rm(root.join(RUNS_DIR, f"{m['run_id']}.json").path)


def scored_key(sample_id: str, content_hash: str) -> str:
    """What incremental runs compare: a trajectory's id and its content."""
    return f"{sample_id}/{content_hash}"


def committed_keys(root: Location, student: str, revision: str) -> set[str]:
    """`scored_key` of every trajectory already scored by this student revision."""
    files = [root.join(f).path for f in committed_files(root) if f.startswith(f"student={student}/")]
    if not files:
        return set()
    dataset = pads.dataset(files, filesystem=root.arrow_fs(), format="parquet")
    table = dataset.to_table(
        columns=["sample_id", "content_hash"], filter=pads.field("student_revision") == revision
    )
    return {scored_key(s, h) for s, h in zip(table["sample_id"].to_pylist(), table["content_hash"].to_pylist())}


def reject_keys(table) -> list[str]:
    """A reject's identity across runs: student, source file, row number and reason, NUL-joined."""
    columns = [table[c].to_pylist() for c in ("student", "source_file", "row_number", "reject_reason")]
    return ["\x00".join(map(str, key)) for key in zip(*columns)]


def committed_reject_keys(root: Location) -> set[str]:
    """The keys of every committed reject (see `reject_keys`)."""
    files = [root.join(f).path for f in committed_files(root) if f.startswith("_rejects/")]
    if not files:
        return set()
    columns = ["student", "source_file", "row_number", "reject_reason"]
    return set(reject_keys(pads.dataset(files, filesystem=root.arrow_fs(), format="parquet").to_table(columns=columns)))
