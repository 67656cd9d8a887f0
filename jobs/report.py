"""Write the teacher-selection table and an HTML report with RSR distributions per teacher.

python -m jobs.report --scores out/rsr --out out/report     # -> teachers.csv, teachers.parquet, report.html
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.config import StorageConfig
from pipeline.query import fingerprint_mixes, latest_scores, teacher_table
from pipeline.report import render_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scores", required=True, help="the scoring job's output.path")
    parser.add_argument("--teacher-column", default="source", help="the column that names the teacher")
    parser.add_argument("--correct-column", default="is_correct",
                        help="a passthrough column saying whether a trajectory is correct (AUC per metric, when present)")  # fmt: skip
    parser.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint")
    parser.add_argument("--out", required=True, help="a local folder")
    args = parser.parse_args(argv)

    scores = latest_scores(args.scores, StorageConfig(endpoint_url=args.endpoint_url))
    for warning in fingerprint_mixes(scores):
        print(f"warning: {warning}", file=sys.stderr)
    if args.teacher_column not in scores.columns:
        print(f"error: no column {args.teacher_column!r} in the scores ({list(scores.columns)})", file=sys.stderr)
        return 2
    teachers = teacher_table(scores, args.teacher_column)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    teachers.to_csv(out / "teachers.csv", index=False)
    teachers.to_parquet(out / "teachers.parquet", index=False)
    (out / "report.html").write_text(render_report(scores, teachers, args.teacher_column, args.correct_column))
    print(teachers.to_string(index=False))
    print(f"\nwrote {out / 'teachers.csv'}, {out / 'teachers.parquet'} and {out / 'report.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
