"""The job's configuration: one typed omegaconf schema, a YAML file and `key=value` overrides.

The key layout is a contract for users and automation: extend it, never rename or remove a key.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline.corpus.shapes import SHAPES, InputShape, selecting_shapes, shape_of
from pipeline.scoring.metrics import METRICS
from pipeline.tokens.scopes import REASONING_MODES, SCOPES
from pipeline.tokens.tokenizer import BUILTIN_TEMPLATES

FORMATS = ("auto", "jsonl", "json", "parquet", "arrow")
DTYPES = ("auto", "float32", "bfloat16", "float16")
OUTPUT_MODES = ("auto", "incremental", "overwrite")
TOO_LONG_POLICIES = ("truncate", "reject")
LOGITS_DTYPES = ("float32", "model")
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class ConfigError(ValueError):
    """A configuration that cannot run; the message says which key and why."""


@dataclass
class SampleConfig:
    """Score only the rows of `n` groups (`by`: a row column such as problem_id): the eligible groups with
    the smallest seeded hash of their value, so that a growing corpus changes the sample only where a new
    group hashes below the current n-th. With `shared_by` (such as source), only groups that every value
    of that column has are eligible (problems every teacher answered)."""

    by: str = MISSING
    n: int = MISSING
    seed: int = 0
    shared_by: Optional[str] = None


def _source_config() -> type:
    """The type of `input.sources` items: every key of InputShape, unset (None) unless given, `paths`
    required. Derived, not copied: a new shape key is a source key too."""
    hints = typing.get_type_hints(InputShape)
    fields = [("paths", list[str], field(default=MISSING))]
    fields += [
        (f.name, Optional[hints[f.name]], field(default=None)) for f in dataclasses.fields(InputShape) if f.name != "paths"
    ]
    source = dataclasses.make_dataclass("SourceConfig", fields)
    source.__module__ = __name__  # pickled by reference (Ray ships configs to its workers)
    source.__doc__ = "A part of the corpus with a shape of its own (`input.sources`); unset keys take the input section's."
    return source


SourceConfig = _source_config()


@dataclass
class InputConfig(InputShape):
    # More corpus parts, each with its own paths and shape (the keys of InputShape that it sets).
    sources: list[SourceConfig] = field(default_factory=list)
    sample: Optional[SampleConfig] = None  # score the rows of a seeded sample of groups only


def input_sources(input_cfg: InputConfig) -> list[InputConfig]:
    """The corpus parts, each with its whole shape: `input.paths` with the input section's keys, then
    each of `input.sources` with the keys it sets over them."""
    base = dataclasses.replace(input_cfg, sources=[])
    parts = [base] if input_cfg.paths else []
    for source in input_cfg.sources:
        overrides = {f.name: getattr(source, f.name) for f in dataclasses.fields(source) if getattr(source, f.name) is not None}
        parts.append(dataclasses.replace(base, **overrides))
    return parts


@dataclass
class StudentConfig:
    name: str = MISSING  # output partition value: letters, digits, '.', '_', '-'
    path: str = MISSING  # hub id, local directory, or a .gguf file (local or s3://)
    dtype: str = "auto"  # auto: bfloat16 on GPU, float32 on CPU
    chat_template: Optional[str] = None  # a .jinja file or a built-in name (chatml, llama3) instead of the tokenizer's
    tokenizer: Optional[str] = (
        None  # a folder or hub id with the model's tokenizer.json; null: the path's own (a GGUF's, checked)
    )


@dataclass
class ScoringConfig:
    rank_clip: int = 100
    max_model_len: int = 32768  # each student gets the smaller of this and its own window (max_position_embeddings)
    token_budget: str = "auto"  # padded tokens per forward pass: auto (2048 on CPU, from free memory on GPU) or a number
    logits_chunk_tokens: str = (
        "auto"  # response positions projected to the vocabulary at a time: auto (256 on CPU, from free memory on GPU) or a number
    )
    on_too_long: str = "truncate"  # truncate (and flag) | reject rows longer than max_model_len
    reasoning: str = "template"  # template: score what the template renders | keep: every turn's reasoning as given
    scope: str = "assistant"  # assistant: every turn's body | final: the answers | reasoning | no_tool_calls
    metrics: Any = field(default_factory=lambda: ["rsr"])  # a list of rsr, entropy, top1, rank, logprob_std; or all
    batch_tokens: str = "auto"  # tokens handed to a scoring actor at a time: auto (32,768 on CPU, 1,048,576 on GPU) or a number
    rows_per_batch: Optional[int] = None  # removed: a scoring call is sized by batch_tokens; set, the config fails saying so
    logits_dtype: str = "float32"  # float32: vocabulary logits in float32 whatever the student's dtype | model: in its dtype
    prompt_cache_tokens: int = 16384  # prompt tokens shared by several rows whose keys/values are held at once


def shape_columns(input_cfg: InputConfig) -> dict[str, str]:
    """The columns the corpus parts' shapes and path fields add to each trajectory, with their Arrow type names."""
    columns = {}
    for part in input_sources(input_cfg):
        columns.update({name: "string" for name in part.path_fields})
        columns.update(shape_of(part).columns)
    return columns


