"""Scoring in waves until the teacher decision is made (`jobs.decide`).

The corpus is scored in waves of nested seeded samples of problems, each answered by every teacher:
`input.sample` with `shared_by`, whose draws are nested (the n problems with the smallest seeded hash),
so each wave holds the one before and, as an incremental run into the job's output, scores only the new
problems. After each wave every student still undecided gets a look (`pipeline.decide.sequential`) on
that wave's problems only; a decided student leaves the later waves. The schedule (start, 2 x start, ...
up to the maximum) is fixed before the first wave, and the rule's level accounts for all of its looks.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from pipeline.decide.query import latest_scores
from pipeline.decide.sequential import Look, look_at, verdict_text
from pipeline.decide.teachers import match_problems, problem_sums, sample_sizes
from pipeline.run.config import ConfigError, JobConfig, SampleConfig, row_columns, validate
from pipeline.run.job import RunResult, ensure_ray, plan_run, run_job
from pipeline.run.survey import group_hash, survey_corpus


@dataclass(frozen=True)
class WaveSpec:
    """What `jobs.decide` takes from its command line."""

    by: str
    teacher_column: str
    confidence: float = 0.95
    start: int = 10
    max_problems: int | None = None  # None: every problem answered by every teacher
    seed: int = 0


@dataclass
class StudentTrack:
    """One student's way through the waves."""

    name: str
    looks: list[Look] = field(default_factory=list)
    waves: list[dict] = field(default_factory=list)
    rows: pd.DataFrame | None = None  # its scored rows on the last wave's problems: the final report's

    @property
    def rows_scored(self) -> int:
        return 0 if self.rows is None else len(self.rows)

    @property
    def tokens_scored(self) -> int:
        return 0 if self.rows is None else int(self.rows["resp_token_length"].sum())

    @property
    def decided(self) -> bool:
        return bool(self.looks) and self.looks[-1].decided

    def verdict(self) -> dict:
        """JSON-ready: decided or undecided, the first teacher, and the teachers it cannot be told from."""
        last = self.looks[-1] if self.looks else None
        if last is None:
            return {"verdict": "undecided", "teacher": None, "p_top1": None, "n_problems": 0, "rows_scored": 0,
                    "tokens_scored": 0, "undecided": None, "waves": self.waves}  # fmt: skip
        tied = [last.teachers[i] for i in last.tied]
        return {
            "verdict": "decided" if last.decided else "undecided",
            "teacher": last.teachers[last.leader],
            "p_top1": float(last.p_top1[last.leader]),
            "n_problems": last.n_problems,
            "rows_scored": self.rows_scored,
            "tokens_scored": self.tokens_scored,
            "undecided": None if last.decided else {"teachers": [last.teachers[last.leader], *tied], "bound": last.bound},
            "waves": self.waves,
        }


@dataclass
class Waves:
    """What the waves did: per student its track, per wave one summary (JSON-ready)."""

    spec: WaveSpec
    sizes: list[int]
    corpus_rows: int  # parsed rows of the corpus, per student
    teachers: list[str]
    students: dict[str, StudentTrack]
    waves: list[dict] = field(default_factory=list)

    @property
    def rows_scored(self) -> int:
        return sum(wave["rows_scored"] for wave in self.waves)

    def share_of_corpus(self) -> float:
        return self.rows_scored / max(self.corpus_rows * len(self.students), 1)


def wave_config(cfg: JobConfig, spec: WaveSpec, n: int, students: list[str]) -> JobConfig:
    """The job's config for a wave of n problems: the sample, incremental output, the undecided students."""
    sample = SampleConfig(by=spec.by, n=n, seed=spec.seed, shared_by=spec.teacher_column)
    return dataclasses.replace(
        cfg,
        input=dataclasses.replace(cfg.input, sample=sample),
        output=dataclasses.replace(cfg.output, mode="auto"),  # incremental once the output holds a run
        students=[s for s in cfg.students if s.name in students],
    )


def check_spec(cfg: JobConfig, spec: WaveSpec) -> JobConfig:
    """The checks that need no corpus; the job's config with the largest wave's sample, validated."""
    if not 0 < spec.confidence < 1:
        raise ConfigError(f"--confidence must lie between 0 and 1, got {spec.confidence}")
    if spec.start < 1:
        raise ConfigError(f"--start must be >= 1, got {spec.start}")
    if spec.max_problems is not None and spec.max_problems < spec.start:
        raise ConfigError(f"--max-problems {spec.max_problems} is below --start {spec.start}")
    columns = row_columns(cfg.input)
    for option, column in (("--by", spec.by), ("--teacher-column", spec.teacher_column)):
        if column not in columns:
            raise ConfigError(f"{option} {column!r} is not a column of the scored rows ({columns}); add it to input.passthrough")
    largest = wave_config(cfg, spec, spec.max_problems or 2**62, [s.name for s in cfg.students])
    validate(largest)
    return largest


@dataclass(frozen=True)
class WavePlan:
    order: list[str]  # the problems of the largest wave, in the order the samples draw them
    teachers: list[str]
    eligible: int  # problems answered by every teacher
    corpus_rows: int  # the corpus's parsed rows


