"""A scoring actor killed mid-run: Ray restarts it, the job completes, and the output equals a clean
run's, with no duplicate rows."""

import os
import signal
import threading
import time
from pathlib import Path

from pipeline.job import run_job
from tests.conftest import write_jsonl
from tests.test_job import job_config, read_scores


def score_actor_pids() -> list[int]:
    """Ray titles actor processes after their class: ray::MapWorker(MapBatches(ScoreActor))."""
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if b"ScoreActor" in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


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
