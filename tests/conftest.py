import contextlib
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

# Keep every Ray connection on loopback (../shared/notes/ray-on-this-machine.md); set before Ray starts.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# Nothing shared with other Ray runtimes on the machine, as in the job's own (pipeline.run.job.ensure_ray): a
# token instead of ~/.ray/auth_token, free ports for the head's metrics servers.
os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
for metrics_port in ("DASHBOARD_METRIC_PORT", "AUTOSCALER_METRIC_PORT"):
    os.environ.setdefault(metrics_port, "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Ray workers inherit the environment at ray.init: the S3 test server's dummy credentials go in first.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")

from benchmarks.tiny_student import build_tiny_student  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def make_corpus(n_rows: int = 40, seed: int = 0) -> list[dict]:
    """Chat rows of mixed lengths, some multi-turn, some with a system message."""
    rng = random.Random(seed)
    words = "the of and to a in is that for it as with was on be at by this had not are but from or have".split()
    numbers = [str(n) for n in range(100)]

    def sentence(n_words):
        return " ".join(rng.choice(words + numbers) for _ in range(n_words)).capitalize() + "."

    rows = []
    for i in range(n_rows):
        messages = [{"role": "system", "content": sentence(6)}] if i % 5 == 0 else []
        for _ in range(1 + (i % 3 == 0)):  # every third row has two exchanges
            messages.append({"role": "user", "content": sentence(rng.randint(3, 15))})
            reply = "\n".join(sentence(rng.randint(4, 12)) for _ in range(rng.randint(1, 1 + i % 12)))
            messages.append({"role": "assistant", "content": reply})
        rows.append({"id": f"row-{i:03d}", "problem_id": f"p{i % 7}", "source": f"teacher_{i % 3}", "messages": messages})
    return rows


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


@pytest.fixture(scope="session")
def corpus() -> list[dict]:
    return make_corpus()


@pytest.fixture(scope="session")
def corpus_path(tmp_path_factory, corpus) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("corpus") / "corpus.jsonl", corpus)


@pytest.fixture(scope="session")
def student_dirs(tmp_path_factory, corpus_path) -> dict[str, Path]:
    """Tiny random Llama students with tokenizers trained on the test corpus, one per chat template."""
    root = tmp_path_factory.mktemp("students")
    return {
        template: build_tiny_student(root / template, corpus_path, template=template, seed=seed)
        for seed, template in enumerate(["chatml", "llama3", "plain"])
    }


def start_ray():
    """A local Ray runtime, started once and kept for the tests after (ray.init costs seconds). Four
    logical CPUs on two cores so that two students' actors and the read and tokenize tasks all get a
    slot; a stalled pipeline fails within 120 s."""
    import ray
    from ray.data import DataContext

    from pipeline.run.job import start_local_ray

    if not ray.is_initialized():
        start_local_ray(num_cpus=4, include_dashboard=False, log_to_driver=False)
        DataContext.get_current().execution_no_progress_timeout_s = 120
    return ray


@pytest.fixture
def ray_runtime():
    return start_ray()


def pytest_sessionfinish(session, exitstatus):
    import ray

    ray.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3-compatible server (moto) on 127.0.0.1, in its own process."""
    port = free_port()
    server = subprocess.Popen(
        ["moto_server", "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError as exc:
            if time.time() > deadline:
                server.kill()
                raise RuntimeError("moto_server did not start") from exc
            time.sleep(0.2)
    yield endpoint
    server.terminate()
    server.wait(timeout=10)


@dataclass
class LocalCluster:
    cluster: object  # ray.cluster_utils.Cluster
    dashboard: str  # the Jobs and state API's address
    temp: Path

    def add_node(self, name: str, num_cpus: int):
        return self.cluster.add_node(num_cpus=num_cpus, temp_dir=str(self.temp / name), dashboard_agent_listen_port=free_port())


@pytest.fixture
def local_cluster(monkeypatch):
    """Starts a head with `head_cpus` and a worker node per entry of `worker_cpus`, on 127.0.0.1."""
    # The nodes start from this process, whose Ray state is one cluster's (starting the head points
    # ray.experimental.internal_kv at its GCS): the local runtime goes; the next test that needs it restarts it.
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()
    port = free_port()
    temp = Path(tempfile.mkdtemp(prefix="rsr-ray-", dir="/tmp"))  # short: Ray's socket paths are limited
    # Ray's default temp dir becomes the head's: Cluster writes the cluster's address there (not into
    # /tmp/ray, where any plain ray.init() on the machine would join it), and the Jobs API reads it there
    # for the job's driver; without it, the driver gets the first GCS of any runtime on the machine.
    monkeypatch.setenv("RAY_TMPDIR", str(temp))
    started = []

    def start(head_cpus: int, *worker_cpus: int) -> LocalCluster:
        # Each node has its own temp dir: a shared one lets one node's runtime-env cleanup delete the
        # working directory under the other's running driver.
        # Own agent ports too: the default one is taken when another local runtime is up.
        cluster = Cluster(
            initialize_head=True,
            head_node_args={"num_cpus": head_cpus, "include_dashboard": True, "dashboard_port": port,
                            "temp_dir": str(temp / "ray"), "dashboard_agent_listen_port": free_port()},
        )  # fmt: skip
        started.append(LocalCluster(cluster, f"http://127.0.0.1:{port}", temp))
        for k, cpus in enumerate(worker_cpus):
            started[-1].add_node(f"worker-{k}", cpus)
        return started[-1]

    try:
        yield start
    finally:
        ray.shutdown()  # a driver this process connected
        for each in started:
            each.cluster.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


def score_actors(dashboard: str) -> list:
    from ray.util.state import list_actors

    return [a for a in list_actors(address=dashboard, detail=True, limit=1000) if "ScoreActor" in a.class_name]


def processes_under(root: int) -> list[int]:
    """Every process under `root` (not `root` itself), read from /proc."""
    parents = {}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            parents[int(proc.name)] = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue

    def under(pid: int) -> bool:
        while pid > 1:
            pid = parents.get(pid, 0)
            if pid == root:
                return True
        return False

    return [pid for pid in parents if under(pid)]


def node_processes(node) -> list[int]:
    """A local node's raylet, first, and every process under it (its Ray workers, actors and agents)."""
    from ray._private import ray_constants

    raylet = node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid
    return [raylet, *processes_under(raylet)]


def titled(pids: list[int], part: bytes) -> list[int]:
    """The processes whose title (Ray's: ray::<task or actor>) holds `part`."""
    found = []
    for pid in pids:
        try:
            if part in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
        except OSError:
            continue
    return found


def lose(nodes, node, pids: list[int]) -> None:
    """Remove `node` without warning; its paused processes would outlive their raylet: they go too."""
    nodes.cluster.remove_node(node, allow_graceful=False)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def freeze(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGSTOP)
