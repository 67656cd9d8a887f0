"""One scoring run end to end: plan, score on Ray, commit in pieces as results stream, summarize."""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from omegaconf import OmegaConf
from ray.data.datasource import FilenameProvider

from pipeline.aggregate import combine_sums, group_sums, summary_from_sums
from pipeline.config import ConfigError, JobConfig, StudentConfig, metric_names, row_columns
from pipeline.errors import RowError
from pipeline.output import STAGING_DIR, OutputStore, new_run_id, scoring_fingerprint
from pipeline.ray_job import (
    build_dataset,
    cached_get,
    committed_reject_keys,
    duplicate_ids,
    reject_keys,
    scored_keys,
)  # fmt: skip
from pipeline.records import count_records
from pipeline.rsr import stat_columns
from pipeline.spans import BUILTIN_TEMPLATES, load_tokenizer, turn_markers
from pipeline.storage import Location, check_output, locate, plan_corpus
from pipeline.student import model_revision

logger = logging.getLogger(__name__)
PROGRESS_EVERY_S = 10.0
COUNT_COLUMNS = ["read", "scored", "rejected", "skipped", "content_dropped"]


def score_columns(cfg: JobConfig) -> list[str]:
    """The score files' columns, the row columns (passthrough, corpus shape) after sample_id."""
    return [
        "sample_id", *row_columns(cfg.input), "student", "student_revision", "scoring_fingerprint", "reasoning_mode", "dtype",
        "rank_clip", *stat_columns(metric_names(cfg.scoring)),
        "truncated", "content_dropped", "content_hash", "run_id", "scored_at", "source_file", "row_number",
    ]  # fmt: skip


REJECT_COLUMNS = ["student", "source_file", "row_number", "sample_id", "reject_reason", "reject_detail", "content_hash", "run_id"]
MAX_PARTITION_NAME = 200  # encoded bytes, under the usual 255-byte file-name limit with "column="


@dataclass
class RunResult:
    run_id: str
    mode: str
    output: str
    counts: pa.Table  # per student: read, scored, rejected, skipped, content_dropped (scored rows)
    summary: pa.Table  # dataset-level RSR per student over this run's scores
    partition_summary: pa.Table | None  # the same per student and partition value
    tokens_scored: int
    wall_s: float
    committed_files: list[str]
    skipped_files: list[str]
    pieces: int  # checkpoints committed
    lock_taken_over: str | None  # why an earlier run's lock was taken over


def partition_value(value):
    """A partition value pyarrow can write as a folder. pyarrow %-encodes '/', '=' and the like itself
    (DuckDB and pyarrow decode them back); NUL would cut the name short and an overlong value would
    exceed the file system's name limit, so those two are changed here, stably across runs."""
    if value is None:
        return None  # pyarrow writes __HIVE_DEFAULT_PARTITION__
    text = str(value).replace("\x00", "\ufffd")
    if len(urllib.parse.quote(text, safe="")) > MAX_PARTITION_NAME:
        digest = hashlib.sha256(text.encode()).hexdigest()[:16]
        while len(urllib.parse.quote(text, safe="")) > MAX_PARTITION_NAME - 17:
            text = text[: len(text) * 3 // 4]
        text = f"{text}~{digest}"
    return text


def check_students(cfg: JobConfig) -> list[str]:
    """Before Ray starts: each student's tokenizer loads (and encodes as its tokenizer.json), has a chat
    template and one whose assistant turns can be found (a base model ships none: every row would be
    rejected). Returns each student's effective chat template."""
    templates = []
    for i, student in enumerate(cfg.students):
        where = f"students.{i} ({student.name})"
        try:
            tokenizer = load_tokenizer(student.path, student.chat_template)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{where}: cannot load a tokenizer from {student.path!r}: {exc}") from exc
        if not tokenizer.chat_template:
            raise ConfigError(
                f"{where}: {student.path!r} has no chat template (a base model?); set students.{i}.chat_template "
                f"to a .jinja file or one of {sorted(BUILTIN_TEMPLATES)}"
            )
        try:
            turn_markers(tokenizer)
        except RowError as exc:
            raise ConfigError(f"{where}: unusable chat template: {exc.detail}") from exc
        templates.append(tokenizer.chat_template)
    return templates


def ensure_ray(cfg: JobConfig, quiet: bool) -> None:
    """Connect to the configured cluster or start a local runtime; `quiet`: Ray logs warnings and up."""
    if ray.is_initialized():
        return
    log_level = {"logging_level": logging.WARNING} if quiet else {}
    address = cfg.compute.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **log_level)
    else:  # a local runtime in this process, reachable on loopback only
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        # Scoring actors hold their CPUs for the whole run: without logical CPUs beyond theirs, the
        # read and tokenize tasks never get a slot and the job hangs (2 actors on a 2-core machine).
        actor_cpus = cfg.compute.cpus_per_actor * cfg.compute.actors_per_student * len(cfg.students)
        ray.init(num_cpus=int(os.cpu_count() + actor_cpus + 0.999), include_dashboard=False, **log_level)


