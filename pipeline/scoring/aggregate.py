"""Dataset-level RSR: sum of per-trajectory avg_rank_clip / sum of avg_surprisal, for any grouping.

The companion metrics (pipeline.scoring.metrics.COMPANIONS) have no ratio: their dataset-level value is the
mean of the per-trajectory values (their `dataset_column`), like mean_avg_rank_clip and mean_avg_surprisal.

Sums come first (`group_sums`, `combine_sums`), so that a run can aggregate block by block without
keeping its rows; `summary_from_sums` turns them into the summary table.
"""

from __future__ import annotations

from collections.abc import Sequence

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.scoring.metrics import COMPANIONS, MIN_SURPRISAL_SUM

SUMMED = ["resp_token_length", "avg_rank_clip", "avg_surprisal", *(m.column for m in COMPANIONS)]


def group_sums(scores: pa.Table, by: Sequence[str]) -> pa.Table:
    """Per group: n_trajectories and the sum of each summed column present in `scores`."""
    columns = [c for c in SUMMED if c in scores.column_names]
    grouped = scores.group_by(list(by)).aggregate([("avg_rank_clip", "count"), *[(c, "sum") for c in columns]])
    return grouped.rename_columns([n.replace("avg_rank_clip_count", "n_trajectories") for n in grouped.column_names])


def combine_sums(tables: Sequence[pa.Table], by: Sequence[str]) -> pa.Table:
    """The `group_sums` of several parts, as if taken over all their rows at once."""
    combined = pa.concat_tables(tables, promote_options="default")
    value_columns = [c for c in combined.column_names if c not in by]
    grouped = combined.group_by(list(by)).aggregate([(c, "sum") for c in value_columns])
    return grouped.rename_columns([n.removesuffix("_sum") if n.endswith("_sum_sum") or n == "n_trajectories_sum" else n
                                   for n in grouped.column_names])  # fmt: skip


def summary_from_sums(sums: pa.Table, by: Sequence[str]) -> pa.Table:
    """One row per group: n_trajectories, resp_tokens, mean_avg_rank_clip, mean_avg_surprisal, rsr, and
    mean_<column> of each companion metric column that was summed."""
    n = pc.cast(sums["n_trajectories"], pa.float64())
    rank_sum, surprisal_sum = sums["avg_rank_clip_sum"], sums["avg_surprisal_sum"]
    metrics = [m for m in COMPANIONS if f"{m.column}_sum" in sums.column_names]
    return pa.table(
        {
            **{key: sums[key] for key in by},
            "n_trajectories": sums["n_trajectories"],
            "resp_tokens": sums["resp_token_length_sum"],
            "mean_avg_rank_clip": pc.divide(rank_sum, n),
            "mean_avg_surprisal": pc.divide(surprisal_sum, n),
            "rsr": pc.divide(rank_sum, pc.max_element_wise(surprisal_sum, MIN_SURPRISAL_SUM)),
            **{m.dataset_column: pc.divide(sums[f"{m.column}_sum"], n) for m in metrics},
        }
    )


def dataset_rsr(scores: pa.Table, by: Sequence[str] = ()) -> pa.Table:
    """The summary table of `scores` grouped by `by` (see `summary_from_sums`)."""
    return summary_from_sums(group_sums(scores, by), by)
