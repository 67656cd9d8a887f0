"""Build the plumbing-demo student offline: `python -m jobs.make_demo_student [OUT_DIR]`.

A 2-layer Llama with random weights and a BPE tokenizer trained on the demo corpus. Its scores mean
nothing; it exists so that the demo job runs end to end without network access.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.tiny_student import build_tiny_student

DEMO_CORPUS = Path(__file__).parent / "demo" / "corpus.jsonl"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out_dir", nargs="?", default="out/demo-student")
    parser.add_argument("--template", default="chatml", choices=["chatml", "llama3", "plain"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = build_tiny_student(args.out_dir, DEMO_CORPUS, template=args.template, seed=args.seed)
    print(f"demo student (random weights, plumbing only) written to {path}")


if __name__ == "__main__":
    main()
