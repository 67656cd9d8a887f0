"""Runs that survive: pieces committed as a run goes, a killed driver resumed from its last checkpoint
(locally and through the S3 server), and a lock that refuses live holders and never strands the output."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta

import duckdb
import pytest
import yaml

from pipeline.corpus.storage import locate
from pipeline.run.config import load_config
from pipeline.run.job import run_job
from pipeline.run.layout import committed_files, read_manifests
from pipeline.run.lock import LOCK_FILE, OutputLock, OutputLocked
from tests.conftest import REPO, make_corpus, write_jsonl
from tests.test_job import job_config

N_ROWS = 160


def kill_after_first_checkpoint(config_path, root, env, log_path) -> None:
    """Start the job as a user does, SIGKILL its driver once its first piece is committed.

    The job commits a piece per row (`output.checkpoint_rows=1`, `scoring.batch_tokens=1`: a block per row): over a
    hundred pieces, each a Ray Data write, follow the first, so the driver is still running when the
    first one is seen, however loaded the machine is. The wait is on the output's state, with no
    deadline of its own."""
    with open(log_path, "wb") as log:
        driver = subprocess.Popen(
            [sys.executable, "-m", "jobs.score", "--config", str(config_path), "output.checkpoint_rows=1", "scoring.batch_tokens=1"],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    first_piece = root.join("_runs").path
    try:
        while not (root.fs.exists(first_piece) and any(p.endswith("-p0001.json") for p in root.fs.ls(first_piece, detail=False))):
            if driver.poll() is not None:
                pytest.fail(
                    f"the job ended (exit {driver.returncode}) before its first checkpoint:\n{log_path.read_text()[-3000:]}"
                )
            time.sleep(0.05)
            root.fs.invalidate_cache()
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    finally:
        try:  # the driver's local Ray processes go with it; leave nothing running on the machine
            os.killpg(driver.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_killed_driver_loses_at_most_one_checkpoint(where, ray_runtime, tmp_path, student_dirs, request):
    rows = make_corpus(N_ROWS, seed=11)
    data = write_jsonl(tmp_path / "corpus.jsonl", rows)
    extra = ["output.checkpoint_rows=20", "scoring.batch_tokens=1000"]
    if where == "s3":
        import s3fs

        endpoint = request.getfixturevalue("s3_endpoint")
        s3fs.S3FileSystem(endpoint_url=endpoint).mkdir("checkpoints")
        output, extra = "s3://checkpoints/out", [*extra, f"storage.endpoint_url={endpoint}"]
    else:
        output = str(tmp_path / "out")
    cfg = job_config(tmp_path, [str(data)], output, {"tiny": student_dirs["chatml"]}, extra)
    config_path = tmp_path / "job.yaml"  # job_config wrote it; the overrides go in for the subprocess
    config = yaml.safe_load(config_path.read_text())
    config["output"].update(checkpoint_rows=20)
    config["scoring"]["batch_tokens"] = "1000"
    config["storage"] = {"endpoint_url": cfg.storage.endpoint_url}
    config_path.write_text(yaml.safe_dump(config))
    root = locate(output, cfg.storage)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}

    kill_after_first_checkpoint(config_path, root, env, tmp_path / "killed-run.log")
    root.fs.invalidate_cache()
    assert root.fs.exists(root.join(LOCK_FILE).path)  # the killed run's lock is still there ...
    committed_before = committed_files(root)
    n_committed = sum(1 for _ in committed_before if _.startswith("student="))
    assert n_committed > 0

    resumed = run_job(load_config(config_path))  # ... and is taken over at once: its process is gone
    assert "is gone" in resumed.lock_taken_over
    [counts] = resumed.counts.to_pylist()
    files = [root.join(f).path for f in committed_files(root) if f.startswith("student=")]
    if where == "s3":
        local = tmp_path / "fetched"
        root.fs.get(root.path + "/", str(local), recursive=True)
        files = [str(local / f) for f in committed_files(root) if f.startswith("student=")]
        glob = f"{local}/student=*/**/*.parquet"
    else:
        glob = f"{output}/student=*/**/*.parquet"
    scored_before = duckdb.sql(
        f"SELECT count(*) FROM read_parquet({json.dumps(files)}) WHERE run_id != '{resumed.run_id}'"
    ).fetchall()[0][0]
    assert 0 < scored_before < N_ROWS  # killed mid-run with at least one piece committed
    assert counts == {"student": "tiny", "read": N_ROWS, "scored": N_ROWS - scored_before, "rejected": 0,
                      "skipped": scored_before, "sampled_out": 0, "content_dropped": 0, "unread": 0}  # fmt: skip
    n, distinct = duckdb.sql(f"SELECT count(*), count(DISTINCT (sample_id, student)) FROM read_parquet('{glob}')").fetchall()[0]
    assert n == distinct == N_ROWS  # every row once, in a plain glob read
    assert resumed.pieces >= 2
    pieces = [m for m in read_manifests(root) if m["run_id"] == resumed.run_id and "piece" in m]
    piece_counts = {status: sum(c[status] for m in pieces for c in m["counts"]) for status in ("read", "scored", "skipped")}
    assert piece_counts["scored"] == counts["scored"]  # every scored row is in a piece's counts
    # a final stretch of skipped rows writes nothing: the run manifest alone counts it
    assert counts["read"] - piece_counts["read"] == counts["skipped"] - piece_counts["skipped"] >= 0


def dead_pid() -> int:
    finished = subprocess.Popen(["true"])
    finished.wait()
    return finished.pid


def test_a_live_lock_refuses_a_second_run_and_a_dead_one_is_taken_over(ray_runtime, tmp_path, corpus, student_dirs):
    data = write_jsonl(tmp_path / "corpus.jsonl", corpus[:4])
    out = tmp_path / "out"
    cfg = job_config(tmp_path, [str(data)], str(out), {"tiny": student_dirs["chatml"]})
    root = locate(str(out), None)
    lock_path = out / LOCK_FILE

    holder = OutputLock(root, "nightly-1", stale_after_s=300, beat_every_s=0.2)
    holder.acquire()
    try:
        first_beat = json.loads(lock_path.read_text())["beat"]
        time.sleep(0.6)
        assert json.loads(lock_path.read_text())["beat"] > first_beat  # the heartbeat renews it
        with pytest.raises(OutputLocked, match=rf"run nightly-1 \(process {os.getpid()} on .+\) holds .+ last heartbeat was at"):
            run_job(cfg)
    finally:
        holder.release()
    assert not lock_path.exists()

    old_beat = (datetime.now(UTC) - timedelta(minutes=10)).isoformat()
    lock_path.write_text(json.dumps({"run_id": "crashed-elsewhere", "host": "another-host", "pid": 1, "beat": old_beat}))
    result = run_job(cfg)
    assert "crashed-elsewhere" in result.lock_taken_over and "10.0 min ago" in result.lock_taken_over
    assert not lock_path.exists()

    fresh_beat = datetime.now(UTC).isoformat()
    lock_path.write_text(
        json.dumps({"run_id": "killed-here", "host": socket.gethostname(), "pid": dead_pid(), "beat": fresh_beat})
    )
    result = run_job(cfg)
    assert "killed-here" in result.lock_taken_over and "is gone" in result.lock_taken_over

    lock_path.write_text(json.dumps({"run_id": "running-elsewhere", "host": "another-host", "pid": 1, "beat": fresh_beat}))
    with pytest.raises(OutputLocked, match="running-elsewhere"):
        run_job(cfg)
