"""Corpus files to raw records, and raw records to trajectories' output fields (through the corpus
shapes, `pipeline.corpus.shapes`). No Ray here.

Reading never fails on one bad row: each line or row becomes a record (its JSON text) or a read
error with a reason, so that the job can quarantine it with its file and line number.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import errors
from pipeline.corpus.messages import split_reasoning
from pipeline.corpus.shapes import column_value, row_trajectories
from pipeline.errors import RowError
from pipeline.run.config import InputConfig

BOM = b"\xef\xbb\xbf"
READ_CHUNK_BYTES = 16 << 20


@dataclass(frozen=True)
class RawRecord:
    row_number: int  # 1-based line (JSONL) or row (JSON array, Parquet); 0 for the whole file
    text: str | None  # the row as JSON text
    reason: str | None = None  # why the row could not be read
    detail: str | None = None


def _split_lines(f: BinaryIO) -> Iterator[bytes]:
    """Lines of a binary stream without loading the file, however long a line is."""
    pending = []
    while chunk := f.read(READ_CHUNK_BYTES):
        *complete, tail = chunk.split(b"\n")
        if complete:
            yield b"".join(pending) + complete[0]
            yield from complete[1:]
            pending = []
        pending.append(tail)
    if last := b"".join(pending):
        yield last


def _jsonl_records(lines: Iterator[bytes]) -> Iterator[RawRecord]:
    for number, line in enumerate(lines, start=1):
        if number == 1:
            line = line.removeprefix(BOM)
        line = line.rstrip(b"\r")
        if not line.strip():
            yield RawRecord(number, None, errors.BLANK_LINE, "blank line")
            continue
        try:
            yield RawRecord(number, line.decode("utf-8"))
        except UnicodeDecodeError as exc:
            yield RawRecord(number, None, errors.BAD_ENCODING, f"not UTF-8 at byte {exc.start}")


def _json_records(data: bytes) -> Iterator[RawRecord]:
    """A .json file: one array of rows, one row, or (commonly mislabelled) JSON lines."""
    try:
        document = json.loads(data.removeprefix(BOM))
    except ValueError:  # not one JSON document (UnicodeDecodeError included): read it as lines
        yield from _jsonl_records(iter(data.split(b"\n")))
        return
    rows = document if isinstance(document, list) else [document]
    for number, row in enumerate(rows, start=1):
        yield RawRecord(number, json.dumps(row, ensure_ascii=False))


def _parquet_records(f: BinaryIO) -> Iterator[RawRecord]:
    number = 0
    for batch in pq.ParquetFile(f).iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            number += 1
            yield RawRecord(number, json.dumps(row, ensure_ascii=False, default=str))


def _arrow_records(f: BinaryIO) -> Iterator[RawRecord]:
    """Arrow IPC: the stream format Hugging Face `save_to_disk` writes, else the file format."""
    try:
        reader = pa.ipc.open_stream(f)
    except pa.ArrowInvalid:
        f.seek(0)
        reader = pa.ipc.open_file(f)
    batches = (
        reader
        if isinstance(reader, pa.ipc.RecordBatchStreamReader)
        else (reader.get_batch(i) for i in range(reader.num_record_batches))
    )
    number = 0
    for batch in batches:
        for row in batch.to_pylist():
            number += 1
            yield RawRecord(number, json.dumps(row, ensure_ascii=False, default=str))


def read_records(f: BinaryIO, fmt: str) -> Iterator[RawRecord]:
    """Records of one corpus file; a file that cannot be parsed at all is one record saying why."""
    produced = False
    try:
        if fmt == "jsonl":
            records = _jsonl_records(_split_lines(f))
        elif fmt == "json":
            records = _json_records(f.read())
        elif fmt == "arrow":
            records = _arrow_records(f)
        else:
            records = _parquet_records(f)
        for record in records:
            produced = True
            yield record
    except Exception as exc:  # a corrupt file must not end the job: it is reported as unreadable
        yield RawRecord(0, None, errors.UNREADABLE_FILE, f"{type(exc).__name__}: {exc}"[:500])
        return
    if not produced:
        yield RawRecord(0, None, errors.EMPTY_FILE, "file holds no rows")


def canonical_json(messages: list[dict]) -> bytes:
    """A row's canonical messages as one JSON text: what its content hash is of, and its size in bytes the
    measure of its work for the time left (tokens are not known before the tokenize stage)."""
    return json.dumps(messages, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()


def content_hash(messages: list[dict], canonical: bytes | None = None) -> str:
    """The hash of a row's canonical messages: the same trajectory in two corpus shapes hashes the same."""
    return hashlib.sha256(canonical or canonical_json(messages)).hexdigest()[:32]