def row_columns(input_cfg: InputConfig) -> list[str]:
    """The columns copied to every score and reject row: passthrough, the row columns each part's shape
    copies (the candidates' aligned columns) and the shapes' own columns, over every corpus part."""
    names = [name for part in input_sources(input_cfg) for name in (*part.passthrough, *shape_of(part).copied(part))]
    return list(dict.fromkeys([*names, *shape_columns(input_cfg)]))


def metric_names(scoring: ScoringConfig) -> tuple[str, ...]:
    """The configured metrics in METRICS order, "rsr" always included."""
    wanted = METRICS if scoring.metrics == "all" else set(scoring.metrics) | {"rsr"}
    return tuple(name for name in METRICS if name in wanted)


@dataclass
class ComputeConfig:
    # Scoring actors per student: a number; a range min..max, the pool growing with its queue onto capacity
    # that joins and shrinking when the queue runs dry; or auto: 1 up to what the cluster's resources allow.
    actors_per_student: str = "1"
    gpus_per_actor: Optional[float] = None  # default: 1 when CUDA is visible, else 0
    cpus_per_actor: float = 1.0
    torch_threads: Optional[int] = None  # CPU threads per actor; null: the node's CPUs / scoring actors on the node
    ray_address: Optional[str] = None  # null: RAY_ADDRESS if set (ray job submit), else a local runtime
    # A run that makes no progress this long fails, saying why (typically: the nodes lost left none that
    # can host a student), instead of waiting for capacity forever; a rerun resumes after its checkpoints.
    lost_capacity_timeout_minutes: float = 10.0


ACTORS = re.compile(r"^(?:auto|[0-9]+(?:\.\.[0-9]+)?)$")


def actor_bounds(setting: str) -> tuple[int, int | None]:
    """`compute.actors_per_student` as (min, max); max None (auto): as many as the cluster's resources allow."""
    if setting == "auto":
        return 1, None
    low, _, high = setting.partition("..")
    return int(low), int(high or low)


@dataclass
class OutputConfig:
    path: str = "out/rsr"  # local or s3://
    partition_by: list[str] = field(default_factory=list)  # passthrough columns, after student=
    mode: str = "auto"  # auto: incremental when the output exists, else a first full run | overwrite
    checkpoint_rows: int = 50000  # commit a piece at least every this many rows per student ...
    checkpoint_minutes: float = 5.0  # ... and at least this often: a crash loses one piece at most
    lock_stale_minutes: float = 5.0  # a lock whose heartbeat is older is taken over (a dead holder on this host: at once)
    lock_heartbeat_seconds: float = 30.0  # how often the running job renews its lock
    lock_ttl_hours: float = 12.0  # superseded by the heartbeat (lock_stale_minutes); kept so that old configs load


@dataclass
class StorageConfig:
    endpoint_url: Optional[str] = None  # S3-compatible endpoint; credentials come from the environment
    region: Optional[str] = None


@dataclass
class JobConfig:
    input: InputConfig = field(default_factory=InputConfig)
    students: list[StudentConfig] = field(default_factory=list)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)


def _schema_type(key: str) -> Any:
    """The type the schema declares at a dotted key (`students.0`: StudentConfig, `input.response_groups.t`:
    ResponseGroup), Optional unwrapped; None where the schema declares nothing."""
    declared: Any = JobConfig
    for part in key.split("."):
        origin, args = typing.get_origin(declared), typing.get_args(declared)
        if dataclasses.is_dataclass(declared):
            declared = typing.get_type_hints(declared).get(part)
        elif origin is list and part.isdigit():
            declared = args[0]
        elif origin is dict:
            declared = args[1]
        else:
            return None
        if typing.get_origin(declared) in (typing.Union, types.UnionType):  # Optional[X], X | None
            declared = next(arg for arg in typing.get_args(declared) if arg is not type(None))
    return declared


