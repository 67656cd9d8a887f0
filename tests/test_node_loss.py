"""Worker nodes lost mid-run on a real local multi-node cluster: a node lost while the survey reads and
another while a checkpoint is written, and the run goes on on the nodes that join; with no node left
that can host the student, the run fails within `compute.lost_capacity_timeout_minutes` saying what was
lost, commits nothing half-done, and a rerun on a restored cluster resumes after its checkpoints. Only
the processes these tests start are stopped."""

import os
import signal
import threading
import time
from pathlib import Path

import ray
import yaml

from jobs.submit import submit
from pipeline.corpus.storage import locate
from pipeline.run import layout
from pipeline.run.results import METER_NAME
from tests.conftest import REPO, freeze, lose, node_processes, titled, write_jsonl
from tests.test_actor_fault import score_actor_pids
from tests.test_job import read_scores

ROWS = 20  # copies of the test corpus, in as many files: far more work than a checkpoint holds
CHECKPOINT_ROWS = 40  # a file's rows


def lose_the_worker_mid_run(local_cluster, tmp_path, corpus, student_dirs):
    """A head with 1 CPU (room for reads and the survey, never for the scoring actor of 2) and a worker of
    3 (the actor, and a CPU for the tasks after scoring: with none, Ray Data left the results waiting for
    the head's one CPU and the first checkpoint came minutes late), the job submitted through the Jobs
    API. Once the scoring actor has scored two files it is paused (the run cannot end first however fast
    the machine is), and once a checkpoint committed its node is removed without warning.
    Returns the cluster, the job's thread, its outcome, the output's root and the config."""
    nodes = local_cluster(1)
    worker = nodes.add_node("worker", num_cpus=3)
    config = write_job(tmp_path, corpus, student_dirs, lost_capacity_timeout_minutes=0.5)
    job, outcome = start_job(nodes, config)
    root = locate(str(tmp_path / "out"), None)
    wait_until_two_files_scored(nodes, job)
    [scoring] = score_actor_pids()
    os.kill(scoring, signal.SIGSTOP)
    while not any(m.get("piece") for m in layout.read_manifests(root)):  # a checkpoint committed
        assert job.is_alive(), "the job ended before it committed a checkpoint"
        time.sleep(0.05)
    lose(nodes, worker, [scoring])
    return nodes, job, outcome, root, config


def write_job(tmp_path, corpus, student_dirs, **compute) -> Path:
    """ROWS copies of the test corpus, a file each, and the job's config: one scoring actor of 2 CPUs."""
    for k in range(ROWS):
        write_jsonl(tmp_path / "corpus" / f"part-{k}.jsonl", [{**row, "id": f"{row['id']}-{k}"} for row in corpus])
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({
        "input": {"paths": [str(tmp_path / "corpus")]},
        "students": [{"name": "tiny", "path": str(student_dirs["chatml"])}],
        "compute": {"actors_per_student": "1", "cpus_per_actor": 2, "torch_threads": 1, **compute},
        "scoring": {"batch_tokens": "1000"},
        "output": {"path": str(tmp_path / "out"), "checkpoint_rows": CHECKPOINT_ROWS},
    }))  # fmt: skip
    return config


def start_job(nodes, config: Path) -> tuple[threading.Thread, dict]:
    """The job submitted through the Jobs API from a thread, and where its exit code lands (`rc`)."""
    outcome = {}
    job = threading.Thread(target=lambda: outcome.update(rc=submit(nodes.dashboard, str(config), [], working_dir=str(REPO))))
    job.start()
    return job, outcome


def wait_until_two_files_scored(nodes, job: threading.Thread) -> None:
    """Read the running job's progress meter (`results.ScoringMeter`) from this process as a second driver
    until two files' rows are scored. A file is one scoring task: by then the first task has handed its
    results over, enough for a checkpoint whatever a paused actor still holds."""
    ray.init(address=nodes.cluster.address)
    while not (named := [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(METER_NAME)]):
        assert job.is_alive(), "the job ended before it started scoring"
        time.sleep(0.05)
    meter = ray.get_actor(named[0]["name"], namespace=named[0]["namespace"])
    while ray.get(meter.read.remote())["finished"] < 2 * CHECKPOINT_ROWS:
        assert job.is_alive(), "the job ended before its actor scored two files"
        time.sleep(0.01)


