"""A run's settings: one frozen object, resolved once from the config, the students' checks and the
cluster's GPUs before anything is scored, then handed to the stages, the scoring actors and the
students. Every `auto` is resolved here or by the device policy this calls (`DevicePolicy.choose`);
nothing downstream reads the config's scoring or compute sections again. Two sizes are left to where
they can be known: a GPU's token budget and logits chunk (from the memory left free once its student is
loaded, `DevicePolicy.sized_for`) and an actor's torch threads (from its node's CPUs,
`stages.score.default_torch_threads`)."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.run.config import JobConfig, actor_bounds
from pipeline.run.schema import RowContract, ScoringSettings
from pipeline.scoring.device import DevicePolicy
from pipeline.scoring.models import StudentSource
from pipeline.scoring.options import ScoringOptions
from pipeline.tokens.scopes import DEFAULT_SCOPE

# `scoring.batch_tokens` auto: about a minute of scoring per call (a 135M student on 2 cores, a 7B on one
# GPU), so that results, checkpoints and progress keep coming whatever the row lengths, and batches fill.
CPU_BATCH_TOKENS, GPU_BATCH_TOKENS = 32768, 1048576


@dataclass(frozen=True)
class StudentCheck:
    """What the driver learned of a student before Ray starts (`job.check_students`)."""

    source: StudentSource
    chat_template: str  # the effective template
    tokens_from: str  # where its tokens come from (`StudentSource.tokens_from`)
    window: int  # the positions it was trained on
    max_model_len: int  # the smaller of `scoring.max_model_len` and its window
    revision: str  # `StudentSource.revision`

    def describe(self, name: str) -> str:
        return f"student {name}: tokens from {self.tokens_from}; window {self.window}, max_model_len {self.max_model_len}"


@dataclass(frozen=True)
class StudentSettings:
    """One student: where its weights and tokens come from, how it scores on its device, and what changes
    its numbers (`scoring`, whose fingerprint is in every score row and in the incremental key)."""

    name: str
    source: StudentSource
    tokens_from: str
    policy: DevicePolicy  # device, dtype, attention and per-pass sizes (GPU sizes 0: from free memory)
    scoring: ScoringSettings

    @property
    def fingerprint(self) -> str:
        return self.scoring.fingerprint

    def manifest(self) -> dict:
        return {"name": self.name, "revision": self.scoring.student_revision, "fingerprint": self.fingerprint,
                "tokens_from": self.tokens_from, "settings": self.scoring.as_dict()}  # fmt: skip


@dataclass(frozen=True)
class RunSettings:
    students: tuple[StudentSettings, ...]
    core: ScoringOptions  # what the scoring core computes, every student's
    truncate: bool  # rows longer than max_model_len: truncated (and flagged) or rejected
    reasoning: str
    scope: str
    batch_tokens: int  # tokens handed to a scoring actor at a time
    gpus_per_actor: float
    cpus_per_actor: float
    actors: tuple[int, int | None]  # per student, the pool's (min, max); max None: what the cluster allows
    torch_threads: int | None  # None: from the node an actor runs on

    @property
    def scoring_actors(self) -> int | None:
        """The most scoring actors of all students at once; None: as many as fit."""
        return None if self.actors[1] is None else self.actors[1] * len(self.students)


def resolve_settings(cfg: JobConfig, contract: RowContract, checks: list[StudentCheck], cluster_gpus: float) -> RunSettings:
    """The run's settings. Actors get a GPU each unless `compute.gpus_per_actor` says otherwise when the
    cluster has one; a student's `auto` dtype follows its device (bfloat16 on GPU, float32 on CPU)."""
    s, compute = cfg.scoring, cfg.compute
    gpus = compute.gpus_per_actor if compute.gpus_per_actor is not None else (1 if cluster_gpus > 0 else 0)
    students = []
    for student, check in zip(cfg.students, checks):
        policy = DevicePolicy.choose(
            "cuda" if gpus else "cpu", student.dtype, _number(s.token_budget), _number(s.logits_chunk_tokens)
        )
        logits_dtype = policy.dtype if s.logits_dtype == "model" else s.logits_dtype
        scoring = ScoringSettings(  # optional settings only when they differ: older outputs keep their fingerprints
            student_revision=check.revision, chat_template=check.chat_template, reasoning=s.reasoning, rank_clip=s.rank_clip,
            max_model_len=check.max_model_len, on_too_long=s.on_too_long, metrics=contract.metrics, dtype=policy.dtype,
            logits_dtype=logits_dtype if logits_dtype != policy.dtype else None,
            scope=s.scope if s.scope != DEFAULT_SCOPE else None,
        )  # fmt: skip
        students.append(StudentSettings(student.name, check.source, check.tokens_from, policy, scoring))
    batch_tokens = _number(s.batch_tokens) or (GPU_BATCH_TOKENS if gpus else CPU_BATCH_TOKENS)
    core = ScoringOptions(
        rank_clip=s.rank_clip, metrics=contract.metrics, prompt_cache_tokens=s.prompt_cache_tokens, logits_dtype=s.logits_dtype
    )
    return RunSettings(
        tuple(students), core, s.on_too_long == "truncate",
        s.reasoning, s.scope, batch_tokens, gpus, compute.cpus_per_actor, actor_bounds(compute.actors_per_student), compute.torch_threads,
    )  # fmt: skip


def _number(setting: str) -> int | None:
    """A size setting's number; None for auto."""
    return None if setting == "auto" else int(setting)
