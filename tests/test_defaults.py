"""Defaults that fit the hardware, and quiet output, as a user gets them with nothing configured."""

import os
import subprocess
import sys

import ray
import yaml

from pipeline.run.config import load_config
from pipeline.run.schema import RowContract
from pipeline.run.settings import CPU_BATCH_TOKENS, StudentCheck, resolve_settings
from pipeline.run.stages.score import default_torch_threads
from pipeline.scoring.device import CPU_TOKEN_BUDGET
from pipeline.scoring.models import StudentSource
from tests.conftest import REPO


def test_resolved_defaults_on_a_cpu_only_runtime(ray_runtime, tmp_path, student_dirs):
    config = tmp_path / "minimal.yaml"
    config.write_text(yaml.safe_dump({"input": {"paths": ["x.jsonl"]}, "students": [{"name": "s", "path": "p"}]}))
    cfg = load_config(config)
    assert cfg.compute.torch_threads is None and cfg.scoring.token_budget == "auto"
    assert ray.cluster_resources().get("GPU", 0) == 0

    # Sizes and dtype: auto resolves to the measured CPU bests, once, in the run's settings.
    check = StudentCheck(StudentSource("p"), "template", "its tokenizer", 8192, 8192, "rev")
    settings = resolve_settings(cfg, RowContract.of(cfg), [check], ray.cluster_resources().get("GPU", 0))
    (student,) = settings.students
    assert (student.policy.token_budget, student.policy.dtype, settings.gpus_per_actor) == (CPU_TOKEN_BUDGET, "float32", 0)
    assert (CPU_TOKEN_BUDGET, settings.batch_tokens) == (2048, CPU_BATCH_TOKENS) and student.scoring.dtype == "float32"

    # Threads: resolved where an actor runs, from its node's CPUs and the scoring actors that fit there.
    assert (settings.actors, settings.scoring_actors) == ((1, 1), 1)
    resolve = ray.remote(num_cpus=settings.cpus_per_actor)(default_torch_threads)
    threads = ray.get(resolve.remote(settings.cpus_per_actor, settings.scoring_actors))
    assert threads == len(os.sched_getaffinity(0))  # one actor gets every CPU of the node, not 1
    assert ray.get(resolve.remote(settings.cpus_per_actor, 2)) == max(1, threads // 2)
    # An elastic pool that may grow to what fits: each actor its share of the CPUs that fit as many.
    fitting = int(ray.cluster_resources()["CPU"] // settings.cpus_per_actor)
    assert ray.get(resolve.remote(settings.cpus_per_actor, None)) == max(1, threads // fitting)


def test_the_demo_is_quiet_on_a_non_tty(tmp_path, student_dirs, corpus_path):
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({
        "input": {"paths": [str(corpus_path)], "passthrough": ["source"]},
        "students": [{"name": "tiny", "path": str(student_dirs["chatml"])}],
        "output": {"path": str(tmp_path / "out"), "partition_by": ["source"]},
    }))  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_DATA_LOGGING_CONFIG")}
    done = subprocess.run([sys.executable, "-m", "jobs.score", "--config", str(config)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    output = done.stdout + done.stderr
    assert " INFO " not in output and "Loading weights" not in output
    assert "read  scored  rejected  skipped  sampled_out  content_dropped" in done.stdout  # the run summary with its counts
    assert "dataset-level RSR" in done.stdout and "committed" in done.stdout
