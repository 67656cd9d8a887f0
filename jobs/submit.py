"""Submit a scoring run to a Ray cluster through the Ray Jobs API, stream its logs, and exit with its
outcome (0 when the job succeeded).

  python -m jobs.submit --address http://HEAD:8265 --config jobs/configs/demo.yaml [key=value ...]

The same as `ray job submit --address http://HEAD:8265 --working-dir . -- python -m jobs.score ...`:
the project folder travels as the job's working directory; the cluster image provides the packages.
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import sys
import time

from ray.job_submission import JobStatus, JobSubmissionClient

# Never upload local outputs, caches or history with the working directory.
AGENT_WAIT_S = 60
EXCLUDES = [".git", "out", "**/__pycache__", ".pytest_cache", "*.egg-info"]


async def _stream_logs(client: JobSubmissionClient, job_id: str) -> None:
    async for lines in client.tail_job_logs(job_id):
        print(lines, end="", flush=True)


def submit(address: str, config: str, overrides: list[str], working_dir: str = ".", wait: bool = True) -> int:
    client = JobSubmissionClient(address)
    entrypoint = shlex.join(["python", "-m", "jobs.score", "--config", config, *overrides])
    runtime_env = {"working_dir": working_dir, "excludes": EXCLUDES}
    for attempt in range(AGENT_WAIT_S // 2):
        try:
            job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
            break
        except RuntimeError as exc:  # a cluster that just started may not have its job agent up yet
            if "No available agent" not in str(exc) or attempt == AGENT_WAIT_S // 2 - 1:
                raise
            time.sleep(2)
    print(f"submitted {job_id}: {entrypoint}", flush=True)
    if not wait:
        return 0
    asyncio.run(_stream_logs(client, job_id))
    status = client.get_job_status(job_id)
    print(f"\njob {job_id} {status.value}", flush=True)
    return 0 if status == JobStatus.SUCCEEDED else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--address", required=True, help="the cluster's dashboard, e.g. http://127.0.0.1:8265")
    parser.add_argument("--config", required=True, help="config path inside the working directory")
    parser.add_argument("--working-dir", default=".", help="the project folder to ship (default: .)")
    parser.add_argument("--no-wait", action="store_true", help="return once submitted")
    parser.add_argument("overrides", nargs="*", help="key=value overrides passed to jobs.score")
    args = parser.parse_args(argv)
    return submit(args.address, args.config, args.overrides, args.working_dir, wait=not args.no_wait)


if __name__ == "__main__":
    sys.exit(main())
