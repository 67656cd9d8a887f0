"""The decision for every student: its teachers on matched problems with their uncertainty and verdict,
the problems the choice needs, RSR at equal length, agreement with a known ranking and the confounds. pandas
and numpy only, so that notebooks import it without the scoring core (torch) or Ray."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from pipeline.decide.sequential import Look, look_at
from pipeline.decide.teachers import (
    Matched,
    Settings,
    agreement,
    bootstrap_rsr,
    confounds,
    drop_truncated_groups,
    length_adjusted,
    match_problems,
    problem_sums,
    sample_size_curve,
    teacher_table,
    win_probabilities,
)


@dataclass(frozen=True)
class StudentDecision:
    student: str
    rows: pd.DataFrame  # the matched rows the decision rests on
    teachers: pd.DataFrame
    wins: pd.DataFrame
    sample_size: pd.DataFrame
    confounds: pd.DataFrame
    length_adjusted: pd.DataFrame
    verdict: Look  # decided or not at the settings' confidence, over their number of looks
    agreement: dict | None


@dataclass(frozen=True)
class Decision:
    settings: Settings
    students: list[StudentDecision]  # students with at least one matched problem
    matching: dict  # per student (all of them): what matched, what was left out (JSON-ready)

    def table(self, name: str) -> pd.DataFrame:
        """teachers, sample_size, confounds or length_adjusted of every student, one after the other."""
        parts = [getattr(s, name) for s in self.students]
        return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def decide(scores: pd.DataFrame, settings: Settings, reference: pd.DataFrame | None = None) -> Decision:
    """The decision for every student in `scores`. `reference`: columns teacher, score (higher =
    better) and optionally student (one ranking per student)."""
    students, matching = [], {}
    for student, mine in scores.groupby("student", sort=True):
        dropped = None
        if settings.drop_truncated_groups and "truncated" in mine:
            mine, dropped = drop_truncated_groups(mine, settings.group_column)
        matched = match_problems(mine, settings.teacher_column, settings.group_column)
        matching[str(student)] = matched.counts if dropped is None else matched.counts | {"dropped_truncated_groups": dropped}
        if matched.problems:
            students.append(decide_student(str(student), matched, settings, reference))
    return Decision(settings, students, matching)


def decide_student(student: str, matched: Matched, settings: Settings, reference: pd.DataFrame | None) -> StudentDecision:
    sums = problem_sums(matched, settings.teacher_column, settings.group_column)
    point = sums.rsr(np.ones(sums.n_problems))
    resampled = bootstrap_rsr(sums, settings.n_resamples, settings.seed)
    agreed = None
    if reference is not None:
        mine = reference[reference["student"].astype(str) == student] if "student" in reference else reference
        agreed = agreement(mine.set_index(mine["teacher"].astype(str))["score"], matched.teachers, point, resampled)
    return StudentDecision(
        student=student,
        rows=matched.rows,
        teachers=teacher_table(student, matched, settings, point, resampled),
        wins=win_probabilities(resampled, matched.teachers),
        sample_size=sample_size_curve(sums, settings).assign(student=student)[["student", "n_problems", "share_same_first"]],
        confounds=confounds(student, matched.rows, settings),
        length_adjusted=length_adjusted(student, matched, settings),
        verdict=look_at(
            sums, [str(t) for t in matched.teachers], settings.confidence, settings.n_looks, settings.seed, resampled
        ),
        agreement=agreed,
    )
