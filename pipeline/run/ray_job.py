"""Ray plumbing: read corpus files, parse rows, tokenize and score them per student in actor pools,
and explode the results to long format (one row per trajectory and student) for the commit.

Each stage is declared (`scoring_stages`) with the columns it reads and adds, in the names of
`pipeline.run.schema`; `build_dataset` checks the chain before any work. Stages, in order:
  read      source_file, row_number, text, reject_reason, reject_detail            (schema.RAW_SCHEMA)
  parse     sample_id, content_hash, messages_json, the row columns (passthrough, candidate and
            teacher columns, path fields): one row per trajectory, several per corpus row for candidates
            and teachers
  dedupe    later rows of a repeated sample_id become duplicate_id rejects (ids from `survey_corpus`)
  tokenize  per student i: schema.TOKENIZED (ids_i, positions_i, truncated_i, content_dropped_i,
            reject_reason_i, reject_detail_i, skipped_i)
  score     per student i: the statistics columns (resp_token_length_i, avg_rank_clip_i, ...) in place
            of ids_i and positions_i
  explode   one row per (trajectory, student): the score columns, status, reject_reason, reject_detail
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import ray
from ray.data.aggregate import Min, Sum
from ray.data.context import ShuffleStrategy
from ray.data.datasource import FileBasedDatasource

from pipeline import errors
from pipeline.corpus.records import fallback_sample_id, parse_row, read_records
from pipeline.corpus.storage import Corpus, Location, format_of, open_corpus_file
from pipeline.errors import Rejected, RowError
from pipeline.run.config import (
    ConfigError,
    JobConfig,
    SampleConfig,
    StudentConfig,
    batch_tokens,
    logits_chunk_tokens,
    token_budget,
)
from pipeline.run.schema import (
    PARSED_SCHEMA,
    RAW_SCHEMA,
    REJECT_KEY_COLUMNS,
    STAT_TYPES,
    TOKENIZED,
    RowContract,
    ScoringSettings,
    Status,
    per_student,
    reject_keys,
    scored_key,
)
from pipeline.scoring.metrics import stat_columns
from pipeline.scoring.models import StudentSource
from pipeline.tokens.spans import DEFAULT_SCOPE, EncodedConversation, encode_conversation

RECORDS_PER_BLOCK = 1024
# Bytes a tokenized row holds per token: its messages as text, the int32 ids of every token and the
# int32 positions of the response tokens, and its other columns (measured: 9.1 on the GSM8K rows, 10.1
# on the AMC23 answers, before the per-row columns). Parse, dedupe, tokenize and score run fused in the
# scoring actor, and Ray Data cuts each stage's output to the dataset's block size: the tokenized block
# is what one scoring call receives, so this turns `scoring.batch_tokens` into that size. (At the 4
# bytes of text per token it once assumed, a call got a third of its tokens: 0.86 padding efficiency
# and a 600-row job 16% slower.) A truncated row holds more text than tokens: its block is smaller.
TOKENIZED_BYTES_PER_TOKEN = 10

# The student (torch, transformers) is imported where it runs, in the scoring actor and on the driver:
# every Ray worker that runs a stage of this module imports the module, and the survey's read and
# group-by workers took ~1.5 s each to import torch (on 120 rows the survey took 7 s instead of 4).
if TYPE_CHECKING:
    from pipeline.scoring.student import ScoringOptions


@dataclass(frozen=True)
class StudentPlan:
    """One student of a run: where its weights and tokens come from, its settings, their fingerprint, and
    the keys it already scored with them."""

    config: StudentConfig  # with the dtype resolved
    source: StudentSource
    tokens_from: str  # where the tokens come from (`StudentSource.tokens_from`)
    revision: str
    fingerprint: str
    settings: ScoringSettings
    done_ref: ray.ObjectRef  # set of `scored_key`s, built by a Ray task

    def manifest(self) -> dict:
        return {"name": self.config.name, "revision": self.revision, "fingerprint": self.fingerprint,
                "tokens_from": self.tokens_from, "settings": self.settings.as_dict()}  # fmt: skip


@dataclass(frozen=True)
class RunStamp:
    """What every row of a run carries."""

    run_id: str
    scored_at: datetime
    rank_clip: int


def scoring_options(cfg: JobConfig, contract: RowContract) -> ScoringOptions:
    """The scoring core's options from the config and the run's metrics (the one place that maps one to the other)."""
    from pipeline.scoring.student import ScoringOptions

    s = cfg.scoring
    return ScoringOptions(
        rank_clip=s.rank_clip,
        token_budget=token_budget(s),
        logits_chunk_tokens=logits_chunk_tokens(s),
        prompt_cache_tokens=s.prompt_cache_tokens,
        metrics=contract.metrics,
        logits_dtype=s.logits_dtype,
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

    def _read_stream(self, f, path: str) -> Iterator[pa.Table]:  # the read stage
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


def parse_batch(batch: pa.Table, corpus: Corpus, columns: list[str], column_types: dict, survey: Sequence = (None,)) -> pa.Table:
    """Raw records to trajectories, each file's rows by the shape of its corpus part (several trajectories
    per row for candidates and teachers), with the run's row `columns` (`config.row_columns`) in
    `column_types` (Arrow type names or types) or else in the types the survey (the `CorpusSurvey`
    behind the one-item list `survey`) found; a column with neither takes the type of its values."""
    if survey[0] is not None:
        column_types = {**cached_get(survey[0]).row_types, **column_types}
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
    table = pa.Table.from_pylist(rows, schema=PARSED_SCHEMA)
    for name in columns:
        kind = column_types.get(name)
        kind = pa.type_for_alias(kind) if isinstance(kind, str) else kind
        values = [row.get(name) for row in rows]
        if kind == pa.string():  # a column whose values differ in type across the corpus is text
            values = [v if v is None or isinstance(v, str) else json.dumps(v) for v in values]
        table = table.append_column(name, pa.array(values, kind))
    return table


def row_column_types(schemas: list[pa.Schema], columns: tuple[str, ...]) -> dict[str, pa.DataType]:
    """Each row column's one type across the corpus, from the schemas of the survey's blocks: its values'
    type; text where they differ or are all null. Every score file of a run then has the same schema
    (a block whose values of a column are all null would otherwise write a null-typed column, which
    DuckDB and Spark cannot read beside the other files)."""
    types = {}
    for name in columns:
        found = {schema.field(name).type for schema in schemas if name in schema.names} - {pa.null()}
        types[name] = found.pop() if len(found) == 1 else pa.string()
    return types


@ray.remote(num_cpus=0)
def block_summary(block: pa.Table) -> tuple[pa.Schema, int, int]:
    """A surveyed block's schema (for the row columns' types), its rows and the bytes of their messages."""
    return block.schema, block.num_rows, pc.sum(block["text_bytes"]).as_py() or 0


def row_order(file_number: int, row_number: int) -> int:
    """A row's place in (file, row number) order as one integer: an id's first row has the smallest."""
    return file_number << 40 | row_number


NOT_VALID = 1 << 62  # the order of an invalid row: never an id's first valid row


def order_batch(batch: pa.Table, file_numbers: dict[str, int], group_columns: list[str], row_columns: list[str]) -> pa.Table:
    """Every parsed row as (sample_id, its `row_order` or NOT_VALID, whether it is valid, the bytes of
    its messages), with the sample's group columns as text (`input.sample`) and the row columns as
    parsed (for their types)."""
    valid = pc.is_valid(batch["content_hash"]).to_pylist()
    places = zip(batch["source_file"].to_pylist(), batch["row_number"].to_pylist(), valid)
    order = [row_order(file_numbers[f], r) if ok else NOT_VALID for f, r, ok in places]
    return pa.table(
        {
            "sample_id": batch["sample_id"],
            "order": pa.array(order, pa.int64()),
            "valid": pa.array([int(ok) for ok in valid], pa.int64()),
            "text_bytes": text_bytes(batch),
            **{f"group:{column}": pc.cast(batch[column], pa.string()) for column in group_columns},
            **{column: batch[column] for column in row_columns},
        }
    )


def text_bytes(batch: pa.Table) -> pa.Array:
    """Each row's messages in bytes (0 for a reject): the survey's and the actors' measure of the work,
    for the time left (tokens are not known before the tokenize stage; rows vary a hundredfold)."""
    return pc.fill_null(pc.binary_length(batch["messages_json"]), 0).combine_chunks().cast(pa.int64())


def valid_groups(batch: pa.Table, group_columns: list[str]) -> pa.Table:
    valid = batch.filter(pc.equal(batch["valid"], 1)).select([f"group:{column}" for column in group_columns])
    return valid.rename_columns(group_columns)


REPEATED_IDS = pa.schema([("sample_id", pa.string()), ("min(order)", pa.int64())])


def repeated_ids(batch: pa.Table) -> pa.Table:
    """The ids that several valid rows carry, with the order of the first."""
    return batch.filter(pc.greater(batch["sum(valid)"], 1)).select(["sample_id", "min(order)"])


@dataclass(frozen=True, eq=False)  # hashed by identity: `cached_get` may be handed the survey itself, not its reference
class CorpusSurvey:
    """What one pass over the parsed corpus tells before scoring: the repeated ids, the row count and,
    with `input.sample`, the sampled groups."""

    duplicates: pa.Table  # `repeated_ids`: each id that several valid rows carry, with the order of the first
    trajectories: int  # parsed rows, rejects included: the rows each student's results will count
    text_bytes: int  # their messages in bytes: the work each student will do, for the time left
    row_types: dict[str, pa.DataType]  # each row column's one type (`row_column_types`)
    sample: GroupSample | None = None


@dataclass(frozen=True)
class GroupSample:
    """The groups of `input.sample`: those eligible and the `n` chosen among them."""

    eligible: int
    chosen: frozenset[str]  # group values as text
    shared_values: frozenset[str] = frozenset()  # the values of `shared_by` (teachers), as text

    def describe(self, sample: SampleConfig) -> str:
        shared = f", answered under every {sample.shared_by}" if sample.shared_by else ""
        return f"sample: {len(self.chosen)} of {self.eligible} {sample.by} groups{shared} (seed {sample.seed})"


def group_hash(value: str, seed: int) -> str:
    """A group's place in the sample order: stable across runs, machines and corpus growth."""
    return hashlib.sha256(f"{seed}\x00{value}".encode()).hexdigest()