def test_a_run_goes_on_after_losing_a_node_while_it_surveys_and_another_while_it_commits(
    local_cluster, tmp_path, corpus, student_dirs, capsys
):
    """A head with no CPUs (the driver and the progress meter; every task and actor runs on a worker), the
    job submitted through the Jobs API with no worker yet: its survey waits. A worker joins whose Ray
    workers are paused as they start, so the survey cannot finish without it; once the job's log says
    the node joined, it is removed without warning. A fresh worker takes the survey and the scoring; once
    its actor has scored two files it is paused, and while a checkpoint's write task runs there, that
    worker is removed too. A third joins. The run succeeds by itself, every row once."""
    nodes = local_cluster(0)
    job, outcome = start_job(nodes, write_job(tmp_path, corpus, student_dirs))
    log = ""
    while "survey: reading" not in log:  # the survey waits for CPUs
        log += capsys.readouterr().out
        assert job.is_alive(), "the job ended before its survey"
        time.sleep(0.05)

    surveying = nodes.add_node("surveying", num_cpus=3)
    while "node joined" not in log:
        freeze(node_processes(surveying)[1:])  # every process under the raylet: its workers never take a task
        log += capsys.readouterr().out
        assert job.is_alive(), "the job ended before it saw the node join"
        time.sleep(0.01)
    lose(nodes, surveying, node_processes(surveying))

    scoring = nodes.add_node("scoring", num_cpus=3)  # the scoring actor of 2, and a CPU for tasks
    wait_until_two_files_scored(nodes, job)
    freeze(titled(node_processes(scoring), b"ScoreActor"))
    while not titled(node_processes(scoring), b"Write"):  # the first checkpoint is being written
        assert job.is_alive(), "the job ended before it wrote a checkpoint"
        time.sleep(0.01)
    held = node_processes(scoring)
    freeze(held)
    lose(nodes, scoring, held)
    nodes.add_node("fresh", num_cpus=3)

    job.join(timeout=600)  # a safety net: the run must end by itself
    log += capsys.readouterr().out
    assert not job.is_alive() and outcome["rc"] == 0, log[-3000:]
    assert "while surveying the corpus" in log
    assert "while scoring and committing checkpoints;" in log and "the run goes on" in log
    assert log.count("node joined") == 3
    assert f"progress: {ROWS * len(corpus):,} of {ROWS * len(corpus):,} rows" in log  # the last progress line
    root = locate(str(tmp_path / "out"), None)
    scores = read_scores(root.path)
    assert scores.num_rows == len(set(scores["sample_id"].to_pylist())) == ROWS * len(corpus)
    [run] = [m for m in layout.read_manifests(root) if m.get("completed")]
    assert sum(c["scored"] for m in layout.read_manifests(root) if m.get("piece") for c in m["counts"]) == ROWS * len(corpus)
    assert run["counts"][0]["scored"] == ROWS * len(corpus)


def test_a_run_with_no_node_left_for_its_student_fails_in_time_and_a_rerun_resumes(
    local_cluster, tmp_path, corpus, student_dirs, capsys
):
    nodes, job, outcome, root, config = lose_the_worker_mid_run(local_cluster, tmp_path, corpus, student_dirs)
    job.join(timeout=600)  # a safety net: the run must end by itself
    assert not job.is_alive() and outcome["rc"] == 1
    log = capsys.readouterr().out
    assert "lost node" in log and "no node left can host student tiny" in log
    manifests = layout.read_manifests(root)
    assert manifests and not any(m.get("completed") for m in manifests)  # its pieces stay, the run is not committed
    committed = sum(c["scored"] for m in manifests for c in m["counts"])

    nodes.add_node("restored", num_cpus=2)
    assert submit(nodes.dashboard, str(config), [], working_dir=str(REPO)) == 0
    scores = read_scores(root.path)
    assert scores.num_rows == len(set(scores["sample_id"].to_pylist())) == ROWS * len(corpus)
    [run] = [m for m in layout.read_manifests(root) if m.get("completed")]
    [counts] = run["counts"]
    assert counts["skipped"] == committed and counts["scored"] == ROWS * len(corpus) - committed
