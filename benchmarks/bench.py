"""Side-by-side benchmark: the reference RSR script and this pipeline's scoring core, same student,
same corpus, one invocation. Prints scored tokens/s, peak memory, wall time, their ratios, and the
max |difference| in rank_surprisal_ratio from a float32 run of both.

  python -m benchmarks.bench                       # CPU, random-weight SmolLM2-135M shape, first 120 GSM8K rows
  python -m benchmarks.bench --dtype float32 --limit 60
  python -m benchmarks.bench --job --limit 600 --reference-batch-size 8   # + the default-settings job
  python -m benchmarks.bench --long --job          # long trajectories: AMC23 answers of 2k-8k tokens
  python -m benchmarks.bench --metrics-cost        # + the core again with scoring.metrics: all
  python -m benchmarks.bench --logits-cost         # + the core again with bf16 logits (scoring.logits_dtype: model)

--job also runs the scoring job as a user runs it, `python -m jobs.score --config FILE` with nothing
set but the input, the student (and its dtype) and the output: every other setting at its default.
--long takes the first --limit rows (default 16) of ../shared/data/skythought_amc23.jsonl whose answer
has 2,000-8,000 tokens, with the system prompt each model saw.

Both sides run in fresh processes and are timed end to end (interpreter start and model load included);
each also reports its scoring-only rate. The student has random weights: speed is real, scores are not.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pipeline.scoring.metrics import METRICS

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
from pipeline.tokens.spans import encode_conversation
from pipeline.scoring.device import DevicePolicy
from pipeline.scoring.student import ScoringOptions, Student

model_dir, corpus, out, dtype, threads, budget, limit, metrics, logits_dtype = sys.argv[1:10]
torch.set_num_threads(int(threads))
options = ScoringOptions(metrics=tuple(metrics.split(",")), logits_dtype=logits_dtype)
student = Student.load(model_dir, options=options, policy=DevicePolicy.choose("cpu", dtype, token_budget=int(budget)))
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
    from transformers import AutoConfig, AutoModelForCausalLM

    from pipeline.tokens.tokenizer import load_tokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config_dir), dtype=torch.float32)
    model.save_pretrained(out_dir)
    # Saved as the model's own tokenizer.json encodes, so that the reference script's AutoTokenizer
    # loads the same tokenizer (transformers 5's GPT2Tokenizer class splits newline pairs otherwise).
    load_tokenizer(str(config_dir)).save_pretrained(out_dir)
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


def run_job(student: Path, corpus: Path, out: Path, dtype: str) -> tuple[float, int]:
    """Wall time of the default-settings scoring job (`python -m jobs.score`, local Ray started by the
    job, model load and commit included) on `corpus`, and the response tokens it scored."""
    import yaml

    config = out.with_suffix(".yaml")
    config.write_text(yaml.safe_dump({
        "input": {"paths": [str(corpus)], "passthrough": ["source"]},
        "students": [{"name": "bench", "path": str(student), "dtype": dtype}],
        "output": {"path": str(out), "partition_by": ["source"]},
    }))  # fmt: skip
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("RAY_ADDRESS", None)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "jobs.score", "--config", str(config)], capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(f"the job failed:\n{done.stderr[-3000:]}")
    wall = time.perf_counter() - start
    return wall, int(re.search(r"^(\d+) response tokens scored", done.stdout, re.MULTILINE).group(1))


def long_rows(path: Path, tokenizer_dir: Path, limit: int, low: int = 2000, high: int = 8000) -> list[dict]:
    """The first `limit` rows whose answer has `low`-`high` tokens, the model's system prompt prepended."""
    from pipeline.tokens.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(str(tokenizer_dir))
    rows = []
    for row in map(json.loads, open(path)):
        answer = row["messages"][-1]["content"]
        if low <= len(tokenizer(answer, add_special_tokens=False)["input_ids"]) <= high:
            system = [{"role": "system", "content": row["system_prompt"]}] if row.get("system_prompt") else []
            rows.append({"id": row["id"], "source": row["source"], "messages": system + row["messages"]})
            if len(rows) == limit:
                break
    return rows


