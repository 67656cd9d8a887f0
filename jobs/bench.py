"""Side-by-side benchmark: the reference RSR script and this pipeline's scoring core, same student,
same corpus, one invocation. Prints scored tokens/s, peak memory, wall time, their ratios, and the
max |difference| in rank_surprisal_ratio from a float32 run of both.

  python -m jobs.bench                       # CPU, random-weight SmolLM2-135M shape, first 120 GSM8K rows
  python -m jobs.bench --dtype float32 --limit 60
  python -m jobs.bench --job --limit 600     # also the Ray job on the same rows, with 1 and 2 actors

With --job, the job also runs on the first --job-base-rows rows: the difference between the two runs is
the job's steady-state cost per token (Ray start, model load and commit cancel out), compared with the
core's scoring-only rate; what is left is tokenizing, Ray scheduling and writing.

Both sides run in fresh processes and are timed end to end (interpreter start and model load included);
each also reports its scoring-only rate. The student has random weights: speed is real, scores are not.
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

SHARED = Path(__file__).resolve().parents[2] / "shared"

# Runs a script in-process and reports its own peak memory, so both sides are measured the same way.
PEAK_WRAPPER = """
import json, resource, runpy, sys
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

PIPELINE_SIDE = """
import json, sys, time
import torch
from pipeline.spans import encode_conversation
from pipeline.student import ScoringOptions, Student

model_dir, corpus, out, dtype, threads, budget, limit = sys.argv[1:8]
torch.set_num_threads(int(threads))
student = Student.load(model_dir, dtype=dtype, device="cpu", options=ScoringOptions(token_budget=int(budget)))
rows = [json.loads(line) for line in open(corpus) if line.strip()][: int(limit)]
start = time.perf_counter()
encoded = [encode_conversation(student.tokenizer, row["messages"]) for row in rows]
stats = student.score(encoded)
seconds = time.perf_counter() - start
with open(out, "w") as f:
    for row, s in zip(rows, stats):
        f.write(json.dumps({"id": row["id"], "rsr": s["rank_surprisal_ratio"], "n_tokens": s["resp_token_length"]}) + "\\n")
tokens = sum(s["resp_token_length"] for s in stats)
print(json.dumps({"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}))
"""


def build_student(config_dir: Path, out_dir: Path, seed: int = 0) -> Path:
    """Random weights of the config's shape with its real tokenizer, saved in float32."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config_dir), dtype=torch.float32)
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(config_dir).save_pretrained(out_dir)
    return out_dir


def run_side(argv: list[str], threads: int) -> dict:
    """Run one side in a fresh process; return its own report plus wall time and peak memory."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", PEAK_WRAPPER, *argv], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f"{argv[0]} failed:\n{done.stderr[-3000:]}")
    reports = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    merged = {k: v for report in reports for k, v in report.items()}
    return {**merged, "wall_s": wall, "e2e_tokens_per_s": merged["tokens"] / wall}


