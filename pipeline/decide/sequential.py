"""Deciding in waves: the teacher decision at each of K looks fixed in advance, made so that the chance of
a wrong decision over all K looks stays at most alpha = 1 - confidence.

At a look on n matched problems the leader is the teacher with the most suitable RSR. It is declared the
choice only when it differs from every other teacher in a paired randomization test at level
alpha / (t * K) (t teachers): for the leader and one other teacher, each of `n_draws` draws exchanges the
two teachers' trajectories on a seeded coin per problem and recomputes both dataset RSRs; the two-sided
p-value is the share of draws (the observed labels counted as one) whose difference is at least as large
as the observed one. Under exchangeable teachers that test is exact at any n. A decision names one
teacher that beats its runner-up, so by the union bound over the t teachers that could be named and the K
looks, exchangeable teachers are declared different with probability at most alpha, however the looks
fall. A percentile bootstrap at the same level is not exact: on 10 problems it crossed the threshold four
times as often. The draw count puts at least RESOLUTION draws beyond the threshold. P(top1) and the
difference intervals behind the undecided bound come from the paired bootstrap over problems, as in the
teacher table.

pandas and numpy only, like the rest of `pipeline.decide`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pipeline.decide.teachers import ProblemSums, bootstrap_rsr, share_first, suitability

RULE = (
    "decided when the leader differs from every other teacher in a two-sided paired randomization test (labels "
    "exchanged per problem) at level alpha / (t * K) on the wave's matched problems (alpha = 1 - confidence, t "
    "teachers, K waves): exchangeable teachers are declared different with probability at most alpha"
)
RESOLUTION = 20  # draws expected beyond the threshold when a comparison sits exactly at it
MIN_DRAWS = 1000


def comparison_level(confidence: float, n_teachers: int, n_looks: int) -> float:
    """The one-sided level of each leader-against-teacher comparison at one look."""
    return (1 - confidence) / (n_teachers * n_looks)


def draws_for(level: float) -> int:
    return max(MIN_DRAWS, math.ceil(RESOLUTION / level))


def exchanges(n_problems: int, n_draws: int, seed: int) -> np.ndarray:
    """[draw, problem]: 1 where a draw exchanges the two compared teachers' labels on that problem."""
    return np.random.default_rng(seed).integers(0, 2, size=(n_draws, n_problems)).astype(float)


@dataclass(frozen=True)
class Look:
    """The decision at one look."""

    teachers: list[str]
    n_problems: int
    rsr: np.ndarray  # per teacher, on the look's matched problems
    p_top1: np.ndarray  # per teacher: the share of bootstrap resamples in which it is the most suitable (`teachers.share_first`)
    leader: int
    p_values: np.ndarray  # per teacher: the randomization p-value of its difference from the leader (NaN: the leader)
    difference_interval: np.ndarray  # [teacher, (low, high)]: the (1 - alpha) interval of its RSR minus the leader's
    level: float  # the p-value every comparison needs, at most
    n_draws: int

    @property
    def decided(self) -> bool:
        return separated(self.p_values, self.leader, self.level)

    @property
    def tied(self) -> list[int]:
        """The teachers the leader is not separated from."""
        return [i for i, p in enumerate(self.p_values) if i != self.leader and p > self.level]

    @property
    def bound(self) -> float | None:
        """How far the tied teachers may lie from the leader: the largest |endpoint| of their difference
        intervals (None when decided)."""
        tied = self.tied
        return float(np.abs(self.difference_interval[tied]).max()) if tied else None

    def margin(self) -> tuple[int, float]:
        """The runner-up (by RSR) and its RSR distance from the leader."""
        runner_up = int(np.argsort(-suitability(self.rsr), kind="stable")[1])
        return runner_up, float(abs(self.rsr[runner_up] - self.rsr[self.leader]))

    def summary(self) -> dict:
        """JSON-ready."""
        runner_up, margin = self.margin()
        return {
            "n_problems": self.n_problems,
            "decided": self.decided,
            "leader": self.teachers[self.leader],
            "p_top1": float(self.p_top1[self.leader]),
            "runner_up": self.teachers[runner_up],
            "margin": margin,
            "rsr": {t: float(v) for t, v in zip(self.teachers, self.rsr)},
            "p_values": {t: float(p) for i, (t, p) in enumerate(zip(self.teachers, self.p_values)) if i != self.leader},
            "level": self.level,
            "n_draws": self.n_draws,
            "tied": [self.teachers[i] for i in self.tied],
            "bound": self.bound,
        }


def exchange_p_value(sums: ProblemSums, leader: int, other: int, exchange: np.ndarray) -> float:
    """The share of label exchanges (the observed labels counted as one) in which the two teachers' dataset
    RSRs differ by at least as much as observed, in either direction."""
    rank, surprisal = sums.rank[:, [leader, other]], sums.surprisal[:, [leader, other]]
    moved_rank, moved_surprisal = exchange @ (rank[:, 1] - rank[:, 0]), exchange @ (surprisal[:, 1] - surprisal[:, 0])
    totals_rank, totals_surprisal = rank.sum(axis=0), surprisal.sum(axis=0)
    exchanged = (totals_rank[0] + moved_rank) / (totals_surprisal[0] + moved_surprisal) - (totals_rank[1] - moved_rank) / (
        totals_surprisal[1] - moved_surprisal
    )
    observed = abs(totals_rank[0] / totals_surprisal[0] - totals_rank[1] / totals_surprisal[1])
    at_least = np.abs(exchanged) >= observed * (1 - 1e-12)  # float-equal differences count as reached
    return float((1 + at_least.sum()) / (1 + len(exchange)))