def read_rsr(path: Path, key: str) -> dict[str, float]:
    return {row["id"]: row[key] for row in map(json.loads, path.read_text().splitlines())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", type=Path, default=SHARED / "bench" / "reference_rsr.py")
    parser.add_argument("--model-config", type=Path, default=SHARED / "models" / "smollm2-135m-instruct",
                        help="a directory with config.json and a tokenizer; weights are random")  # fmt: skip
    parser.add_argument("--corpus", type=Path, default=SHARED / "data" / "gsm8k_multisource_300.jsonl")
    parser.add_argument("--limit", type=int, default=None, help="rows (default: 120, or 16 with --long)")
    parser.add_argument("--long", action="store_true", help="AMC23 answers of 2k-8k tokens instead of GSM8K rows")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reference-batch-size", type=int, default=2,
                        help="2 is the reference's best on 2 CPU cores (120 rows, bf16: 1: 942, 2: 981, 4: ~800, 8: 746, "
                             "16: 634 tokens/s)")  # fmt: skip
    parser.add_argument("--token-budget", type=int, default=2048, help="the core side's budget (the job uses its default)")
    parser.add_argument("--parity-limit", type=int, default=60, help="rows of the float32 parity run (0: skip)")
    parser.add_argument("--job", action="store_true", help="also time the default-settings job on the same rows")
    parser.add_argument("--metrics-cost", action="store_true", help="also time the core with scoring.metrics: all")
    parser.add_argument("--logits-cost", action="store_true",
                        help="also time the core with logits in the student's dtype (the default: float32 logits)")  # fmt: skip
    args = parser.parse_args(argv)
    args.limit = args.limit or (16 if args.long else 120)

    with tempfile.TemporaryDirectory(prefix="rsr-bench-") as tmp:
        tmp = Path(tmp)
        student = build_student(args.model_config, tmp / "student")
        corpus = tmp / "corpus.jsonl"
        if args.long:
            rows = long_rows(SHARED / "data" / "skythought_amc23.jsonl", args.model_config, args.limit)
            corpus.write_text("".join(json.dumps(row) + "\n" for row in rows))
        else:
            corpus.write_text("".join(open(args.corpus).readlines()[: args.limit]))

        def reference(dtype, limit, out):
            return run_side([str(args.reference), str(student), str(corpus), str(out), "--dtype", dtype,
                             "--batch-size", str(args.reference_batch_size), "--threads", str(args.threads),
                             "--limit", str(limit)], args.threads)  # fmt: skip

        def pipeline(dtype, limit, out, metrics=("rsr",), logits_dtype="float32"):
            script = tmp / "pipeline_side.py"
            script.write_text(PIPELINE_SIDE)
            return run_side([str(script), str(student), str(corpus), str(out), dtype, str(args.threads),
                             str(args.token_budget), str(limit), ",".join(metrics), logits_dtype], args.threads)  # fmt: skip

        sides = {"reference": reference(args.dtype, args.limit, tmp / "ref.jsonl"),
                 "pipeline": pipeline(args.dtype, args.limit, tmp / "ours.jsonl")}  # fmt: skip
        parity = None
        if args.parity_limit:
            reference("float32", args.parity_limit, tmp / "ref32.jsonl")
            pipeline("float32", args.parity_limit, tmp / "ours32.jsonl")
            ref, ours = read_rsr(tmp / "ref32.jsonl", "rsr"), read_rsr(tmp / "ours32.jsonl", "rsr")
            parity = max(abs(ref[k] - ours[k]) for k in ref)
        job_wall, job_tokens = run_job(student, corpus, tmp / "job", args.dtype) if args.job else (None, None)
        all_metrics = pipeline(args.dtype, args.limit, tmp / "all.jsonl", METRICS) if args.metrics_cost else None
        model_logits = (
            pipeline(args.dtype, args.limit, tmp / "model-logits.jsonl", logits_dtype="model") if args.logits_cost else None
        )

    ref, ours = sides["reference"], sides["pipeline"]
    assert ref["tokens"] == ours["tokens"], "both sides must score the same response tokens"
    assert job_tokens in (None, ref["tokens"]), f"the job scored {job_tokens} response tokens, the reference {ref['tokens']}"
    corpus_name = "AMC23 answers of 2k-8k tokens" if args.long else args.corpus.name
    print(f"\n{args.limit} rows of {corpus_name}, {ours['tokens']} response tokens, {args.dtype}, {args.threads} threads, "
          f"random-weight student of {args.model_config.name}; reference at batch size {args.reference_batch_size}, "
          f"pipeline core at token budget {args.token_budget}, float32 logits")  # fmt: skip
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
    if all_metrics is not None:
        extra = all_metrics["seconds"] / ours["seconds"] - 1
        print(f"\nscoring only, metrics [rsr]: {ours['seconds']:.1f} s; metrics all: {all_metrics['seconds']:.1f} s "
              f"({extra:+.1%})")  # fmt: skip
    if model_logits is not None:
        cost = ours["seconds"] / model_logits["seconds"] - 1
        print(f"\nscoring only, {args.dtype} logits: {model_logits['seconds']:.1f} s; float32 logits (the default): "
              f"{ours['seconds']:.1f} s ({cost:+.1%})")  # fmt: skip
    if job_wall is not None:
        print(f"\n{'default-settings job (python -m jobs.score)':46}{'reference':>12}{'job':>12}{'ratio':>9}")
        print(f"{'wall time, end to end (s)':46}{ref['wall_s']:12.1f}{job_wall:12.1f}{ref['wall_s'] / job_wall:8.2f}x")
        print(f"{'scored tokens/s, end to end':46}{ref['e2e_tokens_per_s']:12.1f}{ours['tokens'] / job_wall:12.1f}"
              f"{ref['wall_s'] / job_wall:8.2f}x")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