def run_job(student: Path, corpus: Path, out: Path, dtype: str, actors: int, threads: int, budget: int) -> float:
    """Wall time of the scoring job (`python -m jobs.score`, local Ray started by the job) on `corpus`."""
    import yaml

    config = out.with_suffix(".yaml")
    config.write_text(yaml.safe_dump({
        "input": {"paths": [str(corpus)], "passthrough": ["source"]},
        "students": [{"name": "bench", "path": str(student), "dtype": dtype}],
        "scoring": {"token_budget": budget},
        "compute": {"actors_per_student": actors, "cpus_per_actor": 1, "torch_threads": max(1, threads // actors)},
        "output": {"path": str(out), "partition_by": ["source"], "mode": "overwrite"},
    }))  # fmt: skip
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("RAY_ADDRESS", None)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "jobs.score", "--config", str(config)], capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(f"the job failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def read_rsr(path: Path, key: str) -> dict[str, float]:
    return {row["id"]: row[key] for row in map(json.loads, path.read_text().splitlines())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", type=Path, default=SHARED / "bench" / "reference_rsr.py")
    parser.add_argument("--model-config", type=Path, default=SHARED / "models" / "smollm2-135m-instruct",
                        help="a directory with config.json and a tokenizer; weights are random")  # fmt: skip
    parser.add_argument("--corpus", type=Path, default=SHARED / "data" / "gsm8k_multisource_300.jsonl")
    parser.add_argument("--limit", type=int, default=120)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reference-batch-size", type=int, default=2,
                        help="2 is the reference's best on 2 CPU cores (120 rows, bf16: 1: 942, 2: 981, 4: ~800, 8: 746, "
                             "16: 634 tokens/s)")  # fmt: skip
    parser.add_argument("--token-budget", type=int, default=2048, help="2048 is fastest on 2 CPU cores")
    parser.add_argument("--parity-limit", type=int, default=60, help="rows of the float32 parity run (0: skip)")
    parser.add_argument("--job", action="store_true", help="also time the Ray job on the same rows, 1 and 2 actors")
    parser.add_argument("--job-base-rows", type=int, default=12, help="rows of the job run that measures fixed costs")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="rsr-bench-") as tmp:
        tmp = Path(tmp)
        student = build_student(args.model_config, tmp / "student")
        corpus = tmp / "corpus.jsonl"
        corpus.write_text("".join(open(args.corpus).readlines()[: args.limit]))

        def reference(dtype, limit, out):
            return run_side([str(args.reference), str(student), str(corpus), str(out), "--dtype", dtype,
                             "--batch-size", str(args.reference_batch_size), "--threads", str(args.threads),
                             "--limit", str(limit)], args.threads)  # fmt: skip

        def pipeline(dtype, limit, out):
            script = tmp / "pipeline_side.py"
            script.write_text(PIPELINE_SIDE)
            return run_side([str(script), str(student), str(corpus), str(out), dtype, str(args.threads),
                             str(args.token_budget), str(limit)], args.threads)  # fmt: skip

        sides = {"reference": reference(args.dtype, args.limit, tmp / "ref.jsonl"),
                 "pipeline": pipeline(args.dtype, args.limit, tmp / "ours.jsonl")}  # fmt: skip
        parity = None
        if args.parity_limit:
            reference("float32", args.parity_limit, tmp / "ref32.jsonl")
            pipeline("float32", args.parity_limit, tmp / "ours32.jsonl")
            ref, ours = read_rsr(tmp / "ref32.jsonl", "rsr"), read_rsr(tmp / "ours32.jsonl", "rsr")
            parity = max(abs(ref[k] - ours[k]) for k in ref)
        job_walls = {}
        if args.job:
            base_corpus = tmp / "base.jsonl"
            base_corpus.write_text("".join(corpus.read_text().splitlines(keepends=True)[: args.job_base_rows]))
            for actors in (1, 2):
                job_walls[actors] = [
                    run_job(student, rows, tmp / f"job{actors}-{rows.stem}", args.dtype, actors, args.threads, args.token_budget)
                    for rows in (corpus, base_corpus)
                ]
            tokens_per_row = [row["n_tokens"] for row in map(json.loads, (tmp / "ours.jsonl").read_text().splitlines())]

    ref, ours = sides["reference"], sides["pipeline"]
    assert ref["tokens"] == ours["tokens"], "both sides must score the same response tokens"
    print(f"\n{args.limit} rows, {ours['tokens']} response tokens, {args.dtype}, {args.threads} threads, "
          f"random-weight student of {args.model_config.name}")  # fmt: skip
    print(f"{'':34}{'reference':>12}{'pipeline':>12}{'ratio':>9}")
    rows = [
        ("scored tokens/s, end to end", "e2e_tokens_per_s", True),
        ("scored tokens/s, scoring only", "tokens_per_s", True),
        ("wall time, end to end (s)", "wall_s", False),
        ("peak memory (MB RSS)", "peak_rss_mb", False),
    ]
    for label, key, higher_is_better in rows:
        ratio = ours[key] / ref[key] if higher_is_better else ref[key] / ours[key]
        print(f"{label:34}{ref[key]:12.1f}{ours[key]:12.1f}{ratio:8.2f}x")
    print("(ratio > 1: the pipeline is better)")
    if parity is not None:
        print(f"float32 parity on {args.parity_limit} rows: max |rank_surprisal_ratio difference| = {parity:.2e}")
    for actors, (wall, base_wall) in job_walls.items():
        marginal_tokens = ours["tokens"] - sum(tokens_per_row[: args.job_base_rows])
        marginal_rate = marginal_tokens / (wall - base_wall)
        print(f"Ray job, {actors} actor(s): {args.limit} rows in {wall:.1f} s ({ours['tokens'] / wall:.0f} scored tokens/s "
              f"end to end), {args.job_base_rows} rows in {base_wall:.1f} s; steady state {marginal_rate:.0f} scored "
              f"tokens/s, overhead {ours['tokens_per_s'] / marginal_rate - 1:.0%} of the core's scoring time "
              f"(tokenizing, scheduling, writing)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
