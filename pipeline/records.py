"""Corpus files to raw records, and raw records to validated rows. No Ray here.

Reading never fails on one bad row: each line or row becomes a record (its JSON text) or a read
error with a reason, so that the job can quarantine it with its file and line number.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, BinaryIO, Iterator

import pyarrow.parquet as pq

from pipeline import errors
from pipeline.config import InputConfig
from pipeline.errors import RowError
from pipeline.spans import canonical_messages, validate_messages
from pipeline.storage import format_of, open_corpus_file

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
            yield RawRecord(number, None, "blank_line", "blank line")
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


def read_records(f: BinaryIO, fmt: str) -> Iterator[RawRecord]:
    """Records of one corpus file; a file that cannot be parsed at all is one record saying why."""
    produced = False
    try:
        if fmt == "jsonl":
            records = _jsonl_records(_split_lines(f))
        elif fmt == "json":
            records = _json_records(f.read())
        else:
            records = _parquet_records(f)
        for record in records:
            produced = True
            yield record
    except Exception as exc:  # a corrupt file must not end the job: it is reported as unreadable
        yield RawRecord(0, None, "unreadable_file", f"{type(exc).__name__}: {exc}"[:500])
        return
    if not produced:
        yield RawRecord(0, None, "empty_file", "file holds no rows")


SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def _from_sharegpt(message: Any) -> Any:
    """A ShareGPT turn (`{from, value}`) as `{role, content}`; anything else as it is."""
    if isinstance(message, dict) and "role" not in message and "from" in message:
        source = message["from"]
        role = SHAREGPT_ROLES.get(source, source) if isinstance(source, str) else source
        return {"role": role, "content": message.get("value")}
    return message


def _field(row: dict, name: str, reason: str, what: str, required: bool = True) -> str | None:
    value = row.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str):
        found = "missing" if value is None else f"a {type(value).__name__}"
        raise RowError(reason, f"{what} field {name!r} is {found}, not a string")
    return value


def _prompt_response_messages(row: dict, cfg: InputConfig) -> list[dict]:
    system = _field(row, cfg.system_field, errors.BAD_SYSTEM, "system", required=False) if cfg.system_field else None
    prompt = _field(row, cfg.prompt_field, errors.BAD_PROMPT, "prompt")
    response = _field(row, cfg.response_field, errors.BAD_RESPONSE, "response")
    assistant = {"role": "assistant", "content": response}
    if cfg.reasoning_field:
        reasoning = _field(row, cfg.reasoning_field, errors.NON_STRING_REASONING, "reasoning", required=False)
        if reasoning:
            assistant["reasoning_content"] = reasoning
    return [*([{"role": "system", "content": system}] if system else []), {"role": "user", "content": prompt}, assistant]


def row_messages(row: dict, cfg: InputConfig) -> list[dict]:
    """A corpus row as validated canonical messages, whatever its shape: `messages` (with optional
    `reasoning_content` or `thinking`), ShareGPT `conversations` of `{from, value}`, or prompt and
    response columns. Raises RowError naming the problem."""
    if cfg.messages_field in row:
        messages = row[cfg.messages_field]
    elif cfg.prompt_field and cfg.prompt_field in row:
        return validate_messages(_prompt_response_messages(row, cfg))
    elif "conversations" in row:  # ShareGPT rows, with messages_field left at its default
        messages = row["conversations"]
    else:
        looked_for = [cfg.messages_field, *([cfg.prompt_field] if cfg.prompt_field else []), "conversations"]
        raise RowError(errors.MISSING_MESSAGES, f"row has none of the fields {looked_for}")
    if isinstance(messages, list):
        messages = [_from_sharegpt(m) for m in messages]
    return validate_messages(canonical_messages(messages))


def count_records(fs, paths: list[str], configured_format: str) -> int:
    """How many records (lines, rows, unreadable files) the corpus files hold, read without keeping them."""
    total = 0
    for path in paths:
        with open_corpus_file(fs, path) as f:
            total += sum(1 for _ in read_records(f, format_of(path, configured_format)))
    return total


def content_hash(messages: list[dict]) -> str:
    """The hash of a row's canonical messages: the same trajectory in two corpus shapes hashes the same."""
    canonical = json.dumps(messages, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def _passthrough_value(value: Any) -> Any:
    # Nested values become JSON text so that every file yields the same column types.
    return json.dumps(value, ensure_ascii=False) if isinstance(value, (dict, list)) else value


def fallback_sample_id(source_file: str, row_number: int) -> str:
    """The stable id of a row that has no usable id of its own."""
    return f"{source_file}:{row_number}"


def parse_row(text: str, source_file: str, row_number: int, cfg: InputConfig) -> dict:
    """A row's output fields: sample_id and passthrough always; content_hash and messages_json when
    the row is valid, else reject_reason and reject_detail.

    `sample_id` is the row's own string or integer id, else a stable `file:row` id.
    """
    fields = {"sample_id": fallback_sample_id(source_file, row_number), **dict.fromkeys(cfg.passthrough)}
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
        fields.update({name: _passthrough_value(row.get(name)) for name in cfg.passthrough})
        messages = row_messages(row, cfg)
    except RowError as exc:
        return {**fields, "reject_reason": exc.reason, "reject_detail": exc.detail}
    return {**fields, "content_hash": content_hash(messages), "messages_json": json.dumps(messages, ensure_ascii=False)}
