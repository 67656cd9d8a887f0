"""The input files a completed run accounted for, so that a nightly rerun reads only what is new.

A completed run's manifest records, under its run fingerprint (`run_fingerprint`), every corpus file it
accounted for: its URL, its version (`storage.file_version`: size and ETag or modification time), its row
count and the index (`layout.inputs_dir`) that holds the ids of its valid rows, with their groups of
`input.sample` and whether the run scored them (`accounted`: not sampled out). A rerun with the same
fingerprint leaves a file unread when its version is unchanged and, with a sample, none of its rows in
the chosen groups went unaccounted. The rows of the files left unread still take part in the survey as
ids (a new file's row with a committed id is a duplicate) and as groups (which groups the sample chooses).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import ray

from pipeline.corpus.storage import Corpus, Location
from pipeline.run.config import JobConfig, input_sources
from pipeline.run.settings import RunSettings
from pipeline.run.stages.base import row_order

RECORDS_VERSION = 1  # raised whenever what a record or its index means changes: every file is read again once


@dataclass(frozen=True)
class FileRecord:
    """A corpus file a completed run accounted for."""

    file: str  # its URL
    version: str  # `storage.file_version` when the run listed it
    rows: int  # the rows it parsed into, rejects included
    index: str  # the folder (relative to the output) of the index holding its rows' ids and groups


def run_fingerprint(cfg: JobConfig, settings: RunSettings) -> str:
    """What decides what a file yields in a run: every student's scoring fingerprint and each corpus
    part's shape (its keys but the paths), and the columns of `input.sample` (the index holds their
    values); not the sample's size or seed, which choose among the groups."""
    parts = [{k: v for k, v in dataclasses.asdict(part).items() if k not in ("paths", "sources", "sample")}
             for part in input_sources(cfg.input)]  # fmt: skip
    sample = cfg.input.sample
    payload = {
        "records": RECORDS_VERSION,
        "students": sorted(student.fingerprint for student in settings.students),
        "parts": parts,
        "sample": [sample.by, sample.shared_by] if sample else None,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def earlier_records(manifests: list[dict], fingerprint: str) -> dict[str, FileRecord]:
    """The file records of the newest completed run with the fingerprint `fingerprint`, by URL."""
    for manifest in reversed(manifests):
        inputs = manifest.get("inputs") or {}
        if manifest.get("completed") and inputs.get("fingerprint") == fingerprint:
            return {record["file"]: FileRecord(**record) for record in inputs["files"]}
    return {}


def unchanged_files(corpus: Corpus, records: dict[str, FileRecord]) -> set[str]:
    """The URLs of the corpus files whose version is the one recorded."""
    return {url for url, version in corpus.versions.items() if url in records and records[url].version == version}


def group_columns(cfg: JobConfig) -> list[str]:
    """The columns of `input.sample` (its groups, and the teachers that must share them)."""
    sample = cfg.input.sample
    return [column for column in (sample.by, sample.shared_by) if column] if sample else []


def index_schema(groups: list[str]) -> pa.Schema:
    return pa.schema([("source_file", pa.string()), ("row_number", pa.int64()), ("sample_id", pa.string()),
                      ("accounted", pa.bool_()), *((f"group:{c}", pa.string()) for c in groups)])  # fmt: skip


def index_batch(batch: pa.Table, first_rows: dict[str, int], chosen: frozenset[str] | None, groups: list[str]) -> pa.Table:
    """A surveyed batch's index rows: its valid rows but those a repeated id's first row beats
    (`first_rows`: each repeated id's `row_order`), each accounted unless its group is not `chosen`."""
    keep = [bool(ok) and first_rows.get(sample_id, order) == order
            for ok, sample_id, order in zip(batch["valid"].to_pylist(), batch["sample_id"].to_pylist(), batch["order"].to_pylist())]  # fmt: skip
    rows = batch.filter(pa.array(keep, pa.bool_()))
    if chosen is None:
        accounted = pa.array([True] * rows.num_rows, pa.bool_())
    else:
        accounted = pc.is_in(rows[f"group:{groups[0]}"], value_set=pa.array(sorted(chosen), pa.string()))
    columns = {"source_file": rows["source_file"], "row_number": rows["row_number"], "sample_id": rows["sample_id"],
               "accounted": pc.fill_null(accounted, False), **{f"group:{c}": rows[f"group:{c}"] for c in groups}}  # fmt: skip
    return pa.table(columns, schema=index_schema(groups))


def _read_index(root: Location, records: list[FileRecord], groups: list[str], columns: list[str], where=None) -> pa.Table:
    """The indexed rows of the files `records` name, each file's from the index its record names (an
    older index may hold other rows of the same file), with `columns`, filtered by `where`."""
    files_in: dict[str, list[str]] = {}
    for record in records:
        files_in.setdefault(record.index, []).append(record.file)
    tables = [index_schema(groups).empty_table().select(columns)]
    for index, files in files_in.items():
        folder = root.join(index).path
        if not root.fs.exists(folder):  # a run whose files held no valid row wrote no index
            continue
        dataset = pads.dataset(root.fs.find(folder), schema=index_schema(groups), filesystem=root.arrow_fs(), format="parquet")
        mine = pads.field("source_file").isin(pa.array(files, pa.string()))
        tables.append(dataset.to_table(columns=columns, filter=mine if where is None else mine & where))
    return pa.concat_tables(tables)


@dataclass(frozen=True)
class UnreadFiles:
    """The files a run leaves unread (their `records`), as their index tells them to the survey: the ids
    that files read carry too (each a duplicate of the unread file's committed row) and the groups."""

    root: Location
    records: list[FileRecord]
    groups: list[str]  # the columns of `input.sample`

    def rows_with_ids(self, id_blocks: list, file_order: list[str]) -> ray.ObjectRef:
        """The reference of their indexed rows whose ids the `id_blocks` (references to tables with a
        sample_id column: the files read) carry, as the survey's id rows: sample_id, its `row_order` in
        `file_order`, valid (1). Only those can make a row read a duplicate."""
        return _rows_with_ids.remote(self.root, self.records, self.groups, id_blocks, file_order)

    def group_pairs(self) -> ray.ObjectRef:
        """The reference of the distinct values of their rows' group columns (`input.sample`)."""
        return _group_pairs.remote(self.root, self.records, self.groups)

    def missing_groups(self, chosen: frozenset[str]) -> set[str]:
        """The files with a row in the `chosen` groups that their run did not account for (sampled out
        then): a sample that grew must read them."""
        return ray.get(_files_missing_groups.remote(self.root, self.records, self.groups, chosen)) if self.records else set()


@ray.remote
def _rows_with_ids(
    root: Location, records: list[FileRecord], groups: list[str], id_blocks: list, file_order: list[str]
) -> pa.Table:
    ids = pa.concat_arrays([block["sample_id"].combine_chunks() for block in ray.get(id_blocks)] or [pa.array([], pa.string())])
    table = _read_index(root, records, groups, ["source_file", "row_number", "sample_id"], pads.field("sample_id").isin(ids))
    numbers = {url: number for number, url in enumerate(file_order)}
    order = [row_order(numbers[f], r) for f, r in zip(table["source_file"].to_pylist(), table["row_number"].to_pylist())]
    return pa.table(
        {
            "sample_id": table["sample_id"],
            "order": pa.array(order, pa.int64()),
            "valid": pa.array([1] * table.num_rows, pa.int64()),
        }
    )


@ray.remote
def _group_pairs(root: Location, records: list[FileRecord], groups: list[str]) -> pa.Table:
    table = (
        _read_index(root, records, groups, [f"group:{c}" for c in groups]).group_by([f"group:{c}" for c in groups]).aggregate([])
    )
    return table.rename_columns(groups)


@ray.remote
def _files_missing_groups(root: Location, records: list[FileRecord], groups: list[str], chosen: frozenset[str]) -> set[str]:
    missing = pads.field(f"group:{groups[0]}").isin(pa.array(sorted(chosen), pa.string())) & ~pads.field("accounted")
    return set(_read_index(root, records, groups, ["source_file"], missing)["source_file"].to_pylist())


def run_records(corpus: Corpus, earlier: dict[str, FileRecord], rows_read: dict[str, int], index: str) -> list[dict]:
    """The records of a completed run: the files it read (their rows counted now, in its `index`), and
    the files it left unread as recorded before."""
    read = [FileRecord(url, corpus.versions[url], rows_read.get(url, 0), index) for url in corpus.urls]
    return [
        dataclasses.asdict(record) for record in sorted([*read, *(earlier[url] for url in corpus.unread)], key=lambda r: r.file)
    ]