def choose_groups(pairs: pa.Table, sample: SampleConfig) -> GroupSample:
    """The `n` eligible groups with the smallest `group_hash`, from the distinct (group, shared value)
    pairs of the corpus's valid rows; with `shared_by`, a group is eligible when it has every value."""
    groups: dict[str, set] = {}
    shared = pairs[sample.shared_by].to_pylist() if sample.shared_by else [None] * pairs.num_rows
    for group, value in zip(pairs[sample.by].to_pylist(), shared):
        if group is not None:
            groups.setdefault(group, set()).add(value)
    every = set().union(*groups.values()) if groups else set()
    eligible = [group for group, values in groups.items() if values == every]
    chosen = sorted(eligible, key=lambda group: group_hash(group, sample.seed))[: sample.n]
    return GroupSample(len(eligible), frozenset(chosen), frozenset(every - {None}))


def survey_corpus(cfg: JobConfig, contract: RowContract, corpus: Corpus) -> CorpusSurvey:
    """Read and parse the corpus once to find repeated ids (a distributed group-by in Ray Data: no
    process holds every id, only the repeated ones) and count its rows and their bytes (for the time-left
    estimate)."""
    file_numbers = {url: number for number, url in enumerate(corpus.urls)}
    sample = cfg.input.sample
    group_columns = [c for c in (sample.by, sample.shared_by) if c] if sample else []
    ds = parse_stage(cfg, contract, corpus).apply(ray.data.read_datasource(CorpusDatasource(corpus)))
    ds = ds.map_batches(
        order_batch,
        fn_kwargs={"file_numbers": file_numbers, "group_columns": group_columns, "row_columns": list(contract.row)},
        batch_format="pyarrow",
    )
    # The default hash shuffle starts aggregator actors for 200 partitions: ~30 s of fixed time on a
    # small runtime; the task-based sort shuffle costs well under a second once workers are warm.
    ds.context.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    ds = ds.materialize()  # one read serves the group-bys, the totals and the row columns' types
    blocks = ray.get([block_summary.remote(ref) for ref in ds.to_arrow_refs()])
    chosen = None
    if sample:  # the distinct (group, shared value) pairs of valid rows: problems x teachers, small
        valid = ds.map_batches(valid_groups, fn_kwargs={"group_columns": group_columns}, batch_format="pyarrow")
        pairs = valid.groupby(group_columns).count().to_arrow_refs()
        tables = [table for table in ray.get(pairs) if table.num_rows]
        chosen = choose_groups(
            pa.concat_tables(tables) if tables else pa.table({c: pa.array([], pa.string()) for c in group_columns}), sample
        )
    groups = ds.groupby("sample_id").aggregate(Sum("valid"), Min("order"))
    repeated = ray.get(groups.map_batches(repeated_ids, batch_format="pyarrow").to_arrow_refs())
    # A group-by over no valid row yields blocks without columns.
    duplicates = pa.concat_tables([REPEATED_IDS.empty_table(), *(table for table in repeated if table.num_rows)])
    schemas, rows, sizes = zip(*blocks) if blocks else ((), (), ())
    return CorpusSurvey(duplicates, sum(rows), sum(sizes), row_column_types(schemas, contract.row), chosen)


