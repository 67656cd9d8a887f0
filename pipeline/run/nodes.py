"""The cluster's nodes as a run sees them, owned by one `NodeWatch`: it says in the job's log, in its own
words, when a node is lost (which node, in which phase, how many rows its scoring actors held, and that
the run goes on) or joins, and ends a run that stops making progress (in any phase: survey, scoring,
commits) with why: whether a node is left that can host each student."""

from __future__ import annotations

import threading
from collections.abc import Callable

import ray
from ray.data import DataContext
from ray.data.exceptions import ExecutionTimeoutError

from pipeline.run.schema import IncompleteRun

WATCH_EVERY_S = 2.0  # how often the node table is read (one call to Ray's control store)


def alive_nodes() -> dict[str, dict]:
    return {node["NodeID"]: node for node in ray.nodes() if node["Alive"]}


def describe(node: dict) -> str:
    resources = node["Resources"]
    gpus = f", {resources['GPU']:g} GPUs" if resources.get("GPU") else ""
    return f"{node['NodeManagerAddress']} ({node['NodeID'][:8]}: {resources.get('CPU', 0):g} CPUs{gpus})"


class NodeWatch:
    """Watches the nodes from the driver while a run lives (a thread): `needs` holds, per student, the
    resources of one scoring actor; `phase` names what the run is doing; `meter` (a `results.ScoringMeter`,
    once scoring starts) tells how many rows a lost node's scoring actors held. While it lives, a Ray
    dataset of the run that moves no block for `minutes` fails, and the run with it, saying why;
    `pieces` tells how many checkpoints the run has committed."""

    def __init__(self, log: Callable[[str], None], needs: dict[str, dict[str, float]], minutes: float, pieces: Callable[[], int]):
        self.log, self.needs, self.minutes, self.pieces = log, needs, minutes, pieces
        self.phase = "starting"
        self.meter = None
        self.lost: list[str] = []  # each lost node, described, with the phase it was lost in
        self.alive = alive_nodes()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True, name="node-watch")

    def __enter__(self) -> NodeWatch:
        # Ray Data's guard against waiting forever (for capacity that never comes back); each dataset
        # takes the current context when it is created: the survey's, the scoring's and the commits'.
        context = DataContext.get_current()
        self.timeout_before, context.execution_no_progress_timeout_s = context.execution_no_progress_timeout_s, self.minutes * 60
        self.thread.start()
        return self

    def __exit__(self, kind, error, trace) -> None:
        self.stopped.set()
        self.thread.join()
        DataContext.get_current().execution_no_progress_timeout_s = self.timeout_before
        if isinstance(error, ExecutionTimeoutError):
            raise IncompleteRun(self.no_progress()) from error

    def _watch(self) -> None:
        while not self.stopped.wait(WATCH_EVERY_S):
            self.check()

    def check(self) -> None:
        alive = alive_nodes()
        for node_id in self.alive.keys() - alive.keys():
            self._lost(self.alive[node_id], len(alive))
        for node_id in alive.keys() - self.alive.keys():
            self.log(f"node joined: {describe(alive[node_id])}")
        self.alive = alive

    def _lost(self, node: dict, left: int) -> None:
        self.lost.append(f"{describe(node)} while {self.phase}")
        held = ""
        if self.meter is not None:
            rows = ray.get(self.meter.in_flight.remote(node["NodeID"]))
            held = (
                f"; its scoring actors held {rows:,} rows, which are scored again"
                if rows
                else "; no rows were being scored there"
            )
        self.log(
            f"lost node {describe(node)} while {self.phase}{held}. Ray restarts its actors and redoes its tasks "
            f"and the blocks it held; the run goes on with {left} node{'s' if left != 1 else ''}"
        )

    def homeless(self) -> list[str]:
        """The students whose scoring actor fits on no node alive now (by the nodes' total resources)."""
        nodes = [node["Resources"] for node in alive_nodes().values()]
        return [student for student, needs in self.needs.items()
                if not any(all(node.get(k, 0) >= v for k, v in needs.items() if v) for node in nodes)]  # fmt: skip

    def no_progress(self) -> str:
        """Why a run that made no progress for `minutes` stops, and what a rerun does."""
        minutes, pieces = self.minutes, self.pieces()
        lost = f"lost: {'; '.join(self.lost)}" if self.lost else "no node was lost"
        resumes = (f"its {pieces} committed pieces stay, and a rerun resumes after them" if pieces
                   else "it committed nothing, and a rerun starts over")  # fmt: skip
        homeless = self.homeless()
        if homeless:
            needs = "; ".join(f"student {s}'s scoring actor needs {self._needs(s)}" for s in homeless)
            why = f"no node left can host student {', '.join(homeless)} for {minutes:g} min ({needs}; {lost})"
        else:
            why = (f"the run made no progress for {minutes:g} min although the nodes can host every student ({lost}); "
                   "if a student takes longer than that to load or to score one block, raise")  # fmt: skip
        return f"{why} (compute.lost_capacity_timeout_minutes). The run is not committed: {resumes}"

    def _needs(self, student: str) -> str:
        return ", ".join(f"{v:g} {k}s" for k, v in self.needs[student].items() if v)
