"""Chaos soak: SIGKILL the scoring job at random moments, rerun it with defaults, and check the output.

  python -m benchmarks.make_tiny_student && python -m benchmarks.soak                 # 20 kills locally, 20 through S3
  python -m benchmarks.soak --kills 5 --where local
  python -m benchmarks.soak --kills 8 --where cluster                                  # worker nodes and drivers

Each round adds a file of new rows to a growing corpus, starts `python -m jobs.score` with a piece per
few rows (so that kills land in staging, file moves and manifest writes as well as in reading and
scoring), SIGKILLs its process group either at a random time into the run or right as the output shows
a given state (a staging folder, a new manifest), then reruns the job with the default settings. At the
end: every row is present exactly once in a plain glob read of the scores, the last rerun's counts
reconcile, and no debris is left (no staging, no lock, no file that no manifest lists). Last, two runs
started together on one output: one scores, the other refuses with the lock message. The S3 runs go
through a moto server on 127.0.0.1 (installed with '.[test]').

`--where cluster` runs on a local multi-node cluster (a head with no CPUs: the drivers of the jobs,
submitted through the Jobs API; two workers of 3 CPUs), and each round strikes one phase in turn: a
worker lost without warning as the survey starts, while a scoring actor scores, or while a checkpoint's
write task runs (a fresh worker joins each time), or the job's driver SIGKILLed while it scores. A run
that loses a worker should go on by itself; the job's own log names the phase it lost the node in.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import duckdb
import yaml
from ray._private import ray_constants
from ray.cluster_utils import Cluster
from ray.job_submission import JobStatus, JobSubmissionClient

from benchmarks.scale import SYNTHETIC_CORPUS
from jobs.submit import submit
from pipeline.corpus.shapes import row_messages
from pipeline.corpus.storage import Location, locate
from pipeline.run.config import InputConfig, StorageConfig
from pipeline.run.layout import RUNS_DIR, STAGING_DIR, committed_files, read_manifests, scores_prefix
from pipeline.run.lock import LOCK_FILE
from tests.conftest import REPO, LocalCluster, free_port, freeze, lose, node_processes, titled

MOMENTS = ("random time", "staging folder appears", "manifest appears")


def synthetic_rows() -> list[dict]:
    """The synthetic corpus's rows that score."""
    rows = []
    for line in SYNTHETIC_CORPUS.read_text().splitlines():
        try:
            row = json.loads(line)
            row_messages(row, InputConfig(paths=["-"]))
        except (ValueError, AttributeError):  # RowError is a ValueError
            continue
        rows.append(row)
    return rows


def add_file(corpus: Path, round_number: int, rows_per_round: int, base: list[dict]) -> None:
    with open(corpus / f"round-{round_number:03d}.jsonl", "w") as f:
        for k in range(rows_per_round):
            f.write(json.dumps({**base[k % len(base)], "id": f"r{round_number:03d}-{k:04d}"}) + "\n")


