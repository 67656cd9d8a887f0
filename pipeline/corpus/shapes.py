"""Corpus shapes: how a row becomes trajectories. Each shape is one `CorpusShape` record in `SHAPES`:
its input keys, the columns it adds, its row -> trajectories function and its configuration checks.
The keys of a corpus part (`InputShape`: the common ones and every shape's; the config's `input`
section), their validation, the parse stage, the score columns and `jobs.select`'s original rows all
read the registry. No Ray, no torch.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING

from pipeline import errors
from pipeline.corpus.messages import canonical_messages, validate_messages
from pipeline.errors import RowError

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


def _system_message(row: dict, cfg: InputShape, sharegpt: bool = False) -> list[dict]:
    """The row-level system prompt (`input.system_field`; ShareGPT rows: `system` when unset) as a message."""
    name = cfg.system_field or ("system" if sharegpt else None)
    system = _field(row, name, errors.BAD_SYSTEM, "system", required=False) if name else None
    return [{"role": "system", "content": system}] if system else []


def _assistant(response: str, reasoning: str | None) -> dict:
    return {"role": "assistant", "content": response, **({"reasoning_content": reasoning} if reasoning else {})}


def _conversation(row: dict, cfg: InputShape) -> Any:
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


def prompt_messages(row: dict, cfg: InputShape) -> list[dict]:
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


def row_messages(row: dict, cfg: InputShape) -> list[dict]:
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
        messages = [*prompt_messages(row, cfg), _assistant(response, reasoning)]
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


def _candidate_trajectories(row: dict, cfg: InputShape) -> list[Trajectory]:
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
    prompt = prompt_messages(row, cfg)
    trajectories = []
    for k, candidate in enumerate(candidates):
        columns = {"candidate_index": k, **{name: column_value(row[name][k]) for name in cfg.candidate_passthrough}}
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


def _group_trajectories(row: dict, cfg: InputShape) -> list[Trajectory]:
    prompt = prompt_messages(row, cfg)
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


def _row_trajectory(row: dict, cfg: InputShape) -> list[Trajectory]:
    return [Trajectory("", {}, row_messages(row, cfg))]


def _check_row(i: InputShape, key: str, require: Callable[[bool, str], None]) -> None:
    require(bool(i.prompt_field) == bool(i.response_field), f"{key}prompt_field and {key}response_field go together")
    require(not i.reasoning_field or i.response_field, f"{key}reasoning_field needs {key}response_field")


def _check_several(i: InputShape, key: str, require: Callable[[bool, str], None]) -> None:
    require(
        not i.response_field, f"{key}response_field and {key}{shape_of(i).key_names[0]} are exclusive: one source of responses"
    )
    require(not i.reasoning_field, f"{key}reasoning_field needs {key}response_field")


@dataclass
class CorpusKeys:
    """The keys every corpus part has: where it is and the columns that make a trajectory of a row."""

    paths: list[str] = field(default_factory=list)  # files, directories, globs; local or s3://
    format: str = "auto"  # auto (by extension) | jsonl | json | parquet | arrow
    id_field: str = "id"
    messages_field: str = "messages"  # a list of {role, content} or ShareGPT {from, value} turns
    # Rows without messages_field: a prompt and a response column (and optional reasoning and system).
    prompt_field: Optional[str] = None
    response_field: Optional[str] = None
    reasoning_field: Optional[str] = None
    system_field: Optional[str] = None  # a row-level system prompt, for every shape (ShareGPT rows: `system` when unset)
    passthrough: list[str] = field(default_factory=list)  # row fields copied to the output
    # Columns from each file's path below the input path that holds it: {teacher: "{teacher}/*.json"}.
    path_fields: dict[str, str] = field(default_factory=dict)


@dataclass
class CandidateKeys:
    """Several trajectories per row: a list column of candidate responses (strings or message lists), each
    after the row's prompt, and list columns aligned with it."""

    candidates_field: Optional[str] = None
    candidate_passthrough: list[str] = field(default_factory=list)


@dataclass
class ResponseGroup:
    """One teacher's columns in a row that holds several teachers' responses."""

    response: str = MISSING
    reasoning: Optional[str] = None


