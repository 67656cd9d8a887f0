"""A scoring actor killed mid-run: Ray restarts it, the job completes, and the output equals a clean
run's, with no duplicate rows. A results stream that ends short fails the run instead of committing it."""

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from pipeline.corpus.storage import locate
from pipeline.run import job
from pipeline.run.job import run_job
from pipeline.run.layout import read_manifests
from pipeline.run.schema import IncompleteRun
from tests.conftest import processes_under, titled, write_jsonl
from tests.test_job import job_config, read_scores


def score_actor_pids() -> list[int]:
    """This test process's scoring actors (Ray titles them after their class: ray::MapWorker(...ScoreActor)):
    descendants of this process only (the local runtime's raylet is its child), never a scoring job that
    runs beside the tests."""
    return titled(processes_under(os.getpid()), b"ScoreActor")


def kill_one_score_actor(job_done: threading.Event, report: dict, first_piece_dir: Path):
    """SIGKILL a scoring actor process once the run has committed its first piece (the actor has scored
    rows, and dozens of pieces are still to come), while the job runs. Waits on state, not on time."""
    while not job_done.is_set():
        pids = score_actor_pids()
        if pids and any(first_piece_dir.glob("*-p0001.json")):
            os.kill(pids[0], signal.SIGKILL)
            report["killed_pid"], report["job_running"] = pids[0], not job_done.is_set()
            return
        time.sleep(0.05)


def stats(table):
    return {
        row["sample_id"]: (row["resp_token_length"], round(row["rank_surprisal_ratio"], 9), row["content_hash"])
        for row in table.to_pylist()
    }


def test_killed_actor_changes_nothing(ray_runtime, tmp_path, corpus, student_dirs):
    rows = [{**row, "id": f"{row['id']}-{copy}"} for copy in range(8) for row in corpus]  # long enough to kill mid-run
    data = write_jsonl(tmp_path / "corpus.jsonl", rows)
    students = {"tiny": student_dirs["chatml"]}
    extra = ["scoring.batch_tokens=500"]
    clean = run_job(job_config(tmp_path, [str(data)], str(tmp_path / "clean"), students, extra))

    done, report = threading.Event(), {}
    killer = threading.Thread(target=kill_one_score_actor, args=(done, report, tmp_path / "faulty" / "_runs"))
    killer.start()
    try:  # a piece every two blocks: the first is committed long before the run ends
        faulty = run_job(
            job_config(tmp_path, [str(data)], str(tmp_path / "faulty"), students, [*extra, "output.checkpoint_rows=8"])
        )
    finally:
        done.set()
        killer.join()
    assert report.get("job_running"), "no actor was killed while the job ran"
    assert faulty.counts.to_pylist() == clean.counts.to_pylist()
    faulty_scores = read_scores(tmp_path / "faulty")
    assert faulty_scores.num_rows == len(rows) == len(set(faulty_scores["sample_id"].to_pylist()))
    assert stats(faulty_scores) == stats(read_scores(tmp_path / "clean"))


def test_a_results_stream_that_ends_short_fails_the_run(ray_runtime, tmp_path, corpus, student_dirs, monkeypatch):
    """Ray Data has ended a stream without one block and without an error (a restarted actor's retried
    block failed): the run must fail with the rows it misses, commit no run, and a rerun completes it."""
    rows = [{**row, "id": f"{row['id']}-{copy}"} for copy in range(4) for row in corpus]
    data = write_jsonl(tmp_path / "corpus.jsonl", rows)
    cfg = job_config(tmp_path, [str(data)], str(tmp_path / "out"), {"tiny": student_dirs["chatml"]}, ["scoring.batch_tokens=500"])
    build_dataset = job.build_dataset

    class WithoutFirstBlock:
        def __init__(self, plan):
            self.dataset = build_dataset(plan)

        def iter_internal_ref_bundles(self):
            bundles = self.dataset.iter_internal_ref_bundles()
            next(bundles)
            yield from bundles

    monkeypatch.setattr(job, "build_dataset", WithoutFirstBlock)
    with pytest.raises(IncompleteRun, match=rf"account for \d+ of the {len(rows)} rows"):
        run_job(cfg)
    runs = [m for m in read_manifests(locate(str(tmp_path / "out"), None)) if "piece" not in m]
    assert runs == []  # pieces may stay (their rows are scored); no run claims the corpus

    monkeypatch.setattr(job, "build_dataset", build_dataset)
    rerun = run_job(cfg)
    counts = rerun.counts.to_pylist()[0]
    assert counts["read"] == counts["scored"] + counts["skipped"] == len(rows)
