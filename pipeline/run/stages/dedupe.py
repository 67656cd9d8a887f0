"""The dedupe stage: later rows of a repeated sample_id become duplicate_id rejects (the repeated ids come
from the survey, `pipeline.run.survey`)."""

from __future__ import annotations

import functools

import pyarrow as pa

from pipeline import errors
from pipeline.run.stages.base import DatasetPlan, Stage, cached_get, row_order


@functools.lru_cache(maxsize=2)
def _first_rows(survey) -> dict[str, int]:
    repeated = cached_get(survey).duplicates
    return dict(zip(repeated["sample_id"].to_pylist(), repeated["min(order)"].to_pylist()))


def mark_duplicates(batch: pa.Table, survey: list, file_urls: list[str]) -> pa.Table:
    """The dedupe stage: `reject_duplicates` with the repeated ids the survey found (the `CorpusSurvey`
    behind the one-item list `survey`)."""
    return reject_duplicates(batch, _first_rows(survey[0]), file_urls)


def reject_duplicates(batch: pa.Table, first_rows: dict[str, int], file_urls: list[str]) -> pa.Table:
    """Quarantine every valid row whose sample_id an earlier row (in file, row number order) carries;
    `first_rows` maps each repeated id to the `row_order` of its first valid row."""
    ids = batch["sample_id"].to_pylist()
    if not first_rows or not any(i in first_rows for i in ids):
        return batch
    file_numbers = {url: number for number, url in enumerate(file_urls)}
    reasons, details = batch["reject_reason"].to_pylist(), batch["reject_detail"].to_pylist()
    rows = zip(ids, batch["source_file"].to_pylist(), batch["row_number"].to_pylist(), batch["content_hash"].to_pylist())
    for k, (sample_id, source_file, row_number, content) in enumerate(rows):
        first = first_rows.get(sample_id)
        if content is not None and first is not None and first != row_order(file_numbers[source_file], row_number):
            first_file, first_row = file_urls[first >> 40], first & ((1 << 40) - 1)
            reasons[k], details[k] = errors.DUPLICATE_ID, f"sample_id {sample_id!r} first seen at {first_file}:{first_row}"
    batch = batch.set_column(batch.schema.get_field_index("reject_reason"), "reject_reason", pa.array(reasons, pa.string()))
    return batch.set_column(batch.schema.get_field_index("reject_detail"), "reject_detail", pa.array(details, pa.string()))


def dedupe_stage(plan: DatasetPlan) -> Stage:
    return Stage("dedupe", mark_duplicates, ("sample_id", "source_file", "row_number", "content_hash", "reject_reason", "reject_detail"), (),
                 kwargs={"survey": [plan.survey], "file_urls": plan.corpus.file_order})  # fmt: skip
