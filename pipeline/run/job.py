"""One scoring run end to end, in named phases: plan (before Ray starts), plan the students, survey
the corpus, score and stream the results into committed pieces, finish (summaries and the run manifest)."""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import secrets
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import pyarrow as pa
import ray
import ray._private.node
from omegaconf import OmegaConf
from ray._private import ray_constants
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from pipeline.corpus.storage import Corpus, Location, check_output, locate, plan_corpus
from pipeline.errors import RowError
from pipeline.run.accounted import (
    FileRecord,
    UnreadFiles,
    earlier_records,
    group_columns,
    run_fingerprint,
    run_records,
    unchanged_files,
)
from pipeline.run.committed import committed_reject_keys, scored_keys
from pipeline.run.config import ConfigError, JobConfig, actor_bounds
from pipeline.run.dataset import build_dataset
from pipeline.run.nodes import NodeWatch
from pipeline.run.output import OutputStore, new_run_id
from pipeline.run.results import (
    METER_NAME,
    Checkpoints,
    Progress,
    ScoringMeter,
    Tally,
    check_accounted,
    measure_block_task,
    padding_efficiency,
)
from pipeline.run.schema import RowContract
from pipeline.run.settings import RunSettings, StudentCheck, resolve_settings
from pipeline.run.stages.base import DatasetPlan, RunStamp
from pipeline.run.survey import CorpusSurvey, GroupSample, survey_corpus
from pipeline.scoring.models import StudentSource
from pipeline.tokens.markers import turn_markers
from pipeline.tokens.tokenizer import BUILTIN_TEMPLATES

logger = logging.getLogger(__name__)


@dataclass
class RunResult:
    run_id: str
    mode: str
    output: str
    counts: pa.Table  # per student: read, scored, rejected, skipped, content_dropped (scored rows)
    summary: pa.Table  # dataset-level RSR per student over this run's scores
    partition_summary: pa.Table | None  # the same per student and partition value
    tokens_scored: int
    wall_s: float
    committed_files: list[str]
    skipped_files: list[str]
    pieces: int  # checkpoints committed
    padding_efficiency: dict[str, float]  # per student: real / padded tokens of its batches
    lock_taken_over: str | None  # why an earlier run's lock was taken over
    sample: GroupSample | None  # with `input.sample`: the groups the run chose
    fixed_s: float  # from the start until the first scoring call began (the whole run when none did)
    unread_files: int  # corpus files left unread: unchanged since a completed run accounted for them
    rows_redone: int  # rows scored again after their actor or node was lost (counted once in the results)


@dataclass(frozen=True)
class RunPlan:
    """What a run knows before Ray starts: its corpus, its output, its columns and its students."""

    corpus: Corpus
    root: Location
    contract: RowContract
    students: list[StudentCheck]
    started: datetime


def plan_run(cfg: JobConfig) -> RunPlan:
    """Everything that can fail without Ray: inputs, output bucket, students' tokenizers and templates."""
    corpus = plan_corpus(cfg.input, cfg.storage)
    root = locate(cfg.output.path, cfg.storage)
    check_output(root)
    return RunPlan(corpus, root, RowContract.of(cfg), check_students(cfg), datetime.now(UTC))


def check_students(cfg: JobConfig) -> list[StudentCheck]:
    """Before Ray starts: each student's weights can be read (a GGUF is converted here, once per node),
    its tokenizer loads (and encodes as its tokenizer.json, or a GGUF's own vocabulary), it has a chat
    template and one whose assistant turns can be found (a base model ships none: every row would be
    rejected), its window caps `scoring.max_model_len`, and its revision can be told."""
    checks = []
    for i, student in enumerate(cfg.students):
        where = f"students.{i} ({student.name})"
        source = StudentSource(student.path, student.tokenizer, student.chat_template, cfg.storage.endpoint_url)
        try:
            tokenizer = source.load_tokenizer()
            window = source.window()
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{where}: cannot load {student.path!r}: {exc}") from exc
        if not tokenizer.chat_template:
            raise ConfigError(
                f"{where}: {student.path!r} has no chat template (a base model?); set students.{i}.chat_template "
                f"to a .jinja file or one of {sorted(BUILTIN_TEMPLATES)}"
            )
        try:
            turn_markers(tokenizer)
        except RowError as exc:
            raise ConfigError(f"{where}: unusable chat template: {exc.detail}") from exc
        try:
            revision = source.revision()
        except FileNotFoundError as exc:
            raise ConfigError(f"{where}: {exc}") from exc
        max_model_len = min(cfg.scoring.max_model_len, window)
        checks.append(StudentCheck(source, tokenizer.chat_template, source.tokens_from(), window, max_model_len, revision))
        print(checks[-1].describe(student.name), flush=True)
    return checks


