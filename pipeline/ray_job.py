"""Ray plumbing: read corpus files, parse rows, tokenize and score them per student in actor pools,
and stage the long-format results (one row per trajectory and student) for the commit.

Stages and the columns they add:
  read      source_file, row_number, text, reject_reason, reject_detail
  parse     sample_id, content_hash, messages_json, passthrough columns
  tokenize  per student i: ids_i, positions_i, truncated_i, content_dropped_i, reject_reason_i,
            reject_detail_i, skipped_i
  score     per student i: resp_token_length_i, avg_rank_clip_i, avg_surprisal_i, rank_surprisal_ratio_i
  explode   one row per (trajectory, student) with the output columns
"""

from __future__ import annotations

import functools
import json
import os
import threading
import time
from typing import Callable, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import ray
from ray.data.datasource import FileBasedDatasource

from pipeline.config import InputConfig, JobConfig, StudentConfig, token_budget
from pipeline.errors import RowError
from pipeline.commit import scored_key
from pipeline.records import fallback_sample_id, parse_row, read_records
from pipeline.spans import EncodedConversation, encode_conversation, load_tokenizer
from pipeline.storage import Location, format_of, open_corpus_file
from pipeline.student import ScoringOptions, Student

STAT_COLUMNS = ["resp_token_length", "avg_rank_clip", "avg_surprisal", "rank_surprisal_ratio"]
RECORDS_PER_BLOCK = 1024
PROGRESS_EVERY_S = 10.0
RAW_SCHEMA = pa.schema(
    [
        ("source_file", pa.string()),
        ("row_number", pa.int64()),
        ("text", pa.large_string()),  # a single row may be tens of MB
        ("reject_reason", pa.string()),
        ("reject_detail", pa.string()),
    ]
)


class CorpusDatasource(FileBasedDatasource):
    """Every line or row of every corpus file as one record, or as a reject saying why it is unreadable."""

    def __init__(self, paths: list[str], location: Location, input_format: str):
        super().__init__(paths, filesystem=location.arrow_fs())
        self._location = location
        self._input_format = input_format

    def _open_input_source(self, filesystem, path, **open_args):
        if format_of(path, self._input_format) == "parquet":  # Parquet needs random access
            return filesystem.open_input_file(path)
        return open_corpus_file(self._location.fs, path)

    def _read_stream(self, f, path: str) -> Iterator[pa.Table]:
        source_file = self._location.url(path)
        rows = []
        for record in read_records(f, format_of(path, self._input_format)):
            rows.append(
                {"source_file": source_file, "row_number": record.row_number, "text": record.text,
                 "reject_reason": record.reason, "reject_detail": record.detail}
            )  # fmt: skip
            if len(rows) == RECORDS_PER_BLOCK:
                yield pa.Table.from_pylist(rows, schema=RAW_SCHEMA)
                rows = []
        if rows:
            yield pa.Table.from_pylist(rows, schema=RAW_SCHEMA)


def parse_batch(batch: pa.Table, input_cfg: InputConfig) -> pa.Table:
    rows = []
    for raw in batch.to_pylist():
        if raw["reject_reason"] is None:
            row = parse_row(raw["text"], raw["source_file"], raw["row_number"], input_cfg)
        else:
            row = {"sample_id": fallback_sample_id(raw["source_file"], raw["row_number"]), **dict.fromkeys(input_cfg.passthrough)}
            row.update(reject_reason=raw["reject_reason"], reject_detail=raw["reject_detail"])
        rows.append({"source_file": raw["source_file"], "row_number": raw["row_number"], **row})
    schema = pa.schema(
        [("source_file", pa.string()), ("row_number", pa.int64()), ("sample_id", pa.string()),
         ("content_hash", pa.string()), ("messages_json", pa.large_string()),
         ("reject_reason", pa.string()), ("reject_detail", pa.string())]
    )  # fmt: skip
    table = pa.Table.from_pylist(rows, schema=schema)
    for name in input_cfg.passthrough:  # passthrough types come from the data
        table = table.append_column(name, pa.array([row[name] for row in rows]))
    return table


@functools.lru_cache(maxsize=8)
def _tokenizer(path: str, chat_template: str | None):
    return load_tokenizer(path, chat_template)


@functools.lru_cache(maxsize=8)
def _fetch(ref: ray.ObjectRef):
    return ray.get(ref)


