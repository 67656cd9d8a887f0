"""The output's layout, and what is committed in it, for the run that writes it and for every reader.

Commit protocol: a piece of a run is written under `_staging/<piece id>/` in the final layout, its
files are moved into place, then its manifest `_runs/<piece id>.json` is written (one object PUT,
atomic on S3 and locally): the commit point. Only files listed in a manifest are committed; files in
place without one are debris of an interrupted run, deleted by the next run before it starts. A run
commits pieces `<run_id>-p0001`, `<run_id>-p0002`, ... as it goes (checkpoints), then its run manifest
`<run_id>.json`, which says it completed and holds its counts, summaries and config. No Ray here: the
readers (`jobs.select`, `jobs.report`) import this module alone.
"""

from __future__ import annotations

import json

from pipeline.corpus.storage import Location
from pipeline.run.lock import AtomicObject

# Only this module spells the output's paths (readers and writers ask it):
#   student=<name>/<partition col>=<value>/<run_id>_*.parquet   scores (hive-partitioned by pyarrow)
#   _rejects/run_id=<run_id>/*.parquet                          quarantined rows
#   _summary/run_id=<run_id>/by_student.parquet, ...             dataset-level values
#   _inputs/run_id=<run_id>/*.parquet                           the ids and groups of the files a run read
#   _runs/<run_id>-pNNNN.json, _runs/<run_id>.json               commit manifests
#   _staging/<piece or run id>/                                  a piece before its commit
#   _lock.json                                                   the running job's lock
RUNS_DIR, STAGING_DIR, REJECTS_DIR, SUMMARY_DIR, INPUTS_DIR = "_runs", "_staging", "_rejects", "_summary", "_inputs"
SCORES_PARTITION = "student"  # the first hive partition of the score files


def scores_prefix(student: str | None = None) -> str:
    """Relative path prefix of the score files (of one student)."""
    return f"{SCORES_PARTITION}={student}/" if student else f"{SCORES_PARTITION}="


def rejects_dir(base: Location, run_id: str) -> Location:
    """A run's rejects folder under `base` (the root, or a staging folder in the final layout)."""
    return base.join(REJECTS_DIR, f"run_id={run_id}")


def summary_dir(base: Location, run_id: str) -> Location:
    """A run's summary folder under `base` (the root, or a staging folder in the final layout)."""
    return base.join(SUMMARY_DIR, f"run_id={run_id}")


def inputs_dir(base: Location, run_id: str) -> Location:
    """A run's index of the input files it read (`pipeline.run.accounted`) under `base`."""
    return base.join(INPUTS_DIR, f"run_id={run_id}")


def read_manifests(root: Location) -> list[dict]:
    """Committed pieces and runs, oldest first."""
    runs_dir = root.join(RUNS_DIR)
    if not root.fs.exists(runs_dir.path):
        return []
    paths = sorted(p for p in root.fs.ls(runs_dir.path, detail=False) if p.endswith(".json"))
    return [json.loads(root.fs.cat_file(p)) for p in paths]


def committed_files(root: Location) -> list[str]:
    """Paths (relative to the root) of every committed file, for readers outside a run."""
    return [f for m in read_manifests(root) for f in m["files"]]


def committed_score_files(root: Location) -> list[str]:
    """Paths (relative to the root) of every committed score file, for readers outside a run."""
    return [f for f in committed_files(root) if f.startswith(scores_prefix())]


def write_manifest(root: Location, name: str, manifest: dict) -> None:
    """The commit point of a piece or run: until this object exists, none of its files count. Written
    whole (a rename locally, one PUT on S3): a reader never parses half a manifest."""
    root.fs.makedirs(root.join(RUNS_DIR).path, exist_ok=True)
    AtomicObject(root.join(RUNS_DIR, f"{name}.json")).replace(json.dumps(manifest, indent=1).encode())
