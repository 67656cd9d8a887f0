"""One scoring run end to end: plan, score on Ray, stage, commit, summarize."""

from __future__ import annotations

import hashlib
import logging
import os
import time
import urllib.parse
from dataclasses import dataclass
from typing import Callable
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from omegaconf import OmegaConf
from ray.data.datasource import FilenameProvider

from pipeline import commit, errors
from pipeline.aggregate import dataset_rsr
from pipeline.config import ConfigError, JobConfig
from pipeline.errors import RowError
from pipeline.ray_job import STAT_COLUMNS, build_dataset, run_with_progress
from pipeline.records import count_records
from pipeline.spans import BUILTIN_TEMPLATES, load_tokenizer, turn_markers
from pipeline.storage import check_output, expand_inputs, locate
from pipeline.student import model_revision

SCORE_COLUMNS = [
    "sample_id", "student", "student_revision", "rank_clip", *STAT_COLUMNS, "truncated", "content_dropped",
    "content_hash", "run_id", "scored_at", "source_file", "row_number",
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


def check_students(cfg: JobConfig) -> None:
    """Before Ray starts: each student's tokenizer loads, has a chat template and one whose assistant
    turns can be found (a base model ships none: every row would be rejected)."""
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


def _scores_batch(batch: pa.Table, passthrough: list[str], partition_by: list[str]) -> pa.Table:
    scored = batch.filter(pc.equal(batch["status"], "scored"))
    table = scored.select([*SCORE_COLUMNS[:1], *passthrough, *SCORE_COLUMNS[1:]])
    for name in partition_by:
        values = pa.array([partition_value(v) for v in table[name].to_pylist()], pa.string())
        table = table.set_column(table.schema.get_field_index(name), name, values)
    return table


def _rejects_batch(batch: pa.Table, known: set[str]) -> pa.Table:
    """Rejects not already recorded by a committed run (a nightly run re-reads the same bad rows)."""
    rejected = batch.filter(pc.equal(batch["status"], "rejected"))
    is_new = [key not in known for key in commit.reject_keys(rejected)]
    return rejected.filter(pa.array(is_new, pa.bool_())).select(REJECT_COLUMNS)


def _counts(results: pa.Table) -> pa.Table:
    rows = []
    for student in sorted(set(results["student"].to_pylist())):
        mine = results.filter(pc.equal(results["student"], student))
        status = mine["status"].to_pylist()
        dropped = pc.and_(pc.equal(mine["status"], "scored"), pc.fill_null(mine["content_dropped"], False))
        rows.append({
            "student": student, "read": len(status), "scored": status.count("scored"),
            "rejected": status.count("rejected"), "skipped": status.count("skipped"),
            "content_dropped": pc.sum(dropped).as_py() or 0,
        })  # fmt: skip
    return pa.Table.from_pylist(rows)


def _pull(results, columns: list[str]) -> pa.Table:
    return pa.concat_tables(ray.get(results.select_columns(columns).to_arrow_refs()))


def _row_key(source_file: str, row_number: int) -> str:
    return f"{source_file}\x00{row_number}"


def _duplicate_ids(results, first_student: str) -> dict[str, str]:
    """Rows whose sample_id an earlier row of this run already has: `_row_key` -> where it was first.

    Every student sees the same rows, so one student's rows are enough to find them.
    """
    rows = _pull(results, ["student", "sample_id", "source_file", "row_number", "content_hash"])
    rows = rows.filter(pc.and_(pc.equal(rows["student"], first_student), pc.is_valid(rows["content_hash"])))
    first_seen, duplicates = {}, {}
    ordered = sorted(zip(rows["source_file"].to_pylist(), rows["row_number"].to_pylist(), rows["sample_id"].to_pylist()))
    for source_file, row_number, sample_id in ordered:
        where = f"{source_file}:{row_number}"
        if sample_id in first_seen:
            duplicates[_row_key(source_file, row_number)] = f"sample_id {sample_id!r} first seen at {first_seen[sample_id]}"
        else:
            first_seen[sample_id] = where
    return duplicates


def _demote_duplicates(batch: pa.Table, duplicates: dict[str, str]) -> pa.Table:
    keys = [_row_key(f, r) for f, r in zip(batch["source_file"].to_pylist(), batch["row_number"].to_pylist())]
    is_duplicate = pa.array([key in duplicates for key in keys], pa.bool_())
    details = pa.array([duplicates.get(key) for key in keys], pa.string())
    columns = {
        "status": pc.if_else(is_duplicate, "rejected", batch["status"]),
        "reject_reason": pc.if_else(is_duplicate, errors.DUPLICATE_ID, batch["reject_reason"]),
        "reject_detail": pc.if_else(is_duplicate, details, batch["reject_detail"]),
    }
    for name, values in columns.items():
        batch = batch.set_column(batch.schema.get_field_index(name), name, values)
    return batch


def resolve_mode(configured: str, has_runs: bool) -> str:
    if configured == "overwrite":
        return "overwrite"
    return "incremental" if has_runs else "full"


def _students(cfg: JobConfig, root, mode: str) -> list[dict]:
    """Name, revision and (as an object reference) the keys each student revision already scored."""
    students = []
    for s in cfg.students:
        try:
            revision = model_revision(s.path)
        except FileNotFoundError as exc:
            raise ConfigError(f"students.{s.name}: {exc}") from exc
        done = commit.committed_keys(root, s.name, revision) if mode == "incremental" else set()
        students.append({"name": s.name, "revision": revision, "done_ref": ray.put(done)})
    return students


def _stage(results, cfg: JobConfig, staging, run_id: str, summaries: dict, write_scores: bool, known_rejects, write_rejects: bool):
    """Write the run's scores, new rejects and summaries under `staging`, in the final layout."""
    arrow_fs = staging.arrow_fs()
    # file names start with the run id, so each committed file can be traced to its run
    write_args = {"filesystem": arrow_fs, "filename_provider": FilenameProvider(dataset_uuid=run_id, file_format="parquet")}
    partition_by = list(cfg.output.partition_by)
    if write_scores:
        scores_kwargs = {"passthrough": cfg.input.passthrough, "partition_by": partition_by}
        results.map_batches(_scores_batch, fn_kwargs=scores_kwargs, batch_format="pyarrow").write_parquet(
            staging.path, partition_cols=["student", *partition_by], **write_args
        )
    if write_rejects:
        results.map_batches(_rejects_batch, fn_kwargs={"known": known_rejects}, batch_format="pyarrow").write_parquet(
            staging.join("_rejects", f"run_id={run_id}").path, **write_args
        )
    summary_dir = staging.join("_summary", f"run_id={run_id}")
    staging.fs.makedirs(summary_dir.path, exist_ok=True)
    for name, table in summaries.items():
        if table is not None:
            pq.write_table(table, summary_dir.join(f"{name}.parquet").path, filesystem=arrow_fs)


def run_job(cfg: JobConfig, quiet: bool = False, progress: Callable[[str], None] | None = None) -> RunResult:
    """One run. `quiet`: Ray and Ray Data log warnings and errors only; `progress` receives a progress
    line at most every ray_job.PROGRESS_EVERY_S seconds."""
    started = time.perf_counter()
    input_location, files, skipped_files = expand_inputs(cfg.input.paths, cfg.storage, cfg.input.format)
    root = locate(cfg.output.path, cfg.storage)
    check_output(root)
    check_students(cfg)
    now = datetime.now(timezone.utc)
    run_id = commit.new_run_id(now)
    with commit.run_lock(root, run_id, cfg.output.lock_ttl_hours):
        commit.remove_uncommitted(root)  # debris of an interrupted run is never committed
        mode = resolve_mode(cfg.output.mode, bool(commit.manifests(root)))
        ensure_ray(cfg, quiet)
        gpus = cfg.compute.gpus_per_actor
        if gpus is None:
            gpus = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
        students = _students(cfg, root, mode)
        run = {"run_id": run_id, "scored_at": now, "rank_clip": cfg.scoring.rank_clip}
        dataset = build_dataset(cfg, files, input_location, students, run, gpus)
        count_rows = lambda: count_records(input_location.fs, files, cfg.input.format) * len(students)  # noqa: E731
        results = run_with_progress(dataset, count_rows, progress)
        duplicates = _duplicate_ids(results, cfg.students[0].name)
        if duplicates:  # the first row with an id is kept; later ones are quarantined
            results = results.map_batches(_demote_duplicates, fn_kwargs={"duplicates": duplicates}, batch_format="pyarrow").materialize()

        partition_by = list(cfg.output.partition_by)
        local = _pull(results, ["student", "status", "source_file", "row_number", "reject_reason", "content_dropped", *STAT_COLUMNS, *partition_by])
        counts = _counts(local)
        scored = local.filter(pc.equal(local["status"], "scored"))
        known_rejects = commit.committed_reject_keys(root) if mode == "incremental" else set()
        rejected = local.filter(pc.equal(local["status"], "rejected"))
        n_new_rejects = sum(key not in known_rejects for key in commit.reject_keys(rejected))
        summary = dataset_rsr(scored, by=["student"])
        partition_summary = dataset_rsr(scored, by=["student", *partition_by]) if partition_by else None

        committed = []
        if scored.num_rows or n_new_rejects or mode == "overwrite":
            summaries = {"by_student": summary, "by_partition": partition_summary}
            staging = root.join(commit.STAGING_DIR, run_id)
            _stage(results, cfg, staging, run_id, summaries, scored.num_rows > 0, known_rejects, n_new_rejects > 0)
            manifest = {
                "mode": mode,
                "started_at": now.isoformat(),
                "students": [{"name": s["name"], "revision": s["revision"]} for s in students],
                "counts": counts.to_pylist(),
                "input_files": len(files),
                "config": OmegaConf.to_container(OmegaConf.structured(cfg)),
            }
            committed = commit.commit(root, run_id, manifest)
            if mode == "overwrite":
                commit.drop_runs_before(root, run_id)
    return RunResult(
        run_id=run_id,
        mode=mode,
        output=root.url(),
        counts=counts,
        summary=summary,
        partition_summary=partition_summary,
        tokens_scored=int(pc.sum(scored["resp_token_length"]).as_py() or 0),
        wall_s=time.perf_counter() - started,
        committed_files=committed,
        skipped_files=[input_location.url(p) for p in skipped_files],
    )
