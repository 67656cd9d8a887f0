"""Select trajectories by a student's RSR and write the original rows for fine-tuning.

python -m jobs.select --scores out/rsr --student NAME --group-by problem_id --top-k 1 --out sel.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import InputConfig, StorageConfig, load_config
from pipeline.query import fingerprint_mixes, latest_scores, original_rows, select
from pipeline.storage import locate


def input_shape(args) -> InputConfig:
    input_cfg = load_config(args.config).input if args.config else InputConfig(paths=[])
    if args.messages_field:
        input_cfg.messages_field = args.messages_field
    return input_cfg


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scores", required=True, help="the scoring job's output.path")
    parser.add_argument("--student", required=True)
    how = parser.add_mutually_exclusive_group(required=True)
    how.add_argument("--top-k", type=int, help="rows per group (or overall without --group-by)")
    how.add_argument("--top-fraction", type=float, help="fraction of each group (at least one row)")
    how.add_argument("--threshold", type=float, help="RSR at most this (at least, with --direction descending)")
    parser.add_argument("--group-by", nargs="*", default=None, help="columns such as problem_id")
    parser.add_argument("--by", default="rank_surprisal_ratio", help="the score column to rank by (any metric column)")
    parser.add_argument("--where", nargs="*", default=[], metavar="COLUMN=VALUE",
                        help="keep only rows whose column equals the value first, e.g. is_correct=true")  # fmt: skip
    parser.add_argument(
        "--direction",
        choices=["ascending", "descending"],
        default=None,
        help="default: the metric's most suitable end first (lowest RSR, the paper's choice; highest top1_rate)",
    )
    parser.add_argument("--config", help="the scoring job's YAML: its input section says the rows' shape")
    parser.add_argument("--messages-field", default=None, help="without --config: the rows' messages field")
    parser.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint")
    parser.add_argument("--out", required=True, help="a .jsonl or .parquet file (local or s3://)")
    args = parser.parse_args(argv)

    storage = StorageConfig(endpoint_url=args.endpoint_url)
    scores = latest_scores(args.scores, storage)
    for warning in fingerprint_mixes(scores[scores["student"] == args.student]):
        print(f"warning: {warning}", file=sys.stderr)
    try:
        where = dict(condition.split("=", 1) for condition in args.where if "=" in condition)
        if len(where) != len(args.where):
            raise ValueError(f"--where takes COLUMN=VALUE conditions, got {args.where}")
        chosen = select(scores, args.student, args.group_by, args.top_k, args.top_fraction, args.threshold,
                        ascending=None if args.direction is None else args.direction == "ascending", by=args.by, where=where)  # fmt: skip
        rows = original_rows(chosen, input_shape(args), storage=storage)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for row, (_, score) in zip(rows, chosen.iterrows()):
        columns = {"student", "rank_surprisal_ratio", "avg_rank_clip", "avg_surprisal", args.by}
        row["rsr"] = {k: score[k].item() if hasattr(score[k], "item") else score[k] for k in sorted(columns)}
        row["rsr"]["resp_token_length"] = int(score["resp_token_length"])
    target = locate(args.out, storage)
    target.fs.makedirs(target.path.rsplit("/", 1)[0], exist_ok=True)
    if args.out.endswith(".parquet"):
        pq.write_table(pa.Table.from_pylist(rows), target.path, filesystem=target.arrow_fs())
    else:
        with target.fs.open(target.path, "w") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    print(f"selected {len(rows)} of {int((scores['student'] == args.student).sum())} trajectories -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
