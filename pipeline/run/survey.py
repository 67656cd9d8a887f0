"""The survey: one pass over the parsed corpus before scoring for its repeated ids, its rows and their
bytes (for the time left), its row columns' types and, with `input.sample`, the sampled groups."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import ray
from ray.data.aggregate import Min, Sum
from ray.data.context import ShuffleStrategy

from pipeline.corpus.storage import Corpus, Location
from pipeline.run.accounted import UnreadFiles, group_columns, index_batch
from pipeline.run.config import JobConfig, SampleConfig
from pipeline.run.schema import RowContract
from pipeline.run.stages.base import row_order, text_bytes
from pipeline.run.stages.parse import parse_stage
from pipeline.run.stages.read import CorpusDatasource


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
def block_summary(block: pa.Table) -> tuple[pa.Schema, dict[str, int], int]:
    """A surveyed block's schema (for the row columns' types), its rows per file and the bytes of their messages."""
    files = pc.value_counts(block["source_file"]).to_pylist()
    return block.schema, {f["values"]: f["counts"] for f in files}, pc.sum(block["text_bytes"]).as_py() or 0


NOT_VALID = 1 << 62  # the order of an invalid row: never an id's first valid row


def order_batch(batch: pa.Table, file_numbers: dict[str, int], group_columns: list[str], row_columns: list[str]) -> pa.Table:
    """Every parsed row as (sample_id, its `row_order` or NOT_VALID, whether it is valid, the bytes of
    its messages, its file and row number), with the sample's group columns as text (`input.sample`) and
    the row columns as parsed (for their types)."""
    valid = pc.is_valid(batch["content_hash"]).to_pylist()
    places = zip(batch["source_file"].to_pylist(), batch["row_number"].to_pylist(), valid)
    order = [row_order(file_numbers[f], r) if ok else NOT_VALID for f, r, ok in places]
    return pa.table(
        {
            "sample_id": batch["sample_id"],
            "order": pa.array(order, pa.int64()),
            "valid": pa.array([int(ok) for ok in valid], pa.int64()),
            "text_bytes": text_bytes(batch),
            "source_file": batch["source_file"],
            "row_number": batch["row_number"],
            **{f"group:{column}": pc.cast(batch[column], pa.string()) for column in group_columns},
            **{column: batch[column] for column in row_columns},
        }
    )


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
    rows_per_file: dict[str, int] = field(default_factory=dict)  # the parsed rows of each file read


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


ID_COLUMNS = ["sample_id", "order", "valid"]


def survey_corpus(
    cfg: JobConfig, contract: RowContract, corpus: Corpus, unread: UnreadFiles | None = None, index_to: Location | None = None
) -> CorpusSurvey:
    """Read and parse the files the run reads once to find repeated ids (a distributed group-by in Ray
    Data: no process holds every id, only the repeated ones), with the ids of the `unread` files that
    they carry too, and count its rows and their bytes (for the time-left estimate). With `input.sample`,
    the groups are chosen from the groups of every file, read or not. The index of the files read
    (`accounted.index_batch`) goes to `index_to`."""
    sample = cfg.input.sample
    groups = group_columns(cfg)
    unread = unread if unread and unread.records else None
    read, blocks, ids = None, [], []
    if corpus.files:
        file_numbers = {url: number for number, url in enumerate(corpus.file_order)}
        read = parse_stage(cfg, contract, corpus).apply(ray.data.read_datasource(CorpusDatasource(corpus)))
        read = read.map_batches(
            order_batch,
            fn_kwargs={"file_numbers": file_numbers, "group_columns": groups, "row_columns": list(contract.row)},
            batch_format="pyarrow",
        ).materialize()  # one read serves the group-bys, the totals, the row columns' types and the index
        blocks = ray.get([block_summary.remote(ref) for ref in read.to_arrow_refs()])
        ids = [read.select_columns(ID_COLUMNS)]
        if unread:
            committed = unread.rows_with_ids(read.select_columns(["sample_id"]).to_arrow_refs(), corpus.file_order)
            ids.append(ray.data.from_arrow_refs([committed]))
    chosen = None
    if sample:  # the distinct (group, shared value) pairs of valid rows: problems x teachers, small
        pairs = [read.map_batches(valid_groups, fn_kwargs={"group_columns": groups}, batch_format="pyarrow")] if read else []
        pairs += [ray.data.from_arrow_refs([unread.group_pairs()])] if unread else []
        tables = (
            [table for table in ray.get(_shuffled(pairs).groupby(groups).count().to_arrow_refs()) if table.num_rows]
            if pairs
            else []
        )
        chosen = choose_groups(
            pa.concat_tables(tables) if tables else pa.table({c: pa.array([], pa.string()) for c in groups}), sample
        )
    duplicates = REPEATED_IDS.empty_table()
    if ids:
        repeated = _shuffled(ids).groupby("sample_id").aggregate(Sum("valid"), Min("order"))
        # A group-by over no valid row yields blocks without columns.
        found = ray.get(repeated.map_batches(repeated_ids, batch_format="pyarrow").to_arrow_refs())
        duplicates = pa.concat_tables([duplicates, *(table for table in found if table.num_rows)])
    if read and index_to is not None:
        _write_index(read, duplicates, chosen, groups, index_to)
    schemas, files, sizes = zip(*blocks) if blocks else ((), (), ())
    rows_per_file = {url: sum(counts.get(url, 0) for counts in files) for url in corpus.urls}
    return CorpusSurvey(
        duplicates, sum(rows_per_file.values()), sum(sizes), row_column_types(schemas, contract.row), chosen, rows_per_file
    )


def _shuffled(parts: list):
    """The union of `parts`, grouped by the task-based sort shuffle: the default hash shuffle starts
    aggregator actors for 200 partitions (~30 s of fixed time on a small runtime); the sort shuffle
    costs well under a second once workers are warm."""
    ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    ds.context.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    return ds


INDEX_ROWS_PER_FILE = 1_000_000  # a few files, not one per block: the index is read whole by one task


def _write_index(surveyed, duplicates: pa.Table, chosen: GroupSample | None, groups: list[str], index_to: Location) -> None:
    """The index of the files read (their valid rows that first carry their ids), written where the
    run's commit picks it up; a survey taken again (a grown sample) replaces it."""
    if index_to.fs.exists(index_to.path):
        index_to.fs.rm(index_to.path, recursive=True)
    first_rows = dict(zip(duplicates["sample_id"].to_pylist(), duplicates["min(order)"].to_pylist()))
    kwargs = {"first_rows": first_rows, "chosen": chosen.chosen if chosen else None, "groups": groups}
    index = surveyed.map_batches(index_batch, fn_kwargs=kwargs, batch_format="pyarrow")
    index.write_parquet(index_to.path, filesystem=index_to.arrow_fs(), min_rows_per_file=INDEX_ROWS_PER_FILE)
