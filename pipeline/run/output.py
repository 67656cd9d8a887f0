"""The scoring output of one run, owned by one `OutputStore`: what is committed, the files of each piece
(scores and rejects) and of the run (summaries), and their atomic commits (`pipeline.run.layout`'s
protocol), under the lock (`pipeline.run.lock`) the store holds for the run.
"""

from __future__ import annotations

import posixpath
import uuid
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from ray.data.datasource import FilenameProvider

from pipeline.corpus.storage import Location
from pipeline.run.layout import (
    REJECTS_DIR,
    RUNS_DIR,
    SCORES_PARTITION,
    STAGING_DIR,
    inputs_dir,
    read_manifests,
    rejects_dir,
    scores_prefix,
    summary_dir,
    write_manifest,
)
from pipeline.run.lock import LOCK_FILE, OutputLock
from pipeline.run.schema import REJECT_COLUMNS, Status, partition_value, reject_keys
from pipeline.run.stages.base import cached_get


def scores_batch(batch: pa.Table, columns: list[str], partition_by: list[str]) -> pa.Table:
    """The scored rows of a result block as score-file rows, partition values made writable."""
    table = batch.filter(pc.equal(batch["status"], Status.SCORED)).select(columns)
    for name in partition_by:
        values = pa.array([partition_value(v) for v in table[name].to_pylist()], pa.string())
        table = table.set_column(table.schema.get_field_index(name), name, values)
    return table


def rejects_batch(batch: pa.Table, known: list) -> pa.Table:
    """Rejects not already recorded by a committed run (a nightly run re-reads the same bad rows);
    `known` holds the reference to their keys."""
    rejected = batch.filter(pc.equal(batch["status"], Status.REJECTED))
    known_keys = cached_get(known[0])
    is_new = [key not in known_keys for key in reject_keys(rejected)]
    return rejected.filter(pa.array(is_new, pa.bool_())).select(REJECT_COLUMNS)


def new_run_id(now: datetime | None = None) -> str:
    now = now or datetime.now(UTC)
    return f"{now:%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"