@functools.lru_cache(maxsize=2)
def _first_rows(survey) -> dict[str, int]:
    repeated = cached_get(survey).duplicates
    return dict(zip(repeated["sample_id"].to_pylist(), repeated["min(order)"].to_pylist()))


def mark_sampled_out(batch: pa.Table, by: str | None, survey: list) -> pa.Table:
    """The sample stage: a valid row whose group is not among the ones the survey (the `CorpusSurvey`
    behind the one-item list `survey`) chose is sampled out; without `input.sample` no row is."""
    if by is None:
        return batch.append_column("sampled_out", pa.array([False] * batch.num_rows, pa.bool_()))
    groups = cached_get(survey[0]).sample.chosen
    values, reasons = pc.cast(batch[by], pa.string()).to_pylist(), batch["reject_reason"].to_pylist()
    out = [reason is None and value not in groups for value, reason in zip(values, reasons)]
    return batch.append_column("sampled_out", pa.array(out, pa.bool_()))


def mark_duplicates(batch: pa.Table, survey: list, file_urls: list[str]) -> pa.Table:
    """The dedupe stage: `reject_duplicates` with the repeated ids the survey found (the `CorpusSurvey`
    behind the one-item list `survey`)."""
    return reject_duplicates(batch, _first_rows(survey[0]), file_urls)


