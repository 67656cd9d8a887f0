"""The decision behind the teacher report: which teacher suits each student, how sure that is, how many
problems the choice needs, whether it agrees with a known ranking, and what else the scores move with.
pandas, numpy and scipy only, so that notebooks import it without the scoring core (torch) or Ray.

Teachers are compared on matched problems only: per student, the problems (values of the group column)
that every teacher has at least one scored trajectory for. Rows outside them are counted, never mixed
in. A teacher's RSR is the paper's dataset RSR over its matched trajectories (sum of avg_rank_clip /
sum of avg_surprisal, every trajectory of a problem counted). Uncertainty comes from a paired bootstrap
over matched problems: each resample draws problems with replacement and scores every teacher on the
same draw, so a resample compares teachers on the same problems as the decision does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

from pipeline.decide.length import LengthFit
from pipeline.scoring.metrics import BY_COLUMN, COMPANIONS, MIN_SURPRISAL_SUM, REGISTRY

RSR = BY_COLUMN["rank_surprisal_ratio"]
DIRECTION = f"{'lower' if RSR.lower_is_better else 'higher'} RSR = more suitable"
LENGTH = "resp_token_length"
SURPRISAL = "avg_surprisal"
# RSR first, then the metrics whose confounds are reported beside it (those present in the scores).
CONFOUNDED = ["rank_surprisal_ratio", SURPRISAL, *(m.column for m in COMPANIONS)]
MIN_GROUP_SIZE = 3  # a within-problem Spearman needs three trajectories to say more than a sign
# Per-trajectory flags that users filter on: (score column, teacher-table column, the per-row value
# averaged per teacher). Scores without the column skip it (degenerate and assistant_turns are newer).
FLAGS = (
    ("truncated", "share_truncated", lambda column: column.eq(True)),
    ("degenerate", "share_degenerate", lambda column: column.notna()),  # a reason, or null
    ("assistant_turns", "mean_assistant_turns", lambda column: column),
)


@dataclass(frozen=True)
class Settings:
    """What `jobs.report` takes from its command line, and the sample-size curve's shape."""

    teacher_column: str = "source"
    group_column: str = "problem_id"
    n_resamples: int = 1000
    seed: int = 0
    correct_column: str | None = "is_correct"
    drop_truncated_groups: bool = False
    n_subsamples: int = 200  # per size of the sample-size curve
    smallest_sample: int = 10
    confidence: float = 0.95  # of the verdict (`pipeline.decide.sequential`) ...
    n_looks: int = 1  # ... made at the last of this many looks (`jobs.decide`'s waves)


# --- correlations and separation ---------------------------------------------------------------------


def _varies(values: np.ndarray) -> bool:
    return len(values) > 1 and bool(np.ptp(values) > 0)


def spearman(x, y) -> float:
    """Spearman's rho (`scipy.stats.spearmanr`, ties at their average rank) over the pairs where both values
    are known; NaN when either side is constant."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    known = ~(np.isnan(x) | np.isnan(y))
    x, y = x[known], y[known]
    return float(stats.spearmanr(x, y).statistic) if _varies(x) and _varies(y) else float("nan")


def kendall_tau_b(x, y) -> float:
    """Kendall's tau-b (`scipy.stats.kendalltau`'s default variant); NaN when either side is constant."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    return float(stats.kendalltau(x, y).statistic) if _varies(x) and _varies(y) else float("nan")


def within_group_spearman(x: pd.Series, y: pd.Series, groups: pd.Series) -> tuple[float, int]:
    """The mean of the Spearman correlations of x and y inside each group (problem) of at least
    MIN_GROUP_SIZE rows whose x and y both vary, and how many groups that is."""
    frame = pd.DataFrame({"x": x.to_numpy(float), "y": y.to_numpy(float), "group": groups.to_numpy()}).dropna()
    by_group = frame.groupby("group")
    ranks = by_group[["x", "y"]].rank()
    centered = ranks - ranks.groupby(frame["group"]).transform("mean")
    sums = (
        pd.DataFrame(
            {"xy": centered["x"] * centered["y"], "xx": centered["x"] ** 2, "yy": centered["y"] ** 2, "group": frame["group"]}
        )
        .groupby("group")[["xy", "xx", "yy"]]
        .sum()
    )
    usable = (by_group.size() >= MIN_GROUP_SIZE) & (sums["xx"] > 0) & (sums["yy"] > 0)
    correlations = sums["xy"][usable] / np.sqrt(sums["xx"][usable] * sums["yy"][usable])
    return (float(correlations.mean()) if len(correlations) else float("nan")), int(usable.sum())


