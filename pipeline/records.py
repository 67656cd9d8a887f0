"""Corpus files to raw records, and raw records to validated rows. No Ray here.

Reading never fails on one bad row: each line or row becomes a record (its JSON text) or a read
error with a reason, so that the job can quarantine it with its file and line number.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import errors
from pipeline.config import InputConfig
from pipeline.errors import RowError
from pipeline.messages import canonical_messages, split_reasoning, validate_messages

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


def _system_message(row: dict, cfg: InputConfig, sharegpt: bool = False) -> list[dict]:
    """The row-level system prompt (`input.system_field`; ShareGPT rows: `system` when unset) as a message."""
    name = cfg.system_field or ("system" if sharegpt else None)
    system = _field(row, name, errors.BAD_SYSTEM, "system", required=False) if name else None
    return [{"role": "system", "content": system}] if system else []


def _assistant(response: str, reasoning: str | None) -> dict:
    return {"role": "assistant", "content": response, **({"reasoning_content": reasoning} if reasoning else {})}


def _conversation(row: dict, cfg: InputConfig) -> Any:
    """The row's messages (ShareGPT turns converted), with the row-level system prompt unless they hold
    their own; None when the row has no messages. Malformed values are passed on for validation."""
    if cfg.messages_field in row:
        messages = row[cfg.messages_field]
    elif "conversations" in row:  # ShareGPT rows, with messages_field left at its default
        messages = row["conversations"]
    else:
        return None
    if not isinstance(messages, list):
        return messages
    sharegpt = any(isinstance(m, dict) and "from" in m and "role" not in m for m in messages)
    messages = [_from_sharegpt(m) for m in messages]
    has_system = any(isinstance(m, dict) and m.get("role") == "system" for m in messages)
    return messages if has_system else [*_system_message(row, cfg, sharegpt), *messages]


def _prompt_messages(row: dict, cfg: InputConfig) -> list[dict]:
    """The prompt of a row whose responses are elsewhere (candidates, teachers' columns): the prompt
    column (with the system prompt), else the row's messages up to its final assistant turn."""
    if cfg.prompt_field:
        return [
            *_system_message(row, cfg),
            {"role": "user", "content": _field(row, cfg.prompt_field, errors.BAD_PROMPT, "prompt")},
        ]
    messages = _conversation(row, cfg)
    if messages is None:
        raise RowError(errors.MISSING_MESSAGES, f"row has neither {cfg.messages_field!r} nor input.prompt_field for its prompt")
    if not isinstance(messages, list):
        raise RowError(errors.MESSAGES_NOT_A_LIST, f"messages is a {type(messages).__name__}, not a list")
    while messages and isinstance(messages[-1], dict) and messages[-1].get("role") == "assistant":
        messages = messages[:-1]
    return messages


def row_messages(row: dict, cfg: InputConfig) -> list[dict]:
    """A one-trajectory corpus row as validated canonical messages, whatever its shape: `messages` (with
    optional `reasoning_content` or `thinking`), ShareGPT `conversations` of `{from, value}`, or prompt
    and response columns. Raises RowError naming the problem."""
    if cfg.messages_field not in row and cfg.prompt_field and cfg.prompt_field in row:
        response = _field(row, cfg.response_field, errors.BAD_RESPONSE, "response")
        reasoning = (
            _field(row, cfg.reasoning_field, errors.NON_STRING_REASONING, "reasoning", required=False)
            if cfg.reasoning_field
            else None
        )
        messages = [*_prompt_messages(row, cfg), _assistant(response, reasoning)]
    else:
        messages = _conversation(row, cfg)
    if messages is None:
        looked_for = [cfg.messages_field, *([cfg.prompt_field] if cfg.prompt_field else []), "conversations"]
        raise RowError(errors.MISSING_MESSAGES, f"row has none of the fields {looked_for}")
    return validate_messages(canonical_messages(messages))


@dataclass(frozen=True)
class Trajectory:
    """One trajectory of a row: its sample_id suffix, the columns the corpus shape gives it, and its
    canonical messages or why it is rejected."""

    suffix: str
    columns: dict
    messages: list[dict] | None = None
    error: RowError | None = None


def _validated(messages: list) -> tuple[list[dict] | None, RowError | None]:
    try:
        return validate_messages(canonical_messages(messages)), None
    except RowError as exc:
        return None, exc


def _candidate_trajectories(row: dict, cfg: InputConfig) -> list[Trajectory]:
    candidates = row.get(cfg.candidates_field)
    if not isinstance(candidates, list) or not candidates:
        found = (
            "missing" if candidates is None else f"a {type(candidates).__name__}" if not isinstance(candidates, list) else "empty"
        )
        raise RowError(errors.BAD_CANDIDATES, f"candidates field {cfg.candidates_field!r} is {found}, not a list of responses")
    for name in cfg.candidate_passthrough:
        aligned = row.get(name)
        if not isinstance(aligned, list) or len(aligned) != len(candidates):
            length = len(aligned) if isinstance(aligned, list) else type(aligned).__name__
            raise RowError(errors.MISALIGNED_CANDIDATES, f"{name!r} has {length} items for {len(candidates)} candidates")
    prompt = _prompt_messages(row, cfg)
    trajectories = []
    for k, candidate in enumerate(candidates):
        columns = {"candidate_index": k, **{name: _passthrough_value(row[name][k]) for name in cfg.candidate_passthrough}}
        turns = (
            [_assistant(candidate, None)]
            if isinstance(candidate, str)
            else candidate
            if isinstance(candidate, list)
            else [candidate]
        )
        messages, error = _validated([*prompt, *(_from_sharegpt(m) for m in turns)])
        trajectories.append(Trajectory(f"#{k}", columns, messages, error))
    return trajectories


def _group_trajectories(row: dict, cfg: InputConfig) -> list[Trajectory]:
    prompt = _prompt_messages(row, cfg)
    trajectories = []
    for teacher, group in cfg.response_groups.items():
        try:
            response = _field(row, group.response, errors.BAD_RESPONSE, f"{teacher} response")
            reasoning = (
                _field(row, group.reasoning, errors.NON_STRING_REASONING, f"{teacher} reasoning", required=False)
                if group.reasoning
                else None
            )
            messages, error = _validated([*prompt, _assistant(response, reasoning)])
        except RowError as exc:
            messages, error = None, exc
        trajectories.append(Trajectory(f"#{teacher}", {"teacher": teacher}, messages, error))
    return trajectories


def _row_trajectory(row: dict, cfg: InputConfig) -> list[Trajectory]:
    return [Trajectory("", {}, row_messages(row, cfg))]


def _check_row(i: InputConfig, key: str, require: Callable[[bool, str], None]) -> None:
    require(bool(i.prompt_field) == bool(i.response_field), f"{key}prompt_field and {key}response_field go together")
    require(not i.reasoning_field or i.response_field, f"{key}reasoning_field needs {key}response_field")


def _check_several(i: InputConfig, key: str, require: Callable[[bool, str], None]) -> None:
    require(not i.response_field, f"{key}response_field and {key}{shape_of(i).keys[0]} are exclusive: one source of responses")
    require(not i.reasoning_field, f"{key}reasoning_field needs {key}response_field")


@dataclass(frozen=True)
class CorpusShape:
    """How the rows of a corpus part become trajectories. `keys`: the input keys it reads, the first of
    which selects it (none: the default shape, one trajectory per row); `columns`: what it adds to every
    trajectory (Arrow type names), `trajectories`: a row's trajectories (RowError when the row as a whole
    is unusable), `check`: its configuration checks. Adding a corpus shape is its input keys in
    `config.InputShape` and one entry in SHAPES."""

    name: str
    keys: tuple[str, ...]
    columns: dict[str, str]
    trajectories: Callable[[dict, InputConfig], list[Trajectory]]
    check: Callable[[InputConfig, str, Callable[[bool, str], None]], None]

    def selected(self, cfg: InputConfig) -> bool:
        return not self.keys or bool(getattr(cfg, self.keys[0]))

    @property
    def several_per_row(self) -> bool:
        return bool(self.keys)


SHAPES = (
    CorpusShape("candidates", ("candidates_field", "candidate_passthrough"), {"candidate_index": "int64"},
                _candidate_trajectories, _check_several),
    CorpusShape("teachers", ("response_groups",), {"teacher": "string"}, _group_trajectories, _check_several),
    CorpusShape("row", (), {}, _row_trajectory, _check_row),  # messages, ShareGPT, or prompt and response columns
)  # fmt: skip


def shape_of(cfg: InputConfig) -> CorpusShape:
    """The shape of a corpus part: the first whose selecting key is set, else one trajectory per row."""
    selected = [shape for shape in SHAPES if shape.keys and shape.selected(cfg)]
    return selected[0] if selected else SHAPES[-1]


def row_trajectories(row: dict, cfg: InputConfig) -> list[Trajectory]:
    """The trajectories of a corpus row, by its part's shape (`shape_of`). Raises RowError when the row
    as a whole is unusable."""
    return shape_of(cfg).trajectories(row, cfg)


def content_hash(messages: list[dict]) -> str:
    """The hash of a row's canonical messages: the same trajectory in two corpus shapes hashes the same."""
    canonical = json.dumps(messages, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


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


def _passthrough_value(value: Any) -> Any:
    # Nested values become JSON text so that every file yields the same column types.
    return json.dumps(value, ensure_ascii=False) if isinstance(value, (dict, list)) else value


def fallback_sample_id(source_file: str, row_number: int) -> str:
    """The stable id of a row that has no usable id of its own."""
    return f"{source_file}:{row_number}"


def parse_row(text: str, source_file: str, row_number: int, cfg: InputConfig, path_values: dict | None = None) -> list[dict]:
    """A row's trajectories as output fields: sample_id and the row columns it has (`config.row_columns`;
    the parse stage fills the others with nulls) always; content_hash and messages_json when valid, else
    reject_reason and reject_detail. A row that is unusable as a whole is one reject.

    `sample_id` is the row's own string or integer id, else a stable `file:row` id; a row of several
    trajectories adds `#<candidate index>` or `#<teacher>`.
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
        fields.update({name: _passthrough_value(row.get(name)) for name in cfg.passthrough})
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
            out.update(content_hash=content_hash(t.messages), messages_json=json.dumps(t.messages, ensure_ascii=False),
                       assistant_turns=turns, degenerate=degenerate)  # fmt: skip
        parsed.append(out)
    return parsed
