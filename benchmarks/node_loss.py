"""A worker node lost in each phase of a run, on a three-node local cluster (a head of 1 CPU, two workers
of 2): the first 600 shared GSM8K rows, 2 scoring actors of 2 CPUs, the job submitted through the Jobs
API. One run per strike (`benchmarks.soak.STRIKES`): a worker removed without warning as the survey
starts, while its actor scores, or while a checkpoint's write task runs there; a fresh node of 2 CPUs
joins each time. Prints the job's own lines about the loss and its outcome; exits 0 when every run
succeeded by itself with every row once.

  python -m benchmarks.make_tiny_student && python -m benchmarks.node_loss [--strike "actor scores"]
"""

import argparse
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

import duckdb
import yaml
from ray.job_submission import JobStatus, JobSubmissionClient

from benchmarks.soak import STRIKES, start_cluster, strike
from jobs.submit import submit
from tests.conftest import REPO

NODE_STRIKES = STRIKES[:3]  # a killed driver is the soak's
SAID = ("survey: reading", "lost node", "node joined", "rows scored again", "error:")


def lose_a_node(target: str, rows: list[str], student: Path) -> bool:
    tmp = Path(tempfile.mkdtemp(prefix="rsr-3n-", dir="/tmp"))  # short: Ray's socket paths are limited
    os.environ["RAY_TMPDIR"] = str(tmp)
    (tmp / "corpus").mkdir()
    for k in range(6):  # six files: read tasks that keep blocks coming
        (tmp / "corpus" / f"part-{k}.jsonl").write_text("\n".join(rows[k * 100 : (k + 1) * 100]) + "\n")
    out = tmp / "out"
    config = tmp / "job.yaml"
    config.write_text(yaml.safe_dump({
        "input": {"paths": [str(tmp / "corpus")], "passthrough": ["source"]},
        "students": [{"name": "tiny", "path": str(student)}],
        "compute": {"actors_per_student": "2", "cpus_per_actor": 2, "torch_threads": 1},
        "scoring": {"batch_tokens": "2000"},
        "output": {"path": str(out), "checkpoint_rows": 100},
    }))  # fmt: skip
    nodes = start_cluster(tmp, head_cpus=1)
    try:
        workers = [nodes.add_node(f"worker-{k}", num_cpus=2) for k in range(2)]
        client = JobSubmissionClient(nodes.dashboard)
        started = time.monotonic()
        with open(tmp / "submit.log", "w") as quiet, contextlib.redirect_stdout(quiet):
            submit(nodes.dashboard, str(config), [], working_dir=str(REPO), wait=False)
        [job_id] = [job.submission_id for job in client.list_jobs()]
        struck = strike(nodes, workers, client, job_id, target, "fresh", fresh_cpus=2)
        while not client.get_job_status(job_id).is_terminal():
            time.sleep(0.5)
        status = client.get_job_status(job_id)
        lines = client.get_job_logs(job_id).splitlines()
        said = [line for line in lines if line.startswith(SAID)] + [line for line in lines if line.startswith("progress:")][-1:]
        scores = duckdb.sql(
            f"SELECT count(*), count(DISTINCT sample_id) FROM read_parquet('{out}/student=*/**/*.parquet')"
        ).fetchall()
    finally:
        nodes.cluster.shutdown()
    print(
        f"\n== {target}: struck {struck}; job {status.value} in {time.monotonic() - started:.0f} s; scores (rows, distinct ids) {scores}"
    )
    for line in said:
        print(f"   {line[:400]}")
    return struck and status == JobStatus.SUCCEEDED and scores == [(600, 600)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strike", choices=NODE_STRIKES, action="append", help="default: each in turn")
    parser.add_argument("--student", default="out/tiny-student", help="python -m benchmarks.make_tiny_student builds it")
    args = parser.parse_args(argv)
    rows = (REPO.parent / "shared" / "data" / "gsm8k_multisource_300.jsonl").read_text().splitlines()[:600]
    student = Path(args.student).resolve()
    ok = [lose_a_node(target, rows, student) for target in args.strike or NODE_STRIKES]
    print(f"\nnode_loss: {sum(ok)} of {len(ok)} runs succeeded by themselves with 600 rows once")
    return 0 if all(ok) else 1


if __name__ == "__main__":
    sys.exit(main())
