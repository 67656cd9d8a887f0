"""Nightly re-scoring: only new or changed trajectories and new student revisions are scored, every
run is committed atomically, and an interrupted run leaves nothing committed."""

import copy
import json

import duckdb
import pytest

from benchmarks.tiny_student import build_tiny_student
from pipeline.corpus.records import content_hash
from pipeline.corpus.storage import locate
from pipeline.run import layout, output
from pipeline.run.job import run_job
from pipeline.tokens.tokenizer import BUILTIN_TEMPLATES
from tests.conftest import write_jsonl
from tests.test_job import job_config

LATEST_VIEW = """
SELECT * FROM read_parquet({files}, hive_partitioning = true)
QUALIFY row_number() OVER (PARTITION BY sample_id, student ORDER BY scored_at DESC, run_id DESC) = 1
"""


def latest(output_dir) -> list[dict]:
    """The documented "latest score per (id, student)" query, over committed files only."""
    root = locate(str(output_dir), None)
    files = [root.join(f).path for f in layout.committed_files(root) if f.startswith("student=")]
    return duckdb.sql(LATEST_VIEW.format(files=json.dumps(files))).to_arrow_table().to_pylist()


def counts(result) -> dict:
    """Per student: rows scored, rejected, skipped (already scored) and left unread (their files unchanged)."""
    return {row["student"]: (row["scored"], row["rejected"], row["skipped"], row["unread"]) for row in result.counts.to_pylist()}


def test_nightly_runs(ray_runtime, tmp_path, corpus, corpus_path, student_dirs, monkeypatch):
    data = tmp_path / "data" / "corpus.jsonl"
    out = tmp_path / "out"
    evolving = build_tiny_student(tmp_path / "evolving", corpus_path, seed=5)
    students = {"stable": student_dirs["chatml"], "evolving": evolving}
    cfg = job_config(tmp_path, [str(data)], str(out), students)

    write_jsonl(data, corpus[:20])
    first = run_job(cfg)
    assert first.mode == "full" and counts(first) == {"stable": (20, 0, 0, 0), "evolving": (20, 0, 0, 0)}

    files_before = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    again = run_job(cfg)
    assert again.mode == "incremental" and again.committed_files == []
    assert counts(again) == {"stable": (0, 0, 0, 20), "evolving": (0, 0, 0, 20)}  # the file is unchanged
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == files_before

    # Nightly growth: five new rows, one changed row, and a retrained `evolving` student.
    changed = copy.deepcopy(corpus[3])
    changed["messages"][-1]["content"] += " Checked twice."
    write_jsonl(data, [*corpus[:3], changed, *corpus[4:25]])
    build_tiny_student(evolving, corpus_path, seed=6)
    grown = run_job(cfg)
    assert counts(grown) == {"stable": (6, 0, 19, 0), "evolving": (25, 0, 0, 0)}

    view = latest(out)
    assert len(view) == 50 and len({(r["sample_id"], r["student"]) for r in view}) == 50
    row3 = [r for r in view if r["sample_id"] == changed["id"]]
    assert {r["content_hash"] for r in row3} == {content_hash(changed["messages"])}
    assert len({r["student_revision"] for r in view if r["student"] == "evolving"}) == 1

    # A run that dies after moving its files but before its manifest commits nothing ...
    write_jsonl(data, [*corpus[:3], changed, *corpus[4:30]])

    def crash(*args, **kwargs):
        raise RuntimeError("killed between staging and commit")

    monkeypatch.setattr(output, "write_manifest", crash)
    with pytest.raises(RuntimeError, match="killed"):
        run_job(cfg)
    monkeypatch.undo()
    assert len(latest(out)) == 50
    # ... and the next run removes its debris and completes the work.
    resumed = run_job(cfg)
    assert counts(resumed) == {"stable": (5, 0, 25, 0), "evolving": (5, 0, 25, 0)}
    view = latest(out)
    assert len(view) == 60 and len({(r["sample_id"], r["student"]) for r in view}) == 60
    committed = set(layout.committed_files(locate(str(out), None)))
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*.parquet")}
    assert on_disk == committed


def test_overwrite_replaces_earlier_runs(ray_runtime, tmp_path, corpus, student_dirs):
    data = write_jsonl(tmp_path / "corpus.jsonl", corpus[:8])
    out = tmp_path / "out"
    cfg = job_config(tmp_path, [str(data)], str(out), {"tiny": student_dirs["chatml"]})
    run_job(cfg)
    cfg.output.mode = "overwrite"
    second = run_job(cfg)
    assert counts(second) == {"tiny": (8, 0, 0, 0)}
    root = locate(str(out), None)
    assert {m["run_id"] for m in output.read_manifests(root)} == {second.run_id}
    assert len(latest(out)) == 8


