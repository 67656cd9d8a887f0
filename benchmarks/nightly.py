"""What a nightly run costs: the default-settings job with the tiny student scores a synthetic corpus
(files of 10,000 rows), then a new file arrives and the same job runs again; beside it, a fresh run over
the new file alone. Prints the three times and the night's cost as a multiple of the fresh run, then
checks that the output holds every row of the corpus once (scored or rejected, no id twice).

  python -m benchmarks.make_tiny_student && python -m benchmarks.nightly              # 100,000 + 1,000 rows
  python -m benchmarks.nightly --rows 20000 --new-rows 500
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

import duckdb
import yaml

from benchmarks.scale import ROWS_PER_FILE, write_corpus, write_rows
from pipeline.corpus.storage import locate
from pipeline.run import layout


def run_job(config: Path, env: dict) -> float:
    """`python -m jobs.score` in a process of its own (Ray's start included), its wall time."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "jobs.score", "--config", str(config)], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    if done.returncode:
        raise RuntimeError(f"the job failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    lines = done.stdout.splitlines()
    counts = next(k for k, line in enumerate(lines) if line.startswith("run "))  # the counts table follows
    print("\n".join([*(line for line in lines if line.startswith("unread:")), *lines[counts + 1 : counts + 3]]))
    return wall


def write_config(path: Path, corpus: Path, out: Path, student: str) -> Path:
    path.write_text(yaml.safe_dump({
        "input": {"paths": [str(corpus)], "passthrough": ["source"]},
        "students": [{"name": "demo", "path": student}],
        "output": {"path": str(out)},
    }))  # fmt: skip
    return path


def output_rows(out: Path) -> tuple[int, int]:
    """The rows the output holds, scored or rejected, and how many distinct ids they carry."""
    root = locate(str(out), None)
    files = [root.join(f).path for f in layout.committed_files(root) if f.startswith(("student=", "_rejects/"))]
    query = f"SELECT count(*), count(DISTINCT sample_id) FROM read_parquet({json.dumps(files)}, union_by_name = true)"
    [(rows, ids)] = duckdb.sql(query).fetchall()
    return rows, ids


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000, help="the corpus before the night")
    parser.add_argument("--new-rows", type=int, default=1_000, help="the night's new file")
    parser.add_argument("--student", default="out/tiny-student", help="python -m benchmarks.make_tiny_student builds it")
    args = parser.parse_args(argv)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with tempfile.TemporaryDirectory(prefix="rsr-nightly-") as tmp:
        tmp = Path(tmp)
        corpus, out = tmp / "corpus", tmp / "out"
        write_corpus(corpus, args.rows)
        job = write_config(tmp / "job.yaml", corpus, out, args.student)
        first = run_job(job, env)

        new_file = corpus / f"part-{(args.rows + ROWS_PER_FILE - 1) // ROWS_PER_FILE:05d}.jsonl"
        write_rows(new_file, args.rows, args.rows + args.new_rows)
        night = run_job(job, env)
        fresh = run_job(write_config(tmp / "fresh.yaml", new_file, tmp / "fresh-out", args.student), env)

        print(f"\n{'run':<44}{'wall s':>8}")
        print(f"{f'first: {args.rows:,} rows':<44}{first:>8.1f}")
        print(f"{f'night: {args.new_rows:,} new rows beside them':<44}{night:>8.1f}")
        print(f"{f'fresh: the {args.new_rows:,} new rows alone':<44}{fresh:>8.1f}")
        print(f"the night costs {night / fresh:.2f}x a fresh run over its new rows")
        rows, ids = output_rows(out)
        total = args.rows + args.new_rows
        print(f"output: {rows:,} rows scored or rejected, {ids:,} distinct ids, of {total:,} in the corpus")
        return 0 if rows == ids == total else 1


if __name__ == "__main__":
    sys.exit(main())