def tokenize_batch(
    batch: pa.Table, index: int, student: StudentConfig, max_model_len: int, truncate: bool, reasoning: str, done_ref: list
) -> pa.Table:
    """Encode every parsed row with student `index`'s chat template (a CPU stage, before the actors).

    Rows whose `sample_id/content_hash` key is in the set behind `done_ref` (a one-item list, so that
    Ray hands over the reference, not a copy per call) were scored by this student revision before:
    they are marked skipped and not encoded.
    """
    tokenizer = _tokenizer(student.path, student.chat_template)
    done = _fetch(done_ref[0])
    keys = [scored_key(s, h) for s, h in zip(batch["sample_id"].to_pylist(), batch["content_hash"].to_pylist())]
    skipped = [key in done for key in keys]
    ids, positions, truncated, dropped, reasons, details = [], [], [], [], [], []
    rows = zip(batch["reject_reason"].to_pylist(), batch["messages_json"].to_pylist(), skipped)
    for reject, messages_json, skip in rows:
        encoded = reason = detail = None
        if reject is None and not skip:
            try:
                encoded = encode_conversation(tokenizer, json.loads(messages_json), max_model_len, truncate, reasoning)
            except RowError as exc:
                reason, detail = exc.reason, exc.detail
        ids.append(encoded.input_ids if encoded else None)
        positions.append(encoded.response_positions if encoded else None)
        truncated.append(encoded.truncated if encoded else None)
        dropped.append(encoded.content_dropped if encoded else None)
        reasons.append(reason)
        details.append(detail)
    return (
        batch.append_column(f"ids_{index}", pa.array(ids, pa.list_(pa.int32())))
        .append_column(f"positions_{index}", pa.array(positions, pa.list_(pa.int32())))
        .append_column(f"truncated_{index}", pa.array(truncated, pa.bool_()))
        .append_column(f"content_dropped_{index}", pa.array(dropped, pa.bool_()))
        .append_column(f"reject_reason_{index}", pa.array(reasons, pa.string()))
        .append_column(f"reject_detail_{index}", pa.array(details, pa.string()))
        .append_column(f"skipped_{index}", pa.array(skipped, pa.bool_()))
    )