def ensure_ray(cfg: JobConfig, quiet: bool) -> None:
    """Connect to the configured cluster or start a local runtime; `quiet`: Ray logs warnings and up.
    A local runtime shares nothing with other Ray runtimes on the machine: its own temp dir, loopback
    only, its own auth token, metrics on free ports. (ray.init cannot move the node agent's HTTP port,
    52365: where another runtime holds it, this one's agent serves no HTTP, which only the dashboard's
    job and log APIs use, off here.)"""
    if ray.is_initialized():
        return
    log_level = {"logging_level": logging.WARNING} if quiet else {}
    address = cfg.compute.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **log_level)
        return
    # Ray reads this flag when it is imported, which it was: without the constant it binds the machine's
    # address. The variable is for the processes it starts.
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    # Not ~/.ray/auth_token, which every runtime of this user reads and the first to miss it writes.
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
    # The head's dashboard and autoscaler otherwise serve metrics on fixed ports (44227, 44217).
    for metrics_port in ("DASHBOARD_METRIC_PORT", "AUTOSCALER_METRIC_PORT"):
        os.environ.setdefault(metrics_port, "0")
    # Scoring actors hold their CPUs for the whole run: without logical CPUs beyond theirs, the
    # read and tokenize tasks never get a slot and the job hangs (2 actors on a 2-core machine).
    # auto: as many actors as this machine has cores for.
    most = actor_bounds(cfg.compute.actors_per_student)[1] or max(1, int(os.cpu_count() // cfg.compute.cpus_per_actor))
    actor_cpus = cfg.compute.cpus_per_actor * most * len(cfg.students)
    start_local_ray(num_cpus=int(os.cpu_count() + actor_cpus + 0.999), include_dashboard=False, **log_level)


NODE_START_ATTEMPTS = 3


def start_local_ray(**init_kwargs) -> None:
    """ray.init of a new local runtime in a temp dir of its own. Not /tmp/ray: a plain ray.init() joins
    the cluster named in its ray_current_cluster (written by `ray start` and ray.cluster_utils) instead
    of starting one. Ray's logs of the run stay there.
    Ray gives its raylet a fixed 30 s to register with the GCS, which a machine busy with other work can
    miss: the attempt's processes are stopped and the runtime started afresh."""
    for attempt in range(1, NODE_START_ATTEMPTS + 1):
        temp_dir = tempfile.mkdtemp(prefix="rsr-ray-", dir=os.environ.get("RAY_TMPDIR"))
        try:
            ray.init(_temp_dir=temp_dir, **init_kwargs)
            return
        except Exception as exc:
            if "timed out during startup" not in str(exc) or attempt == NODE_START_ATTEMPTS:
                raise
            _stop_unfinished_node(exc)
            print(f"Ray's node did not register within Ray's 30 s (a busy machine?): starting it again, "
                  f"attempt {attempt + 1} of {NODE_START_ATTEMPTS}", flush=True)  # fmt: skip


def _stop_unfinished_node(exc: BaseException) -> None:
    """Stop the processes of a node whose start raised `exc`: ray.init keeps no handle on a node that
    failed to start, so it is found in the failed constructor's frame."""
    tb = exc.__traceback__
    while tb is not None:
        node = tb.tb_frame.f_locals.get("self")
        if isinstance(node, ray._private.node.Node):
            node.kill_all_processes(check_alive=False, allow_graceful=True)
            return
        tb = tb.tb_next


def resolve_mode(configured: str, has_runs: bool) -> str:
    if configured == "overwrite":
        return "overwrite"
    return "incremental" if has_runs else "full"


def already_scored(settings: RunSettings, store: OutputStore, mode: str) -> tuple:
    """Per student, a reference to the keys it already scored with its fingerprint, read by a Ray task."""
    return tuple(
        scored_keys.remote(store.score_paths(student.name) if mode == "incremental" else [], store.root, student.fingerprint)
        for student in settings.students
    )


def survey_new_files(
    cfg: JobConfig, plan: RunPlan, store: OutputStore, earlier: dict[str, FileRecord]
) -> tuple[Corpus, CorpusSurvey]:
    """The corpus with the files unchanged since the run that recorded them (`earlier`) left unread, and
    its survey: the files read, with the ids and groups of those left unread from their index. A file
    left unread whose rows in the sample's chosen groups were sampled out then is read after all (the
    survey is taken again: the same groups are chosen, its rows were surveyed from the index)."""
    groups = group_columns(cfg)
    index_to, _ = store.inputs_index

    def unread_files(corpus: Corpus) -> UnreadFiles:
        return UnreadFiles(store.root, [earlier[url] for url in corpus.unread], groups)

    corpus = plan.corpus.leaving_unread(unchanged_files(plan.corpus, earlier))
    print(
        f"survey: reading {len(corpus.files):,} of {len(corpus.file_order):,} files for their ids, groups and lengths", flush=True
    )
    found = survey_corpus(cfg, plan.contract, corpus, unread_files(corpus), index_to)
    if found.sample:
        missing = unread_files(corpus).missing_groups(found.sample.chosen)
        if missing:
            corpus = corpus.reading(missing)
            found = survey_corpus(cfg, plan.contract, corpus, unread_files(corpus), index_to)
    return corpus, found


def score_and_commit(
    cfg: JobConfig, settings: RunSettings, plan: RunPlan, store: OutputStore, mode: str, survey: CorpusSurvey,
    progress: Callable[[str], None] | None, watch: NodeWatch,
) -> tuple[Tally, list[str], dict]:  # fmt: skip
    """Stream the results: each block counted where it lives, then added to a piece that is committed
    every checkpoint; then check that they account for every row. Returns the run's tally, its committed
    files and what the scoring actors did (`ScoringMeter.read`). Nothing to read: nothing to do. `watch`
    learns of the meter, to tell what a lost node was scoring."""
    partition_by = list(cfg.output.partition_by)
    if not plan.corpus.files:
        return Tally(partition_by), [], ScoringMeter.NOTHING
    reject_paths = store.reject_paths() if mode == "incremental" else []
    known_rejects = committed_reject_keys.remote(reject_paths, store.root)
    # On the driver's node: a worker node's loss must not take the run's progress and padding with it.
    # Named after the run, so that its progress can be read from outside it (`ray.get_actor`).
    meter = ScoringMeter.options(
        name=f"{METER_NAME}-{store.run_id}",
        scheduling_strategy=NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False),
    ).remote()
    watch.meter = meter
    dataset = build_dataset(DatasetPlan(cfg, settings, plan.contract, plan.corpus, ray.put(survey), RunStamp(store.run_id, plan.started),
                                        already_scored(settings, store, mode), meter))  # fmt: skip
    tally = Tally(partition_by)
    checkpoints = Checkpoints(cfg, plan.contract, store, known_rejects, tally)
    students = [student.name for student in settings.students]
    reporter = Progress(progress, survey.trajectories * len(students), survey.text_bytes * len(students), meter)
    try:
        for bundle in dataset.iter_internal_ref_bundles():
            refs = list(bundle.block_refs)
            for ref, part in zip(refs, ray.get([measure_block_task.remote(ref, partition_by) for ref in refs])):
                tally.add(part)
                checkpoints.add(ref)
            reporter.update()
        reporter.update(last=True)
    finally:
        reporter.stop()
    checkpoints.commit()
    check_accounted(tally, survey.trajectories, students)
    return tally, checkpoints.committed, ray.get(meter.read.remote())


def finish(
    cfg: JobConfig,
    settings: RunSettings,
    plan: RunPlan,
    store: OutputStore,
    mode: str,
    survey: CorpusSurvey,
    tally: Tally,
    padding: dict[str, float],
    inputs: dict,
) -> list[str]:
    """After the last piece: the run's summaries, the index of the files it read and its manifest with
    their `inputs` records (when it committed anything, read any file, or overwrites)."""
    if not (store.pieces_committed or plan.corpus.files or mode == "overwrite"):
        return []
    manifest = {
        "mode": mode,
        "started_at": plan.started.isoformat(),
        "students": [student.manifest() | {"padding_efficiency": padding.get(student.name)} for student in settings.students],
        "counts": tally.counts_table().to_pylist(),
        "input_files": len(plan.corpus.file_order),
        "unread_files": len(plan.corpus.unread),
        "inputs": inputs,
        "sample": {"eligible_groups": survey.sample.eligible, "chosen_groups": len(survey.sample.chosen)}
        if survey.sample
        else None,
        "config": OmegaConf.to_container(OmegaConf.structured(cfg)),
    }
    committed = store.commit_run(manifest, tally.summaries())
    if mode == "overwrite":
        store.drop_earlier_runs()
    return committed


def run_job(cfg: JobConfig, quiet: bool = False, progress: Callable[[str], None] | None = None) -> RunResult:
    """One run: plan, take the output's lock, plan the students, survey the corpus, score while committing
    pieces, finish. `quiet`: Ray logs warnings and up; `progress` receives progress lines."""
    started, started_at = time.perf_counter(), time.time()
    plan = plan_run(cfg)
    lock = {"stale_after_s": cfg.output.lock_stale_minutes * 60, "beat_every_s": cfg.output.lock_heartbeat_seconds}
    with OutputStore(plan.root, new_run_id(plan.started), **lock) as store:
        if store.taken_over:
            logger.warning("%s", store.taken_over)
        mode = resolve_mode(cfg.output.mode, store.has_runs)
        ensure_ray(cfg, quiet)
        settings = resolve_settings(cfg, plan.contract, plan.students, ray.cluster_resources().get("GPU", 0))
        fingerprint = run_fingerprint(cfg, settings)
        earlier = earlier_records(store.manifests, fingerprint) if mode == "incremental" else {}
        needs = {student.name: {"CPU": settings.cpus_per_actor, "GPU": settings.gpus_per_actor} for student in settings.students}
        minutes = cfg.compute.lost_capacity_timeout_minutes
        with NodeWatch(functools.partial(print, flush=True), needs, minutes, lambda: store.pieces_committed) as watch:
            watch.phase = "surveying the corpus"
            corpus, survey = survey_new_files(cfg, plan, store, earlier)
            plan = dataclasses.replace(plan, corpus=corpus)
            unread_rows = sum(earlier[url].rows for url in corpus.unread)
            if corpus.unread:
                print(describe_unread(corpus, unread_rows), flush=True)
            if survey.sample:
                print(survey.sample.describe(cfg.input.sample), flush=True)
            watch.phase = "scoring and committing checkpoints"
            tally, committed, scoring = score_and_commit(cfg, settings, plan, store, mode, survey, progress, watch)
            tally.add_unread(unread_rows, [student.name for student in settings.students])
            padding = padding_efficiency(scoring)
            inputs = {
                "fingerprint": fingerprint,
                "files": run_records(corpus, earlier, survey.rows_per_file, store.inputs_index[1]),
            }
            watch.phase = "committing the run"
            committed += finish(cfg, settings, plan, store, mode, survey, tally, padding, inputs)
    wall_s = time.perf_counter() - started
    return RunResult(
        run_id=store.run_id,
        mode=mode,
        output=plan.root.url(),
        counts=tally.counts_table(),
        summary=tally.summary(("student",)),
        partition_summary=tally.summary(("student", *cfg.output.partition_by)) if cfg.output.partition_by else None,
        tokens_scored=tally.tokens,
        wall_s=wall_s,
        committed_files=committed,
        skipped_files=[plan.corpus.location.url(p) for p in plan.corpus.skipped],
        pieces=store.pieces_committed,
        padding_efficiency=padding,
        lock_taken_over=store.taken_over,
        sample=survey.sample,
        fixed_s=wall_s if scoring["first_at"] is None else scoring["first_at"] - started_at,
        unread_files=len(plan.corpus.unread),
        rows_redone=scoring["redone"],
    )


def describe_unread(corpus: Corpus, rows: int) -> str:
    return (f"unread: {len(corpus.unread):,} of {len(corpus.file_order):,} files ({rows:,} rows), unchanged since a "
            f"completed run accounted for them with the same settings; reading {len(corpus.files):,}")  # fmt: skip
