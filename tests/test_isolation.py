"""Two local jobs started at once share no Ray state with each other or with any other runtime on the
machine: each starts its own runtime in its own temp dir, on loopback, with its own auth token."""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import duckdb
import pytest
import yaml

from tests.conftest import REPO, free_port

# The job in a fresh process, as `python -m jobs.score` runs it (Ray imported before the runtime starts),
# then the address its runtime's node took.
RUN_JOB = """
import sys
import ray
from pipeline.run.config import load_config
from pipeline.run.job import run_job
run_job(load_config(sys.argv[1]), quiet=True)
print("node", ray.util.get_node_ip_address())
"""


def test_two_local_jobs_at_once_share_no_ray_state(tmp_path, corpus_path, student_dirs):
    ray_tmp = Path(tempfile.mkdtemp(prefix="rsr-iso-", dir="/tmp"))  # short: Ray's socket paths are limited
    # What `ray start` and ray.cluster_utils leave in Ray's default temp dir: a plain ray.init() would
    # try to join that cluster instead of starting a runtime.
    (ray_tmp / "ray").mkdir()
    (ray_tmp / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{free_port()}")
    home = tmp_path / "home"  # where Ray would write ~/.ray/auth_token
    home.mkdir()
    # A user's environment: none of what this process set for its own runtime.
    ours = (
        "RAY_ADDRESS",
        "RAY_AUTH_MODE",
        "RAY_AUTH_TOKEN",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER",
        "DASHBOARD_METRIC_PORT",
        "AUTOSCALER_METRIC_PORT",
    )
    env = {k: v for k, v in os.environ.items() if k not in ours} | {"RAY_TMPDIR": str(ray_tmp), "HOME": str(home)}
    runs = {}
    for name in ("a", "b"):
        config = tmp_path / f"{name}.yaml"
        config.write_text(yaml.safe_dump({
            "input": {"paths": [str(corpus_path)], "passthrough": ["source"]},
            "students": [{"name": "tiny", "path": str(student_dirs["chatml"])}],
            "compute": {"cpus_per_actor": 0.5, "torch_threads": 1},
            "output": {"path": str(tmp_path / f"out-{name}"), "partition_by": ["source"]},
        }))  # fmt: skip
        runs[name] = subprocess.Popen(
            [sys.executable, "-c", RUN_JOB, str(config)],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    outputs = {name: run.communicate(timeout=600) for name, run in runs.items()}

    n_rows = len(corpus_path.read_text().splitlines())
    for name, (stdout, stderr) in outputs.items():
        assert runs[name].returncode == 0, stderr[-3000:]
        assert "node 127.0.0.1" in stdout.splitlines()
        scores = duckdb.sql(f"SELECT * FROM read_parquet('{tmp_path}/out-{name}/student=*/**/*.parquet', hive_partitioning=true)")
        assert scores.to_arrow_table().num_rows == n_rows
    assert len(list(ray_tmp.glob("rsr-ray-*/session_2*"))) == 2  # a temp dir of its own each
    assert not list((ray_tmp / "ray").glob("session_*"))
    assert not (home / ".ray").exists()
    shutil.rmtree(ray_tmp, ignore_errors=True)


# Freezes the first raylet this process starts (SIGSTOP, as a starved process looks to the GCS), so that
# Ray's fixed 30 s for the node to register runs out; then reports the frozen raylet's fate.
START_WITH_A_FROZEN_RAYLET = """
import os, signal, threading, time
from pathlib import Path
import ray
from pipeline.run.job import start_local_ray

frozen = []

def freeze_first_raylet():
    while not frozen:
        for proc in Path("/proc").iterdir():
            try:
                command = (proc / "cmdline").read_bytes().split(b"\\0")
                parent = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if parent == os.getpid() and command[0].endswith(b"/raylet"):
                os.kill(int(proc.name), signal.SIGSTOP)
                frozen.append(proc)
                return
        time.sleep(0.01)

threading.Thread(target=freeze_first_raylet, daemon=True).start()
start_local_ray(num_cpus=1, include_dashboard=False)
print("result", ray.get(ray.remote(lambda: 1 + 1).remote()))
gone = not frozen[0].exists() or (frozen[0] / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
print("first raylet gone", gone)
"""


def test_a_node_that_misses_rays_start_deadline_is_replaced():
    """A local runtime whose raylet misses Ray's registration deadline (a busy machine) is stopped and
    started again; the job gets a working runtime."""
    if not Path("/proc/self/stat").exists():
        pytest.skip("finds the raylet through /proc (Linux)")
    ray_tmp = tempfile.mkdtemp(prefix="rsr-iso-", dir="/tmp")  # short: Ray's socket paths are limited
    try:
        proc = subprocess.run([sys.executable, "-c", START_WITH_A_FROZEN_RAYLET], cwd=REPO, capture_output=True,
                              env={**os.environ, "RAY_TMPDIR": ray_tmp}, text=True, timeout=600)  # fmt: skip
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "starting it again, attempt 2 of 3" in proc.stdout
    assert "result 2" in proc.stdout and "first raylet gone True" in proc.stdout
