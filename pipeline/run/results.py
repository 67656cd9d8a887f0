"""A run's results as they stream from the scoring actors: counted where each block lives (`BlockTally`),
added up on the driver (`Tally`), written and committed in pieces (`Checkpoints`), reported (`Progress`)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import ray

from pipeline.run.config import JobConfig
from pipeline.run.output import OutputStore
from pipeline.run.schema import COUNT_COLUMNS, IncompleteRun, RowContract, Status
from pipeline.scoring.aggregate import combine_sums, group_sums, summary_from_sums

PROGRESS_EVERY_S = 30.0


def groupings(partition_by: list[str]) -> list[tuple]:
    """The summary groupings: per student, and per student and partition values."""
    return [("student",), ("student", *partition_by)] if partition_by else [("student",)]


@dataclass
class BlockTally:
    """What the driver keeps of one result block: counts per student, scored tokens, summary sums."""

    rows: int
    counts: dict[str, dict[str, int]]  # student -> COUNT_COLUMNS
    tokens: int
    sums: dict[tuple, pa.Table]  # grouping -> group_sums of the block's scored rows


def measure_block(block: pa.Table, partition_by: list[str]) -> BlockTally:
    counts: dict[str, dict[str, int]] = {}
    for row in block.group_by(["student", "status"]).aggregate([("status", "count")]).to_pylist():
        student = counts.setdefault(row["student"], dict.fromkeys(COUNT_COLUMNS, 0))
        student["read"] += row["status_count"]
        student[row["status"]] += row["status_count"]
    scored = block.filter(pc.equal(block["status"], Status.SCORED))
    dropped = scored.filter(pc.fill_null(scored["content_dropped"], False))
    for row in dropped.group_by("student").aggregate([("student", "count")]).to_pylist():
        counts[row["student"]]["content_dropped"] += row["student_count"]
    tokens = (pc.sum(scored["resp_token_length"]).as_py() or 0) if scored.num_rows else 0
    sums = {by: group_sums(scored, by) for by in groupings(partition_by)} if scored.num_rows else {}
    return BlockTally(block.num_rows, counts, tokens, sums)


@ray.remote
def measure_block_task(block: pa.Table, partition_by: list[str]) -> BlockTally:
    """`measure_block` where the block lives: the driver never pulls result blocks."""
    return measure_block(block, partition_by)


@dataclass
class Tally:
    """Counts per student and summary sums per group over a run's result blocks."""

    partition_by: list[str]
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    sums: dict[tuple, pa.Table] = field(default_factory=dict)  # grouping -> combined group_sums
    tokens: int = 0
    rows: int = 0

    def add(self, part: BlockTally) -> None:
        self.rows += part.rows
        self.tokens += part.tokens
        for student, counts in part.counts.items():
            mine = self.counts.setdefault(student, dict.fromkeys(COUNT_COLUMNS, 0))
            for column, n in counts.items():
                mine[column] += n
        for by, sums in part.sums.items():
            self.sums[by] = combine_sums([self.sums[by], sums], by) if by in self.sums else sums

    def add_unread(self, rows: int, students: list[str]) -> None:
        """The `rows` of the files the run left unread, for every student."""
        for student in students:
            self.counts.setdefault(student, dict.fromkeys(COUNT_COLUMNS, 0))["unread"] = rows

    def counts_table(self) -> pa.Table:
        return pa.Table.from_pylist([{"student": s, **self.counts[s]} for s in sorted(self.counts)])

    def summaries(self) -> dict[str, pa.Table]:
        """The run's summary tables by name: per student, and per student and partition values."""
        return dict(zip(("by_student", "by_partition"), (self.summary(by) for by in groupings(self.partition_by))))

    def summary(self, by: tuple) -> pa.Table:
        if by not in self.sums:
            return pa.table({key: pa.array([], pa.string()) for key in by})
        return summary_from_sums(self.sums[by], by)


