"""Score trajectory corpora with RSR: `python -m jobs.score --config FILE [key=value ...]`."""

from __future__ import annotations

import argparse
import functools
import gc
import os
import sys
from collections.abc import Callable
from importlib import resources

from pipeline.corpus.storage import StorageError
from pipeline.run.config import ConfigError, load_config
from pipeline.run.lock import OutputLocked
from pipeline.run.schema import IncompleteRun

DEFAULT_CONFIG = "jobs/configs/demo.yaml"


def print_result(result) -> None:
    print(f"\nrun {result.run_id} ({result.mode}) -> {result.output}")
    print(result.counts.to_pandas().to_string(index=False))
    for row in result.counts.to_pylist():
        if row["content_dropped"]:
            print(
                f"warning: student {row['student']}: its chat template left out reasoning or content of "
                f"{row['content_dropped']} scored rows (column content_dropped); scoring.reasoning=keep scores it as given"
            )
    if result.summary.num_rows:
        print("\ndataset-level RSR (lower = more suitable trajectories for the student):")
        print(result.summary.to_pandas().to_string(index=False))
    if result.partition_summary is not None and result.partition_summary.num_rows:
        print()
        print(result.partition_summary.to_pandas().sort_values(["student", "rsr"]).to_string(index=False))
    for student, efficiency in result.padding_efficiency.items():
        print(f"student {student}: padding efficiency {efficiency:.2f} (real / padded tokens of its batches)")
    if result.rows_redone:
        print(f"{result.rows_redone:,} rows scored again after their scoring actor or node was lost (each counted once)")
    tokens_per_s = result.tokens_scored / result.wall_s if result.wall_s else 0.0
    print(
        f"\n{result.tokens_scored} response tokens scored in {result.wall_s:.1f} s "
        f"({tokens_per_s:.0f} tokens/s end to end, model loading included)"
    )
    if not sum(row["scored"] + row["rejected"] for row in result.counts.to_pylist()):
        print("nothing new to score")
    if result.committed_files:
        print(f"committed {len(result.committed_files)} files under {result.output}")
    for path in result.skipped_files:
        print(f"skipped (not .jsonl/.json/.parquet): {path}")


JOB_ERRORS = (ConfigError, StorageError, OutputLocked, IncompleteRun)


def job_error(exc: Exception) -> int:
    """A job error as one line on stderr, and the exit code: 2 for a configuration that cannot work, 1 for
    the rest (storage, another run's lock, results that do not account for every row)."""
    print(f"error: {exc}", file=sys.stderr)
    return 2 if isinstance(exc, ConfigError) else 1


def quiet_ray_logs(verbose: bool) -> Callable[[str], None] | None:
    """Unless `verbose`, Ray Data and transformers log warnings and up (set before Ray Data is imported;
    workers started later inherit it). Returns where progress lines go: on a terminal Ray Data draws
    progress bars; elsewhere (logs, CI) one line every few seconds."""
    if not verbose:
        os.environ.setdefault("RAY_DATA_LOGGING_CONFIG", str(resources.files("pipeline.run") / "ray_data_quiet.yaml"))
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # also transformers' weight-loading bar
    from ray.data import DataContext

    # The fused stages' names, whole: Ray Data would otherwise cut them and warn that it did.
    DataContext.get_current().enable_progress_bar_name_truncation = False
    return None if verbose or sys.stderr.isatty() else functools.partial(print, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default=DEFAULT_CONFIG, help=f"YAML config (default: {DEFAULT_CONFIG})")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. scoring.rank_clip=50")
    parser.add_argument("--verbose", action="store_true", help="Ray's and Ray Data's INFO logs on the console")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        progress = quiet_ray_logs(args.verbose)
        import ray

        from pipeline.run.job import run_job  # imports Ray: only once the config is known to be good

        result = run_job(cfg, quiet=not args.verbose, progress=progress)
    except JOB_ERRORS as exc:
        return job_error(exc)
    print_result(result)
    # This process owns the runtime that run_job started: stopped here rather than by Ray's exit hook,
    # which first waits half a second for late error messages. Then the interpreter's last garbage
    # collection, a walk over every object torch, transformers and Ray made (a second of a 120-row
    # run), is skipped: the process is about to end and frees them all.
    ray.shutdown()
    gc.freeze()
    return 0


if __name__ == "__main__":
    sys.exit(main())
