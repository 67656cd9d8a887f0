"""Choose a teacher per student: RSR on matched problems with paired-bootstrap intervals, p_top1, the
problems the choice needs, agreement with a reference ranking and the confounds beside every metric,
as CSV/JSON tables and one HTML report.

python -m jobs.report --scores out/rsr --out out/report [--reference ref.csv] [--drop-truncated-groups]
  -> teachers.csv/.parquet, matching.json, sample_size.csv, confounds.csv, length_adjusted.csv, [agreement.json],
     report.html
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

from pipeline.decide.decision import Decision, decide
from pipeline.decide.query import fingerprint_mixes, latest_scores
from pipeline.decide.report import render_report
from pipeline.decide.sequential import verdict_text
from pipeline.decide.teachers import DIRECTION, Settings
from pipeline.run.config import StorageConfig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scores", required=True, help="the scoring job's output.path")
    parser.add_argument("--teacher-column", default="source", help="the column that names the teacher")
    parser.add_argument("--group-column", default="problem_id",
                        help="the column that names the problem; teachers are compared on the problems they all answered")  # fmt: skip
    parser.add_argument("--correct-column", default="is_correct",
                        help="a passthrough column saying whether a trajectory is correct (AUC per metric, when present)")  # fmt: skip
    parser.add_argument("--bootstrap", type=int, default=1000, help="paired bootstrap resamples over matched problems")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap and of the sample-size subsamples")
    parser.add_argument("--reference", default=None,
                        help="a CSV with columns teacher,score (higher = better; optionally student): agreement.json")  # fmt: skip
    parser.add_argument("--drop-truncated-groups", action="store_true",
                        help="drop, per student, every problem where any trajectory was truncated, before matching")  # fmt: skip
    parser.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint")
    parser.add_argument("--out", required=True, help="a local folder")
    args = parser.parse_args(argv)

    scores = latest_scores(args.scores, StorageConfig(endpoint_url=args.endpoint_url))
    for warning in fingerprint_mixes(scores):
        print(f"warning: {warning}", file=sys.stderr)
    for option, column in (("--teacher-column", args.teacher_column), ("--group-column", args.group_column)):
        if column not in scores.columns:
            print(f"error: no column {column!r} ({option}) in the scores ({list(scores.columns)})", file=sys.stderr)
            return 2
    reference = pd.read_csv(args.reference) if args.reference else None
    if reference is not None and not {"teacher", "score"} <= set(reference.columns):
        print(f"error: {args.reference} needs columns teacher,score; has {list(reference.columns)}", file=sys.stderr)
        return 2
    if reference is not None and reference.duplicated([c for c in ("student", "teacher") if c in reference]).any():
        print(f"error: {args.reference} scores a teacher twice (per student, when it has a student column)", file=sys.stderr)
        return 2
    if args.drop_truncated_groups and "truncated" not in scores.columns:
        print("warning: no truncated column in the scores; --drop-truncated-groups drops nothing", file=sys.stderr)
    settings = Settings(
        teacher_column=args.teacher_column,
        group_column=args.group_column,
        n_resamples=args.bootstrap,
        seed=args.seed,
        correct_column=args.correct_column,
        drop_truncated_groups=args.drop_truncated_groups,
    )
    decision, written = write_report(scores, settings, Path(args.out), reference, args.reference)
    if decision is None:
        print(
            f"error: no student has a problem that every teacher answered; see {Path(args.out) / 'matching.json'}",
            file=sys.stderr,
        )
        return 1
    print_decision(decision)
    print(f"\nwrote {', '.join(written)} in {args.out}")
    return 0


def write_report(
    scores: pd.DataFrame, settings: Settings, out: Path, reference: pd.DataFrame | None = None, reference_path: str | None = None
) -> tuple[Decision | None, list[str]]:
    """The decision on `scores` and its files in `out`; no decision (None) when no student has a matched problem."""
    decision = decide(scores, settings, reference)
    out.mkdir(parents=True, exist_ok=True)
    matching = {"teacher_column": settings.teacher_column, "group_column": settings.group_column,
                "drop_truncated_groups": settings.drop_truncated_groups, "students": decision.matching}  # fmt: skip
    (out / "matching.json").write_text(json.dumps(matching, indent=2) + "\n")
    if not decision.students:
        return None, ["matching.json"]
    teachers = decision.table("teachers")
    teachers.to_csv(out / "teachers.csv", index=False)
    teachers.to_parquet(out / "teachers.parquet", index=False)
    for table in ("sample_size", "confounds", "length_adjusted"):
        decision.table(table).to_csv(out / f"{table}.csv", index=False)
    written = ["teachers.csv", "teachers.parquet", "matching.json", "sample_size.csv", "confounds.csv", "length_adjusted.csv"]
    if reference is not None:
        agreement = {"reference": reference_path, "direction": DIRECTION,
                     "students": {s.student: s.agreement for s in decision.students}}  # fmt: skip
        (out / "agreement.json").write_text(json.dumps(agreement, indent=2) + "\n")
        written.append("agreement.json")
    (out / "report.html").write_text(render_report(decision, len(scores)))
    return decision, [*written, "report.html"]


def print_decision(decision: Decision) -> None:
    settings = decision.settings
    for student, counts in decision.matching.items():
        left_out = ", ".join(f"{t}: {n}" for t, n in counts["unmatched_rows_by_teacher"].items())
        print(f"\nstudent {student}: {counts['n_problems_matched']} of {counts['n_problems']} problems "
              f"({settings.group_column}) answered by all {len(counts['teachers'])} teachers; "
              f"{counts['n_rows_unmatched']} of {counts['n_rows']} rows left out" + (f" ({left_out})" if left_out else ""))  # fmt: skip
        if not counts["n_problems_matched"]:
            print("  no problem has a trajectory from every teacher: no decision for this student")
        if "dropped_truncated_groups" in counts:
            dropped = counts["dropped_truncated_groups"]
            print(
                f"  dropped before matching: {dropped['problems']} problems with a truncated trajectory ({dropped['rows']} rows)"
            )
    for mine in decision.students:
        first = mine.teachers["teacher"].iloc[0]
        print(f"\n{verdict_text(mine.student, mine.verdict)}")
        print(f"\n{mine.student}: teachers ({DIRECTION}; 95% paired bootstrap over matched problems, "
              f"{settings.n_resamples} resamples, seed {settings.seed})")  # fmt: skip
        print(mine.teachers.drop(columns="student").to_string(index=False, float_format=lambda x: f"{x:.4f}"))
        print(f"\n{mine.student}: at equal length (effect = exp(b - mean b) of log RSR ~ problem + teacher + log length; "
              "below 1 = more suitable than the average teacher at the same problem and length)")  # fmt: skip
        print(mine.length_adjusted.drop(columns="student").to_string(index=False, float_format=lambda x: f"{x:.3f}"))
        print(f"\n{mine.student}: problems the choice needs ({DIRECTION}; share of {settings.n_subsamples} "
              f"subsamples whose first teacher is {first}, as on all matched problems)")  # fmt: skip
        print(mine.sample_size.drop(columns="student").to_string(index=False))
        print(f"\n{mine.student}: confounds ({DIRECTION}; Spearman across trajectories and mean within problems)")
        print(mine.confounds.drop(columns="student").to_string(index=False, float_format=lambda x: f"{x:.3f}"))
        if mine.agreement is not None:
            a = mine.agreement
            print(f"\n{mine.student}: agreement with the reference ({DIRECTION}; positive = the reference's order)")
            for name in ("kendall_tau", "spearman"):
                low, high = _number(a[f"{name}_ci_low"]), _number(a[f"{name}_ci_high"])
                print(f"  {name} {_number(a[name])} [{low}, {high}] over {len(a['teachers'])} teachers")


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


if __name__ == "__main__":
    sys.exit(main())
