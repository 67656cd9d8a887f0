"""Ray plumbing: read corpus files, parse rows, tokenize and score them per student in actor pools,
and stage the long-format results (one row per trajectory and student) for the commit.

Stages and the columns they add:
  read      source_file, row_number, text, reject_reason, reject_detail
  parse     sample_id, content_hash, messages_json, row columns (passthrough, candidate and teacher
            columns, path fields): one row per trajectory, several per corpus row for candidates and teachers
  dedupe    later rows of a repeated sample_id become duplicate_id rejects (ids from a Ray Data group-by)
  tokenize  per student i: ids_i, positions_i, truncated_i, content_dropped_i, reject_reason_i,
            reject_detail_i, skipped_i
  score     per student i: resp_token_length_i, avg_rank_clip_i, avg_surprisal_i, rank_surprisal_ratio_i
            and the companion metrics' columns (pipeline.rsr.stat_columns)
  explode   one row per (trajectory, student) with the output columns
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import ray
from ray.data.aggregate import Count, Min
from ray.data.context import ShuffleStrategy
from ray.data.datasource import FileBasedDatasource

from pipeline import errors
from pipeline.config import (
    JobConfig,
    StudentConfig,
    logits_chunk_tokens,
    metric_names,
    row_columns,
    shape_columns,
    token_budget,
)  # fmt: skip
from pipeline.errors import RowError
from pipeline.output import reject_key, scored_key
from pipeline.records import fallback_sample_id, parse_row, read_records
from pipeline.rsr import stat_columns
from pipeline.spans import EncodedConversation, encode_conversation, load_tokenizer
from pipeline.storage import Corpus, Location, format_of, open_corpus_file
from pipeline.student import ScoringOptions, Student

RECORDS_PER_BLOCK = 1024
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

    def __init__(self, corpus: Corpus):
        super().__init__(corpus.files, filesystem=corpus.location.arrow_fs())
        self._corpus = corpus

    def _format(self, path: str) -> str:
        return format_of(path, self._corpus.format_setting(path))

    def _open_input_source(self, filesystem, path, **open_args):
        if self._format(path) == "parquet":  # Parquet needs random access
            return filesystem.open_input_file(path)
        return open_corpus_file(self._corpus.location.fs, path)

    def _read_stream(self, f, path: str) -> Iterator[pa.Table]:
        source_file = self._corpus.location.url(path)
        rows = []
        for record in read_records(f, self._format(path)):
            rows.append(
                {"source_file": source_file, "row_number": record.row_number, "text": record.text,
                 "reject_reason": record.reason, "reject_detail": record.detail}
            )  # fmt: skip
            if len(rows) == RECORDS_PER_BLOCK:
                yield pa.Table.from_pylist(rows, schema=RAW_SCHEMA)
                rows = []
        if rows:
            yield pa.Table.from_pylist(rows, schema=RAW_SCHEMA)


def parse_batch(batch: pa.Table, corpus: Corpus, columns: list[str], column_types: dict[str, str]) -> pa.Table:
    """Raw records to trajectories, each file's rows by the shape of its corpus part (several trajectories
    per row for candidates and teachers), with the run's row `columns` (`config.row_columns`)."""
    rows = []
    for raw in batch.to_pylist():
        file_values = corpus.path_values.get(raw["source_file"], {})
        if raw["reject_reason"] is None:
            part = corpus.parts[corpus.part_of[raw["source_file"]]]
            parsed = parse_row(raw["text"], raw["source_file"], raw["row_number"], part, file_values)
        else:
            sample_id = fallback_sample_id(raw["source_file"], raw["row_number"])
            parsed = [
                {
                    "sample_id": sample_id,
                    **file_values,
                    "reject_reason": raw["reject_reason"],
                    "reject_detail": raw["reject_detail"],
                }
            ]
        rows += [{"source_file": raw["source_file"], "row_number": raw["row_number"], **row} for row in parsed]
    schema = pa.schema(
        [("source_file", pa.string()), ("row_number", pa.int64()), ("sample_id", pa.string()),
         ("content_hash", pa.string()), ("messages_json", pa.large_string()),
         ("reject_reason", pa.string()), ("reject_detail", pa.string())]
    )  # fmt: skip
    table = pa.Table.from_pylist(rows, schema=schema)
    for name in columns:  # passthrough types come from the data
        kind = pa.type_for_alias(column_types[name]) if name in column_types else None
        table = table.append_column(name, pa.array([row.get(name) for row in rows], kind))
    return table


def parse(ds, cfg: JobConfig, corpus: Corpus):
    """The parse stage over a dataset of raw records."""
    kwargs = {"corpus": corpus, "columns": row_columns(cfg.input), "column_types": shape_columns(cfg.input)}
    return ds.map_batches(parse_batch, fn_kwargs=kwargs, batch_format="pyarrow")


def row_order(file_number: int, row_number: int) -> int:
    """A row's place in (file, row number) order as one integer: an id's first row has the smallest."""
    return file_number << 40 | row_number