def check_accounted(tally: Tally, expected_rows: int, students: list[str]) -> None:
    """Every student's results count each of the `expected_rows` the survey pass counted, and reconcile
    (read = scored + rejected + skipped + sampled out). Ray Data can end a stream short without raising
    (seen: a restarted scoring actor's retried block failed, and Ray logged it as an unhandled error):
    such a run must fail, not commit part of the corpus as the whole."""
    for student in students:
        counts = tally.counts.get(student, dict.fromkeys(COUNT_COLUMNS, 0))
        accounted = sum(counts[status] for status in Status)
        if counts["read"] != expected_rows or accounted != expected_rows:
            raise IncompleteRun(
                f"student {student}: the results account for {accounted} of the {expected_rows} rows of the corpus "
                f"({', '.join(f'{counts[s]} {s}' for s in Status)}); the others never came back from scoring (see "
                "the errors above). The run is not committed; the pieces it committed stay, and a rerun with "
                "output.mode auto skips their rows"
            )


class Checkpoints:
    """The run's results streamed into pieces, each committed to the output when it holds
    `output.checkpoint_rows` rows per student or is `output.checkpoint_minutes` old. A piece's counts
    are the run's `tally` now less the tally at the last committed piece (a stretch with nothing to write,
    such as rows all skipped, commits nothing and is counted by the next piece and the run manifest)."""

    def __init__(self, cfg: JobConfig, contract: RowContract, store: OutputStore, known_rejects: ray.ObjectRef, tally: Tally):
        self.cfg, self.contract, self.store, self.known_rejects, self.tally = cfg, contract, store, known_rejects, tally
        self.max_rows = cfg.output.checkpoint_rows * len(cfg.students)  # long format: a row per student
        self.max_age_s = cfg.output.checkpoint_minutes * 60
        self.committed: list[str] = []
        self.counts_before: dict[str, dict[str, int]] = {}
        self._start_piece()

    def _start_piece(self) -> None:
        self.refs: list[ray.ObjectRef] = []
        self.rows_before = self.tally.rows
        self.started = time.monotonic()

    def add(self, ref: ray.ObjectRef) -> None:
        """Add a block the run's tally has counted."""
        self.refs.append(ref)
        if self.tally.rows - self.rows_before >= self.max_rows or time.monotonic() - self.started >= self.max_age_s:
            self.commit()

    def _piece_counts(self) -> list[dict]:
        def before(student):
            return self.counts_before.get(student, dict.fromkeys(COUNT_COLUMNS, 0))

        return [{"student": student, **{k: n - before(student)[k] for k, n in counts.items()}}
                for student, counts in sorted(self.tally.counts.items())]  # fmt: skip

    def commit(self) -> None:
        """Hand the piece to the output to write and commit (nothing to write: no piece)."""
        if not self.refs:
            return
        counts = self._piece_counts()
        committed = self.store.commit_piece(
            self.refs, counts, self.contract.scores, self.cfg.output.partition_by, self.known_rejects
        )
        if committed:
            self.committed += committed
            self.counts_before = {student: dict(c) for student, c in self.tally.counts.items()}
        self._start_piece()


METER_NAME = "rsr-scoring-meter"  # a run's meter is named METER_NAME-<run id> in the driver's namespace