def test_changed_scoring_settings_rescore_every_row_and_unchanged_ones_skip(ray_runtime, tmp_path, corpus, student_dirs):
    data = write_jsonl(tmp_path / "corpus.jsonl", corpus[:6])
    out = tmp_path / "out"
    template = tmp_path / "other.jinja"
    template.write_text(
        BUILTIN_TEMPLATES["chatml"].replace("{% endfor %}", "{{ '\\n' }}{% endfor %}", 1)
    )  # a blank line after each turn
    settings = [
        [],  # the first run
        ["scoring.reasoning=keep"],
        [f"students.0.chat_template={template}"],
        ["scoring.rank_clip=50"],
        ["scoring.metrics=[rsr,entropy]"],
        ["students.0.dtype=bfloat16"],
    ]
    fingerprints = []
    for changed in settings:
        cfg = job_config(tmp_path, [str(data)], str(out), {"tiny": student_dirs["chatml"]}, changed)
        assert counts(run_job(cfg)) == {"tiny": (6, 0, 0, 0)}, changed  # every row rescored
        assert counts(run_job(cfg)) == {"tiny": (0, 0, 0, 6)}, changed  # unchanged: the file is left unread
        view = latest(out)
        assert len({r["scoring_fingerprint"] for r in view}) == 1 and len(view) == 6
        fingerprints.append(view[0]["scoring_fingerprint"])
    assert len(set(fingerprints)) == len(settings)
    assert {(r["reasoning_mode"], r["dtype"], r["rank_clip"]) for r in view} == {("template", "bfloat16", 100)}
    manifests = output.read_manifests(locate(str(out), None))
    [student] = [m for m in manifests if m.get("completed")][-1]["students"]
    assert student["fingerprint"] == fingerprints[-1] and student["settings"]["dtype"] == "bfloat16"


def test_select_and_report_say_when_a_students_scores_mix_settings(ray_runtime, tmp_path, corpus, student_dirs, capsys):
    from jobs import report, select

    data = write_jsonl(tmp_path / "corpus.jsonl", corpus[:6])
    out = tmp_path / "out"
    run_job(job_config(tmp_path, [str(data)], str(out), {"tiny": student_dirs["chatml"]}))
    write_jsonl(data, corpus[:3])  # three rows leave the corpus; the rest is rescored with new settings
    run_job(job_config(tmp_path, [str(data)], str(out), {"tiny": student_dirs["chatml"]}, ["scoring.rank_clip=50"]))
    select.main(["--scores", str(out), "--student", "tiny", "--top-k", "1", "--out", str(tmp_path / "sel.jsonl")])
    report.main(["--scores", str(out), "--out", str(tmp_path / "report")])
    err = capsys.readouterr().err
    assert err.count("warning: student tiny: scores made with 2 scoring settings") == 2


def test_a_night_reads_only_the_new_and_changed_files(ray_runtime, tmp_path, corpus, student_dirs, capsys):
    """Files unchanged since the last completed run are left unread, and counted; a new file's id that
    an unread file committed is a duplicate, whichever file sorts first."""
    data, out = tmp_path / "data", tmp_path / "out"
    for name, rows in (("a", corpus[:6]), ("b", corpus[6:12]), ("c", corpus[12:18])):
        write_jsonl(data / f"{name}.jsonl", rows)
    cfg = job_config(tmp_path, [str(data)], str(out), {"tiny": student_dirs["chatml"]})
    assert counts(run_job(cfg)) == {"tiny": (18, 0, 0, 0)}

    write_jsonl(data / "b.jsonl", [*corpus[6:12], corpus[18]])  # b grows by a row
    # A new file that sorts first, with a row whose id a.jsonl (unread) committed, changed in content.
    taken = {**corpus[2], "messages": corpus[30]["messages"]}
    write_jsonl(data / "0-new.jsonl", [*corpus[20:24], taken])
    night = run_job(cfg)
    assert counts(night) == {"tiny": (5, 1, 6, 12)} and night.unread_files == 2
    [read] = night.counts.to_pylist()
    assert read["read"] + read["unread"] == 6 + 7 + 6 + 5  # every row of the corpus, once
    assert "unread: 2 of 4 files (12 rows)" in capsys.readouterr().out
    root = locate(str(out), None)
    rejects = [f for f in layout.committed_files(root) if f.startswith("_rejects/") and night.run_id in f]
    [reject] = (
        duckdb.sql(f"SELECT * FROM read_parquet({json.dumps([root.join(f).path for f in rejects])})").to_arrow_table().to_pylist()
    )
    assert reject["sample_id"] == corpus[2]["id"] and reject["reject_reason"] == "duplicate_id"
    assert reject["reject_detail"].endswith("a.jsonl:3")  # the committed row wins (row numbers are 1-based)
    view = latest(out)
    assert len(view) == 23 and len({r["sample_id"] for r in view}) == 23
    assert {r["content_hash"] for r in view if r["sample_id"] == corpus[2]["id"]} == {content_hash(corpus[2]["messages"])}

    quiet = run_job(cfg)  # nothing changed
    assert counts(quiet) == {"tiny": (0, 0, 0, 24)} and quiet.committed_files == []