def _order_batch(batch: pa.Table, file_numbers: dict[str, int]) -> pa.Table:
    valid = batch.filter(pc.is_valid(batch["content_hash"]))
    order = [row_order(file_numbers[f], r) for f, r in zip(valid["source_file"].to_pylist(), valid["row_number"].to_pylist())]
    return pa.table({"sample_id": valid["sample_id"], "order": pa.array(order, pa.int64())})


def _repeated(batch: pa.Table) -> pa.Table:
    return batch.filter(pc.greater(batch["count()"], 1)).select(["sample_id", "min(order)"])


def duplicate_ids(cfg: JobConfig, corpus: Corpus) -> list[ray.ObjectRef]:
    """References to tables (sample_id, min(order)) of the ids that several valid rows carry, with the
    `row_order` of the first: a distributed group-by in Ray Data, so no process holds every id."""
    file_numbers = {url: number for number, url in enumerate(corpus.urls)}
    ds = parse(ray.data.read_datasource(CorpusDatasource(corpus)), cfg, corpus)
    ds = ds.map_batches(_order_batch, fn_kwargs={"file_numbers": file_numbers}, batch_format="pyarrow")
    # The default hash shuffle starts aggregator actors for 200 partitions: ~30 s of fixed time on a
    # small runtime; the task-based sort shuffle costs well under a second once workers are warm.
    ds.context.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    groups = ds.groupby("sample_id").aggregate(Count(), Min("order"))
    return groups.map_batches(_repeated, batch_format="pyarrow").to_arrow_refs()


@functools.lru_cache(maxsize=2)
def _first_rows(refs: tuple) -> dict[str, int]:
    # A group-by over no valid row yields blocks without columns.
    tables = [table for table in ray.get(list(refs)) if table.num_rows]
    return {s: o for table in tables for s, o in zip(table["sample_id"].to_pylist(), table["min(order)"].to_pylist())}


def mark_duplicates(batch: pa.Table, duplicates: list, file_urls: list[str]) -> pa.Table:
    """Quarantine every valid row whose sample_id an earlier row (in file, row number order) carries."""
    first_rows = _first_rows(tuple(duplicates))
    ids = batch["sample_id"].to_pylist()
    if not first_rows or not any(i in first_rows for i in ids):
        return batch
    file_numbers = {url: number for number, url in enumerate(file_urls)}
    reasons, details = batch["reject_reason"].to_pylist(), batch["reject_detail"].to_pylist()
    rows = zip(ids, batch["source_file"].to_pylist(), batch["row_number"].to_pylist(), batch["content_hash"].to_pylist())
    for k, (sample_id, source_file, row_number, content) in enumerate(rows):
        first = first_rows.get(sample_id)
        if content is not None and first is not None and first != row_order(file_numbers[source_file], row_number):
            first_file, first_row = file_urls[first >> 40], first & ((1 << 40) - 1)
            reasons[k], details[k] = errors.DUPLICATE_ID, f"sample_id {sample_id!r} first seen at {first_file}:{first_row}"
    batch = batch.set_column(batch.schema.get_field_index("reject_reason"), "reject_reason", pa.array(reasons, pa.string()))
    return batch.set_column(batch.schema.get_field_index("reject_detail"), "reject_detail", pa.array(details, pa.string()))


@ray.remote
def scored_keys(paths: list[str], location: Location, fingerprint: str) -> set[str]:
    """`scored_key` of every trajectory scored with the scoring fingerprint `fingerprint` in the
    committed files `paths` (a task: the driver never holds them). Files written before fingerprints
    existed lack the column: their rows count as scored with other settings."""
    if not paths:
        return set()
    schema = pa.schema([("sample_id", pa.string()), ("content_hash", pa.string()), ("scoring_fingerprint", pa.string())])
    table = pads.dataset(paths, schema=schema, filesystem=location.arrow_fs(), format="parquet").to_table(
        filter=pads.field("scoring_fingerprint") == fingerprint
    )
    return {scored_key(s, h) for s, h in zip(table["sample_id"].to_pylist(), table["content_hash"].to_pylist())}


REJECT_KEY_COLUMNS = ["student", "source_file", "row_number", "reject_reason"]


def reject_keys(table: pa.Table) -> list[str]:
    """`reject_key` of each row of a table with the REJECT_KEY_COLUMNS."""
    return [reject_key(*key) for key in zip(*(table[c].to_pylist() for c in REJECT_KEY_COLUMNS))]


@ray.remote
def committed_reject_keys(paths: list[str], location: Location) -> set[str]:
    """`reject_key` of every reject in the committed files `paths` (a task: the driver never holds them)."""
    if not paths:
        return set()
    table = pads.dataset(paths, filesystem=location.arrow_fs(), format="parquet").to_table(columns=REJECT_KEY_COLUMNS)
    return set(reject_keys(table))


@functools.lru_cache(maxsize=8)
def _tokenizer(path: str, chat_template: str | None):
    return load_tokenizer(path, chat_template)


