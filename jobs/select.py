"""Select trajectories by a student's RSR and write them for fine-tuning, with a manifest beside them.

python -m jobs.select --scores out/rsr --student NAME --group-by problem_id --top-k 1 --out sel.jsonl
python -m jobs.select ... --arm random --seed 1 --match-tokens sel.jsonl.manifest.json --out rand.jsonl

Every output comes with OUT.manifest.json: the arguments, student, arm, seed, rows, groups, target
tokens (sum of the chosen rows' resp_token_length), rows and tokens per teacher, the scores' run ids
and scoring fingerprints, and the output file's sha256.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from pipeline.corpus.storage import locate
from pipeline.decide.query import fingerprint_mixes, latest_scores, original_rows, selected_messages
from pipeline.decide.selection import (
    ARMS,
    FORMATS,
    dataset_info_entry,
    describe_selection,
    encode_rows,
    match_tokens,
    select_arm,
    suitable_first,
    to_messages,
    to_sharegpt,
    update_dataset_info,
    write_whole,
)
from pipeline.run.config import InputConfig, StorageConfig, load_config

ARM_HELP = """which rows of each group (--group-by) to take, --top-k or --top-fraction of them. lowest: the
most suitable end by the metric's direction (lowest RSR, the paper's choice; for top1_rate, where higher
is better, the highest values), or the first rows of --direction's order when given; highest: the other
end; middle: the rows around the group's median, nearest first (of two equally near, the more suitable);
random: a draw seeded by --seed (a hash of seed and sample_id: the same rows on every run and machine).
Ties go to the smaller sample_id. Default: lowest"""


def input_shape(args) -> InputConfig:
    input_cfg = load_config(args.config).input if args.config else InputConfig(paths=[])
    if args.messages_field:
        input_cfg.messages_field = args.messages_field
    return input_cfg


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scores", required=True, help="the scoring job's output.path")
    parser.add_argument("--student", required=True)
    how = parser.add_mutually_exclusive_group(required=True)
    how.add_argument("--top-k", type=int, help="rows per group (or overall without --group-by)")
    how.add_argument("--top-fraction", type=float, help="fraction of each group (at least one row)")
    how.add_argument("--threshold", type=float, help="RSR at most this (at least, with --direction descending); lowest arm only")
    parser.add_argument("--group-by", nargs="*", default=None, help="columns such as problem_id")
    parser.add_argument("--arm", choices=ARMS, default="lowest", help=ARM_HELP)
    parser.add_argument("--seed", type=int, default=0, help="the random arm's seed (default 0)")
    parser.add_argument("--by", default="rank_surprisal_ratio", help="the score column to rank by (any metric column)")
    parser.add_argument("--where", nargs="*", default=[], metavar="COLUMN=VALUE",
                        help="keep only rows whose column equals the value first (as text, any case), e.g. is_correct=true")  # fmt: skip
    parser.add_argument("--drop-truncated-groups", action="store_true",
                        help="leave out every group in which any of the student's trajectories was truncated (before --where)")  # fmt: skip
    parser.add_argument("--match-tokens", metavar="OTHER.manifest.json",
                        help="trim or fill this arm until its target tokens are within 0.1%% (or one row) of that arm's: trimming "
                             "drops each group's last choice first, filling adds each group's next choice (the arm's order)")  # fmt: skip
    parser.add_argument(
        "--direction",
        choices=["ascending", "descending"],
        default=None,
        help="default: the metric's most suitable end first (lowest RSR, the paper's choice; highest top1_rate)",
    )
    parser.add_argument("--format", choices=FORMATS, default="rows",
                        help="rows: the original corpus rows plus an rsr field (default); messages: "
                             '{"id", "messages": [{role, content}]}; sharegpt: {"id", "conversations": [{from, value}]}. '
                             "messages and sharegpt put a turn's reasoning before its content as "
                             "<think>\\nREASONING\\n</think>\\n\\n")  # fmt: skip
    parser.add_argument("--dataset-info", metavar="NAME",
                        help="add or update NAME in a LLaMA-Factory dataset_info.json beside the output (--format messages or sharegpt)")  # fmt: skip
    parser.add_argument(
        "--teacher-column", default=None, help="the column naming the teacher, for the manifest (default: source when present)"
    )
    parser.add_argument("--config", help="the scoring job's YAML: its input section says the rows' shape")
    parser.add_argument("--messages-field", default=None, help="without --config: the rows' messages field")
    parser.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint")
    parser.add_argument("--out", required=True, help="a .jsonl or .parquet file (local or s3://)")
    return parser.parse_args(argv)


def training_rows(chosen, args, storage: StorageConfig) -> list[dict]:
    """The chosen trajectories in the asked format."""
    if args.format != "rows":
        convert = to_messages if args.format == "messages" else to_sharegpt
        messages = selected_messages(chosen, input_shape(args), storage=storage)
        return [convert(sample_id, m) for sample_id, m in zip(chosen["sample_id"], messages)]
    rows = original_rows(chosen, input_shape(args), storage=storage)
    for row, (_, score) in zip(rows, chosen.iterrows()):
        columns = {"student", "rank_surprisal_ratio", "avg_rank_clip", "avg_surprisal", args.by}
        row["rsr"] = {k: score[k].item() if hasattr(score[k], "item") else score[k] for k in sorted(columns)}
        row["rsr"]["resp_token_length"] = int(score["resp_token_length"])
    return rows


def other_arm(path: str, storage: StorageConfig) -> dict:
    location = locate(path, storage)
    manifest = json.loads(location.fs.cat_file(location.path))
    if not isinstance(manifest, dict) or "target_tokens" not in manifest:
        raise ValueError(f"{path} is not a jobs.select manifest (no target_tokens)")
    return manifest


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    storage = StorageConfig(endpoint_url=args.endpoint_url)
    scores = latest_scores(args.scores, storage)
    for warning in fingerprint_mixes(scores[scores["student"] == args.student]):
        print(f"warning: {warning}", file=sys.stderr)
    teacher_column = args.teacher_column or ("source" if "source" in scores.columns else None)
    try:
        if args.dataset_info and args.format == "rows":
            raise ValueError("--dataset-info needs --format sharegpt or messages (LLaMA-Factory's shapes)")
        where = dict(condition.split("=", 1) for condition in args.where if "=" in condition)
        if len(where) != len(args.where):
            raise ValueError(f"--where takes COLUMN=VALUE conditions, got {args.where}")
        if args.teacher_column and args.teacher_column not in scores.columns:
            raise ValueError(f"no column {args.teacher_column!r} in the scores for --teacher-column")
        ascending = None if args.direction is None else args.direction == "ascending"
        selection = select_arm(scores, args.student, args.group_by, args.top_k, args.top_fraction, args.threshold,
                               ascending, args.by, where, args.arm, args.seed, args.drop_truncated_groups)  # fmt: skip
        token_match, other = None, None
        if args.match_tokens:
            other = other_arm(args.match_tokens, storage)
            if other.get("student") != args.student:
                print(
                    f"warning: {args.match_tokens} is student {other.get('student')!r}'s: its tokens are another tokenizer's",
                    file=sys.stderr,
                )
            selection, token_match = match_tokens(selection, int(other["target_tokens"]))
        chosen = selection.chosen
        rows = training_rows(chosen, args, storage)
        target = locate(args.out, storage)
        entry = dataset_info_entry(target.path.rsplit("/", 1)[-1], args.format, rows) if args.dataset_info else None
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    sha256 = write_whole(target, encode_rows(rows, args.out.endswith(".parquet")))
    summary = describe_selection(chosen, args.group_by, teacher_column)
    manifest = {
        "command": "jobs.select",
        "argv": list(sys.argv[1:] if argv is None else argv),
        "output": args.out,
        "format": args.format,
        "sha256": sha256,
        "student": args.student,
        "arm": args.arm,
        "seed": args.seed,
        "by": args.by,
        "direction": "ascending" if suitable_first(args.by, ascending) else "descending",
        "group_by": args.group_by,
        "where": where,
        "dropped_truncated_groups": selection.dropped_groups if args.drop_truncated_groups else None,
        **summary,
        "match_tokens": None if token_match is None else {"manifest": args.match_tokens, **dataclasses.asdict(token_match)},
    }
    write_whole(locate(args.out + ".manifest.json", storage), json.dumps(manifest, indent=1, ensure_ascii=False).encode())
    if entry is not None:
        info = dataclasses.replace(target, path=target.path.rsplit("/", 1)[0] + "/dataset_info.json")
        update_dataset_info(info, args.dataset_info, entry)
        print(f"dataset_info.json: {args.dataset_info} -> {entry['file_name']} ({info.url()})")

    scored = int((scores["student"] == args.student).sum())
    groups = f" in {summary['groups']} groups" if args.group_by else ""
    arm = f"arm {args.arm}" + (f", seed {args.seed}" if args.arm == "random" else "")
    print(
        f"selected {len(rows)} of {scored} trajectories{groups} ({arm}), {summary['target_tokens']:,} target tokens -> {args.out}"
    )
    if args.drop_truncated_groups:
        print(f"dropped {selection.dropped_groups} groups with a truncated trajectory")
    if token_match is not None:
        print(token_match.describe())
    print(f"manifest: {args.out}.manifest.json (sha256 {sha256[:16]}...)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
