"""A worker node lost while it scores, on a three-node local cluster (a head of 1 CPU, two workers of 2):
the first 600 shared GSM8K rows, 2 scoring actors of 2 CPUs, the job submitted through the Jobs API. Once
both actors are alive they are paused (so that the run cannot end first), the worker hosting one is
removed without warning, a fresh node joins, and the survivor goes on. Prints the job's log lines about
the loss and the outcome; exits 0 when the job succeeded with every row once.

  python -m benchmarks.make_tiny_student && python -m benchmarks.node_loss
"""

import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import duckdb
import yaml
from ray.cluster_utils import Cluster
from ray.util.state import list_actors

from jobs.submit import submit
from tests.conftest import REPO, free_port
from tests.test_actor_fault import score_actor_pids


def alive_score_actors(dashboard: str) -> list:
    return [
        a for a in list_actors(address=dashboard, detail=True, limit=1000) if "ScoreActor" in a.class_name and a.state == "ALIVE"
    ]


def main() -> int:
    tmp = Path(tempfile.mkdtemp(prefix="rsr-3n-", dir="/tmp"))  # short: Ray's socket paths are limited
    os.environ["RAY_TMPDIR"] = str(tmp)
    rows = (REPO.parent / "shared" / "data" / "gsm8k_multisource_300.jsonl").read_text().splitlines()[:600]
    (tmp / "corpus").mkdir()
    for k in range(6):  # six files: read tasks that keep blocks coming
        (tmp / "corpus" / f"part-{k}.jsonl").write_text("\n".join(rows[k * 100 : (k + 1) * 100]) + "\n")
    port = free_port()
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1,
            "include_dashboard": True,
            "dashboard_port": port,
            "temp_dir": str(tmp / "ray"),
            "dashboard_agent_listen_port": free_port(),
        },
    )
    workers = [
        cluster.add_node(num_cpus=2, temp_dir=str(tmp / f"w{k}"), dashboard_agent_listen_port=free_port()) for k in range(2)
    ]
    dashboard = f"http://127.0.0.1:{port}"
    out = tmp / "out"
    config = tmp / "job.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "input": {"paths": [str(tmp / "corpus")], "passthrough": ["source"]},
                "students": [{"name": "tiny", "path": str(REPO / "out" / "tiny-student")}],
                "compute": {"actors_per_student": "2", "cpus_per_actor": 2, "torch_threads": 1},
                "scoring": {"batch_tokens": "2000"},
                "output": {"path": str(out), "checkpoint_rows": 100},
            }
        )
    )
    outcome = {}
    job = threading.Thread(target=lambda: outcome.update(rc=submit(dashboard, str(config), [], working_dir=str(REPO))))
    started = time.monotonic()
    job.start()
    while len(actors := alive_score_actors(dashboard)) < 2:
        assert job.is_alive(), "ended before its actors started"
        time.sleep(0.1)
    paused = score_actor_pids()
    for pid in paused:  # the run cannot end before the loss
        os.kill(pid, signal.SIGSTOP)
    victim = next(w for w in workers if w.node_id in {a.node_id for a in actors})
    cluster.remove_node(victim, allow_graceful=False)
    for pid in paused:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:  # the removed node's
            pass
    print(
        f"node_loss: removed worker {victim.node_id[:8]} hosting a scoring actor at {time.monotonic() - started:.1f} s",
        flush=True,
    )
    cluster.add_node(num_cpus=2, temp_dir=str(tmp / "fresh"), dashboard_agent_listen_port=free_port())
    print("node_loss: a fresh node joined", flush=True)
    job.join()
    scores = duckdb.sql(
        f"SELECT count(*), count(DISTINCT sample_id) FROM read_parquet('{out}/student=*/**/*.parquet')"
    ).fetchall()
    print(f"node_loss: job rc {outcome['rc']}; scores {scores}; wall {time.monotonic() - started:.1f} s", flush=True)
    cluster.shutdown()
    return 0 if outcome["rc"] == 0 and scores == [(600, 600)] else 1


if __name__ == "__main__":
    sys.exit(main())
