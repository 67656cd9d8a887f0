"""How often `jobs.decide` declares a winner between exchangeable teachers: the proofs of its rule.

  # a corpus whose two teachers are exchangeable: per problem, their labels swapped by a seeded coin
  python -m benchmarks.false_decisions swap-corpus CORPUS.jsonl --teachers A B --seed 1 --out swapped-1.jsonl
  # on rows already scored: >= 1,000 seeded label swaps through the rule jobs.decide applies at each wave
  python -m benchmarks.false_decisions simulate --scores OUT --teachers A B --start 10 --max-problems 100 --swaps 2000

`simulate` needs only per-problem sums, so it replays the waves on the scored rows: the problems in the
order the waves draw them (`group_hash` with --seed), the schedule `jobs.decide` would use, and at each
look the decision `jobs.decide` makes. It prints the false-decision rate with its exact 95% interval, and
beside it the rate of the rule it replaces (stop once P(top1) >= confidence at any wave) on the same swaps.
"""

from __future__ import annotations

import argparse
import json
import random
import sys

import numpy as np
from scipy import stats

from pipeline.decide.query import latest_scores
from pipeline.decide.sequential import false_decisions, subset, swapped
from pipeline.decide.teachers import match_problems, problem_sums, sample_sizes, share_first
from pipeline.run.survey import group_hash


def swap_corpus(args) -> None:
    """The rows of the two teachers, with their labels exchanged on a seeded half of the problems."""
    rng = random.Random(args.seed)
    rows = [json.loads(line) for line in open(args.corpus)]
    rows = [row for row in rows if row[args.teacher_column] in args.teachers]
    swapped = {problem: rng.random() < 0.5 for problem in sorted({row[args.by] for row in rows})}
    a, b = args.teachers
    with open(args.out, "w") as out:
        for row in rows:
            if swapped[row[args.by]]:
                row = {**row, args.teacher_column: b if row[args.teacher_column] == a else a}
            out.write(json.dumps(row) + "\n")
    print(f"{len(rows)} rows of {a} and {b}; labels swapped on {sum(swapped.values())} of {len(swapped)} problems")


def simulate(args) -> None:
    scores = latest_scores(args.scores)
    scores = scores[(scores["student"] == args.student) if args.student else slice(None)]
    if scores["student"].nunique() != 1:
        sys.exit(f"the scores hold several students ({sorted(scores['student'].unique())}): name one with --student")
    scores = scores[scores[args.teacher_column].isin(args.teachers)]
    matched = match_problems(scores, args.teacher_column, args.by)
    sums = problem_sums(matched, args.teacher_column, args.by)
    order = np.argsort([group_hash(str(problem), args.seed) for problem in matched.problems], kind="stable")
    n = min(args.max_problems or len(order), len(order))
    sums = type(sums)(sums.rank[order[:n]], sums.surprisal[order[:n]])
    sizes = sample_sizes(n, args.start)
    alpha = 1 - args.confidence
    print(
        f"{n} problems of {' and '.join(matched.teachers)}, waves of {', '.join(map(str, sizes))}, {args.swaps} seeded label swaps:"
    )
    wrong = false_decisions(sums, sizes, args.confidence, args.seed, args.swaps)
    interval = stats.binomtest(wrong, args.swaps).proportion_ci(0.95, method="exact")
    print(f"  jobs.decide's rule: {wrong} decided, false-decision rate {wrong / args.swaps:.4f} "
          f"(95% interval {interval.low:.4f}-{interval.high:.4f}; alpha {alpha:.2f}: {'held' if interval.high <= alpha else 'NOT shown'})")  # fmt: skip
    naive = naive_decisions(sums, sizes, args.confidence, args.seed, args.swaps)
    print(
        f"  for comparison, stopping once P(top1) >= {args.confidence} at any wave: {naive} decided, rate {naive / args.swaps:.4f}"
    )


def naive_decisions(sums, sizes: list[int], confidence: float, seed: int, n_swaps: int, n_resamples: int = 1000) -> int:
    """The same swaps, decided by the rule jobs.decide does not use: a leader's bootstrap P(top1) >= confidence at any look."""
    rng = np.random.default_rng(seed)
    weights = {n: rng.multinomial(n, np.full(n, 1 / n), size=n_resamples).astype(float) for n in sizes}
    rng = np.random.default_rng(seed)  # the swaps false_decisions draws
    decided = 0
    for _ in range(n_swaps):
        labelled = swapped(sums, rng.random(sums.n_problems) < 0.5)
        decided += any(share_first(subset(labelled, slice(0, n)).rsr(weights[n])).max() >= confidence for n in sizes)
    return decided


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("swap-corpus", "simulate"):
        command = commands.add_parser(name)
        command.add_argument("--teachers", nargs=2, required=True, help="the two teachers' values")
        command.add_argument("--teacher-column", default="source")
        command.add_argument("--by", default="problem_id")
        command.add_argument("--seed", type=int, default=0)
    swap = commands.choices["swap-corpus"]
    swap.add_argument("corpus", help="a JSONL corpus")
    swap.add_argument("--out", required=True)
    sim = commands.choices["simulate"]
    sim.add_argument("--scores", required=True, help="a scoring job's output.path")
    sim.add_argument("--student", default=None)
    sim.add_argument("--start", type=int, default=10)
    sim.add_argument("--max-problems", type=int, default=None)
    sim.add_argument("--confidence", type=float, default=0.95)
    sim.add_argument("--swaps", type=int, default=1000)
    args = parser.parse_args(argv)
    (swap_corpus if args.command == "swap-corpus" else simulate)(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