def _override_value(key: str, value: str) -> tuple[Any, bool]:
    """An override's value and whether it is merged. A value in braces or brackets replaces the configured
    mapping, section or list whole; where the schema types it (a section, a student, a list of them),
    it is built on that type's defaults: only a merge builds typed list items, and a typed mapping is
    filled in before it is set."""
    parsed = OmegaConf.from_dotlist([f"value={value}"])["value"]
    declared = _schema_type(key)
    if isinstance(parsed, DictConfig) and dataclasses.is_dataclass(declared):
        return OmegaConf.merge(OmegaConf.structured(declared), parsed), False
    return parsed, isinstance(parsed, ListConfig) and typing.get_origin(declared) is list


def load_config(config_file: str | Path | None = None, overrides: Sequence[str] = ()) -> JobConfig:
    """Schema defaults, then the YAML file, then `key=value` overrides (`students.0.dtype=float32`,
    `input.sample={by: problem_id, n: 40}`)."""
    cfg = OmegaConf.structured(JobConfig)
    try:
        if config_file is not None:
            cfg = OmegaConf.merge(cfg, OmegaConf.load(config_file))
        for override in overrides:
            key, sep, value = override.partition("=")
            if not sep:
                raise ConfigError(f"override {override!r} is not key=value")
            parsed, merge = _override_value(key.strip(), value)
            OmegaConf.update(cfg, key.strip(), parsed, merge=merge)
        job: JobConfig = OmegaConf.to_object(cfg)
    except FileNotFoundError as exc:
        raise ConfigError(f"config file not found: {config_file}") from exc
    except OmegaConfBaseException as exc:
        # omegaconf names the offending key; its first line is the message a user needs
        raise ConfigError(str(exc).splitlines()[0] + f" (key: {getattr(exc, 'full_key', None)})") from exc
    validate(job)
    return job


def validate_shape(i: InputConfig, key: str, require) -> None:
    """The checks of one corpus part's shape; `key` prefixes the keys named in messages ("input.")."""
    require(i.format in FORMATS, f"{key}format must be one of {FORMATS}, got {i.format!r}")
    selecting = [shape.key_names[0] for shape in selecting_shapes(i)]
    require(len(selecting) <= 1, f"{key}{f' and {key}'.join(selecting)} are exclusive: one source of responses")
    shape = shape_of(i)
    for other in SHAPES:
        for name in other.key_names[1:] if other is not shape else ():
            require(not getattr(i, name), f"{key}{name} needs {key}{other.key_names[0]}")
    shape.check(i, key, require)
    for name, pattern in i.path_fields.items():
        require("{" + name + "}" in pattern, f"{key}path_fields.{name}: the pattern {pattern!r} must name {{{name}}}")
    columns = [*i.passthrough, *shape.copied(i), *shape_columns(i)]
    require(len(set(columns)) == len(columns), f"{key}: row columns repeat a name: {columns}")


