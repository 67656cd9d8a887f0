"""The score stage, one actor pool per student i: the statistics columns (resp_token_length_i,
avg_rank_clip_i, ...) in place of ids_i and positions_i."""

from __future__ import annotations

import dataclasses
import functools
import os
import time

import pyarrow as pa
import ray

from pipeline.errors import Rejected
from pipeline.run.schema import STAT_TYPES, per_student
from pipeline.run.settings import RunSettings
from pipeline.run.stages.base import DatasetPlan, Stage, text_bytes
from pipeline.scoring.metrics import stat_columns
from pipeline.tokens.spans import EncodedConversation


def default_torch_threads(cpus_per_actor: float, scoring_actors: int | None) -> int:
    """CPU threads for a scoring actor without `compute.torch_threads`: the CPUs of the node it runs on,
    shared among the scoring actors that fit on that node (all of them on a local runtime; as many as
    fit when the pool may grow to what the cluster allows, `scoring_actors` None)."""
    node_id = ray.get_runtime_context().get_node_id()
    node = next(n for n in ray.nodes() if n["NodeID"] == node_id)
    fitting = int(node["Resources"].get("CPU", 1) // cpus_per_actor)
    sharing = fitting if scoring_actors is None else min(scoring_actors, fitting)
    return max(1, len(os.sched_getaffinity(0)) // max(1, sharing))


class ScoreActor:
    """Holds student `index` of the run's settings for its lifetime; scores the rows its tokenize stage encoded."""

    def __init__(self, index: int, settings: RunSettings, meter=None):  # meter: a `results.ScoringMeter`
        import torch

        from pipeline.scoring.student import Student

        student = settings.students[index]
        torch.set_num_threads(settings.torch_threads or default_torch_threads(settings.cpus_per_actor, settings.scoring_actors))
        self.index, self.name, self.meter = index, student.name, meter
        self.started = False  # told the meter when scoring began
        self.student = Student.load(student.source, options=settings.core, policy=student.policy)
        self.columns = stat_columns(settings.core.metrics)
        print(f"student {student.name}: {self.student.policy.describe()}", flush=True)  # once per actor, on the driver's console

    def __call__(self, batch: pa.Table) -> pa.Table:
        name = functools.partial(per_student, index=self.index)
        ids, positions = batch[name("ids")].to_pylist(), batch[name("positions")].to_pylist()
        todo = [row for row, row_ids in enumerate(ids) if row_ids is not None]
        sizes = text_bytes(batch).to_pylist()
        before = dataclasses.replace(self.student.padding)
        # A block's first trajectory names it, the same when a restarted actor scores it again (a corpus row
        # of several candidates or teachers may start two blocks: its file and row number alone would not).
        first = batch.slice(0, 1).select(["source_file", "row_number", "sample_id"]).to_pylist() if self.meter else []
        block = ":".join(map(str, first[0].values())) if first else ""
        if self.meter:
            self.meter.begin.remote(self.name, block, ray.get_runtime_context().get_node_id(), len(ids))
            if todo and not self.started:
                self.meter.start.remote(time.time())
                self.started = True

        def report(done: list[int], tokens: int) -> None:
            if self.meter:
                self.meter.add.remote(
                    self.name, block, rows=len(done), tokens=tokens, text_bytes=sum(sizes[todo[i]] for i in done)
                )

        stats = self.student.score([EncodedConversation(ids[row], positions[row], False) for row in todo], on_batch=report)
        if self.meter:  # rows that needed no scoring (rejected, skipped, sampled out) are done too
            padding = self.student.padding
            self.meter.add.remote(self.name, block, unscored=len(ids) - len(todo), unscored_bytes=sum(sizes) - sum(sizes[row] for row in todo),
                                  real=padding.real - before.real, padded=padding.padded - before.padded)  # fmt: skip
            self.meter.end.remote(self.name, block)
        columns = {column: [None] * len(ids) for column in self.columns}
        reasons, details = batch[name("reject_reason")].to_pylist(), batch[name("reject_detail")].to_pylist()
        for row, row_stats in zip(todo, stats):
            if isinstance(row_stats, Rejected):  # too long for the device
                reasons[row], details[row] = row_stats.reason, row_stats.detail
                continue
            for column in self.columns:
                columns[column][row] = row_stats[column]
        for column, values in (("reject_reason", reasons), ("reject_detail", details)):
            batch = batch.set_column(batch.schema.get_field_index(name(column)), name(column), pa.array(values, pa.string()))
        batch = batch.drop_columns([name("ids"), name("positions")])  # the tokens are not needed downstream
        for column in self.columns:
            batch = batch.append_column(name(column), pa.array(columns[column], STAT_TYPES.get(column, pa.float64())))
        return batch


def score_stage(plan: DatasetPlan, index: int) -> Stage:
    settings = plan.settings
    name = functools.partial(per_student, index=index)
    return Stage(
        f"score {settings.students[index].name}", ScoreActor,
        ("source_file", "row_number", "sample_id", "text_bytes", *(name(c) for c in ("ids", "positions", "reject_reason", "reject_detail"))),
        tuple(name(c) for c in plan.contract.stats),
        drops=(name("ids"), name("positions")),
        kwargs={"index": index, "settings": settings, "meter": plan.meter},
        # One call at a time either way; "true multi-threading" runs it on the actor's own thread, where
        # the student was loaded, not on a second thread of Ray Data's: there the same scoring ran 35-45%
        # slower (600 GSM8K rows, bf16: 91-98 s of scoring calls against 72 s).
        # min..max: Ray Data's autoscaling pool adds actors while blocks queue and resources allow (nodes
        # that join included) and removes idle ones.
        map_options={"compute": ray.data.ActorPoolStrategy(min_size=settings.actors[0], max_size=settings.actors[1],
                                                        enable_true_multi_threading=True),
                  "num_cpus": settings.cpus_per_actor, "num_gpus": settings.gpus_per_actor,
                  "batch_size": None},  # a block at a time: blocks are sized by tokens
    )  # fmt: skip