def leader_p_values(sums: ProblemSums, exchange: np.ndarray) -> tuple[int, np.ndarray]:
    """The leader (the most suitable RSR) and each teacher's p-value against it (NaN: the leader)."""
    leader = int(np.argmax(suitability(sums.rsr(np.ones(sums.n_problems)))))
    p_values = [np.nan if j == leader else exchange_p_value(sums, leader, j, exchange) for j in range(sums.rank.shape[1])]
    return leader, np.array(p_values)


def separated(p_values: np.ndarray, leader: int, level: float) -> bool:
    """The decision: the leader differs from every other teacher at the level."""
    return bool(np.all(np.delete(p_values, leader) <= level))


def decides(sums: ProblemSums, exchange: np.ndarray, level: float) -> bool:
    """The decision alone, as `look` makes it."""
    leader, p_values = leader_p_values(sums, exchange)
    return separated(p_values, leader, level)


def look(
    sums: ProblemSums, teachers: list[str], resampled: np.ndarray, exchange: np.ndarray, confidence: float, n_looks: int
) -> Look:
    """The decision on the problems of `sums`, with the label `exchange`s of the test and the bootstrap's
    `resampled` [resample, teacher] RSR (`teachers.bootstrap_rsr`) for P(top1) and the intervals."""
    leader, p_values = leader_p_values(sums, exchange)
    alpha = 1 - confidence
    interval = np.percentile(resampled - resampled[:, [leader]], [100 * alpha / 2, 100 * (1 - alpha / 2)], axis=0).T
    return Look(
        teachers=teachers,
        n_problems=sums.n_problems,
        rsr=sums.rsr(np.ones(sums.n_problems)),
        p_top1=share_first(resampled),
        leader=leader,
        p_values=p_values,
        difference_interval=interval,
        level=comparison_level(confidence, len(teachers), n_looks),
        n_draws=len(exchange),
    )


def look_at(
    sums: ProblemSums, teachers: list[str], confidence: float, n_looks: int, seed: int, resampled: np.ndarray | None = None
) -> Look:
    """`look` with as many seeded exchanges as its level needs: what `jobs.decide` does at each wave. The
    bootstrap is the teacher table's (`teachers.bootstrap_rsr` with the seed and 1,000 resamples), unless
    the caller already drew it."""
    n_draws = draws_for(comparison_level(confidence, len(teachers), n_looks))
    resampled = bootstrap_rsr(sums, 1000, seed) if resampled is None else resampled
    return look(sums, teachers, resampled, exchanges(sums.n_problems, n_draws, seed), confidence, n_looks)


def subset(sums: ProblemSums, problems: slice | np.ndarray, teachers: list[int] | None = None) -> ProblemSums:
    columns = slice(None) if teachers is None else teachers
    return ProblemSums(sums.rank[problems][:, columns], sums.surprisal[problems][:, columns])


def swapped(sums: ProblemSums, swap: np.ndarray) -> ProblemSums:
    """Two teachers' sums with their labels exchanged on the problems where `swap` is true."""
    order = np.where(swap[:, None], [1, 0], [0, 1])
    return ProblemSums(np.take_along_axis(sums.rank, order, axis=1), np.take_along_axis(sums.surprisal, order, axis=1))


def false_decisions(sums: ProblemSums, sizes: list[int], confidence: float, seed: int, n_swaps: int) -> int:
    """How many of `n_swaps` seeded label swaps of two teachers' per-problem sums (rows in wave order) end in
    a decision at some look of the schedule `sizes` (`teachers.sample_sizes`): each swap makes the two
    teachers exchangeable, so every decision is a false one. Each look decides as `look_at` does, with
    the exchanges it draws."""
    level = comparison_level(confidence, 2, len(sizes))
    drawn = {n: exchanges(n, draws_for(level), seed) for n in sizes}
    rng = np.random.default_rng(seed)
    decided = 0
    for _ in range(n_swaps):
        labelled = swapped(sums, rng.random(sums.n_problems) < 0.5)
        decided += any(decides(subset(labelled, slice(0, n)), drawn[n], level) for n in sizes)
    return decided


def verdict_text(student: str, look: Look) -> str:
    """The verdict in words: decided or not, the first teacher and its P(top1), the teachers it cannot be
    separated from and how far apart they may be, and the problems used."""
    leader, p_top1 = look.teachers[look.leader], look.p_top1[look.leader]
    if look.decided:
        return (
            f"{student}: decided on {look.n_problems} problems: {leader} is the most suitable teacher (P(top1) "
            f"{p_top1:.2f}; it differs from every other teacher at p <= {look.level:.2g})."
        )
    tied = [look.teachers[i] for i in look.tied]
    return (
        f"{student}: undecided on {look.n_problems} problems: {leader} leads (P(top1) {p_top1:.2f}) but cannot be "
        f"separated from {', '.join(tied)}: they differ by at most {look.bound:.3f} RSR."
    )