@dataclass
class TeacherKeys:
    """Several teachers' responses per row, each in columns of its own: {teacher: {response, reasoning}}."""

    response_groups: dict[str, ResponseGroup] = field(default_factory=dict)


def _copies_no_columns(cfg: InputShape) -> list[str]:
    return []


def _aligned_columns(cfg: InputShape) -> list[str]:
    return list(cfg.candidate_passthrough)


@dataclass(frozen=True)
class CorpusShape:
    """How the rows of a corpus part become trajectories.

    `keys`: a dataclass of the input keys it reads, the first of which selects it (`InputShape` inherits
    them, and with it the config's `input` section and its `sources` items); None for the one default
    shape, one trajectory per row. `columns`: what it adds to every trajectory (Arrow type names).
    `trajectories`: a row's trajectories (RowError when the row as a whole is unusable). `check`: its
    configuration checks. `copied`: the row columns, named by its keys, that it copies to each
    trajectory. Adding a corpus shape is these, written in this module, and its entry in SHAPES."""

    name: str
    keys: type | None
    columns: dict[str, str]
    trajectories: Callable[[dict, InputShape], list[Trajectory]]
    check: Callable[[InputShape, str, Callable[[bool, str], None]], None]
    copied: Callable[[InputShape], list[str]] = _copies_no_columns

    @functools.cached_property  # read per row by shape_of
    def key_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(self.keys)) if self.keys else ()

    @property
    def several_per_row(self) -> bool:
        """A shape with keys makes trajectories of a row's parts; the default shape makes the row one."""
        return self.keys is not None


def _registry(*shapes: CorpusShape) -> tuple[CorpusShape, ...]:
    """The shapes, checked as the module loads: exactly one default (no keys), and no input key named
    twice (a repeated dataclass field would silently stand for two shapes' keys)."""
    defaults = [shape.name for shape in shapes if shape.keys is None]
    if len(defaults) != 1:
        raise TypeError(f"corpus shapes need exactly one default shape (keys None), got {defaults}")
    names = [f.name for f in dataclasses.fields(CorpusKeys)] + [name for shape in shapes for name in shape.key_names]
    if repeated := sorted({name for name in names if names.count(name) > 1}):
        raise TypeError(f"corpus shapes name these input keys twice: {repeated}")
    return shapes


SHAPES = _registry(
    CorpusShape("candidates", CandidateKeys, {"candidate_index": "int64"},
                _candidate_trajectories, _check_several, _aligned_columns),
    CorpusShape("teachers", TeacherKeys, {"teacher": "string"}, _group_trajectories, _check_several),
    CorpusShape("row", None, {}, _row_trajectory, _check_row),  # messages, ShareGPT, or prompt and response columns
)  # fmt: skip


# Dataclass fields come base last to first: the common keys, then each shape's in SHAPES order. The
# config schema's `input` section (`config.InputConfig`) and each of its `sources` hold these keys.
@dataclass
class InputShape(*reversed([shape.keys for shape in SHAPES if shape.keys]), CorpusKeys):
    """The keys of one corpus part: the common ones and each corpus shape's."""


DEFAULT_SHAPE = next(shape for shape in SHAPES if shape.keys is None)


def selecting_shapes(cfg: InputShape) -> list[CorpusShape]:
    """The shapes whose selecting key a corpus part sets (more than one is a configuration error)."""
    return [shape for shape in SHAPES if shape.keys and getattr(cfg, shape.key_names[0])]


def shape_of(cfg: InputShape) -> CorpusShape:
    """The shape of a corpus part: the first whose selecting key is set, else the default shape."""
    return next(iter(selecting_shapes(cfg)), DEFAULT_SHAPE)


def row_trajectories(row: dict, cfg: InputShape) -> list[Trajectory]:
    """The trajectories of a corpus row, by its part's shape (`shape_of`). Raises RowError when the row
    as a whole is unusable."""
    return shape_of(cfg).trajectories(row, cfg)


def column_value(value: Any) -> Any:
    """A row value as a column value: nested values become JSON text, so that every file yields the same
    column types."""
    return json.dumps(value, ensure_ascii=False) if isinstance(value, (dict, list)) else value