def suitability_auc(values: pd.Series, correct: pd.Series, lower_is_better: bool) -> float:
    """The probability that the metric rates a correct trajectory more suitable than an incorrect one
    (ties count half): the Mann-Whitney U of the correct trajectories over the pairs. 0.5 is no separation."""
    turned = (-values if lower_is_better else values).to_numpy(float)
    mask = correct.to_numpy(bool)
    n_correct, n_incorrect = int(mask.sum()), int((~mask).sum())
    if not n_correct or not n_incorrect:
        return float("nan")
    return float(stats.mannwhitneyu(turned[mask], turned[~mask]).statistic / (n_correct * n_incorrect))


def correctness(column: pd.Series) -> pd.Series:
    """A passthrough correctness column as booleans (true/1 as text, any case); rows without a value dropped."""
    known = column.dropna()
    return known.astype(str).str.lower().isin(["true", "1"])


# --- matching ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Matched:
    rows: pd.DataFrame  # the student's rows on matched problems
    teachers: list  # sorted: the order of every per-teacher array (ProblemSums' columns)
    problems: list  # sorted: ProblemSums' rows
    counts: dict  # how many problems and rows matched, and what was left out (JSON-ready)


def drop_truncated_groups(mine: pd.DataFrame, group_column: str) -> tuple[pd.DataFrame, dict]:
    """The student's rows without the problems where any of its trajectories was truncated. A truncated
    trajectory is scored on its beginning only; dropping its whole problem, not the row, keeps every
    teacher on the same problems."""
    truncated = mine["truncated"].eq(True).groupby(mine[group_column], dropna=False).transform("any")
    dropped = mine[group_column][truncated]
    return mine[~truncated], {"problems": int(dropped.nunique()), "rows": int(len(dropped))}


def match_problems(mine: pd.DataFrame, teacher_column: str, group_column: str) -> Matched:
    """The problems every teacher of this student answered, their rows, and counts of the rest."""
    keyed = mine.dropna(subset=[teacher_column, group_column])
    teachers = sorted(keyed[teacher_column].unique())
    teachers_per_problem = keyed.groupby(group_column)[teacher_column].nunique()
    problems = sorted(teachers_per_problem.index[teachers_per_problem == len(teachers)])
    is_matched = mine[teacher_column].notna() & mine[group_column].isin(problems)
    matched, unmatched = mine[is_matched], mine[~is_matched]
    counts = {
        "teachers": [str(t) for t in teachers],
        "n_problems": int(len(teachers_per_problem)),
        "n_problems_matched": len(problems),
        "n_rows": len(mine),
        "n_rows_matched": len(matched),
        "n_rows_unmatched": len(mine) - len(matched),
        "n_rows_without_teacher_or_problem": len(mine) - len(keyed),
        "unmatched_rows_by_teacher": {str(t): int(n) for t, n in unmatched[teacher_column].value_counts().sort_index().items()},
    }
    return Matched(matched, teachers, problems, counts)


# --- RSR on problems ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProblemSums:
    """Per matched problem (rows) and teacher (columns): the sums of avg_rank_clip and avg_surprisal
    over that teacher's trajectories of that problem."""

    rank: np.ndarray
    surprisal: np.ndarray

    @property
    def n_problems(self) -> int:
        return self.rank.shape[0]

    def rsr(self, weights: np.ndarray) -> np.ndarray:
        """Every teacher's dataset RSR over the problems weighted by `weights` (how many times each is drawn)."""
        return (weights @ self.rank) / np.maximum(weights @ self.surprisal, MIN_SURPRISAL_SUM)


def problem_sums(matched: Matched, teacher_column: str, group_column: str) -> ProblemSums:
    sums = matched.rows.groupby([group_column, teacher_column])[["avg_rank_clip", SURPRISAL]].sum()

    def grid(column: str) -> np.ndarray:
        return sums[column].unstack(teacher_column).reindex(index=matched.problems, columns=matched.teachers).to_numpy()

    return ProblemSums(grid("avg_rank_clip"), grid(SURPRISAL))


def suitability(rsr: np.ndarray) -> np.ndarray:
    """RSR turned so that higher is more suitable, whichever its registered direction."""
    return -rsr if RSR.lower_is_better else rsr