def start_job(config: Path, log: Path, overrides: list[str], env: dict) -> subprocess.Popen:
    with open(log, "ab") as f:
        return subprocess.Popen(
            [sys.executable, "-m", "jobs.score", "--config", str(config), *overrides],
            stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip


def rerun_with_defaults(config: Path, log: Path, env: dict) -> bool:
    """Run the job to its end with the default settings; print its log's end when it fails."""
    if start_job(config, log, [], env).wait() == 0:
        return True
    print(f"rerun failed ({log.name}):\n{log.read_text()[-3000:]}", file=sys.stderr, flush=True)
    return False


def kill_group(job: subprocess.Popen) -> None:
    try:
        os.killpg(job.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    job.wait()


def listing(root: Location) -> list[str]:
    root.fs.invalidate_cache()
    if not root.fs.exists(root.path):
        return []
    return [os.path.relpath(p, root.path) for p in root.fs.find(root.path)]


def wait_for_moment(job: subprocess.Popen, root: Location, moment: str, run_seconds: float, rng: random.Random) -> bool:
    """Wait until `moment` (or the job's end: False)."""
    manifests_before = sum(f.startswith(f"{RUNS_DIR}/") for f in listing(root))
    deadline = time.monotonic() + rng.uniform(0.5, run_seconds)
    while job.poll() is None:
        files = listing(root) if moment != "random time" else []
        if moment == "random time" and time.monotonic() >= deadline:
            return True
        if moment == "staging folder appears" and any(f.startswith(f"{STAGING_DIR}/") for f in files):
            return True
        if moment == "manifest appears" and sum(f.startswith(f"{RUNS_DIR}/") for f in files) > manifests_before:
            return True
        time.sleep(0.01 if moment != "random time" else 0.05)
    return False


def last_run_reconciles(root: Location) -> bool:
    """The last manifest's counts: read = scored + rejected + skipped."""
    counts = read_manifests(root)[-1].get("counts", [{}])[0]
    return counts.get("read") == counts.get("scored", 0) + counts.get("rejected", 0) + counts.get("skipped", 0)


def check_output(root: Location, scratch: Path, expected_rows: int) -> dict:
    """Rows once in a plain glob read, and debris (files no manifest lists, staging, lock)."""
    committed = set(committed_files(root))
    files = listing(root)
    debris = [f for f in files if f not in committed and not f.startswith(f"{RUNS_DIR}/")]
    if root.scheme == "s3":
        local = scratch / f"fetched-{time.monotonic_ns()}"
        root.fs.get(root.path + "/", str(local), recursive=True)
        glob = f"{local}/{scores_prefix()}*/**/*.parquet"
    else:
        glob = f"{root.path}/{scores_prefix()}*/**/*.parquet"
    n, distinct = duckdb.sql(f"SELECT count(*), count(DISTINCT (sample_id, student)) FROM read_parquet('{glob}')").fetchall()[0]
    return {"rows": n, "distinct": distinct, "expected": expected_rows, "debris": len(debris), "debris_files": debris[:5]}


def soak(where: str, kills: int, rows_per_round: int, student: str, seed: int, endpoint: str | None) -> dict:
    rng = random.Random(seed)
    base = synthetic_rows()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with tempfile.TemporaryDirectory(prefix=f"rsr-soak-{where}-") as tmp:
        tmp = Path(tmp)
        corpus = tmp / "corpus"
        corpus.mkdir()
        if where == "s3":
            import s3fs

            bucket = f"soak-{seed}-{time.monotonic_ns() % 10**8}"
            s3fs.S3FileSystem(endpoint_url=endpoint).mkdir(bucket)
            output = f"s3://{bucket}/rsr"
        else:
            output = str(tmp / "rsr")
        config = tmp / "job.yaml"
        config.write_text(yaml.safe_dump({
            "input": {"paths": [str(corpus)], "passthrough": ["source"]},
            "students": [{"name": "demo", "path": student}],
            "output": {"path": output, "partition_by": ["source"]},
            "storage": {"endpoint_url": endpoint},
        }))  # fmt: skip
        root = locate(output, StorageConfig(endpoint_url=endpoint))
        log = tmp / "jobs.log"
        killed_at, reruns_ok, run_seconds = {m: 0 for m in MOMENTS}, 0, 20.0
        chaos = ["output.checkpoint_rows=3", "scoring.batch_tokens=1"]
        for round_number in range(kills):
            add_file(corpus, round_number, rows_per_round, base)
            moment = MOMENTS[round_number % len(MOMENTS)]
            started = time.monotonic()
            job = start_job(config, log, chaos, env)
            if wait_for_moment(job, root, moment, run_seconds, rng):
                kill_group(job)
                killed_at[moment] += 1
            else:
                run_seconds = time.monotonic() - started  # the job won the race: aim earlier next time
            reruns_ok += rerun_with_defaults(config, tmp / f"rerun-{round_number}.log", env)
        last_ok = rerun_with_defaults(config, tmp / "last.log", env)
        result = check_output(root, tmp, kills * rows_per_round)
        reconciled = last_run_reconciles(root)

        # Two runs started together on new rows: one scores, the other refuses; neither corrupts.
        add_file(corpus, kills, rows_per_round, base)
        pair = [start_job(config, tmp / f"pair-{k}.log", [], env) for k in range(2)]
        codes = sorted(job.wait() for job in pair)
        refused = sum("holds" in (tmp / f"pair-{k}.log").read_text() for k in range(2))
        final = start_job(config, log, [], env)
        final.wait()
        after_pair = check_output(root, tmp, (kills + 1) * rows_per_round)
        lock_left = root.fs.exists(root.join(LOCK_FILE).path)
        return {
            "where": where, "kills": sum(killed_at.values()), "killed_at": killed_at, "reruns_ok": reruns_ok + last_ok,
            "rows": result["rows"], "distinct": result["distinct"], "expected": result["expected"],
            "counts_reconcile": reconciled, "debris": result["debris"], "debris_files": result["debris_files"],
            "pair_exit_codes": codes, "pair_refused_with_lock_message": refused,
            "after_pair_rows_once": after_pair["rows"] == after_pair["distinct"] == after_pair["expected"],
            "after_pair_debris": after_pair["debris"], "lock_left": lock_left,
        }  # fmt: skip


STRIKES = ("survey starts", "actor scores", "checkpoint written", "driver killed")


def strike(
    nodes: LocalCluster, workers: list, client: JobSubmissionClient, job_id: str, target: str, name: str, fresh_cpus: int = 3
) -> bool:
    """Wait for `target`'s moment in the job, then strike: remove a worker without warning (a fresh one
    of `fresh_cpus` joins, named `name`) or SIGKILL the job's driver. A checkpoint written on the head
    strikes a worker that scores. False when the job ended first."""
    while not client.get_job_status(job_id).is_terminal():
        logs = client.get_job_logs(job_id)
        processes = {id(w): node_processes(w) for w in workers}
        if target == "survey starts" and "survey: reading" in logs:
            victim = workers[0]
        elif target == "actor scores" and "progress:" in logs:
            victim = next((w for w in workers if titled(processes[id(w)], b"ScoreActor")), None)
        elif target == "checkpoint written" and "progress:" in logs:  # not the survey's index write
            writing = [w for w in workers if titled(processes[id(w)], b"Write")]
            if not writing and titled(node_processes(nodes.cluster.head_node), b"Write"):  # the head writes it
                writing = [w for w in workers if titled(processes[id(w)], b"ScoreActor")]
            victim = next(iter(writing), None)
        elif target == "driver killed" and "progress:" in logs:
            for pid in titled(node_processes(nodes.cluster.head_node), b"jobs.score"):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            return True
        else:
            victim = None
        if victim is not None:
            freeze(processes[id(victim)])
            lose(nodes, victim, processes[id(victim)])
            workers.remove(victim)
            workers.append(nodes.add_node(name, num_cpus=fresh_cpus))
            return True
        time.sleep(0.02)
    return False


def loopback_only() -> None:
    """Keep a local cluster's Ray traffic on 127.0.0.1: Ray read its flag when this module imported it,
    so the constant is set as well as the variable (which the processes it starts read)."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


def start_cluster(tmp: Path, head_cpus: int) -> LocalCluster:
    """A local cluster's head, on 127.0.0.1, with the Jobs and state APIs on a free port; files under `tmp`."""
    loopback_only()
    port = free_port()
    head = {"num_cpus": head_cpus, "include_dashboard": True, "dashboard_port": port, "temp_dir": str(tmp / "ray"),
            "dashboard_agent_listen_port": free_port()}  # fmt: skip
    return LocalCluster(Cluster(initialize_head=True, head_node_args=head), f"http://127.0.0.1:{port}", tmp)


def cluster_soak(kills: int, rows_per_round: int, student: str) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="rsr-soak-", dir="/tmp"))  # short: Ray's socket paths are limited
    os.environ["RAY_TMPDIR"] = str(tmp)  # the cluster's address goes there, not to /tmp/ray
    base = synthetic_rows()
    corpus = tmp / "corpus"
    corpus.mkdir()
    output = tmp / "rsr"
    config = tmp / "job.yaml"
    config.write_text(yaml.safe_dump({
        "input": {"paths": [str(corpus)], "passthrough": ["source"]},
        "students": [{"name": "demo", "path": student}],
        "output": {"path": str(output), "partition_by": ["source"]},
    }))  # fmt: skip
    nodes = start_cluster(tmp, head_cpus=0)
    try:
        workers = [nodes.add_node(f"worker-{k}", num_cpus=3) for k in range(2)]
        client = JobSubmissionClient(nodes.dashboard)
        root = locate(str(output), None)
        rounds = []
        chaos = ["output.checkpoint_rows=3", "scoring.batch_tokens=1"]
        for round_number in range(kills):
            add_file(corpus, round_number, rows_per_round, base)
            target = STRIKES[round_number % len(STRIKES)]
            with open(tmp / "submit.log", "a") as quiet, contextlib.redirect_stdout(quiet):
                submit(nodes.dashboard, str(config), chaos, working_dir=str(REPO), wait=False)
                [job_id] = [job.submission_id for job in client.list_jobs() if not job.status.is_terminal()]
                struck = strike(nodes, workers, client, job_id, target, f"joined-{round_number}")
                while not client.get_job_status(job_id).is_terminal():
                    time.sleep(0.2)
                logs = client.get_job_logs(job_id)
                rerun_ok = submit(nodes.dashboard, str(config), [], working_dir=str(REPO)) == 0
            words = sorted({line.split(" while ")[1].split(";")[0].split(".")[0]
                            for line in logs.splitlines() if line.startswith("lost node")})  # fmt: skip
            rounds.append({"strike": target, "struck": struck, "job_words": words, "rerun_ok": rerun_ok,
                           "went_on": client.get_job_status(job_id) == JobStatus.SUCCEEDED})  # fmt: skip
            print(json.dumps(rounds[-1]), flush=True)
        result = check_output(root, tmp, kills * rows_per_round)
        reconciled = last_run_reconciles(root)
        return {"where": "cluster", "rounds": rounds, "rows": result["rows"], "distinct": result["distinct"],
                "expected": result["expected"], "counts_reconcile": reconciled, "debris": result["debris"],
                "debris_files": result["debris_files"], "lock_left": root.fs.exists(root.join(LOCK_FILE).path)}  # fmt: skip
    finally:
        nodes.cluster.shutdown()