def reject_duplicates(batch: pa.Table, first_rows: dict[str, int], file_urls: list[str]) -> pa.Table:
    """Quarantine every valid row whose sample_id an earlier row (in file, row number order) carries;
    `first_rows` maps each repeated id to the `row_order` of its first valid row."""
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


@ray.remote
def committed_reject_keys(paths: list[str], location: Location) -> set[str]:
    """`reject_key` of every reject in the committed files `paths` (a task: the driver never holds them)."""
    if not paths:
        return set()
    table = pads.dataset(paths, filesystem=location.arrow_fs(), format="parquet").to_table(columns=REJECT_KEY_COLUMNS)
    return set(reject_keys(table))


@functools.lru_cache(maxsize=64)
def cached_get(ref):
    """`ray.get` once per worker process for objects that many batches read: a run's survey, its known
    rejects and one set of done keys per student (room for many students; bounded because each cached
    reference keeps its object in the object store); a value that is not a reference is its own value."""
    return ray.get(ref) if isinstance(ref, ray.ObjectRef) else ref


def tokenize_batch(
    batch: pa.Table,
    index: int,
    source: StudentSource,
    max_model_len: int,
    truncate: bool,
    reasoning: str,
    done_ref: list,
    scope: str = DEFAULT_SCOPE,
) -> pa.Table:
    """Encode every parsed row with student `index`'s chat template (a CPU stage, before the actors).

    Rows whose `sample_id/content_hash` key is in the set behind `done_ref` (a one-item list, so that
    Ray hands over the reference, not a copy per call) were scored with the same scoring fingerprint
    before: they are marked skipped and not encoded.
    """
    tokenizer = source.load_tokenizer()
    done = cached_get(done_ref[0])
    keys = [scored_key(s, h) for s, h in zip(batch["sample_id"].to_pylist(), batch["content_hash"].to_pylist())]
    skipped = [key in done for key in keys]
    ids, positions, truncated, dropped, reasons, details = [], [], [], [], [], []
    rows = zip(batch["reject_reason"].to_pylist(), batch["messages_json"].to_pylist(), skipped, batch["sampled_out"].to_pylist())
    for reject, messages_json, skip, sampled_out in rows:
        encoded = reason = detail = None
        if reject is None and not skip and not sampled_out:
            try:
                messages = json.loads(messages_json)  # canonical and checked at parse time
                encoded = encode_conversation(tokenizer, messages, max_model_len, truncate, reasoning, scope, canonical=True)
            except RowError as exc:
                reason, detail = exc.reason, exc.detail
        ids.append(encoded.input_ids if encoded else None)
        positions.append(encoded.response_positions if encoded else None)
        truncated.append(encoded.truncated if encoded else None)
        dropped.append(encoded.content_dropped if encoded else None)
        reasons.append(reason)
        details.append(detail)
    values = {"ids": ids, "positions": positions, "truncated": truncated, "content_dropped": dropped,
              "reject_reason": reasons, "reject_detail": details, "skipped": skipped}  # fmt: skip
    for name, kind in TOKENIZED.items():
        batch = batch.append_column(per_student(name, index), pa.array(values[name], kind))
    return batch


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
        source: StudentSource | None = None,  # None: the student config's path, tokenizer and chat template
        meter=None,  # a `results.ScoringMeter`: what this actor scores, batch by batch
    ):
        import torch

        from pipeline.scoring.student import Student

        torch.set_num_threads(threads or default_torch_threads(cpus_per_actor, scoring_actors))
        self.index, self.name, self.meter = index, student.name, meter
        self.started = False  # told the meter when scoring began
        source = source or StudentSource(student.path, student.tokenizer, student.chat_template)
        self.student = Student.load(source, dtype=student.dtype, options=options)
        self.columns = stat_columns(options.metrics)
        print(f"student {student.name}: {self.student.policy.describe()}", flush=True)  # once per actor, on the driver's console

    def __call__(self, batch: pa.Table) -> pa.Table:
        name = functools.partial(per_student, index=self.index)
        ids, positions = batch[name("ids")].to_pylist(), batch[name("positions")].to_pylist()
        todo = [row for row, row_ids in enumerate(ids) if row_ids is not None]
        sizes = text_bytes(batch).to_pylist()
        before = dataclasses.replace(self.student.padding)
        if self.meter and todo and not self.started:
            self.meter.start.remote(time.time())
            self.started = True

        def report(done: list[int], tokens: int) -> None:
            if self.meter:
                self.meter.add.remote(len(done), tokens, sum(sizes[todo[i]] for i in done))

        stats = self.student.score([EncodedConversation(ids[row], positions[row], False) for row in todo], on_batch=report)
        if self.meter:  # rows that needed no scoring (rejected, skipped, sampled out) are done too
            self.meter.add_unscored.remote(len(ids) - len(todo), sum(sizes) - sum(sizes[row] for row in todo))
            padding = self.student.padding
            self.meter.add_padding.remote(self.name, padding.real - before.real, padding.padded - before.padded)
        columns = {column: [None] * len(ids) for column in self.columns}
        reasons, details = batch[name("reject_reason")].to_pylist(), batch[name("reject_detail")].to_pylist()
        for row, row_stats in zip(todo, stats):
            if isinstance(row_stats, Rejected):  # too long for the device
                reasons[row], details[row] = row_stats.reason, row_stats.detail
                continue
            for column in self.columns:
                columns[column][row] = row_stats[column]
        for column, values in (("reject_reason", reasons), ("reject_detail", details)):
            batch = batch.set_column(batch.schema.get_field_index(name(column)), name(column), pa.array(values, pa.string()))
        batch = batch.drop_columns([name("ids"), name("positions")])  # the tokens are not needed downstream
        for column in self.columns:
            batch = batch.append_column(name(column), pa.array(columns[column], STAT_TYPES.get(column, pa.float64())))
        return batch


