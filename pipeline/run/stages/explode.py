"""The explode stage: one row per (trajectory, student) with the score columns, status, reject_reason and
reject_detail, ready for the commit."""

from __future__ import annotations

import functools

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.run.schema import Status, per_student
from pipeline.run.settings import StudentSettings
from pipeline.run.stages.base import DatasetPlan, RunStamp, Stage
from pipeline.tokens.scopes import DEFAULT_SCOPE


def explode_batch(
    batch: pa.Table, students: tuple[StudentSettings, ...], carried: list[str], stats: list[str], stamp: RunStamp
) -> pa.Table:
    """One row per (trajectory, student): the score columns, a status, and the reject reason if any."""
    parts = []
    n = batch.num_rows
    for i, student in enumerate(students):
        name = functools.partial(per_student, index=i)
        reason = pc.coalesce(batch["reject_reason"], batch[name("reject_reason")])
        detail = pc.coalesce(batch["reject_detail"], batch[name("reject_detail")])
        status = pc.if_else(
            pc.is_valid(reason),
            Status.REJECTED,
            pc.if_else(
                batch["sampled_out"], Status.SAMPLED_OUT, pc.if_else(batch[name("skipped")], Status.SKIPPED, Status.SCORED)
            ),
        )
        constants = {
            "student": (student.name, pa.string()),
            "student_revision": (student.scoring.student_revision, pa.string()),
            "scoring_fingerprint": (student.fingerprint, pa.string()),
            "reasoning_mode": (student.scoring.reasoning, pa.string()),
            "scope": (student.scoring.scope or DEFAULT_SCOPE, pa.string()),
            "dtype": (student.scoring.dtype, pa.string()),
            "rank_clip": (student.scoring.rank_clip, pa.int32()),
        }
        per_row = {column: batch[name(column)] for column in (*stats, "truncated", "content_dropped")}
        columns = {column: pa.array([value] * n, kind) for column, (value, kind) in constants.items()} | per_row
        parts.append(
            pa.table(
                {
                    "sample_id": batch["sample_id"],
                    **{column: batch[column] for column in carried},
                    **columns,
                    "assistant_turns": batch["assistant_turns"],
                    "degenerate": batch["degenerate"],
                    "content_hash": batch["content_hash"],
                    "run_id": pa.array([stamp.run_id] * n, pa.string()),
                    "scored_at": pa.array([stamp.scored_at] * n, pa.timestamp("us", tz="UTC")),
                    "source_file": batch["source_file"],
                    "row_number": batch["row_number"],
                    "status": status,
                    "reject_reason": reason,
                    "reject_detail": detail,
                }
            )
        )
    return pa.concat_tables(parts)


def explode_stage(plan: DatasetPlan) -> Stage:
    contract = plan.contract
    per_student_reads = [per_student(c, i) for i in range(len(plan.settings.students))
                         for c in (*contract.stats, "truncated", "content_dropped", "skipped", "reject_reason", "reject_detail")]  # fmt: skip
    reads = ("sample_id", *contract.row, "assistant_turns", "degenerate", "content_hash", "sampled_out", "source_file",
             "row_number", "reject_reason", "reject_detail", *per_student_reads)  # fmt: skip
    return Stage("explode", explode_batch, reads, (*contract.scores, "status", "reject_reason", "reject_detail"), replaces=True,
                 kwargs={"students": plan.settings.students, "carried": list(contract.row), "stats": list(contract.stats), "stamp": plan.stamp})  # fmt: skip
