"""Reading committed scores back: the latest score per (sample_id, student), trajectory selection,
the teacher table, and the original rows behind selected scores. No Ray here."""

from __future__ import annotations

import json
from collections import defaultdict

import pandas as pd
import pyarrow.dataset as pads

from pipeline.corpus.records import content_hash, read_records
from pipeline.corpus.shapes import row_trajectories, shape_of
from pipeline.corpus.storage import format_of, locate, open_corpus_file, plan_corpus
from pipeline.errors import RowError
from pipeline.run.config import InputConfig, StorageConfig, input_sources
from pipeline.run.layout import committed_score_files


def latest_scores(output: str, storage: StorageConfig | None = None) -> pd.DataFrame:
    """Committed scores, newest per (sample_id, student); partition columns come from the folders."""
    root = locate(output, storage or StorageConfig())
    files = [root.join(f).path for f in committed_score_files(root)]
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


def _trajectories_by_hash(row: dict, part: InputConfig) -> dict[str, list[dict]]:
    """The row's valid trajectories' canonical messages by content hash."""
    try:
        trajectories = row_trajectories(row, part)
    except RowError:
        return {}
    return {content_hash(t.messages): t.messages for t in trajectories if t.messages is not None}


def _selected_trajectories(selected: pd.DataFrame, input_cfg: InputConfig, storage: StorageConfig | None):
    """Per selected score: its corpus row, the scored trajectory's canonical messages, and whether the
    row holds several trajectories (candidates, teachers)."""
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
    for source_file, row_number, scored_hash in zip(selected["source_file"], selected["row_number"], selected["content_hash"]):
        row, trajectories, part = found.get((source_file, int(row_number)), (None, {}, None))
        if scored_hash not in trajectories:
            raise ValueError(f"{source_file}:{row_number} changed since it was scored; re-run the scoring job")
        yield row, trajectories[scored_hash], shape_of(part).several_per_row


def original_rows(selected: pd.DataFrame, input_cfg: InputConfig, storage: StorageConfig | None = None) -> list[dict]:
    """The corpus rows behind `selected` scores, read back from their source files by row number.

    `input_cfg` is the scoring job's input section (the rows' shapes). A row of several trajectories
    (candidates, teachers) comes back with the selected trajectory's canonical messages as `messages`.
    A row none of whose trajectories hashes to the scored content_hash (the file changed since) is an error.
    """
    return [
        {**row, "messages": messages} if several else row
        for row, messages, several in _selected_trajectories(selected, input_cfg, storage)
    ]


def selected_messages(selected: pd.DataFrame, input_cfg: InputConfig, storage: StorageConfig | None = None) -> list[list[dict]]:
    """The canonical messages (`role`, `content`, `reasoning_content`, tool keys) of each selected
    trajectory, read back as `original_rows` reads them, whatever the corpus shape."""
    return [messages for _, messages, _ in _selected_trajectories(selected, input_cfg, storage)]