def plan_waves(cfg: JobConfig, spec: WaveSpec, quiet: bool) -> WavePlan:
    """Before anything is scored: one survey of the corpus for its teachers and the problems every teacher
    answered, in sample order. Bad input is a ConfigError here."""
    largest = check_spec(cfg, spec)
    plan = plan_run(largest)
    ensure_ray(largest, quiet)
    survey = survey_corpus(largest, plan.contract, plan.corpus)
    groups = survey.sample
    teachers = sorted(groups.shared_values)
    if not teachers:
        raise ConfigError(f"no valid row has a value in --teacher-column {spec.teacher_column!r}")
    if len(teachers) < 2:
        raise ConfigError(f"--teacher-column {spec.teacher_column!r} has one teacher ({teachers[0]}): nothing to decide")
    if not groups.eligible:
        raise ConfigError(f"no {spec.by} is answered by every one of the {len(teachers)} teachers ({', '.join(teachers)})")
    if spec.start > groups.eligible:
        raise ConfigError(f"--start {spec.start} is more than the {groups.eligible} {spec.by} answered by every teacher")
    order = sorted(groups.chosen, key=lambda group: group_hash(group, spec.seed))
    return WavePlan(order, teachers, groups.eligible, survey.trajectories)


def run_waves(
    cfg: JobConfig, spec: WaveSpec, quiet: bool = False, say: Callable[[str], None] = print,
    progress: Callable[[str], None] | None = None,
) -> Waves:  # fmt: skip
    """Plan, then score wave after wave until every student is decided or the schedule ends."""
    started = time.perf_counter()
    plan = plan_waves(cfg, spec, quiet)
    sizes = sample_sizes(len(plan.order), spec.start)
    say(f"{plan.eligible} {spec.by} answered by all {len(plan.teachers)} teachers; waves of {', '.join(map(str, sizes))} "
        f"problems (planned in {time.perf_counter() - started:.1f} s)")  # fmt: skip
    waves = Waves(spec, sizes, plan.corpus_rows, plan.teachers, {s.name: StudentTrack(s.name) for s in cfg.students})
    for k, n in enumerate(sizes, start=1):
        undecided = [name for name, track in waves.students.items() if not track.decided]
        if not undecided:
            break
        result = run_job(wave_config(cfg, spec, n, undecided), quiet=quiet, progress=progress)
        chosen = result.sample.chosen
        if set(plan.order[:n]) != chosen:
            raise RuntimeError(f"wave {k}: the corpus changed since the waves were planned (its sample is not the planned one)")
        scores = latest_scores(result.output, cfg.storage)
        looks = {name: decide_wave(waves.students[name], scores, chosen, spec, len(sizes)) for name in undecided}
        scored = sum(row["scored"] for row in result.counts.to_pylist())
        waves.waves.append(
            {
                "wave": k,
                "n_problems": n,
                "students": undecided,
                "rows_scored": scored,
                "wall_s": result.wall_s,
                "fixed_s": result.fixed_s,
                "tokens_scored": result.tokens_scored,
            }
        )
        say(wave_line(waves, k, result, looks, time.perf_counter() - started))
    return waves


def decide_wave(track: StudentTrack, scores: pd.DataFrame, chosen: frozenset[str], spec: WaveSpec, n_looks: int) -> Look | None:
    """The student's look on the wave's problems only (the output may hold others)."""
    track.rows = mine = scores[(scores["student"] == track.name) & scores[spec.by].astype(str).isin(chosen)]
    matched = match_problems(mine, spec.teacher_column, spec.by)
    if len(matched.teachers) < 2 or not matched.problems:
        track.waves.append({"n_problems": 0, "decided": False, "note": "no problem with a scored trajectory of every teacher"})
        return None
    look = look_at(problem_sums(matched, spec.teacher_column, spec.by), [str(t) for t in matched.teachers], spec.confidence, n_looks, spec.seed)  # fmt: skip
    track.looks.append(look)
    track.waves.append(look.summary() | {"rows_scored": track.rows_scored, "tokens_scored": track.tokens_scored})
    return look


def wave_line(waves: Waves, k: int, result: RunResult, looks: dict[str, Look | None], elapsed: float) -> str:
    wave = waves.waves[-1]
    parts = [
        f"wave {k} of {len(waves.sizes)}: {wave['n_problems']} problems; {wave['rows_scored']} rows scored in the wave, "
        f"{waves.rows_scored} in all ({waves.share_of_corpus():.1%} of the corpus)"
    ]
    for name, look in looks.items():
        parts.append(f"{name}: " + (describe_look(look) if look else "no problem with every teacher scored"))
    parts.append(f"{elapsed:.1f} s elapsed (this wave {result.wall_s:.1f} s, of which fixed {result.fixed_s:.1f} s)")
    return "; ".join(parts)


def describe_look(look: Look) -> str:
    runner_up, margin = look.margin()
    state = "decided" if look.decided else "undecided"
    return (
        f"{look.teachers[look.leader]} leads {look.teachers[runner_up]} by {margin:.3f} RSR, largest p-value "
        f"{np.nanmax(look.p_values):.3g} (needs <= {look.level:.2g}): {state}"
    )


def verdict_sentence(track: StudentTrack) -> str:
    if not track.looks:
        return f"{track.name}: undecided: no problem had a scored trajectory from every teacher."
    return verdict_text(track.name, track.looks[-1])