def resolve_mode(configured: str, has_runs: bool) -> str:
    if configured == "overwrite":
        return "overwrite"
    return "incremental" if has_runs else "full"


def _scores_batch(batch: pa.Table, columns: list[str], partition_by: list[str]) -> pa.Table:
    table = batch.filter(pc.equal(batch["status"], "scored")).select(columns)
    for name in partition_by:
        values = pa.array([partition_value(v) for v in table[name].to_pylist()], pa.string())
        table = table.set_column(table.schema.get_field_index(name), name, values)
    return table


def _rejects_batch(batch: pa.Table, known: list) -> pa.Table:
    """Rejects not already recorded by a committed run (a nightly run re-reads the same bad rows);
    `known` holds the reference to their keys."""
    rejected = batch.filter(pc.equal(batch["status"], "rejected"))
    known_keys = cached_get(known[0])
    is_new = [key not in known_keys for key in reject_keys(rejected)]
    return rejected.filter(pa.array(is_new, pa.bool_())).select(REJECT_COLUMNS)


@dataclass
class Tally:
    """Counts per student and summary sums per group over result blocks, without keeping their rows."""

    partition_by: list[str]
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    sums: dict[tuple, pa.Table] = field(default_factory=dict)  # grouping -> combined group_sums
    tokens: int = 0
    rows: int = 0

    def add(self, block: pa.Table) -> None:
        self.rows += block.num_rows
        for row in block.group_by(["student", "status"]).aggregate([("status", "count")]).to_pylist():
            counts = self.counts.setdefault(row["student"], dict.fromkeys(COUNT_COLUMNS, 0))
            counts["read"] += row["status_count"]
            counts[row["status"]] += row["status_count"]
        scored = block.filter(pc.equal(block["status"], "scored"))
        for row in (
            scored.filter(pc.fill_null(scored["content_dropped"], False))
            .group_by("student")
            .aggregate([("student", "count")])
            .to_pylist()
        ):
            self.counts[row["student"]]["content_dropped"] += row["student_count"]
        if scored.num_rows:
            self.tokens += pc.sum(scored["resp_token_length"]).as_py()
            for by in self.groupings():
                part = group_sums(scored, by)
                self.sums[by] = combine_sums([self.sums[by], part], by) if by in self.sums else part

    def groupings(self) -> list[tuple]:
        return [("student",), ("student", *self.partition_by)] if self.partition_by else [("student",)]

    def counts_table(self) -> pa.Table:
        return pa.Table.from_pylist([{"student": s, **self.counts[s]} for s in sorted(self.counts)])

    def summary(self, by: tuple) -> pa.Table:
        return (
            summary_from_sums(self.sums[by], by) if by in self.sums else pa.table({key: pa.array([], pa.string()) for key in by})
        )


