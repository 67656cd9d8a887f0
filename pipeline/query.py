"""Reading committed scores back: the latest score per (sample_id, student), trajectory selection,
the teacher table, and the original rows behind selected scores. No Ray here."""

from __future__ import annotations

import json
from collections import defaultdict

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads

from pipeline.aggregate import dataset_rsr
from pipeline.config import InputConfig, StorageConfig, input_sources
from pipeline.errors import RowError
from pipeline.metrics import BY_COLUMN, COMPANIONS
from pipeline.output import committed_files
from pipeline.records import content_hash, read_records, row_trajectories
from pipeline.storage import format_of, locate, open_corpus_file, plan_corpus


def latest_scores(output: str, storage: StorageConfig | None = None) -> pd.DataFrame:
    """Committed scores, newest per (sample_id, student); partition columns come from the folders."""
    root = locate(output, storage or StorageConfig())
    files = [root.join(f).path for f in committed_files(root) if f.startswith("student=")]
    if not files:
        raise FileNotFoundError(f"no committed scores under {root.url()}")
    dataset = pads.dataset(files, filesystem=root.arrow_fs(), format="parquet", partitioning="hive", partition_base_dir=root.path)
    scores = dataset.to_table().to_pandas()
    scores = scores.sort_values(["scored_at", "run_id"]).drop_duplicates(["sample_id", "student"], keep="last")
    return scores.reset_index(drop=True)


def fingerprint_mixes(scores: pd.DataFrame) -> list[str]:
    """A warning per student whose latest scores were made with different scoring settings (a rerun
    with new settings that did not cover every row, such as rows since removed from the corpus)."""
    if "scoring_fingerprint" not in scores.columns:
        return []
    fingerprints = scores["scoring_fingerprint"].fillna("(before fingerprints)")
    warnings = []
    for student, counts in fingerprints.groupby(scores["student"]).value_counts().groupby(level=0):
        if len(counts) > 1:
            mix = ", ".join(f"{fingerprint}: {n} rows" for (_, fingerprint), n in counts.items())
            warnings.append(
                f"student {student}: scores made with {len(counts)} scoring settings ({mix}); compare rows of one fingerprint"
            )
    return warnings


def select(
    scores: pd.DataFrame,
    student: str,
    group_by: list[str] | None = None,
    top_k: int | None = None,
    top_fraction: float | None = None,
    threshold: float | None = None,
    ascending: bool | None = None,
    by: str = "rank_surprisal_ratio",
    where: dict[str, str] | None = None,
) -> pd.DataFrame:
    """Trajectories chosen by one student's `by` column (by default its metric's most suitable end first:
    lowest RSR, highest top1_rate; `ascending` sets the order), among the rows
    whose columns equal `where`'s values (compared as text, case-insensitively: {"is_correct": "true"}).

    Exactly one of `top_k` (per group when `group_by` is given), `top_fraction` (of each group, at
    least one row) or `threshold` (`by` at most this, or at least when descending) is set.
    """
    if sum(x is not None for x in (top_k, top_fraction, threshold)) != 1:
        raise ValueError("set exactly one of top_k, top_fraction, threshold")
    for column in [by, *(where or {})]:
        if column not in scores.columns:
            raise ValueError(f"no column {column!r} in the scores; have {sorted(scores.columns)}")
    mine = scores[scores["student"] == student]
    if mine.empty:
        raise ValueError(f"no scores for student {student!r}; have {sorted(scores['student'].unique())}")
    for column, value in (where or {}).items():
        mine = mine[mine[column].astype(str).str.lower() == str(value).lower()]
    if ascending is None:  # the metric's own direction: most suitable first (lowest RSR, highest top1_rate)
        ascending = BY_COLUMN[by].lower_is_better if by in BY_COLUMN else True
    ranked = mine.sort_values(by, ascending=ascending, kind="stable")
    if threshold is not None:
        keep = ranked[by] <= threshold if ascending else ranked[by] >= threshold
        return ranked[keep]
    groups = ranked.groupby(group_by, sort=False, dropna=False) if group_by else [(None, ranked)]
    parts = []
    for _, group in groups:
        n = top_k if top_k is not None else max(1, round(len(group) * top_fraction))
        parts.append(group.head(n))
    return pd.concat(parts)


def teacher_table(scores: pd.DataFrame, teacher_column: str = "source") -> pd.DataFrame:
    """Dataset-level RSR per teacher and student, ranked per student (rank 1 = most suitable)."""
    metrics = [m.column for m in COMPANIONS if m.column in scores.columns]
    columns = ["student", teacher_column, "resp_token_length", "avg_rank_clip", "avg_surprisal", *metrics]
    table = dataset_rsr(pa.Table.from_pandas(scores[columns], preserve_index=False), by=["student", teacher_column])
    result = table.to_pandas().sort_values(["student", "rsr"])
    result.insert(2, "rank", result.groupby("student").cumcount() + 1)
    return result.reset_index(drop=True)


def _trajectories_by_hash(row: dict, part: InputConfig) -> dict[str, list[dict]]:
    """The row's valid trajectories' canonical messages by content hash."""
    try:
        trajectories = row_trajectories(row, part)
    except RowError:
        return {}
    return {content_hash(t.messages): t.messages for t in trajectories if t.messages is not None}


def original_rows(selected: pd.DataFrame, input_cfg: InputConfig, storage: StorageConfig | None = None) -> list[dict]:
    """The corpus rows behind `selected` scores, read back from their source files by row number.

    `input_cfg` is the scoring job's input section (the rows' shapes). A row of several trajectories
    (candidates, teachers) comes back with the selected trajectory's canonical messages as `messages`.
    A row none of whose trajectories hashes to the scored content_hash (the file changed since) is an error.
    """
    storage = storage or StorageConfig()
    parts = input_sources(input_cfg) or [input_cfg]
    part_of = plan_corpus(input_cfg, storage).part_of if len(parts) > 1 else {}  # which part names each file
    wanted = defaultdict(set)
    for source_file, row_number in zip(selected["source_file"], selected["row_number"]):
        wanted[source_file].add(int(row_number))
    found = {}
    for source_file, numbers in wanted.items():
        location = locate(source_file, storage)
        part = parts[part_of.get(source_file, 0)]
        with open_corpus_file(location.fs, location.path) as f:
            for record in read_records(f, format_of(location.path, part.format)):
                if record.row_number in numbers:
                    row = json.loads(record.text)
                    found[(source_file, record.row_number)] = (row, _trajectories_by_hash(row, part), part)
    rows = []
    for source_file, row_number, scored_hash in zip(selected["source_file"], selected["row_number"], selected["content_hash"]):
        row, trajectories, part = found.get((source_file, int(row_number)), (None, {}, None))
        if scored_hash not in trajectories:
            raise ValueError(f"{source_file}:{row_number} changed since it was scored; re-run the scoring job")
        several = part.candidates_field or part.response_groups
        rows.append({**row, "messages": trajectories[scored_hash]} if several else row)
    return rows