def explode_batch(
    batch: pa.Table, students: list[StudentPlan], carried: list[str], stats: list[str], stamp: RunStamp
) -> pa.Table:
    """One row per (trajectory, student): the score columns, a status, and the reject reason if any."""
    parts = []
    n = batch.num_rows
    for i, student in enumerate(students):
        name = functools.partial(per_student, index=i)
        reason = pc.coalesce(batch["reject_reason"], batch[name("reject_reason")])
        detail = pc.coalesce(batch["reject_detail"], batch[name("reject_detail")])
        status = pc.if_else(
            pc.is_valid(reason),
            Status.REJECTED,
            pc.if_else(
                batch["sampled_out"], Status.SAMPLED_OUT, pc.if_else(batch[name("skipped")], Status.SKIPPED, Status.SCORED)
            ),
        )
        constants = {
            "student": (student.config.name, pa.string()),
            "student_revision": (student.revision, pa.string()),
            "scoring_fingerprint": (student.fingerprint, pa.string()),
            "reasoning_mode": (student.settings.reasoning, pa.string()),
            "scope": (student.settings.scope or DEFAULT_SCOPE, pa.string()),
            "dtype": (student.settings.dtype, pa.string()),
            "rank_clip": (stamp.rank_clip, pa.int32()),
        }
        per_row = {column: batch[name(column)] for column in (*stats, "truncated", "content_dropped")}
        columns = {column: pa.array([value] * n, kind) for column, (value, kind) in constants.items()} | per_row
        parts.append(
            pa.table(
                {
                    "sample_id": batch["sample_id"],
                    **{column: batch[column] for column in carried},
                    **columns,
                    "assistant_turns": batch["assistant_turns"],
                    "degenerate": batch["degenerate"],
                    "content_hash": batch["content_hash"],
                    "run_id": pa.array([stamp.run_id] * n, pa.string()),
                    "scored_at": pa.array([stamp.scored_at] * n, pa.timestamp("us", tz="UTC")),
                    "source_file": batch["source_file"],
                    "row_number": batch["row_number"],
                    "status": status,
                    "reject_reason": reason,
                    "reject_detail": detail,
                }
            )
        )
    return pa.concat_tables(parts)