class Checkpoints:
    """The run's results streamed into pieces, each committed to the output when it holds
    `output.checkpoint_rows` rows per student or is `output.checkpoint_minutes` old. A piece's counts
    are the run's `tally` now less the tally at the last committed piece (a stretch with nothing to write,
    such as rows all skipped, commits nothing and is counted by the next piece and the run manifest)."""

    def __init__(self, cfg: JobConfig, store: OutputStore, known_rejects: ray.ObjectRef, tally: Tally):
        self.cfg, self.store, self.known_rejects, self.tally = cfg, store, known_rejects, tally
        self.max_rows = cfg.output.checkpoint_rows * len(cfg.students)  # long format: a row per student
        self.max_age_s = cfg.output.checkpoint_minutes * 60
        self.committed: list[str] = []
        self.counts_before: dict[str, dict[str, int]] = {}
        self._start_piece()

    def _start_piece(self) -> None:
        self.refs: list[ray.ObjectRef] = []
        self.rows_before = self.tally.rows
        self.started = time.monotonic()

    def add(self, ref: ray.ObjectRef) -> None:
        """Add a block the run's tally has counted."""
        self.refs.append(ref)
        if self.tally.rows - self.rows_before >= self.max_rows or time.monotonic() - self.started >= self.max_age_s:
            self.commit()

    def _piece_counts(self) -> list[dict]:
        before = lambda student: self.counts_before.get(student, dict.fromkeys(COUNT_COLUMNS, 0))  # noqa: E731
        return [{"student": student, **{k: n - before(student)[k] for k, n in counts.items()}}
                for student, counts in sorted(self.tally.counts.items())]  # fmt: skip

    def commit(self) -> None:
        """Write the piece's scores and new rejects to staging and commit them (nothing to write: no piece)."""
        if not self.refs:
            return
        staging = self.store.staging()
        name_files = FilenameProvider(dataset_uuid=self.store.piece_name, file_format="parquet")
        write_args = {"filesystem": staging.arrow_fs(), "filename_provider": name_files}
        piece = ray.data.from_arrow_refs(self.refs)
        partition_by = list(self.cfg.output.partition_by)
        counts = self._piece_counts()
        wrote = False
        if sum(c["scored"] for c in counts):
            piece.map_batches(_scores_batch, fn_kwargs={"columns": score_columns(self.cfg), "partition_by": partition_by},
                              batch_format="pyarrow").write_parquet(staging.path, partition_cols=["student", *partition_by], **write_args)  # fmt: skip
            wrote = True
        if sum(c["rejected"] for c in counts):
            rejects = staging.join("_rejects", f"run_id={self.store.run_id}")
            piece.map_batches(_rejects_batch, fn_kwargs={"known": [self.known_rejects]}, batch_format="pyarrow").write_parquet(
                rejects.path, **write_args
            )
            wrote = staging.fs.exists(rejects.path) or wrote
        if wrote:
            self.committed += self.store.commit_piece({"counts": counts})
            self.counts_before = {student: dict(c) for student, c in self.tally.counts.items()}
        self._start_piece()


def scoring_settings(cfg: JobConfig, student: StudentConfig, revision: str, chat_template: str, gpus: float) -> dict:
    """Everything that changes a student's numbers. The tokenizer's files are part of the revision (a
    hash of the model directory's files, or the hub commit); `auto` dtype is resolved as the actor will."""
    dtype = student.dtype if student.dtype != "auto" else ("bfloat16" if gpus else "float32")
    s = cfg.scoring
    return {
        "student_revision": revision, "chat_template": chat_template, "reasoning": s.reasoning, "rank_clip": s.rank_clip,
        "max_model_len": s.max_model_len, "on_too_long": s.on_too_long, "metrics": list(metric_names(s)), "dtype": dtype,
    }  # fmt: skip


def _students(cfg: JobConfig, store: OutputStore, mode: str, templates: list[str], gpus: float) -> list[dict]:
    """Per student: name, revision, scoring settings and their fingerprint, and (a reference to) the keys
    already scored with that fingerprint, read by a Ray task."""
    students = []
    for s, template in zip(cfg.students, templates):
        try:
            revision = model_revision(s.path)
        except FileNotFoundError as exc:
            raise ConfigError(f"students.{s.name}: {exc}") from exc
        settings = scoring_settings(cfg, s, revision, template, gpus)
        fingerprint = scoring_fingerprint(settings)
        paths = store.paths(store.committed_files(f"student={s.name}/")) if mode == "incremental" else []
        done_ref = scored_keys.remote(paths, store.root, fingerprint)
        students.append(
            {"name": s.name, "revision": revision, "fingerprint": fingerprint, "settings": settings, "done_ref": done_ref}
        )
    return students


def _write_summaries(staging: Location, run_id: str, tally: Tally) -> None:
    directory = staging.join("_summary", f"run_id={run_id}")
    staging.fs.makedirs(directory.path, exist_ok=True)
    for name, by in zip(("by_student", "by_partition"), tally.groupings()):
        pq.write_table(tally.summary(by), directory.join(f"{name}.parquet").path, filesystem=staging.arrow_fs())


