"""The parse stage: raw records to trajectories (sample_id, content_hash, the canonical messages, the row columns:
passthrough, candidate and teacher columns, path fields), several per corpus row for candidates and teachers."""

from __future__ import annotations

import json
from collections.abc import Sequence

import pyarrow as pa

from pipeline.corpus.messages import messages_to_arrow
from pipeline.corpus.records import fallback_sample_id, parse_row
from pipeline.corpus.storage import Corpus
from pipeline.run.config import JobConfig
from pipeline.run.schema import PARSED_SCHEMA, RAW_SCHEMA, RowContract
from pipeline.run.stages.base import Stage, cached_get


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
    messages = messages_to_arrow([row.pop("messages", None) for row in rows])
    table = pa.Table.from_pylist(rows, schema=PARSED_SCHEMA.remove(PARSED_SCHEMA.get_field_index("messages")))
    table = table.add_column(PARSED_SCHEMA.get_field_index("messages"), "messages", messages)
    for name in columns:
        kind = column_types.get(name)
        kind = pa.type_for_alias(kind) if isinstance(kind, str) else kind
        values = [row.get(name) for row in rows]
        if kind == pa.string():  # a column whose values differ in type across the corpus is text
            values = [v if v is None or isinstance(v, str) else json.dumps(v) for v in values]
        table = table.append_column(name, pa.array(values, kind))
    return table


def parse_stage(cfg: JobConfig, contract: RowContract, corpus: Corpus, survey=None) -> Stage:
    """Raw records to trajectories (the survey pass runs it too, before the row columns' types are known)."""
    return Stage("parse", parse_batch, tuple(RAW_SCHEMA.names), (*PARSED_SCHEMA.names[2:], *contract.row), drops=("text",),
                 kwargs={"corpus": corpus, "columns": list(contract.row), "column_types": contract.row_types, "survey": [survey]})  # fmt: skip