def default_torch_threads(cpus_per_actor: float, scoring_actors: int) -> int:
    """CPU threads for a scoring actor without `compute.torch_threads`: the CPUs of the node it runs on,
    shared among the scoring actors that fit on that node (all of them on a local runtime)."""
    node_id = ray.get_runtime_context().get_node_id()
    node = next(n for n in ray.nodes() if n["NodeID"] == node_id)
    fitting = int(node["Resources"].get("CPU", 1) // cpus_per_actor)
    return max(1, len(os.sched_getaffinity(0)) // max(1, min(scoring_actors, fitting)))


class ScoreActor:
    """Holds one student for its lifetime; scores the rows its tokenize stage encoded."""

    def __init__(self, index: int, student: StudentConfig, options: ScoringOptions, threads: int | None, cpus_per_actor: float, scoring_actors: int):
        import torch

        torch.set_num_threads(threads or default_torch_threads(cpus_per_actor, scoring_actors))
        self.index = index
        self.student = Student.load(student.path, dtype=student.dtype, options=options)

    def __call__(self, batch: pa.Table) -> pa.Table:
        i = self.index
        ids, positions = batch[f"ids_{i}"].to_pylist(), batch[f"positions_{i}"].to_pylist()
        todo = [row for row, row_ids in enumerate(ids) if row_ids is not None]
        stats = self.student.score([EncodedConversation(ids[row], positions[row], False) for row in todo])
        columns = {name: [None] * len(ids) for name in STAT_COLUMNS}
        for row, row_stats in zip(todo, stats):
            for name in STAT_COLUMNS:
                columns[name][row] = row_stats[name]
        batch = batch.drop_columns([f"ids_{i}", f"positions_{i}"])  # the tokens are not needed downstream
        types = {"resp_token_length": pa.int64()}
        for name in STAT_COLUMNS:
            batch = batch.append_column(f"{name}_{i}", pa.array(columns[name], types.get(name, pa.float64())))
        return batch


def explode_batch(batch: pa.Table, students: list[dict], passthrough: list[str], run: dict) -> pa.Table:
    """One row per (trajectory, student): the output columns and a status (scored, rejected, skipped)."""
    parts = []
    n = batch.num_rows
    for i, student in enumerate(students):
        reason = pc.coalesce(batch["reject_reason"], batch[f"reject_reason_{i}"])
        detail = pc.coalesce(batch["reject_detail"], batch[f"reject_detail_{i}"])
        status = pc.if_else(
            pc.is_valid(reason), "rejected", pc.if_else(batch[f"skipped_{i}"], "skipped", "scored")
        )
        parts.append(
            pa.table(
                {
                    "sample_id": batch["sample_id"],
                    **{name: batch[name] for name in passthrough},
                    "student": pa.array([student["name"]] * n, pa.string()),
                    "student_revision": pa.array([student["revision"]] * n, pa.string()),
                    "rank_clip": pa.array([run["rank_clip"]] * n, pa.int32()),
                    **{name: batch[f"{name}_{i}"] for name in STAT_COLUMNS},
                    "truncated": batch[f"truncated_{i}"],
                    "content_dropped": batch[f"content_dropped_{i}"],
                    "content_hash": batch["content_hash"],
                    "run_id": pa.array([run["run_id"]] * n, pa.string()),
                    "scored_at": pa.array([run["scored_at"]] * n, pa.timestamp("us", tz="UTC")),
                    "source_file": batch["source_file"],
                    "row_number": batch["row_number"],
                    "status": status,
                    "reject_reason": reason,
                    "reject_detail": detail,
                }
            )
        )
    return pa.concat_tables(parts)


def run_with_progress(ds, count_rows: Callable[[], int], log: Callable[[str], None] | None):
    """Execute `ds` to completion like `materialize()`, calling `log` with the rows done, the scored
    tokens per second and, once `count_rows` has answered, the time left, at most every
    PROGRESS_EVERY_S seconds. `count_rows` runs in a thread beside the job, started only when the job
    outlasts the first interval (short runs never pay for it)."""
    expected: list[int] = []
    counting = None
    refs, rows, tokens = [], 0, 0
    started = last_line = time.monotonic()
    for bundle in ds.iter_internal_ref_bundles():
        for ref in bundle.block_refs:
            block = ray.get(ref)
            rows += block.num_rows
            tokens += pc.sum(block["resp_token_length"]).as_py() or 0
            refs.append(ref)
        now = time.monotonic()
        if log and now - last_line >= PROGRESS_EVERY_S and rows:
            if counting is None:
                counting = threading.Thread(target=lambda: expected.append(count_rows()), daemon=True)
                counting.start()
            elapsed = now - started
            line = f"progress: {rows:,} rows done, {tokens / elapsed:,.0f} scored tokens/s"
            if expected:
                left = elapsed * max(expected[0] - rows, 0) / rows
                line += f", {rows / expected[0]:.0%} of {expected[0]:,}, about {left / 60:.0f} min left"
            log(line)
            last_line = now
    return ray.data.from_arrow_refs(refs)


def build_dataset(cfg: JobConfig, files: list[str], location: Location, students: list[dict], run: dict, gpus: float):
    """The lazy Ray dataset of long-format results for `files`.

    `students[i]` holds the name, revision and `done_ref` (keys already scored) of `cfg.students[i]`.
    """
    ds = ray.data.read_datasource(CorpusDatasource(files, location, cfg.input.format))
    ds = ds.map_batches(parse_batch, fn_kwargs={"input_cfg": cfg.input}, batch_format="pyarrow")
    options = ScoringOptions(
        rank_clip=cfg.scoring.rank_clip,
        token_budget=token_budget(cfg.scoring),
        logits_chunk_tokens=cfg.scoring.logits_chunk_tokens,
        prompt_cache_tokens=cfg.scoring.prompt_cache_tokens,
    )
    actor_args = {"options": options, "threads": cfg.compute.torch_threads, "cpus_per_actor": cfg.compute.cpus_per_actor,
                  "scoring_actors": cfg.compute.actors_per_student * len(cfg.students)}  # fmt: skip
    for i, student in enumerate(cfg.students):
        ds = ds.map_batches(
            tokenize_batch,
            fn_kwargs={"index": i, "student": student, "max_model_len": cfg.scoring.max_model_len,
                       "truncate": cfg.scoring.on_too_long == "truncate", "reasoning": cfg.scoring.reasoning,
                       "done_ref": [students[i]["done_ref"]]},
            batch_format="pyarrow",
        )  # fmt: skip
        ds = ds.map_batches(
            ScoreActor,
            fn_constructor_kwargs={"index": i, "student": student, **actor_args},
            compute=ray.data.ActorPoolStrategy(size=cfg.compute.actors_per_student),
            num_cpus=cfg.compute.cpus_per_actor,
            num_gpus=gpus,
            batch_size=cfg.scoring.rows_per_batch,
            batch_format="pyarrow",
        )
    return ds.map_batches(
        explode_batch,
        fn_kwargs={
            "students": [{"name": s["name"], "revision": s["revision"]} for s in students],
            "passthrough": cfg.input.passthrough,
            "run": run,
        },
        batch_format="pyarrow",
    )