@dataclass(frozen=True)
class Stage:
    """A map stage of the scoring dataset, in one object: its function (a callable class runs in an actor
    pool), the columns it reads, adds and drops (or, when it `replaces` the rows, the only columns it
    writes: `adds`), its arguments and its map settings (actor pool, resources, batch size)."""

    name: str
    fn: Callable
    reads: tuple[str, ...]
    adds: tuple[str, ...]
    drops: tuple[str, ...] = ()
    replaces: bool = False
    kwargs: dict = field(default_factory=dict)  # the function's (or the class constructor's) keyword arguments
    settings: dict = field(default_factory=dict)  # map_batches settings beyond the batch format

    def output(self, columns: set[str]) -> set[str]:
        """The columns after this stage, given those before it."""
        return set(self.adds) if self.replaces else (columns | set(self.adds)) - set(self.drops)

    def apply(self, ds):
        arguments = {"fn_constructor_kwargs" if isinstance(self.fn, type) else "fn_kwargs": self.kwargs}
        return ds.map_batches(self.fn, batch_format="pyarrow", **arguments, **self.settings)


@dataclass(frozen=True)
class DatasetPlan:
    """What the scoring stages are built from: the config, its row contract, the corpus, the students,
    what the survey finds, what every row carries, and where progress is counted."""

    cfg: JobConfig
    contract: RowContract
    corpus: Corpus
    students: list[StudentPlan]
    survey: object  # the reference of the `CorpusSurvey` (`ray.put`): every stage worker gets it once
    stamp: RunStamp
    gpus: float
    meter: object = None  # a `results.ScoringMeter`


def parse_stage(cfg: JobConfig, contract: RowContract, corpus: Corpus, survey=None) -> Stage:
    """Raw records to trajectories (the survey pass runs it too, before the row columns' types are known)."""
    return Stage("parse", parse_batch, tuple(RAW_SCHEMA.names), (*PARSED_SCHEMA.names[2:], *contract.row), drops=("text",),
                 kwargs={"corpus": corpus, "columns": list(contract.row), "column_types": contract.row_types, "survey": [survey]})  # fmt: skip


