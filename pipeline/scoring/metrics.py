"""The metric registry: one record per per-trajectory metric (its column, how it reduces a trajectory's
token statistics, its dataset-level column, its direction). No torch here: the config check, the row
contract, `jobs.select` and `jobs.report` read the registry without loading the scoring core
(`pipeline.scoring.rsr`), whose token statistics the reducers receive.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

MIN_SURPRISAL_SUM = 1e-12
RSR_COLUMNS = ["resp_token_length", "avg_rank_clip", "avg_surprisal", "rank_surprisal_ratio"]


@dataclass(frozen=True)
class TokenStats:
    """One trajectory's per-token statistics: unclipped ranks, float32 surprisals, entropies if computed."""

    ranks: Any  # torch tensors, from pipeline.scoring.rsr
    surprisals: Any
    entropies: Any


@dataclass(frozen=True)
class Metric:
    """A per-trajectory metric: its name in `scoring.metrics`, its column, how a trajectory's value comes
    from its token statistics, its dataset-level column (the mean of the per-trajectory values unless it
    is RSR's ratio of sums) and whether a lower value marks a more suitable trajectory. Adding a metric is
    one entry here, plus its per-token statistic in `token_statistics` if it needs a new one."""

    name: str
    column: str
    reduce: Callable[[TokenStats], float] | None  # None: part of RSR's own columns
    dataset_column: str
    lower_is_better: bool = True
    needs_entropy: bool = False


# RSR's own columns first (always computed), then the companion metrics.
REGISTRY = (
    Metric("rsr", "rank_surprisal_ratio", None, "rsr"),
    Metric("surprisal", "avg_surprisal", None, "mean_avg_surprisal"),
    Metric("entropy", "avg_entropy", lambda t: float(t.entropies.double().mean()), "mean_avg_entropy", needs_entropy=True),
    Metric("top1", "top1_rate", lambda t: float((t.ranks == 1).double().mean()), "mean_top1_rate", lower_is_better=False),
    Metric("rank", "avg_rank", lambda t: float(t.ranks.double().mean()), "mean_avg_rank"),
    # the log-probabilities are the negated surprisals: the same spread
    Metric("logprob_std", "avg_log_prob_std", lambda t: float(t.surprisals.double().std(correction=0)), "mean_avg_log_prob_std"),
)
COMPANIONS = tuple(m for m in REGISTRY if m.reduce is not None)
METRICS = ("rsr", *(m.name for m in COMPANIONS))  # the names `scoring.metrics` takes
BY_COLUMN = {m.column: m for m in REGISTRY}


def stat_columns(metrics: Sequence[str]) -> list[str]:
    """The per-trajectory columns that `metrics` (names from METRICS, "rsr" always included) produce."""
    return RSR_COLUMNS + [m.column for m in COMPANIONS if m.name in metrics]
