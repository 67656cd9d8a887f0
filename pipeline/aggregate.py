"""Dataset-level RSR: sum of per-trajectory avg_rank_clip / sum of avg_surprisal, for any grouping."""

from __future__ import annotations

from typing import Sequence

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.rsr import MIN_SURPRISAL_SUM


def dataset_rsr(scores: pa.Table, by: Sequence[str] = ()) -> pa.Table:
    """One row per group: n_trajectories, resp_tokens, mean_avg_rank_clip, mean_avg_surprisal, rsr."""
    grouped = scores.group_by(list(by)).aggregate(
        [
            ("avg_rank_clip", "count"),
            ("resp_token_length", "sum"),
            ("avg_rank_clip", "sum"),
            ("avg_surprisal", "sum"),
        ]
    )
    n = grouped["avg_rank_clip_count"]
    rank_sum, surprisal_sum = grouped["avg_rank_clip_sum"], grouped["avg_surprisal_sum"]
    return pa.table(
        {
            **{key: grouped[key] for key in by},
            "n_trajectories": n,
            "resp_tokens": grouped["resp_token_length_sum"],
            "mean_avg_rank_clip": pc.divide(rank_sum, pc.cast(n, pa.float64())),
            "mean_avg_surprisal": pc.divide(surprisal_sum, pc.cast(n, pa.float64())),
            "rsr": pc.divide(rank_sum, pc.max_element_wise(surprisal_sum, MIN_SURPRISAL_SUM)),
        }
    )