def scoring_stages(plan: DatasetPlan) -> list[Stage]:
    """The stages after `read`, each with its function, arguments and declared columns."""
    cfg, contract, survey = plan.cfg, plan.contract, plan.survey
    by = cfg.input.sample.by if cfg.input.sample else None
    stages = [
        parse_stage(cfg, contract, plan.corpus, survey),
        Stage("dedupe", mark_duplicates, ("sample_id", "source_file", "row_number", "content_hash", "reject_reason", "reject_detail"), (),
              kwargs={"survey": [survey], "file_urls": plan.corpus.urls}),
        Stage("sample", mark_sampled_out, ("reject_reason", *([by] if by else [])), ("sampled_out",),
              kwargs={"by": by, "survey": [survey]}),
    ]  # fmt: skip
    actor_args = {"options": scoring_options(cfg, contract), "threads": cfg.compute.torch_threads, "cpus_per_actor": cfg.compute.cpus_per_actor,
                  "scoring_actors": cfg.compute.actors_per_student * len(cfg.students), "meter": plan.meter}  # fmt: skip
    for i, student in enumerate(plan.students):
        name = functools.partial(per_student, index=i)
        stages.append(Stage(
            f"tokenize {student.config.name}", tokenize_batch,
            ("sample_id", "content_hash", "reject_reason", "messages_json", "sampled_out"), tuple(name(c) for c in TOKENIZED),
            kwargs={"index": i, "source": student.source, "max_model_len": student.settings.max_model_len,
                    "truncate": cfg.scoring.on_too_long == "truncate", "reasoning": cfg.scoring.reasoning,
                    "scope": cfg.scoring.scope, "done_ref": [student.done_ref]},
        ))  # fmt: skip
        stages.append(Stage(
            f"score {student.config.name}", ScoreActor,
            ("messages_json", *(name(c) for c in ("ids", "positions", "reject_reason", "reject_detail"))), tuple(name(c) for c in contract.stats),
            drops=(name("ids"), name("positions")),
            kwargs={"index": i, "student": student.config, "source": student.source, **actor_args},
            # One call at a time either way; "true multi-threading" runs it on the actor's own thread, where
            # the student was loaded, not on a second thread of Ray Data's: there the same scoring ran 35-45%
            # slower (600 GSM8K rows, bf16: 91-98 s of scoring calls against 72 s).
            settings={"compute": ray.data.ActorPoolStrategy(size=cfg.compute.actors_per_student, enable_true_multi_threading=True),
                      "num_cpus": cfg.compute.cpus_per_actor, "num_gpus": plan.gpus,
                      "batch_size": None},  # a block at a time: blocks are sized by tokens
        ))  # fmt: skip
    per_student_reads = [per_student(c, i) for i in range(len(plan.students))
                         for c in (*contract.stats, "truncated", "content_dropped", "skipped", "reject_reason", "reject_detail")]  # fmt: skip
    explode_reads = ("sample_id", *contract.row, "assistant_turns", "degenerate", "content_hash", "sampled_out", "source_file",
                     "row_number", "reject_reason", "reject_detail", *per_student_reads)  # fmt: skip
    stages.append(Stage("explode", explode_batch, explode_reads, (*contract.scores, "status", "reject_reason", "reject_detail"),
                        replaces=True, kwargs={"students": plan.students, "carried": list(contract.row),
                                               "stats": list(contract.stats), "stamp": plan.stamp}))  # fmt: skip
    return stages


def check_stages(stages: list[Stage], available: list[str]) -> None:
    """Fail before any work when a stage reads a column that no earlier stage adds, naming the stage."""
    columns = set(available)
    for stage in stages:
        missing = [c for c in stage.reads if c not in columns]
        if missing:
            raise ConfigError(f"stage {stage.name!r} reads {missing}, which no earlier stage adds")
        columns = stage.output(columns)


def build_dataset(plan: DatasetPlan):
    """The lazy Ray dataset of long-format results for the corpus: the stages' columns are checked
    first, then each stage maps the blocks of the one before."""
    stages = scoring_stages(plan)
    check_stages(stages, RAW_SCHEMA.names)
    # One read task per file: Ray Data would otherwise cut each file's blocks into pieces to reach its
    # minimum read parallelism (the 600-row GSM8K file: 100-row scoring calls, whatever batch_tokens says).
    ds = ray.data.read_datasource(CorpusDatasource(plan.corpus), override_num_blocks=len(plan.corpus.files))
    # A scoring call takes one tokenized block: blocks hold about `batch_tokens` tokens, so that results,
    # checkpoints and progress keep coming whatever the row lengths (this dataset's context only).
    ds.context.target_max_block_size = batch_tokens(plan.cfg.scoring, plan.gpus) * TOKENIZED_BYTES_PER_TOKEN
    for stage in stages:
        ds = stage.apply(ds)
    return ds
