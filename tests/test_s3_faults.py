"""S3 faults through a fault-injecting proxy on 127.0.0.1: transient errors are retried and change
nothing; permanent ones stop the job with a clear error and commit nothing."""

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import s3fs

from pipeline.corpus.storage import StorageError
from pipeline.run.job import run_job
from tests.conftest import free_port
from tests.test_job import job_config, read_scores

PROXY = Path(__file__).parent / "s3_fault_proxy.py"


@pytest.fixture
def fault_proxy(s3_endpoint, tmp_path):
    """Start a proxy in front of the S3 server; returns (endpoint, injected-fault counter)."""
    started = []

    def start(*options):
        port, stats = free_port(), tmp_path / f"faults-{len(started)}.txt"
        upstream = s3_endpoint.rsplit(":", 1)[1]
        started.append(subprocess.Popen([sys.executable, str(PROXY), str(port), upstream, str(stats), *options]))
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        return f"http://127.0.0.1:{port}", lambda: int(stats.read_text()) if stats.exists() else 0

    yield start
    for process in started:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture
def bucket(s3_endpoint, corpus_path, request):
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint)
    name = f"faults-{request.node.name.replace('_', '-')[:40].lower()}"
    fs.mkdir(name)
    fs.put(str(corpus_path), f"{name}/in/corpus.jsonl")
    return fs, name


def scores_by_id(fs, url, tmp_path, name):
    local = tmp_path / name
    fs.get(url, str(local), recursive=True)
    table = read_scores(local).to_pylist()
    return {row["sample_id"]: {k: row[k] for k in ("avg_rank_clip", "avg_surprisal", "rank_surprisal_ratio")} for row in table}


def test_transient_errors_are_retried_and_change_nothing(ray_runtime, tmp_path, s3_endpoint, bucket, fault_proxy, student_dirs):
    fs, name = bucket
    students = {"tiny": student_dirs["chatml"]}
    clean = job_config(tmp_path, [f"s3://{name}/in/"], f"s3://{name}/clean", students, [f"storage.endpoint_url={s3_endpoint}"])
    run_job(clean)
    endpoint, injected = fault_proxy("--fail-every", "5", "--max-failures", "25")
    faulty = job_config(tmp_path, [f"s3://{name}/in/"], f"s3://{name}/faulty", students, [f"storage.endpoint_url={endpoint}"])
    result = run_job(faulty)
    assert injected() >= 5  # the faults really happened
    [counts] = result.counts.to_pylist()
    assert counts["rejected"] == 0 and counts["scored"] == counts["read"]
    expected = scores_by_id(fs, f"{name}/clean/", tmp_path, "clean")
    got = scores_by_id(fs, f"{name}/faulty/", tmp_path, "faulty")
    assert len(expected) == counts["read"] and got.keys() == expected.keys()
    for sample_id, stats in expected.items():
        assert got[sample_id] == pytest.approx(stats, abs=1e-6)


def test_missing_output_bucket_is_a_clear_error(ray_runtime, tmp_path, s3_endpoint, bucket, student_dirs):
    fs, name = bucket
    cfg = job_config(tmp_path, [f"s3://{name}/in/"], "s3://no-such-bucket/out", {"tiny": student_dirs["chatml"]},
                     [f"storage.endpoint_url={s3_endpoint}"])  # fmt: skip
    with pytest.raises(StorageError, match="s3://no-such-bucket does not exist"):
        run_job(cfg)
    assert not fs.exists("no-such-bucket")


def test_access_denied_is_a_clear_error_and_commits_nothing(
    ray_runtime, tmp_path, s3_endpoint, bucket, fault_proxy, student_dirs
):
    fs, name = bucket
    fs.mkdir("denied")
    endpoint, injected = fault_proxy("--deny-bucket", "denied")
    cfg = job_config(tmp_path, [f"s3://{name}/in/"], "s3://denied/out", {"tiny": student_dirs["chatml"]},
                     [f"storage.endpoint_url={endpoint}"])  # fmt: skip
    with pytest.raises(StorageError, match="cannot access output s3://denied/out"):
        run_job(cfg)
    assert injected() >= 1 and fs.ls("denied") == []


def test_a_run_reads_the_corpus_twice_from_s3(ray_runtime, tmp_path, bucket, fault_proxy, student_dirs, monkeypatch):
    """Once to find repeated ids and count the rows, once to score; a progress line every moment so that
    a row count for the time left would show as a third read."""
    from pipeline.run import results

    monkeypatch.setattr(results, "PROGRESS_EVERY_S", 0.0)
    fs, name = bucket
    gets = tmp_path / "gets.log"
    endpoint, _ = fault_proxy("--log-gets", str(gets))
    cfg = job_config(tmp_path, [f"s3://{name}/in/"], f"s3://{name}/out", {"tiny": student_dirs["chatml"]},
                     [f"storage.endpoint_url={endpoint}"])  # fmt: skip
    lines = []
    run_job(cfg, progress=lines.append)
    reads = [line.split() for line in gets.read_text().splitlines()]
    corpus_reads = [int(size) for path, size in reads if path.endswith("/in/corpus.jsonl")]
    size = fs.size(f"{name}/in/corpus.jsonl")
    assert lines and sum(corpus_reads) == 2 * size, (len(corpus_reads), sum(corpus_reads), size)
    print(
        f"bytes read from S3 by the run: {sum(int(s) for _, s in reads):,}, the corpus {sum(corpus_reads):,} ({size:,} bytes, read twice)"
    )