class OutputStore:
    """The output of one run: opened once (manifests read once), locked for the run's duration."""

    def __init__(self, root: Location, run_id: str, stale_after_s: float = 300.0, beat_every_s: float = 30.0):
        self.root = root
        self.run_id = run_id
        self.lock = OutputLock(root, run_id, stale_after_s, beat_every_s)
        self.manifests: list[dict] = []
        self.pieces_committed = 0
        self.taken_over: str | None = None

    def __enter__(self) -> OutputStore:
        self.taken_over = self.lock.acquire()
        try:
            self.manifests = read_manifests(self.root)
            self._remove_debris()
        except BaseException:
            self.lock.release()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.lock.release()

    @property
    def has_runs(self) -> bool:
        return bool(self.manifests)

    def committed_files(self, prefix: str = "") -> list[str]:
        """Paths (relative to the root) of committed files starting with `prefix`."""
        return [f for m in self.manifests for f in m["files"] if f.startswith(prefix)]

    def paths(self, relative: list[str]) -> list[str]:
        return [self.root.join(f).path for f in relative]

    def score_paths(self, student: str) -> list[str]:
        """Committed score files of `student`."""
        return self.paths(self.committed_files(scores_prefix(student)))

    def reject_paths(self) -> list[str]:
        """Committed reject files."""
        return self.paths(self.committed_files(f"{REJECTS_DIR}/"))

    def _remove_debris(self) -> None:
        """Delete files no manifest lists: debris of interrupted runs (staging and half-written manifests
        included). The lock and other runs' attempts at it (`_lock.json.tmp-*`) are left to their writers."""
        if not self.root.fs.exists(self.root.path):
            return
        committed = set(self.committed_files())
        for path in self.root.fs.find(self.root.path):
            relative = posixpath.relpath(path, self.root.path)
            if relative.startswith(LOCK_FILE) or relative in committed:
                continue
            if not relative.startswith(f"{RUNS_DIR}/") or ".tmp-" in relative:
                self.root.fs.rm(path)

    @property
    def piece_name(self) -> str:
        """The next piece's id: its staging folder, manifest and file-name prefix."""
        return f"{self.run_id}-p{self.pieces_committed + 1:04d}"

    def staging(self) -> Location:
        """Where the next piece is written, in the final layout."""
        return self.root.join(STAGING_DIR, self.piece_name)

    def commit_piece(
        self, refs: list, counts: list[dict], columns: tuple[str, ...], partition_by: list[str], known_rejects
    ) -> list[str]:
        """Write a piece of result blocks (`refs`, long format) in the final layout: its scored rows as score
        files under student=/<partition>=, its rejects that no committed run recorded (the keys behind the
        reference `known_rejects`) under _rejects/; then move it into place and write its manifest with
        its `counts`. Returns its committed files; with nothing to write there is no piece and none."""
        staging, name = self.staging(), self.piece_name
        write_args = {
            "filesystem": staging.arrow_fs(),
            "filename_provider": FilenameProvider(dataset_uuid=name, file_format="parquet"),
        }
        piece = ray.data.from_arrow_refs(refs)
        wrote = False
        if sum(c[Status.SCORED] for c in counts):
            scores = piece.map_batches(scores_batch, fn_kwargs={"columns": list(columns), "partition_by": list(partition_by)},
                                       batch_format="pyarrow")  # fmt: skip
            scores.write_parquet(staging.path, partition_cols=[SCORES_PARTITION, *partition_by], **write_args)
            wrote = True
        if sum(c[Status.REJECTED] for c in counts):
            rejects = rejects_dir(staging, self.run_id)
            new = piece.map_batches(rejects_batch, fn_kwargs={"known": [known_rejects]}, batch_format="pyarrow")
            new.write_parquet(rejects.path, **write_args)
            wrote = staging.fs.exists(rejects.path) or wrote
        if not wrote:
            return []
        self.pieces_committed += 1
        return self._commit(staging, {"counts": counts, "run_id": self.run_id, "piece": self.pieces_committed}, name)

    @property
    def run_staging(self) -> Location:
        """Where the run's own files wait for its commit (`commit_run`)."""
        return self.root.join(STAGING_DIR, self.run_id)

    @property
    def inputs_index(self) -> tuple[Location, str]:
        """Where the run writes the index of the files it reads (`pipeline.run.accounted`), and where
        its commit puts it (relative to the root)."""
        return inputs_dir(self.run_staging, self.run_id), posixpath.relpath(
            inputs_dir(self.root, self.run_id).path, self.root.path
        )

    def commit_run(self, manifest: dict, summaries: dict[str, pa.Table]) -> list[str]:
        """The run's summaries, its index of the files it read and its own manifest (totals, `completed`),
        after its last piece."""
        staging = self.run_staging
        directory = summary_dir(staging, self.run_id)
        staging.fs.makedirs(directory.path, exist_ok=True)
        for name, table in summaries.items():
            pq.write_table(table, directory.join(f"{name}.parquet").path, filesystem=staging.arrow_fs())
        return self._commit(
            staging, {**manifest, "run_id": self.run_id, "pieces": self.pieces_committed, "completed": True}, self.run_id
        )

    def _commit(self, staging: Location, manifest: dict, name: str) -> list[str]:
        fs = self.root.fs
        staged = [posixpath.relpath(p, staging.path) for p in fs.find(staging.path)] if fs.exists(staging.path) else []
        for relative in staged:
            target = self.root.join(relative)
            fs.makedirs(posixpath.dirname(target.path), exist_ok=True)
            fs.mv(staging.join(relative).path, target.path)
        manifest = {**manifest, "files": sorted(staged)}
        write_manifest(self.root, name, manifest)
        self.manifests.append(manifest)
        if fs.exists(staging.path):
            fs.rm(staging.path, recursive=True)
        return sorted(staged)

    def drop_earlier_runs(self) -> None:
        """Overwrite mode: remove every other run's files and manifests once this run completed."""
        for m in [m for m in self.manifests if m["run_id"] != self.run_id]:
            for f in m["files"]:
                self.root.fs.rm(self.root.join(f).path)
        for path in self.root.fs.ls(self.root.join(RUNS_DIR).path, detail=False):
            if not posixpath.basename(path).startswith(self.run_id):
                self.root.fs.rm(path)
        self.manifests = [m for m in self.manifests if m["run_id"] == self.run_id]
