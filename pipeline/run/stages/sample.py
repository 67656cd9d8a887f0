"""The sample stage: with `input.sample`, valid rows outside the groups the survey chose are sampled out."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.run.stages.base import DatasetPlan, Stage, cached_get


def mark_sampled_out(batch: pa.Table, by: str | None, survey: list) -> pa.Table:
    """The sample stage: a valid row whose group is not among the ones the survey (the `CorpusSurvey`
    behind the one-item list `survey`) chose is sampled out; without `input.sample` no row is."""
    if by is None:
        return batch.append_column("sampled_out", pa.array([False] * batch.num_rows, pa.bool_()))
    groups = cached_get(survey[0]).sample.chosen
    values, reasons = pc.cast(batch[by], pa.string()).to_pylist(), batch["reject_reason"].to_pylist()
    out = [reason is None and value not in groups for value, reason in zip(values, reasons)]
    return batch.append_column("sampled_out", pa.array(out, pa.bool_()))


def sample_stage(plan: DatasetPlan) -> Stage:
    by = plan.cfg.input.sample.by if plan.cfg.input.sample else None
    return Stage("sample", mark_sampled_out, ("reject_reason", *([by] if by else [])), ("sampled_out",),
                 kwargs={"by": by, "survey": [plan.survey]})  # fmt: skip