def _arguments_are_empty(call: Any) -> bool:
    arguments = (call.get("function") or {}).get("arguments", call.get("arguments")) if isinstance(call, dict) else None
    return arguments is None or (isinstance(arguments, str) and not arguments.strip()) or arguments == {}


def trajectory_flags(messages: list[dict]) -> tuple[int, str | None]:
    """(assistant turns, why the trajectory looks degenerate or None): a turn that repeats an earlier one
    word for word, a tool call with empty arguments, a turn with reasoning but neither answer nor tool
    call. Timed-out agent runs full of empty commands score a *better* RSR than real ones: users filter."""
    turns: list[list[dict]] = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if i and messages[i - 1]["role"] == "assistant":
            turns[-1].append(message)
        else:
            turns.append([message])
    seen, reason = set(), None
    for turn in turns:
        pieces = [split_reasoning(m) for m in turn]
        calls = [call for m in turn for call in m.get("tool_calls") or []]
        text = json.dumps([(m.get("content"), m.get("reasoning_content"), m.get("tool_calls")) for m in turn], sort_keys=True)
        if text in seen:
            reason = reason or "repeated_turn"
        seen.add(text)
        if any(_arguments_are_empty(call) for call in calls):
            reason = reason or "empty_tool_arguments"
        if any(r.strip() for r, _ in pieces) and not any(a.strip() for _, a in pieces) and not calls:
            reason = reason or "reasoning_without_answer"
    return len(turns), reason


def fallback_sample_id(source_file: str, row_number: int) -> str:
    """The stable id of a row that has no usable id of its own."""
    return f"{source_file}:{row_number}"


def parse_row(text: str, source_file: str, row_number: int, cfg: InputConfig, path_values: dict | None = None) -> list[dict]:
    """A row's trajectories as output fields: sample_id and the row columns it has (`config.row_columns`;
    the parse stage fills the others with nulls) always; the canonical messages, their content_hash and
    text_bytes when valid, else reject_reason and reject_detail. A row that is unusable as a whole is one reject.

    `sample_id` is the row's own string or integer id, else a stable `file:row` id; a row of several
    trajectories adds each one's suffix from its shape (`#<candidate index>`, `#<teacher>`).
    """
    fields = {"sample_id": fallback_sample_id(source_file, row_number), **(path_values or {})}
    try:
        try:
            row = json.loads(text)
        except ValueError as exc:
            raise RowError(errors.MALFORMED_JSON, str(exc)[:200]) from exc
        if not isinstance(row, dict):
            raise RowError(errors.NOT_AN_OBJECT, f"row is a JSON {type(row).__name__}, not an object")
        row_id = row.get(cfg.id_field)
        if isinstance(row_id, (str, int)) and not isinstance(row_id, bool) and row_id != "":
            fields["sample_id"] = str(row_id)
        fields.update({name: column_value(row.get(name)) for name in cfg.passthrough})
        trajectories = row_trajectories(row, cfg)
    except RowError as exc:
        return [{**fields, "reject_reason": exc.reason, "reject_detail": exc.detail}]
    parsed = []
    for t in trajectories:
        out = {**fields, **t.columns, "sample_id": fields["sample_id"] + t.suffix}
        if t.error is not None:
            out.update(reject_reason=t.error.reason, reject_detail=t.error.detail)
        else:
            turns, degenerate = trajectory_flags(t.messages)
            canonical = canonical_json(t.messages)
            out.update(content_hash=content_hash(t.messages, canonical), text_bytes=len(canonical), messages=t.messages,
                       assistant_turns=turns, degenerate=degenerate)  # fmt: skip
        parsed.append(out)
    return parsed
