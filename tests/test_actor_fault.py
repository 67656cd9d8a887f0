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


def kill_one_score_actor(job_done: threading.Event, report: dict, warmup_s: float = 2.0):
    """SIGKILL the first scoring actor process once it has worked for `warmup_s`, while the job runs."""
    first_seen = {}
    while not job_done.is_set():
        for pid in score_actor_pids():
            first_seen.setdefault(pid, time.time())
            if time.time() - first_seen[pid] > warmup_s:
                os.kill(pid, signal.SIGKILL)
                report["killed_pid"], report["job_running"] = pid, not job_done.is_set()
                return
        time.sleep(0.1)


def stats(table):
    return {
        row["sample_id"]: (row["resp_token_length"], round(row["rank_surprisal_ratio"], 9), row["content_hash"])
        for row in table.to_pylist()
    }


def test_killed_actor_changes_nothing(ray_runtime, tmp_path, corpus, student_dirs):
    rows = [{**row, "id": f"{row['id']}-{copy}"} for copy in range(8) for row in corpus]  # long enough to kill mid-run
    data = write_jsonl(tmp_path / "corpus.jsonl", rows)
    students = {"tiny": student_dirs["chatml"]}
    extra = ["scoring.rows_per_batch=4"]
    clean = run_job(job_config(tmp_path, [str(data)], str(tmp_path / "clean"), students, extra))

    done, report = threading.Event(), {}
    killer = threading.Thread(target=kill_one_score_actor, args=(done, report))
    killer.start()
    try:
        faulty = run_job(job_config(tmp_path, [str(data)], str(tmp_path / "faulty"), students, extra))
    finally:
        done.set()
        killer.join()
    assert report.get("job_running"), "no actor was killed while the job ran"
    assert faulty.counts.to_pylist() == clean.counts.to_pylist()
    faulty_scores = read_scores(tmp_path / "faulty")
    assert faulty_scores.num_rows == len(rows) == len(set(faulty_scores["sample_id"].to_pylist()))
    assert stats(faulty_scores) == stats(read_scores(tmp_path / "clean"))