def problem_draws(n_problems: int, n_resamples: int, seed: int):
    """Per resample, how many times each problem is drawn: resample b draws `rng.integers(0, n_problems,
    size=n_problems)` from `np.random.default_rng(seed)`, indices into the sorted matched problems. One at a
    time: memory stays n_problems, not n_resamples x n_problems."""
    rng = np.random.default_rng(seed)
    for _ in range(n_resamples):
        yield np.bincount(rng.integers(0, n_problems, size=n_problems), minlength=n_problems).astype(float)


def bootstrap_rsr(sums: ProblemSums, n_resamples: int, seed: int) -> np.ndarray:
    """[resample, teacher] RSR over `problem_draws`, the same draw for every teacher."""
    return np.array([sums.rsr(weights) for weights in problem_draws(sums.n_problems, n_resamples, seed)])


def share_first(resampled: np.ndarray) -> np.ndarray:
    """Per teacher, the share of resamples in which it is the most suitable."""
    first = suitability(resampled).argmax(axis=1)
    return np.bincount(first, minlength=resampled.shape[1]) / len(resampled)


def win_probabilities(resampled: np.ndarray, teachers: list) -> pd.DataFrame:
    """P(row teacher more suitable than column teacher) over the resamples; the diagonal is empty."""
    turned = suitability(resampled)
    wins = (turned[:, :, None] > turned[:, None, :]).mean(axis=0)
    np.fill_diagonal(wins, np.nan)
    names = [str(t) for t in teachers]
    return pd.DataFrame(wins, index=pd.Index(names, name="more suitable"), columns=pd.Index(names, name="than"))


def sample_sizes(n_problems: int, smallest: int) -> list[int]:
    """smallest, 2 x smallest, 4 x smallest, ... below n_problems, then n_problems itself."""
    sizes = []
    while smallest < n_problems:
        sizes.append(smallest)
        smallest *= 2
    return [*sizes, n_problems]


def sample_size_curve(sums: ProblemSums, settings: Settings) -> pd.DataFrame:
    """For each size n below all matched problems, the share of seeded subsamples of n matched problems
    (without replacement) whose most suitable teacher is the one all matched problems give."""
    first = suitability(sums.rsr(np.ones(sums.n_problems))).argmax()
    rng = np.random.default_rng(settings.seed)
    rows = []
    for size in sample_sizes(sums.n_problems, settings.smallest_sample)[:-1]:  # at all of them it is 1 by construction
        same = 0
        for _ in range(settings.n_subsamples):
            weights = np.zeros(sums.n_problems)
            weights[rng.choice(sums.n_problems, size=size, replace=False)] = 1.0
            same += suitability(sums.rsr(weights)).argmax() == first
        rows.append({"n_problems": size, "share_same_first": same / settings.n_subsamples})
    return pd.DataFrame(rows, columns=["n_problems", "share_same_first"])


def interval(values: np.ndarray) -> tuple[float, float]:
    """The 95% percentile interval of the finite values (NaN, NaN when there are none)."""
    finite = values[np.isfinite(values)]
    if not len(finite):
        return float("nan"), float("nan")
    low, high = np.percentile(finite, [2.5, 97.5])
    return float(low), float(high)


def agreement(reference: pd.Series, teachers: list, point: np.ndarray, resampled: np.ndarray) -> dict:
    """Kendall's tau-b and Spearman's rho between the reference scores (higher = better, indexed by
    teacher name) and the RSR suitability order, on all matched problems and per resample: positive
    means RSR orders the teachers as the reference does. JSON-ready (NaN as None)."""
    names = [str(t) for t in teachers]
    known = [i for i, name in enumerate(names) if name in reference.index]
    scores = reference.loc[[names[i] for i in known]].to_numpy(float)
    result = {
        "teachers": [names[i] for i in known],
        "missing_from_reference": [name for name in names if name not in reference.index],
        "n_resamples": len(resampled),
    }
    for name, correlate in (("kendall_tau", kendall_tau_b), ("spearman", spearman)):
        per_resample = np.array([correlate(scores, turned) for turned in suitability(resampled[:, known])])
        low, high = interval(per_resample)
        result |= {name: correlate(scores, suitability(point[known])), f"{name}_ci_low": low, f"{name}_ci_high": high}
    return {key: None if isinstance(value, float) and np.isnan(value) else value for key, value in result.items()}


# --- tables ------------------------------------------------------------------------------------------


