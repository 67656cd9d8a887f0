"""Secrets stay out of everything the job prints and writes; crafted values cannot move output files
outside the output root."""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import s3fs
import yaml

from pipeline.run.job import run_job
from pipeline.run.schema import partition_value
from tests.conftest import REPO, write_jsonl
from tests.test_job import job_config

ACCESS_KEY = "AKIAPLANTEDKEY0000001"
SECRET_KEY = "planted/Secret+Value-4d9b1c77"


def run_score_job(config: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "jobs.score", "--config", str(config)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def test_credentials_never_leak(tmp_path, corpus, student_dirs, s3_endpoint):
    admin = s3fs.S3FileSystem(endpoint_url=s3_endpoint)
    admin.mkdir("secrets-test")
    rows = [*corpus[:6], {"id": "bad", "messages": "not a list"}]
    admin.pipe("secrets-test/in/corpus.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({
        "input": {"paths": ["s3://secrets-test/in/"], "passthrough": ["source"]},
        "students": [{"name": "tiny", "path": str(student_dirs["chatml"])}],
        "compute": {"cpus_per_actor": 0.5},
        "output": {"path": "s3://secrets-test/out", "partition_by": ["source"]},
        "storage": {"endpoint_url": s3_endpoint},
    }))  # fmt: skip
    ray_tmp = tempfile.mkdtemp(prefix="rsr-sec-", dir="/tmp")  # its own Ray runtime, logs included
    env = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "RAY_TMPDIR": ray_tmp}
    env.pop("RAY_ADDRESS", None)
    ok = run_score_job(config, env)
    assert ok.returncode == 0, ok.stderr[-3000:]
    failed = run_score_job(config, {**env, "AWS_ACCESS_KEY_ID": ACCESS_KEY + "X"})  # rejected by nobody: still scans
    broken = yaml.safe_load(config.read_text())
    broken["input"]["paths"] = ["s3://no-such-bucket/in/"]
    config.write_text(yaml.safe_dump(broken))
    error = run_score_job(config, env)
    assert error.returncode == 2 and "no-such-bucket" in error.stderr

    texts = {"stdout/stderr": ok.stdout + ok.stderr + failed.stdout + failed.stderr + error.stdout + error.stderr}
    local = tmp_path / "written"
    admin.get("secrets-test/out/", str(local), recursive=True)
    written = [p for p in local.rglob("*") if p.is_file()]
    assert any(p.suffix == ".parquet" for p in written) and any("_rejects" in str(p) for p in written)
    for path in written:
        texts[str(path)] = path.read_bytes().decode("latin-1")
        if path.suffix == ".parquet":  # column values may be compressed on disk: scan them decoded too
            texts[f"{path} (decoded)"] = str(pq.read_table(path).to_pylist()) + str(pq.read_metadata(path).metadata)
    for path in Path(ray_tmp).rglob("*"):
        if path.is_file() and not path.is_symlink() and path.stat().st_size < 50_000_000:
            texts[str(path)] = path.read_bytes().decode("latin-1")
    assert len(texts) > 10
    for where, text in texts.items():
        assert ACCESS_KEY not in text and SECRET_KEY not in text, f"credential found in {where}"


def test_crafted_values_stay_inside_the_output_root(ray_runtime, tmp_path, corpus, student_dirs):
    crafted = ["../../escape", "/etc/passwd", "a/b", "x=y", "nul\x00byte", ".", "..", "L" * 500, "ok", "ok%2F"]
    rows = [{**corpus[i], "id": f"../../../id-{i}/..", "source": value} for i, value in enumerate(crafted)]
    data = write_jsonl(tmp_path / "crafted.jsonl", rows)
    out = tmp_path / "nested" / "out"
    run_job(job_config(tmp_path, [str(data)], str(out), {"tiny": student_dirs["chatml"]}))

    root = out.resolve()
    everything = [p.resolve() for p in tmp_path.rglob("*")]
    outside = [p for p in everything if not p.is_relative_to(root) and not p.is_relative_to(data.parent / "nested")]
    assert {p.name for p in outside} <= {"crafted.jsonl", "job.yaml", "nested"}
    folders = [p.name for p in (root / "student=tiny").iterdir()]
    assert len(folders) == len(crafted) and all(len(name.encode()) <= 255 for name in folders)
    scores = duckdb.sql(f"SELECT sample_id, source FROM read_parquet('{root}/student=*/**/*.parquet', hive_partitioning=true)")
    read_back = dict(scores.fetchall())
    assert sorted(read_back) == sorted(r["id"] for r in rows)  # crafted ids are kept, as data only
    # values come back exactly, except NUL (replaced) and overlong ones (cut, with a hash of the whole)
    assert sorted(read_back.values()) == sorted(partition_value(v) for v in crafted)
    assert partition_value("nul\x00byte") == "nul\ufffdbyte" and partition_value("../../escape") == "../../escape"
    assert len(partition_value("L" * 500)) < 200 and partition_value("L" * 500) != partition_value("L" * 499)