class Progress:
    """One line at most every PROGRESS_EVERY_S seconds: rows done, scored tokens/s and, once a thread
    started with the first line has counted the input, the time left."""

    def __init__(self, log: Callable[[str], None] | None, count_rows: Callable[[], int]):
        self.log, self.count_rows = log, count_rows
        self.expected: list[int] = []
        self.counting: threading.Thread | None = None
        self.started = self.last_line = time.monotonic()

    def update(self, tally: Tally) -> None:
        now = time.monotonic()
        if not self.log or now - self.last_line < PROGRESS_EVERY_S or not tally.rows:
            return
        if self.counting is None:  # short runs never pay for the count
            self.counting = threading.Thread(target=lambda: self.expected.append(self.count_rows()), daemon=True)
            self.counting.start()
        elapsed = now - self.started
        line = f"progress: {tally.rows:,} rows done, {tally.tokens / elapsed:,.0f} scored tokens/s"
        if self.expected:
            left = elapsed * max(self.expected[0] - tally.rows, 0) / tally.rows
            line += f", {tally.rows / self.expected[0]:.0%} of {self.expected[0]:,}, about {left / 60:.0f} min left"
        self.log(line)
        self.last_line = now


def run_job(cfg: JobConfig, quiet: bool = False, progress: Callable[[str], None] | None = None) -> RunResult:
    """One run: plan (inputs, students, lock, what is committed), score on Ray while committing pieces,
    then commit the run's summary. `quiet`: Ray logs warnings and up; `progress` receives progress lines."""
    started = time.perf_counter()
    corpus = plan_corpus(cfg.input, cfg.storage)
    root = locate(cfg.output.path, cfg.storage)
    check_output(root)
    templates = check_students(cfg)
    now = datetime.now(UTC)
    lock = {"stale_after_s": cfg.output.lock_stale_minutes * 60, "beat_every_s": cfg.output.lock_heartbeat_seconds}
    with OutputStore(root, new_run_id(now), **lock) as store:
        if store.taken_over:
            logger.warning("%s", store.taken_over)
        mode = resolve_mode(cfg.output.mode, store.has_runs)
        ensure_ray(cfg, quiet)
        gpus = cfg.compute.gpus_per_actor
        if gpus is None:
            gpus = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
        students = _students(cfg, store, mode, templates, gpus)
        reject_paths = store.paths(store.committed_files("_rejects/")) if mode == "incremental" else []
        known_rejects = committed_reject_keys.remote(reject_paths, store.root)
        run = {"run_id": store.run_id, "scored_at": now, "rank_clip": cfg.scoring.rank_clip}
        dataset = build_dataset(cfg, corpus, students, duplicate_ids(cfg, corpus), run, gpus)

        tally = Tally(list(cfg.output.partition_by))
        checkpoints = Checkpoints(cfg, store, known_rejects, tally)
        reporter = Progress(progress, lambda: count_records(corpus) * len(students))
        for bundle in dataset.iter_internal_ref_bundles():
            for ref in bundle.block_refs:
                block = ray.get(ref)
                tally.add(block)
                checkpoints.add(ref)
            reporter.update(tally)
        checkpoints.commit()

        committed = checkpoints.committed
        if store.pieces_committed or mode == "overwrite":
            staging = root.join(STAGING_DIR, store.run_id)
            _write_summaries(staging, store.run_id, tally)
            manifest = {
                "mode": mode,
                "started_at": now.isoformat(),
                "students": [{k: s[k] for k in ("name", "revision", "fingerprint", "settings")} for s in students],
                "counts": tally.counts_table().to_pylist(),
                "input_files": len(corpus.files),
                "config": OmegaConf.to_container(OmegaConf.structured(cfg)),
            }
            committed = committed + store.commit_run(staging, manifest)
            if mode == "overwrite":
                store.drop_earlier_runs()
    return RunResult(
        run_id=store.run_id,
        mode=mode,
        output=root.url(),
        counts=tally.counts_table(),
        summary=tally.summary(("student",)),
        partition_summary=tally.summary(("student", *cfg.output.partition_by)) if cfg.output.partition_by else None,
        tokens_scored=tally.tokens,
        wall_s=time.perf_counter() - started,
        committed_files=committed,
        skipped_files=[corpus.location.url(p) for p in corpus.skipped],
        pieces=store.pieces_committed,
        lock_taken_over=store.taken_over,
    )