@functools.lru_cache(maxsize=8)
def cached_get(ref: ray.ObjectRef):
    """`ray.get` once per worker process for objects that many batches read (key sets)."""
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
    done = cached_get(done_ref[0])
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

    def __init__(
        self,
        index: int,
        student: StudentConfig,
        options: ScoringOptions,
        threads: int | None,
        cpus_per_actor: float,
        scoring_actors: int,
    ):
        import torch

        torch.set_num_threads(threads or default_torch_threads(cpus_per_actor, scoring_actors))
        self.index = index
        self.student = Student.load(student.path, dtype=student.dtype, options=options)
        self.columns = stat_columns(options.metrics)
        print(f"student {student.name}: {self.student.policy.describe()}", flush=True)  # once per actor, on the driver's console

    def __call__(self, batch: pa.Table) -> pa.Table:
        i = self.index
        ids, positions = batch[f"ids_{i}"].to_pylist(), batch[f"positions_{i}"].to_pylist()
        todo = [row for row, row_ids in enumerate(ids) if row_ids is not None]
        stats = self.student.score([EncodedConversation(ids[row], positions[row], False) for row in todo])
        columns = {name: [None] * len(ids) for name in self.columns}
        reasons, details = batch[f"reject_reason_{i}"].to_pylist(), batch[f"reject_detail_{i}"].to_pylist()
        for row, row_stats in zip(todo, stats):
            if "reject_reason" in row_stats:  # too long for the device
                reasons[row], details[row] = row_stats["reject_reason"], row_stats["reject_detail"]
                continue
            for name in self.columns:
                columns[name][row] = row_stats[name]
        for name, values in ((f"reject_reason_{i}", reasons), (f"reject_detail_{i}", details)):
            batch = batch.set_column(batch.schema.get_field_index(name), name, pa.array(values, pa.string()))
        batch = batch.drop_columns([f"ids_{i}", f"positions_{i}"])  # the tokens are not needed downstream
        types = {"resp_token_length": pa.int64()}
        for name in self.columns:
            batch = batch.append_column(f"{name}_{i}", pa.array(columns[name], types.get(name, pa.float64())))
        return batch


def explode_batch(batch: pa.Table, students: list[dict], passthrough: list[str], columns: list[str], run: dict) -> pa.Table:
    """One row per (trajectory, student): the output columns and a status (scored, rejected, skipped)."""
    parts = []
    n = batch.num_rows
    for i, student in enumerate(students):
        reason = pc.coalesce(batch["reject_reason"], batch[f"reject_reason_{i}"])
        detail = pc.coalesce(batch["reject_detail"], batch[f"reject_detail_{i}"])
        status = pc.if_else(pc.is_valid(reason), "rejected", pc.if_else(batch[f"skipped_{i}"], "skipped", "scored"))
        parts.append(
            pa.table(
                {
                    "sample_id": batch["sample_id"],
                    **{name: batch[name] for name in passthrough},
                    "student": pa.array([student["name"]] * n, pa.string()),
                    "student_revision": pa.array([student["revision"]] * n, pa.string()),
                    "scoring_fingerprint": pa.array([student["fingerprint"]] * n, pa.string()),
                    "reasoning_mode": pa.array([student["settings"]["reasoning"]] * n, pa.string()),
                    "dtype": pa.array([student["settings"]["dtype"]] * n, pa.string()),
                    "rank_clip": pa.array([run["rank_clip"]] * n, pa.int32()),
                    **{name: batch[f"{name}_{i}"] for name in columns},
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


def build_dataset(cfg: JobConfig, corpus: Corpus, students: list[dict], duplicates: list, run: dict, gpus: float):
    """The lazy Ray dataset of long-format results for `files`.

    `students[i]` holds the name, revision, scoring settings, their fingerprint and `done_ref` (keys
    already scored with that fingerprint) of `cfg.students[i]`;
    `duplicates` comes from `duplicate_ids`.
    """
    ds = parse(ray.data.read_datasource(CorpusDatasource(corpus)), cfg, corpus)
    ds = ds.map_batches(mark_duplicates, fn_kwargs={"duplicates": duplicates, "file_urls": corpus.urls}, batch_format="pyarrow")
    options = ScoringOptions(
        rank_clip=cfg.scoring.rank_clip,
        token_budget=token_budget(cfg.scoring),
        logits_chunk_tokens=logits_chunk_tokens(cfg.scoring),
        prompt_cache_tokens=cfg.scoring.prompt_cache_tokens,
        metrics=metric_names(cfg.scoring),
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
            fn_constructor_kwargs={
                "index": i,
                "student": dataclasses.replace(student, dtype=students[i]["settings"]["dtype"]),
                **actor_args,
            },
            compute=ray.data.ActorPoolStrategy(size=cfg.compute.actors_per_student),
            num_cpus=cfg.compute.cpus_per_actor,
            num_gpus=gpus,
            batch_size=cfg.scoring.rows_per_batch,
            batch_format="pyarrow",
        )
    return ds.map_batches(
        explode_batch,
        fn_kwargs={
            "students": [{k: s[k] for k in ("name", "revision", "fingerprint", "settings")} for s in students],
            "passthrough": row_columns(cfg.input),
            "columns": stat_columns(metric_names(cfg.scoring)),
            "run": run,
        },
        batch_format="pyarrow",
    )
