"""Real multi-node Ray clusters on 127.0.0.1: the scoring job goes in through the Jobs API and its score
actors run on both nodes; an elastic pool grows onto a node that joins mid-run. Only the processes
these tests start are stopped."""

import os
import signal
import threading
import time

import duckdb
import yaml
from ray.util.state import list_actors

from jobs.submit import submit
from tests.conftest import REPO, score_actors, write_jsonl
from tests.test_actor_fault import score_actor_pids
from tests.test_job import read_scores


def test_job_submitted_to_a_two_node_cluster(local_cluster, tmp_path, corpus_path, student_dirs):
    nodes = local_cluster(3, 3)
    dashboard = nodes.dashboard
    config = tmp_path / "job.yaml"
    out = tmp_path / "out"
    config.write_text(yaml.safe_dump({
        "input": {"paths": [str(corpus_path)], "passthrough": ["source"]},
        "students": [{"name": "tiny", "path": str(student_dirs["chatml"])}],
        # two actors that need 2 of a node's 3 CPUs each: one per node, a CPU left on each for tasks
        "compute": {"actors_per_student": 2, "cpus_per_actor": 2, "torch_threads": 1},
        "scoring": {"batch_tokens": "1000"},
        "output": {"path": str(out), "partition_by": ["source"]},
    }))  # fmt: skip
    assert submit(dashboard, str(config), [], working_dir=str(REPO)) == 0
    actors = list_actors(address=dashboard, detail=True, limit=1000)
    assert len({a.node_id for a in actors if "ScoreActor" in a.class_name}) == 2
    # The progress meter lives with the driver (the head, under the Jobs API): losing a worker never takes it.
    assert {a.node_id for a in actors if a.class_name == "ScoringMeter"} == {nodes.cluster.head_node.node_id}

    n_rows = len(corpus_path.read_text().splitlines())
    scores = duckdb.sql(f"SELECT * FROM read_parquet('{out}/student=*/**/*.parquet', hive_partitioning=true)")
    assert scores.to_arrow_table().num_rows == n_rows

    # A job that fails (here: a bad override) makes the submitter exit non-zero.
    assert submit(dashboard, str(config), ["scoring.rank_clip=0"], working_dir=str(REPO)) == 1


def test_an_elastic_pool_grows_onto_a_node_that_joins_mid_run(local_cluster, tmp_path, corpus, student_dirs):
    """`compute.actors_per_student: 1..2` on a cluster with room for one scoring actor: the pool's one actor
    starts, a node joins mid-run, and the pool puts a second actor there while blocks still queue. The
    first actor is paused (SIGSTOP) from the node's join until the second one is alive, so that the run
    cannot end first however fast the machine is; every row is scored once."""
    nodes = local_cluster(1, 2)  # a head for the read and survey tasks, one worker with room for one actor
    for k in range(6):  # read tasks that keep blocks coming for the pool
        write_jsonl(tmp_path / "corpus" / f"part-{k}.jsonl", [{**row, "id": f"{row['id']}-{k}"} for row in corpus])
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({
        "input": {"paths": [str(tmp_path / "corpus")], "passthrough": ["source"]},
        "students": [{"name": "tiny", "path": str(student_dirs["chatml"])}],
        "compute": {"actors_per_student": "1..2", "cpus_per_actor": 2, "torch_threads": 1},
        "scoring": {"batch_tokens": "1000"},
        "output": {"path": str(tmp_path / "out")},
    }))  # fmt: skip
    outcome = {}
    job = threading.Thread(target=lambda: outcome.update(rc=submit(nodes.dashboard, str(config), [], working_dir=str(REPO))))
    job.start()
    while not [a for a in score_actors(nodes.dashboard) if a.state == "ALIVE"]:
        assert job.is_alive(), "the job ended before its scoring actor started"
        time.sleep(0.2)
    paused = score_actor_pids()
    assert len(paused) == 1  # room for one actor of 2 CPUs at the start
    os.kill(paused[0], signal.SIGSTOP)
    try:
        # Ray Data gives a CPU pool a share of the cluster's CPUs beside the read and tokenize tasks: a
        # node of 6 leaves room for a second actor of 2 (one of 2 would not). Nodes start from the main thread.
        joined = nodes.add_node("joined", num_cpus=6)
        deadline = time.monotonic() + 600  # a safety net: the wait is on the actor's state
        while not [a for a in score_actors(nodes.dashboard) if a.node_id == joined.node_id and a.state == "ALIVE"]:
            assert time.monotonic() < deadline, "no scoring actor started on the node that joined"
            time.sleep(0.5)
    finally:
        os.kill(paused[0], signal.SIGCONT)
        job.join()
    assert outcome["rc"] == 0
    scores = read_scores(tmp_path / "out")
    assert scores.num_rows == len(set(scores["sample_id"].to_pylist())) == 6 * len(corpus)
