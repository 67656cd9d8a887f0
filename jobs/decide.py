"""Decide which teacher suits each student at a fraction of the cost: score the job's corpus in waves of
nested seeded samples of problems (start, 2 x start, ... up to --max-problems) until every student's
decision is made at the --confidence level over all the waves' looks, or the waves run out (undecided).

python -m jobs.decide --config JOB.yaml --by problem_id --teacher-column source [--confidence 0.95]
    [--start 10] [--max-problems N] [--seed 0] --out DIR [key=value ...]
  -> DIR/decision.json, and the final wave's report (teachers.csv, ..., report.html) in DIR
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

from jobs.report import write_report
from jobs.score import JOB_ERRORS, job_error, quiet_ray_logs
from pipeline.decide.sequential import RULE
from pipeline.decide.teachers import Settings
from pipeline.run.config import load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="the scoring job's YAML config (its output holds the waves)")
    parser.add_argument("--by", required=True, help="the column that names the problem (a passthrough column)")
    parser.add_argument("--teacher-column", required=True, help="the column that names the teacher (a passthrough column)")
    parser.add_argument("--confidence", type=float, default=0.95, help="1 - the false-decision rate over all waves")
    parser.add_argument("--start", type=int, default=10, help="problems in the first wave; each wave doubles it")
    parser.add_argument("--max-problems", type=int, default=None, help="problems in the last wave (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the problem sample and of the resamples")
    parser.add_argument("--out", required=True, help="a local folder for decision.json and the report")
    parser.add_argument("--verbose", action="store_true", help="Ray's and Ray Data's INFO logs on the console")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the job's config")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        progress = quiet_ray_logs(args.verbose)
        import ray

        from pipeline.decide.waves import WaveSpec, run_waves  # imports Ray: only once the config is known to be good

        spec = WaveSpec(args.by, args.teacher_column, args.confidence, args.start, args.max_problems, args.seed)
        waves = run_waves(cfg, spec, quiet=not args.verbose, say=lambda line: print(line, flush=True), progress=progress)
    except JOB_ERRORS as exc:
        return job_error(exc)
    write_decision(waves, Path(args.out))
    ray.shutdown()
    return 0


def write_decision(waves, out: Path) -> None:
    """decision.json, the verdicts on the console and the final wave's report beside them."""
    from pipeline.decide.waves import verdict_sentence

    spec = waves.spec
    out.mkdir(parents=True, exist_ok=True)
    decision = {
        "by": spec.by, "teacher_column": spec.teacher_column, "confidence": spec.confidence, "seed": spec.seed,
        "rule": RULE, "schedule": waves.sizes, "teachers": waves.teachers, "corpus_rows": waves.corpus_rows,
        "rows_scored": waves.rows_scored, "share_of_corpus": waves.share_of_corpus(), "waves": waves.waves,
        "students": {name: track.verdict() for name, track in waves.students.items()},
    }  # fmt: skip
    (out / "decision.json").write_text(json.dumps(decision, indent=2) + "\n")
    print()
    for track in waves.students.values():
        print(verdict_sentence(track))
    final = pd.concat([track.rows for track in waves.students.values() if track.rows is not None])
    # The report's verdicts are the waves' last looks: the same rows, seed, confidence and number of looks.
    settings = Settings(spec.teacher_column, spec.by, seed=spec.seed, confidence=spec.confidence, n_looks=len(waves.sizes))
    _, written = write_report(final, settings, out)
    print(
        f"\n{waves.share_of_corpus():.1%} of the corpus scored ({waves.rows_scored} rows); wrote decision.json, {', '.join(written)} in {out}"
    )


if __name__ == "__main__":
    sys.exit(main())
