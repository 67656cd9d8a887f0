"""Build a tiny random-weight student offline: `python -m benchmarks.make_tiny_student [OUT_DIR]`.

A 2-layer Llama with random weights and a BPE tokenizer trained on the synthetic corpus. Its scores mean
nothing; it drives the plumbing runs (`benchmarks.scale`, `benchmarks.soak`) in seconds. The quickstart's
student is the trained SmolLM2 of `jobs.make_demo_student`.
"""

from __future__ import annotations

import argparse

from benchmarks.scale import SYNTHETIC_CORPUS
from benchmarks.tiny_student import build_tiny_student


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out_dir", nargs="?", default="out/tiny-student")
    parser.add_argument("--template", default="chatml", choices=["chatml", "llama3", "plain"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = build_tiny_student(args.out_dir, SYNTHETIC_CORPUS, template=args.template, seed=args.seed)
    print(f"tiny student (random weights, plumbing only) written to {path}")


if __name__ == "__main__":
    main()
