"""What every stage shares: the `Stage` record (a function with the columns it reads and adds, declared
beside it in each stage's module), the plan the stages are built from, the chain check, and the values a
worker fetches once."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

import pyarrow as pa
import pyarrow.compute as pc
import ray

from pipeline.corpus.storage import Corpus
from pipeline.run.config import ConfigError, JobConfig
from pipeline.run.schema import RowContract
from pipeline.run.settings import RunSettings


@dataclass(frozen=True)
class RunStamp:
    """What every row of a run carries."""

    run_id: str
    scored_at: datetime


@dataclass(frozen=True)
class Stage:
    """A map stage of the scoring dataset, in one object: its function (a callable class runs in an actor
    pool), the columns it reads, adds and drops (or, when it `replaces` the rows, the only columns it
    writes: `adds`), its arguments and its map options (actor pool, resources, batch size)."""

    name: str
    fn: Callable
    reads: tuple[str, ...]
    adds: tuple[str, ...]
    drops: tuple[str, ...] = ()
    replaces: bool = False
    kwargs: dict = field(default_factory=dict)  # the function's (or the class constructor's) keyword arguments
    map_options: dict = field(default_factory=dict)  # map_batches options beyond the batch format

    def output(self, columns: set[str]) -> set[str]:
        """The columns after this stage, given those before it."""
        return set(self.adds) if self.replaces else (columns | set(self.adds)) - set(self.drops)

    def apply(self, ds):
        arguments = {"fn_constructor_kwargs" if isinstance(self.fn, type) else "fn_kwargs": self.kwargs}
        return ds.map_batches(self.fn, batch_format="pyarrow", **arguments, **self.map_options)


@dataclass(frozen=True)
class DatasetPlan:
    """What the scoring stages are built from: the config's input and output sections, the run's settings,
    its row contract, the corpus, what the survey finds, what every row carries, the keys each student
    already scored, and where progress is counted."""

    cfg: JobConfig
    settings: RunSettings
    contract: RowContract
    corpus: Corpus
    survey: object  # the reference of the `CorpusSurvey` (`ray.put`): every stage worker gets it once
    stamp: RunStamp
    done_refs: tuple  # per student, a reference to its set of `scored_key`s (built by a Ray task)
    meter: object = None  # a `results.ScoringMeter`


def check_stages(stages: list[Stage], available: list[str]) -> None:
    """Fail before any work when a stage reads a column that no earlier stage adds, naming the stage."""
    columns = set(available)
    for stage in stages:
        missing = [c for c in stage.reads if c not in columns]
        if missing:
            raise ConfigError(f"stage {stage.name!r} reads {missing}, which no earlier stage adds")
        columns = stage.output(columns)


@functools.lru_cache(maxsize=64)
def cached_get(ref):
    """`ray.get` once per worker process for objects that many batches read: a run's survey, its known
    rejects and one set of done keys per student (room for many students; bounded because each cached
    reference keeps its object in the object store); a value that is not a reference is its own value."""
    return ray.get(ref) if isinstance(ref, ray.ObjectRef) else ref


def row_order(file_number: int, row_number: int) -> int:
    """A row's place in (file, row number) order as one integer: an id's first row has the smallest."""
    return file_number << 40 | row_number


def text_bytes(batch: pa.Table) -> pa.Array:
    """Each row's messages in bytes (0 for a reject): the survey's and the actors' measure of the work,
    for the time left (tokens are not known before the tokenize stage; rows vary a hundredfold)."""
    return pc.fill_null(batch["text_bytes"], 0).combine_chunks()
