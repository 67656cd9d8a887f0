"""The one-command GPU benchmark runs on the CPU with its tiny shape, without Ray, and its parity holds."""

import subprocess
import sys

from tests.conftest import REPO

RUN_WITHOUT_RAY = """
import sys
from benchmarks.bench_gpu import main
code = main(["--tiny", "--device", "cpu"])
assert "ray" not in sys.modules, "the GPU benchmark imported Ray"
sys.exit(code)
"""


def test_the_gpu_benchmark_runs_its_tiny_shape_on_the_cpu_without_ray():
    done = subprocess.run([sys.executable, "-c", RUN_WITHOUT_RAY], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert any(line.startswith("shared ") for line in lines)  # the shared-prompt shape ran
    assert "float32 parity on the tiny shape" in done.stdout and "(ok" in done.stdout
    assert lines[-1].startswith("summary: cpu") and lines[-1].endswith("parity ok")