def validate(job: JobConfig) -> None:
    problems = []

    def require(condition, message):
        if not condition:
            problems.append(message)

    require(job.input.paths or job.input.sources, "input.paths is empty: name at least one file, directory or glob")
    require(job.students, "students is empty: name at least one student (name, path)")
    names = [s.name for s in job.students]
    require(len(set(names)) == len(names), f"student names must be unique, got {names}")
    for i, student in enumerate(job.students):
        require(SAFE_NAME.match(student.name), f"students.{i}.name {student.name!r} must match {SAFE_NAME.pattern}")
        require(student.dtype in DTYPES, f"students.{i}.dtype must be one of {DTYPES}, got {student.dtype!r}")
        template = student.chat_template
        require(
            template is None or template in BUILTIN_TEMPLATES or Path(template).is_file(),
            f"students.{i}.chat_template {template!r} is neither a file nor one of {sorted(BUILTIN_TEMPLATES)}",
        )
    s = job.scoring
    require(s.rank_clip >= 1, f"scoring.rank_clip must be >= 1, got {s.rank_clip}")
    require(s.max_model_len >= 2, f"scoring.max_model_len must be >= 2, got {s.max_model_len}")
    require(
        s.token_budget == "auto" or (s.token_budget.isdigit() and int(s.token_budget) >= 1),
        f"scoring.token_budget must be auto or a number >= 1, got {s.token_budget!r}",
    )
    require(
        s.logits_chunk_tokens == "auto" or (s.logits_chunk_tokens.isdigit() and int(s.logits_chunk_tokens) >= 1),
        f"scoring.logits_chunk_tokens must be auto or a number >= 1, got {s.logits_chunk_tokens!r}",
    )
    require(
        s.batch_tokens == "auto" or (s.batch_tokens.isdigit() and int(s.batch_tokens) >= 1),
        f"scoring.batch_tokens must be auto or a number >= 1, got {s.batch_tokens!r}",
    )
    require(
        s.rows_per_batch is None,
        f"scoring.rows_per_batch ({s.rows_per_batch}) is no longer used: a scoring call is sized by tokens, "
        "scoring.batch_tokens (auto: 32,768 on CPU, 1,048,576 on GPU); remove it or set batch_tokens",
    )
    require(s.logits_dtype in LOGITS_DTYPES, f"scoring.logits_dtype must be one of {LOGITS_DTYPES}, got {s.logits_dtype!r}")
    require(s.prompt_cache_tokens >= 0, f"scoring.prompt_cache_tokens must be >= 0, got {s.prompt_cache_tokens}")
    require(s.on_too_long in TOO_LONG_POLICIES, f"scoring.on_too_long must be one of {TOO_LONG_POLICIES}")
    metrics_ok = s.metrics == "all" or (isinstance(s.metrics, list) and set(s.metrics) <= set(METRICS))
    require(metrics_ok, f"scoring.metrics must be all or a list of {list(METRICS)}, got {s.metrics!r}")
    require(s.reasoning in REASONING_MODES, f"scoring.reasoning must be one of {REASONING_MODES}, got {s.reasoning!r}")
    require(s.scope in SCOPES, f"scoring.scope must be one of {SCOPES}, got {s.scope!r}")
    for k, part in enumerate(input_sources(job.input)):
        validate_shape(part, "input." if k == 0 and job.input.paths else f"input.sources.{k - bool(job.input.paths)}.", require)
    c = job.compute
    actors = c.actors_per_student
    if ACTORS.match(actors):
        low, high = actor_bounds(actors)
        require(1 <= low <= (high or low), f"compute.actors_per_student {actors!r}: at least 1 actor, and min <= max")
    else:
        require(False, f"compute.actors_per_student must be a number, a range min..max or auto, got {actors!r}")
    require(c.gpus_per_actor is None or c.gpus_per_actor >= 0, "compute.gpus_per_actor must be >= 0")
    require(c.cpus_per_actor > 0, f"compute.cpus_per_actor must be > 0, got {c.cpus_per_actor}")
    require(
        c.lost_capacity_timeout_minutes > 0,
        f"compute.lost_capacity_timeout_minutes must be > 0, got {c.lost_capacity_timeout_minutes}",
    )
    o = job.output
    require(o.checkpoint_rows >= 1, f"output.checkpoint_rows must be >= 1, got {o.checkpoint_rows}")
    require(o.checkpoint_minutes > 0, f"output.checkpoint_minutes must be > 0, got {o.checkpoint_minutes}")
    require(
        0 < o.lock_heartbeat_seconds < o.lock_stale_minutes * 60,
        "output.lock_heartbeat_seconds must be > 0 and well under output.lock_stale_minutes",
    )
    require(job.output.mode in OUTPUT_MODES, f"output.mode must be one of {OUTPUT_MODES}, got {job.output.mode!r}")
    if sample := job.input.sample:
        require(sample.n >= 1, f"input.sample.n must be >= 1, got {sample.n}")
        for key, column in (("by", sample.by), ("shared_by", sample.shared_by)):
            require(column is None or column in row_columns(job.input),
                    f"input.sample.{key} {column!r} must be a row column ({row_columns(job.input)})")  # fmt: skip
    missing_partitions = [p for p in job.output.partition_by if p not in row_columns(job.input)]
    require(
        not missing_partitions,
        f"output.partition_by {missing_partitions} must also be in input.passthrough or be a column of the corpus shape ({row_columns(job.input)})",
    )
    if problems:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))
