"""The row contract: every column, status, key and per-student column name that the stages, the
output and the readers share. Each is spelled here once; the reject reasons are in `pipeline.errors`.

Rows flow through the stages in `pipeline/run/stages/` (each declares the columns it reads and adds, from
the names below) and land as score rows (`score_columns`) and reject rows (`REJECT_COLUMNS`), counted
per student in `COUNT_COLUMNS`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import urllib.parse
from dataclasses import dataclass
from enum import StrEnum

import pyarrow as pa

from pipeline.corpus.messages import MESSAGES
from pipeline.run.config import JobConfig, metric_names, row_columns, shape_columns
from pipeline.scoring.metrics import stat_columns


class Status(StrEnum):
    """What happened to a (trajectory, student) row in a run."""

    SCORED = "scored"
    REJECTED = "rejected"
    SKIPPED = "skipped"  # already scored with the same scoring fingerprint by a committed run
    SAMPLED_OUT = "sampled_out"  # outside `input.sample`: not scored in this run


# Read stage: one record per line or row of a corpus file.
RAW_SCHEMA = pa.schema(
    [
        ("source_file", pa.string()),
        ("row_number", pa.int64()),
        ("text", pa.large_string()),  # a single row may be tens of MB
        ("reject_reason", pa.string()),
        ("reject_detail", pa.string()),
    ]
)
# Parse stage: one row per trajectory, before the row columns (`config.row_columns`).
PARSED_SCHEMA = pa.schema(
    [
        ("source_file", pa.string()),
        ("row_number", pa.int64()),
        ("sample_id", pa.string()),
        ("content_hash", pa.string()),
        ("messages", MESSAGES),  # canonical, as Arrow data (`corpus.messages`): no JSON text between stages
        ("text_bytes", pa.int64()),  # the canonical messages' JSON size: the work, for the time left
        ("reject_reason", pa.string()),
        ("reject_detail", pa.string()),
        ("assistant_turns", pa.int32()),  # `records.trajectory_flags`
        ("degenerate", pa.string()),
    ]
)
# Per student i, the tokenize stage adds these (as `per_student(name, i)`); the score stage replaces
# ids and positions by the statistics columns (`metrics.stat_columns`).
TOKENIZED = {
    "ids": pa.list_(pa.int32()),
    "positions": pa.list_(pa.int32()),
    "truncated": pa.bool_(),
    "content_dropped": pa.bool_(),
    "reject_reason": pa.string(),
    "reject_detail": pa.string(),
    "skipped": pa.bool_(),
}
STAT_TYPES = {"resp_token_length": pa.int64()}  # the other statistics are float64

COUNT_COLUMNS = ["read", *Status, "content_dropped", "unread"]  # read = scored + rejected + skipped + sampled_out;
# unread: the rows of files left unread, unchanged since a run accounted for them (`pipeline.run.accounted`)


class IncompleteRun(RuntimeError):
    """A run's results do not account for every row of the corpus: the run is not committed."""


REJECT_COLUMNS = ["student", "source_file", "row_number", "sample_id", "reject_reason", "reject_detail", "content_hash", "run_id"]
REJECT_KEY_COLUMNS = ["student", "source_file", "row_number", "reject_reason"]
MAX_PARTITION_NAME = 200  # encoded bytes, under the usual 255-byte file-name limit with "column="


def per_student(column: str, index: int) -> str:
    """The name of student `index`'s copy of `column` in the wide rows between tokenize and explode."""
    return f"{column}_{index}"


@dataclass(frozen=True)
class RowContract:
    """A run's columns, computed once from its config and handed to the stages and the writers."""

    row: tuple[str, ...]  # passthrough, aligned candidate and corpus-shape columns (`config.row_columns`)
    row_types: dict[str, str]  # the corpus shape's columns and their Arrow type names (`config.shape_columns`)
    metrics: tuple[str, ...]  # `config.metric_names`
    stats: tuple[str, ...]  # the per-trajectory statistics columns of those metrics
    scores: tuple[str, ...]  # the score files' columns, in order

    @classmethod
    def of(cls, cfg: JobConfig) -> RowContract:
        row, metrics = tuple(row_columns(cfg.input)), metric_names(cfg.scoring)
        stats = tuple(stat_columns(metrics))
        student = ("student", "student_revision", "scoring_fingerprint", "reasoning_mode", "scope", "dtype", "rank_clip",
                   *stats, "truncated", "content_dropped")  # fmt: skip
        scores = ("sample_id", *row, *student, "assistant_turns", "degenerate",
                  "content_hash", "run_id", "scored_at", "source_file", "row_number")  # fmt: skip
        return cls(row, shape_columns(cfg.input), metrics, stats, scores)


@dataclass(frozen=True)
class ScoringSettings:
    """Everything that changes a student's numbers, and its fingerprint (in every score row and in the
    incremental key). Optional settings enter only when set, so that outputs made before they existed
    keep their fingerprints (a float32 student's logits were always float32; the default scope)."""

    student_revision: str  # the weights and tokenizer: a folder's file hash, the hub commit, a GGUF's sha256
    chat_template: str  # the effective template text
    reasoning: str
    rank_clip: int
    max_model_len: int  # the smaller of scoring.max_model_len and the student's window
    on_too_long: str
    metrics: tuple[str, ...]
    dtype: str  # resolved: auto is bfloat16 on GPU, float32 on CPU
    logits_dtype: str | None = None  # set only when it is not the student's dtype
    scope: str | None = None  # set only when it is not the default

    def as_dict(self) -> dict:
        settings = {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
        return settings | {"metrics": list(self.metrics)}

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.as_dict(), sort_keys=True).encode()).hexdigest()[:16]


def scored_key(sample_id: str, content_hash: str) -> str:
    """What incremental runs compare, per scoring fingerprint: a trajectory's id and its content."""
    return f"{sample_id}/{content_hash}"


def reject_key(student, source_file, row_number, reason) -> str:
    """A reject's identity across runs: student, source file, row number and reason, NUL-joined."""
    return "\x00".join(map(str, (student, source_file, row_number, reason)))


def reject_keys(table: pa.Table) -> list[str]:
    """`reject_key` of each row of a table with the REJECT_KEY_COLUMNS."""
    return [reject_key(*key) for key in zip(*(table[c].to_pylist() for c in REJECT_KEY_COLUMNS))]


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