@ray.remote(num_cpus=0)
class ScoringMeter:
    """What the scoring actors have done, as each batch finishes: rows, response tokens and the rows'
    message bytes (progress between commits) and, per student, the real and padded tokens of its
    batches (padding efficiency). Counted per block: a block that a restarted actor scores again (its
    first actor or node was lost) starts over, so that its rows count once, and its rows count as redone.
    The blocks being scored, with the node that scores them, tell what a lost node held; the rows of the
    blocks scored to the end (`finished`) are what the driver can commit next."""

    COUNTED = ("rows", "tokens", "text_bytes", "unscored", "unscored_bytes", "real", "padded")
    # `read` of a run that scored nothing
    NOTHING = {**dict.fromkeys(COUNTED, 0), "first_at": None, "padding": {}, "redone": 0, "finished": 0}

    def __init__(self):
        self.blocks: dict[tuple[str, str], dict[str, int]] = {}  # (student, block) -> its counts so far
        self.scoring: dict[tuple[str, str], tuple[str, int]] = {}  # blocks being scored: (node, rows)
        self.finished: dict[tuple[str, str], int] = {}  # blocks scored to the end: rows
        self.redone = 0  # rows of blocks scored again
        self.first_at: float | None = None

    def start(self, at: float) -> None:
        """An actor begins scoring: the rate and the time left are measured from the first start."""
        self.first_at = min(self.first_at or at, at)

    def begin(self, student: str, block: str, node: str = "", rows: int = 0) -> None:
        """An actor on `node` takes a block of `rows`: whatever an earlier try of it counted is dropped."""
        if (student, block) in self.blocks:
            self.redone += rows
        self.blocks[(student, block)] = dict.fromkeys(self.COUNTED, 0)
        self.scoring[(student, block)] = (node, rows)

    def add(self, student: str, block: str, **counts: int) -> None:
        """A scored batch (rows, tokens, text_bytes); rows done without scoring (rejected, skipped, sampled
        out: unscored, unscored_bytes; they count as done but say nothing of the rate: a resumed run's first
        blocks are all of them); a block's padding (real, padded)."""
        block_counts = self.blocks.setdefault((student, block), dict.fromkeys(self.COUNTED, 0))
        for name, value in counts.items():
            block_counts[name] += value

    def end(self, student: str, block: str) -> None:
        """A block is scored."""
        _, rows = self.scoring.pop((student, block), ("", 0))
        self.finished[(student, block)] = rows

    def in_flight(self, node: str) -> int:
        """The rows of the blocks being scored on `node`."""
        return sum(rows for where, rows in self.scoring.values() if where == node)

    def read(self) -> dict:
        totals = {name: sum(c[name] for c in self.blocks.values()) for name in self.COUNTED}
        padding: dict[str, list[int]] = {}
        for (student, _), c in self.blocks.items():
            student_padding = padding.setdefault(student, [0, 0])
            student_padding[0] += c["real"]
            student_padding[1] += c["padded"]
        finished = sum(self.finished.values())
        return {**totals, "first_at": self.first_at, "padding": padding, "redone": self.redone, "finished": finished}


def padding_efficiency(meter: dict) -> dict[str, float]:
    """Per student, real / padded tokens of its batches."""
    return {student: real / padded for student, (real, padded) in meter["padding"].items() if padded}


class Progress:
    """A line every PROGRESS_EVERY_S seconds from the first scored batch on, counted from what the scoring
    actors have done (`ScoringMeter`), not from committed blocks: rows and tokens done, tokens/s, and the
    time left against the `expected_rows` and `expected_bytes` (of their messages) the survey pass
    counted. The time left is measured in bytes, not rows: a chain of thought of 8,000 tokens beside
    answers of 200 would make a row-based estimate wrong by the share of long rows still to come. A
    ticker thread keeps the lines coming while the driver waits for a block."""

    def __init__(self, log: Callable[[str], None] | None, expected_rows: int, expected_bytes: int, meter):
        self.log, self.expected_rows, self.expected_bytes, self.meter = log, expected_rows, expected_bytes, meter
        self.last_line = 0.0
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.ticker = threading.Thread(target=self._tick, daemon=True)
        if log:
            self.ticker.start()

    def _tick(self) -> None:
        while not self.stopped.wait(max(PROGRESS_EVERY_S, 1.0)):
            self.update()

    def update(self, last: bool = False) -> None:
        """A line when PROGRESS_EVERY_S passed since the last one, or when it is the `last`."""
        with self.lock:
            now = time.monotonic()
            if not self.log or (now - self.last_line < PROGRESS_EVERY_S and not last):
                return
            done = ray.get(self.meter.read.remote())
            if not done["rows"]:
                return
            elapsed = max(time.time() - done["first_at"], 1e-9)
            rows = done["rows"] + done["unscored"]
            line = f"progress: {rows:,} of {self.expected_rows:,} rows and {done['tokens']:,} tokens done, {done['tokens'] / elapsed:,.0f} tokens/s"
            if self.expected_bytes and done["text_bytes"]:
                share = min((done["text_bytes"] + done["unscored_bytes"]) / self.expected_bytes, 1)
                left = elapsed * (1 - share) * self.expected_bytes / done["text_bytes"]  # at the rate bytes are scored
                line += f", {share:.0%} of the text, about {left / 60:.0f} min left"
            if done["redone"]:
                line += f"; {done['redone']:,} rows scored again after a lost actor or node"
            self.log(line)
            self.last_line = now

    def stop(self) -> None:
        self.stopped.set()