def teacher_table(student: str, matched: Matched, settings: Settings, point: np.ndarray, resampled: np.ndarray) -> pd.DataFrame:
    """One row per teacher, most suitable first: RSR on the matched problems with its interval and
    p_top1, then the other metrics' dataset-level values and the trajectory flags on the same rows."""
    low, high = np.percentile(resampled, [2.5, 97.5], axis=0)
    table = pd.DataFrame(
        {
            "student": student,
            "teacher": matched.teachers,
            "n_problems": len(matched.problems),
            "rsr": point,
            "rsr_ci_low": low,
            "rsr_ci_high": high,
            "p_top1": share_first(resampled),
            "rank": pd.Series(suitability(point)).rank(ascending=False, method="min").astype(int),
        }
    )
    rows = matched.rows
    by_teacher = rows.groupby(settings.teacher_column)
    others = {m.dataset_column: by_teacher[m.column].mean() for m in REGISTRY if m is not RSR and m.column in rows}
    flags = pd.DataFrame({name: per_row(rows[column]) for column, name, per_row in FLAGS if column in rows}, index=rows.index)
    per_teacher = pd.concat(
        [
            pd.DataFrame({"n_trajectories": by_teacher.size(), "mean_resp_token_length": by_teacher[LENGTH].mean(), **others}),
            flags.groupby(rows[settings.teacher_column]).mean(),
        ],
        axis=1,
    )
    table = table.join(per_teacher, on="teacher")
    table["n_rows_unmatched"] = [matched.counts["unmatched_rows_by_teacher"].get(str(t), 0) for t in matched.teachers]
    return table.sort_values(["rank", "teacher"]).reset_index(drop=True)


def length_adjusted(student: str, matched: Matched, settings: Settings) -> pd.DataFrame:
    """Per teacher (matched.teachers' order), its RSR at equal length (`pipeline.decide.length`) with a 95%
    interval over the teacher table's problem draws, and the length coefficient with its interval."""
    rows = matched.rows
    rows = rows[np.isfinite(rows[RSR.column]) & (rows[RSR.column] > 0) & (rows[LENGTH] > 0)]
    fit = LengthFit(
        rows[RSR.column].to_numpy(float),
        rows[LENGTH].to_numpy(float),
        pd.Categorical(rows[settings.teacher_column], categories=matched.teachers).codes,
        pd.Categorical(rows[settings.group_column], categories=matched.problems).codes,
        len(matched.teachers),
    )
    point = fit.effects()
    draws = problem_draws(len(matched.problems), settings.n_resamples, settings.seed)
    resampled = np.array([fit.effects(weights) for weights in draws])
    low, high = np.array([interval(resampled[:, i]) for i in range(len(point))]).T
    return pd.DataFrame(
        {
            "student": student,
            "teacher": matched.teachers,
            "effect": point[:-1],
            "effect_ci_low": low[:-1],
            "effect_ci_high": high[:-1],
            "length_coefficient": point[-1],
            "length_coefficient_ci_low": low[-1],
            "length_coefficient_ci_high": high[-1],
            "n_trajectories": len(rows),
        }
    ).sort_values(["effect", "teacher"], ascending=[RSR.lower_is_better, True], ignore_index=True)


def confounds(student: str, rows: pd.DataFrame, settings: Settings) -> pd.DataFrame:
    """Per metric: its Spearman correlation with response length and with avg_surprisal, across the
    trajectories and within problems (mean over problems of MIN_GROUP_SIZE+ trajectories where both vary),
    and its AUC for rating correct trajectories more suitable (when there is a correctness column)."""
    correct = correctness(rows[settings.correct_column]) if settings.correct_column in rows else None
    records = []
    for column in [c for c in CONFOUNDED if c in rows]:
        record = {"student": student, "metric": column, "lower_is_better": BY_COLUMN[column].lower_is_better}
        for other, name in ((LENGTH, "length"), (SURPRISAL, "surprisal")):
            within, n_problems = within_group_spearman(rows[column], rows[other], rows[settings.group_column])
            record |= {
                f"spearman_{name}": spearman(rows[column], rows[other]),
                f"spearman_{name}_within_problems": within,
                f"n_problems_within_{name}": n_problems,
            }
        if correct is not None:
            record["auc_correct"] = suitability_auc(rows.loc[correct.index, column], correct, BY_COLUMN[column].lower_is_better)
        records.append(record)
    return pd.DataFrame(records)