def print_cluster_table(r: dict) -> bool:
    print(f"\n{'strike':<20}{'struck':>7}{'job went on':>12}{'rerun ok':>9}  the job's words for the lost node's phase")
    for target in STRIKES:
        mine = [x for x in r["rounds"] if x["strike"] == target]
        words = sorted({w for x in mine for w in x["job_words"]})
        print(f"{target:<20}{sum(x['struck'] for x in mine):>7}{sum(x['went_on'] for x in mine if x['struck']):>12}"
              f"{sum(x['rerun_ok'] for x in mine):>9}  {'; '.join(words) or '-'}")  # fmt: skip
    rows_once = r["rows"] == r["distinct"] == r["expected"]
    debris = r["debris"] + r["lock_left"]
    print(f"rows once: {rows_once} ({r['rows']} rows, {r['distinct']} distinct, {r['expected']} expected); "
          f"counts reconcile: {r['counts_reconcile']}; debris: {debris}")  # fmt: skip
    node_losses_went_on = all(x["went_on"] for x in r["rounds"] if x["struck"] and x["strike"] != "driver killed")
    return rows_once and r["counts_reconcile"] and not debris and all(x["rerun_ok"] for x in r["rounds"]) and node_losses_went_on


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=20, help="kills (each followed by a rerun) per place")
    parser.add_argument("--rows-per-round", type=int, default=30)
    parser.add_argument("--where", choices=["local", "s3", "both", "cluster"], default="both")
    parser.add_argument("--student", default="out/tiny-student", help="python -m benchmarks.make_tiny_student builds it")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "soak")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "soak")
    student = str(Path(args.student).resolve())
    if args.where == "cluster":
        ok = print_cluster_table(cluster_soak(args.kills, args.rows_per_round, student))
        print("soak: all checks passed" if ok else "soak: FAILED")
        return 0 if ok else 1
    results, server = [], None
    try:
        for where in ["local", "s3"] if args.where == "both" else [args.where]:
            endpoint = None
            if where == "s3":
                port = free_port()
                server = subprocess.Popen(
                    ["moto_server", "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
                )
                endpoint = f"http://127.0.0.1:{port}"
                while socket.socket().connect_ex(("127.0.0.1", port)):
                    time.sleep(0.1)
            results.append(soak(where, args.kills, args.rows_per_round, student, args.seed, endpoint))
            print(json.dumps(results[-1]), flush=True)
    finally:
        if server:
            server.terminate()
    print(f"\n{'where':<7}{'kills':>6}{'reruns ok':>10}{'rows once':>10}{'reconcile':>10}{'debris':>7}{'pair: one refused':>19}")
    ok = True
    for r in results:
        rows_once = r["rows"] == r["distinct"] == r["expected"] and r["after_pair_rows_once"]
        pair_ok = r["pair_exit_codes"] == [0, 1] and r["pair_refused_with_lock_message"] == 1
        debris = r["debris"] + r["after_pair_debris"] + r["lock_left"]
        ok &= rows_once and r["counts_reconcile"] and not debris and pair_ok and r["reruns_ok"] == args.kills + 1
        print(
            f"{r['where']:<7}{r['kills']:>6}{r['reruns_ok']:>10}{str(rows_once):>10}{str(r['counts_reconcile']):>10}{debris:>7}{str(pair_ok):>19}"
        )
    print("soak: all checks passed" if ok else "soak: FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
