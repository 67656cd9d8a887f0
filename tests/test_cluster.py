"""A real two-node Ray cluster on 127.0.0.1: the scoring job goes in through the Jobs API and its
score actors run on both nodes. Only the processes this test starts are stopped."""

import shutil
import tempfile
from pathlib import Path

import duckdb
import pytest
import ray
import yaml
from ray.cluster_utils import Cluster
from ray.util.state import list_actors

from jobs.submit import submit
from tests.conftest import REPO, free_port


@pytest.fixture
def two_node_cluster(monkeypatch):
    # The nodes start from this process, whose Ray state is one cluster's (starting the head points
    # ray.experimental.internal_kv at its GCS): the local runtime goes; the next test that needs it restarts it.
    ray.shutdown()
    port = free_port()
    temp = Path(tempfile.mkdtemp(prefix="rsr-ray-", dir="/tmp"))  # short: Ray's socket paths are limited
    # Ray's default temp dir becomes the head's: Cluster writes the cluster's address there (not into
    # /tmp/ray, where any plain ray.init() on the machine would join it), and the Jobs API reads it there
    # for the job's driver; without it, the driver gets the first GCS of any runtime on the machine.
    monkeypatch.setenv("RAY_TMPDIR", str(temp))
    # Each node has its own temp dir: a shared one lets one node's runtime-env cleanup delete the
    # working directory under the other's running driver.
    # Own agent ports too: the default one is taken when another local runtime is up.
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 3, "include_dashboard": True, "dashboard_port": port, "temp_dir": str(temp / "ray"),
                        "dashboard_agent_listen_port": free_port()},
    )  # fmt: skip
    try:
        cluster.add_node(num_cpus=3, temp_dir=str(temp / "worker"), dashboard_agent_listen_port=free_port())
        yield f"http://127.0.0.1:{port}"
    finally:
        cluster.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


def test_job_submitted_to_a_two_node_cluster(two_node_cluster, tmp_path, corpus_path, student_dirs):
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
    assert submit(two_node_cluster, str(config), [], working_dir=str(REPO)) == 0

    actors = list_actors(address=two_node_cluster, detail=True, limit=1000)
    score_nodes = {a.node_id for a in actors if "ScoreActor" in a.class_name}
    assert len(score_nodes) == 2

    n_rows = len(corpus_path.read_text().splitlines())
    scores = duckdb.sql(f"SELECT * FROM read_parquet('{out}/student=*/**/*.parquet', hive_partitioning=true)")
    assert scores.to_arrow_table().num_rows == n_rows

    # A job that fails (here: a bad override) makes the submitter exit non-zero.
    assert submit(two_node_cluster, str(config), ["scoring.rank_clip=0"], working_dir=str(REPO)) == 1
