"""Driver memory and speed as the corpus grows: the default-settings job with the tiny student on
synthetic corpora of several sizes, each in a fresh process; prints rows/s and the driver's peak RSS.

  python -m benchmarks.make_tiny_student && python -m benchmarks.scale              # 10k, 50k and 200k rows
  python -m benchmarks.scale --rows 2000 20000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

# Demo data, so it stays in jobs/demo; the benchmarks run from the checkout beside it.
SYNTHETIC_CORPUS = Path(__file__).resolve().parents[1] / "jobs" / "demo" / "synthetic.jsonl"
# The job in this process, as `python -m jobs.score`, then its own peak RSS (the driver's).
DRIVER = """
import json, resource, runpy, sys
sys.argv = ["jobs.score", *sys.argv[1:]]
try:
    runpy.run_module("jobs.score", run_name="__main__")
except SystemExit as exit:
    if exit.code:
        raise
print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def synthetic_rows() -> list[dict]:
    """The synthetic corpus's good rows (the ones with a messages list)."""
    rows = []
    for line in SYNTHETIC_CORPUS.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("messages"), list):
            rows.append(row)
    return rows


def write_rows(path: Path, start: int, stop: int) -> None:
    """Rows `start` to `stop` of the endless synthetic corpus (its good rows over and over, each with an
    id of its own) as one JSONL file."""
    base = synthetic_rows()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for i in range(start, stop):
            f.write(json.dumps({**base[i % len(base)], "id": f"row-{i:07d}"}) + "\n")


ROWS_PER_FILE = 10_000


def write_corpus(path: Path, n_rows: int) -> None:
    """The first `n_rows` rows of the synthetic corpus as files of 10,000 rows."""
    for start in range(0, n_rows, ROWS_PER_FILE):
        write_rows(path / f"part-{start // ROWS_PER_FILE:05d}.jsonl", start, min(start + ROWS_PER_FILE, n_rows))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 50_000, 200_000])
    parser.add_argument("--student", default="out/tiny-student", help="python -m benchmarks.make_tiny_student builds it")
    args = parser.parse_args(argv)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    print(f"{'rows':>9}{'wall s':>9}{'rows/s':>9}{'driver peak RSS MB':>20}")
    with tempfile.TemporaryDirectory(prefix="rsr-scale-") as tmp:
        for n_rows in args.rows:
            corpus, out = Path(tmp) / f"corpus-{n_rows}", Path(tmp) / f"out-{n_rows}"
            write_corpus(corpus, n_rows)
            config = Path(tmp) / f"job-{n_rows}.yaml"
            config.write_text(yaml.safe_dump({
                "input": {"paths": [str(corpus)], "passthrough": ["source"]},
                "students": [{"name": "demo", "path": args.student}],
                "output": {"path": str(out), "partition_by": ["source"]},
            }))  # fmt: skip
            started = time.perf_counter()
            done = subprocess.run([sys.executable, "-c", DRIVER, "--config", str(config)],
                                  capture_output=True, text=True, env=env)  # fmt: skip
            wall = time.perf_counter() - started
            if done.returncode:
                raise RuntimeError(f"the job failed:\n{done.stderr[-3000:]}")
            peak = json.loads(done.stdout.strip().splitlines()[-1])["peak_rss_mb"]
            print(f"{n_rows:>9,}{wall:>9.1f}{n_rows / wall:>9.0f}{peak:>20.0f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
