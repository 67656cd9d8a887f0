"""The output lock under contention, locally and through the S3 server on 127.0.0.1: whole writes, readers
that never crash on a lock caught mid-write, one winner among runs that start together, and a
heartbeat that never overwrites a lock another run took over."""

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import pytest

from pipeline.corpus.storage import locate
from pipeline.run.config import StorageConfig
from pipeline.run.lock import LOCK_FILE, OutputLock, OutputLocked

STALE = (datetime.now(UTC) - timedelta(hours=1)).isoformat()


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return locate(str(tmp_path / "out"), StorageConfig())
    import s3fs

    endpoint = request.getfixturevalue("s3_endpoint")
    bucket = f"lock-{tmp_path.name.lower().replace('_', '-')[-40:]}"
    s3fs.S3FileSystem(endpoint_url=endpoint).mkdir(bucket)
    return locate(f"s3://{bucket}/out", StorageConfig(endpoint_url=endpoint))


def write_lock(root, record: dict) -> None:
    root.fs.makedirs(root.path, exist_ok=True)
    root.fs.pipe_file(root.join(LOCK_FILE).path, json.dumps(record).encode())


def read_lock(root) -> dict:
    root.fs.invalidate_cache()
    return json.loads(root.fs.cat_file(root.join(LOCK_FILE).path))


def attempt(root, run_id: str) -> str:
    """Try to take the lock as run `run_id`: "took", "took over ..." or the refusal's message."""
    lock = OutputLock(root, run_id, stale_after_s=300, beat_every_s=60)
    try:
        taken_over = lock.acquire()
    except OutputLocked as exc:
        return str(exc)
    lock._stop.set()  # keep the lock: the other attempts must see it held
    return f"took over: {taken_over}" if taken_over else "took"


def test_runs_that_start_together_on_a_free_lock_leave_one_holder(root):
    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(lambda k: attempt(root, f"run-{k}"), range(8)))
    assert outcomes.count("took") == 1
    holder = read_lock(root)["run_id"]
    assert all(f"run {holder} (process" in o for o in outcomes if o != "took")


def test_runs_that_start_together_on_a_stale_lock_take_it_over_once(root):
    write_lock(root, {"run_id": "crashed", "host": "another-host", "pid": 1, "beat": STALE})
    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(lambda k: attempt(root, f"run-{k}"), range(8)))
    # One holder: the run that replaced the stale lock, or (locally, where a takeover moves it aside
    # first) one that found the name free at that moment.
    taken = [o for o in outcomes if o.startswith("took")]
    assert len(taken) == 1 and ("crashed" in taken[0] or root.scheme == "file")
    holder = read_lock(root)["run_id"]
    assert all(f"run {holder} (process" in o for o in outcomes if not o.startswith("took"))


def test_a_lock_rewritten_in_place_never_crashes_a_reader(tmp_path):
    """A writer outside the protocol rewrites the lock in place (truncate, then write) in a tight loop
    while other runs start: each refuses, naming the holder, or (where the writer stalled mid-write through
    all of a reader's retries, as on a busy machine) an unreadable lock; none crashes or takes it over."""
    root = locate(str(tmp_path / "out"), StorageConfig())
    record = json.dumps({"run_id": "nightly-7", "host": "another-host", "pid": 1, "beat": datetime.now(UTC).isoformat()})
    write_lock(root, json.loads(record))
    done = threading.Event()

    def rewrite_in_place():
        while not done.is_set():
            with open(root.join(LOCK_FILE).path, "w") as f:
                f.write(record[:20])
                f.flush()
                time.sleep(0.001)
                f.write(record[20:])
            time.sleep(0.002)  # whole for twice as long as half-written

    writer = threading.Thread(target=rewrite_in_place)
    writer.start()
    try:
        outcomes = [attempt(root, f"reader-{k}") for k in range(40)]
    finally:
        done.set()
        writer.join()
    named, unreadable = "run nightly-7 (process 1 on another-host) holds", "run (unreadable lock) (process -1"
    assert all(named in o or unreadable in o for o in outcomes), set(outcomes)
    # The writer leaves the lock whole twice as long as half-written: the retries read it whole.
    assert any(named in o for o in outcomes), set(outcomes)


def test_the_heartbeat_never_overwrites_a_lock_another_run_took(root):
    holder = OutputLock(root, "slow-run", stale_after_s=300, beat_every_s=0.05)
    holder.acquire()
    try:
        other = {"run_id": "took-it", "host": "another-host", "pid": 1, "beat": datetime.now(UTC).isoformat()}
        write_lock(root, other)
        holder._thread.join(timeout=120)  # the heartbeat ends at its first beat after the takeover
        assert not holder._thread.is_alive()
        assert read_lock(root) == other
    finally:
        holder.release()
    assert read_lock(root) == other  # release leaves another run's lock alone


def test_a_released_lock_is_gone_and_leaves_no_temporary_files(root):
    lock = OutputLock(root, "clean-run", stale_after_s=300, beat_every_s=0.05)
    lock.acquire()
    first = read_lock(root)["beat"]
    deadline = time.monotonic() + 120
    while read_lock(root)["beat"] == first:  # renewed by whole writes
        assert time.monotonic() < deadline
        time.sleep(0.02)
    lock.release()
    root.fs.invalidate_cache()
    assert root.fs.ls(root.path, detail=False) == [] if root.fs.exists(root.path) else True
