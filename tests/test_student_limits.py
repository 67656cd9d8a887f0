"""What a student can do, per student: its own window caps max_model_len; a bfloat16 student keeps
float32 logits; a scoring call is sized by tokens, so results of long rows arrive as they are scored."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from pipeline.decide.query import latest_scores
from pipeline.run.job import check_students, run_job
from pipeline.run.schema import RowContract
from pipeline.run.settings import resolve_settings
from pipeline.scoring.rsr import project_and_score, token_statistics
from pipeline.scoring.student import ScoringOptions, Student
from pipeline.tokens.spans import encode_conversation
from tests.conftest import start_ray, write_jsonl
from tests.test_job import job_config

SHORT_WINDOW = 64


@pytest.fixture(scope="module")
def short_window_student(tmp_path_factory, student_dirs):
    """The chatml tiny student, told it was trained on 64 positions (shorter than most test rows)."""
    folder = shutil.copytree(student_dirs["chatml"], tmp_path_factory.mktemp("window") / "student")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "max_position_embeddings": SHORT_WINDOW}))
    return folder


def student_settings(cfg, check):
    """The one student's fingerprinted settings, on a cluster without GPUs."""
    return resolve_settings(cfg, RowContract.of(cfg), [check], cluster_gpus=0).students[0].scoring


def test_a_student_scores_within_its_own_window(tmp_path, short_window_student, corpus):
    start_ray()
    data = write_jsonl(tmp_path / "corpus.jsonl", corpus)
    out = tmp_path / "out"
    cfg = job_config(tmp_path, [str(data)], str(out), {"short": short_window_student}, ["scoring.max_model_len=32768"])
    (check,) = check_students(cfg)
    assert (check.window, check.max_model_len) == (SHORT_WINDOW, SHORT_WINDOW)
    window = run_job(cfg).counts.to_pylist()[0]
    scores = latest_scores(str(out))
    lengths = {row["id"]: len(encode_conversation(check.source.load_tokenizer(), row["messages"]).input_ids) for row in corpus}
    longer = {sample for sample, n in lengths.items() if n > SHORT_WINDOW}
    assert longer and set(scores.loc[scores["truncated"], "sample_id"]) == longer  # flagged, scored on their first 64 tokens
    manifest = json.loads(next((out / "_runs").glob("*Z-??????.json")).read_text())
    assert manifest["students"][0]["settings"]["max_model_len"] == SHORT_WINDOW

    rejecting = job_config(tmp_path, [str(data)], str(tmp_path / "rejecting"), {"short": short_window_student},
                           ["scoring.on_too_long=reject"])  # fmt: skip
    counts = run_job(rejecting).counts.to_pylist()[0]
    assert (counts["scored"], counts["rejected"]) == (window["scored"] - len(longer), window["rejected"] + len(longer))


def test_bfloat16_students_keep_float32_logits(student_dirs):
    """The body runs in bfloat16; the vocabulary projection returns its float32 result unrounded (the
    numbers of a float32 matrix product of the same bfloat16 inputs, summed in another order), or rounds
    it with `logits_dtype: model`."""
    kept = Student.load(
        str(student_dirs["chatml"]), dtype="bfloat16", device="cpu", options=ScoringOptions(logits_dtype="float32")
    )
    rounded = Student.load(
        str(student_dirs["chatml"]), dtype="bfloat16", device="cpu", options=ScoringOptions(logits_dtype="model")
    )
    weight = rounded.head.weight
    assert weight.dtype == torch.bfloat16 and kept.head.weight.dtype == torch.float32
    assert kept.head.bfloat16_head and not rounded.head.bfloat16_head  # the bfloat16-kernel path is the one tested
    hidden = torch.randn(40, weight.shape[1]).to(torch.bfloat16)
    targets = torch.randint(0, weight.shape[0], (40,))
    exact = hidden.float() @ weight.float().T
    _, surprisals, _ = project_and_score(hidden, kept.head, targets, 16)
    torch.testing.assert_close(surprisals, token_statistics(exact, targets)[1], rtol=1e-5, atol=1e-5)
    _, surprisals, _ = project_and_score(hidden, rounded.head, targets, 16)
    assert torch.equal(surprisals, token_statistics(exact.to(torch.bfloat16), targets)[1])
    assert (surprisals - token_statistics(exact, targets)[1]).abs().max() > 1e-3  # rounding shows


def test_logits_dtype_enters_the_fingerprint_only_where_it_changes_numbers(tmp_path, student_dirs, corpus_path):
    cfg = job_config(tmp_path, [str(corpus_path)], str(tmp_path / "out"), {"tiny": student_dirs["chatml"]})
    (check,) = check_students(cfg)
    float32 = student_settings(cfg, check)
    assert "logits_dtype" not in float32.as_dict()  # float32 students keep their fingerprints
    cfg.students[0].dtype = "bfloat16"
    assert student_settings(cfg, check).as_dict()["logits_dtype"] == "float32"
    cfg.scoring.logits_dtype = "model"
    assert "logits_dtype" not in student_settings(cfg, check).as_dict()


def test_a_scoring_call_is_sized_by_tokens_not_rows(tmp_path, student_dirs, corpus):
    """Long rows: with a small token size per call, results leave the actor (and are committed as pieces)
    a row at a time; with the default size, several rows share a call."""
    start_ray()
    long_rows = [{**row, "messages": [*row["messages"][:-1], {"role": "assistant", "content": row["messages"][-1]["content"] * 20}]}
                 for row in corpus]  # fmt: skip
    data = write_jsonl(tmp_path / "long.jsonl", long_rows)
    students = {"tiny": student_dirs["chatml"]}
    default = run_job(
        job_config(
            tmp_path, [str(data)], str(tmp_path / "one"), students, ["output.checkpoint_rows=1", "scoring.batch_tokens=auto"]
        )
    )
    by_tokens = run_job(
        job_config(
            tmp_path, [str(data)], str(tmp_path / "many"), students, ["output.checkpoint_rows=1", "scoring.batch_tokens=1"]
        )
    )
    assert by_tokens.pieces == len(long_rows) > default.pieces  # each row's block committed as it arrives
    assert by_tokens.counts.to_pylist() == default.counts.to_pylist()
    one, many = latest_scores(str(tmp_path / "one")), latest_scores(str(tmp_path / "many"))
    merged = one.merge(many, on="sample_id")
    assert (
        len(merged) == len(long_rows) and (merged["rank_surprisal_ratio_x"] - merged["rank_surprisal_ratio_y"]).abs().max() < 1e-6
    )


def test_progress_is_counted_from_what_the_actors_scored(tmp_path, student_dirs, corpus, monkeypatch):
    from pipeline.run import results

    start_ray()
    monkeypatch.setattr(results, "PROGRESS_EVERY_S", 0.0)
    data = write_jsonl(tmp_path / "corpus.jsonl", corpus)
    out = tmp_path / "out"
    lines = []
    result = run_job(job_config(tmp_path, [str(data)], str(out), {"tiny": student_dirs["chatml"]}), progress=lines.append)
    assert lines and all(line.startswith("progress: ") and "tokens done" in line for line in lines)
    done = [int(line.split()[1].replace(",", "")) for line in lines]
    assert done == sorted(done) and done[-1] <= len(corpus)  # rows through the actors, never past the corpus
    efficiency = result.padding_efficiency["tiny"]
    assert 0 < efficiency <= 1
    manifest = json.loads(next((out / "_runs").glob("*Z-??????.json")).read_text())
    assert manifest["students"][0]["padding_efficiency"] == efficiency


def test_time_left_comes_from_the_text_scored_not_the_rows_passed_through():
    """A resumed run's first blocks are rows scored before: they count as done, not as speed. The time
    left is measured in the rows' bytes: short rows scored first say little of long ones to come."""
    import time

    import ray

    from pipeline.run.results import Progress, ScoringMeter

    start_ray()
    meter, lines = ScoringMeter.remote(), []
    progress = Progress(lines.append, 600, 1_000_000, meter)
    progress.stop()  # no ticker: lines only from update()
    ray.get(meter.add.remote("tiny", "f:1", unscored=74, unscored_bytes=74_000))
    progress.update()
    assert lines == []  # nothing scored yet: no rate to speak of
    ray.get(meter.start.remote(time.time() - 60))
    ray.get(meter.add.remote("tiny", "f:75", rows=26, tokens=1000, text_bytes=26_000))
    progress.update()
    # 26,000 bytes scored in about 60 s; 900,000 of 1,000,000 to go at that rate: about 35 minutes (not 0
    # as the rows passed through would say, nor 19 as the rows scored would)
    assert lines[0].startswith("progress: 100 of 600 rows and 1,000 tokens done, 17 tokens/s, 10% of the text, about 35 min left")


def test_a_block_scored_again_after_a_lost_actor_counts_once():
    """A restarted actor scores a lost actor's block again: progress and padding count its rows once."""
    import ray

    from pipeline.run.results import ScoringMeter, padding_efficiency

    start_ray()
    meter = ScoringMeter.remote()
    for node in ("lost", "left"):  # the first actor's node died after its first batch; the second scores the whole block
        ray.get(meter.begin.remote("tiny", "f.jsonl:1", node, 20))
        ray.get(meter.add.remote("tiny", "f.jsonl:1", rows=10, tokens=400, text_bytes=1_000))
        if node == "lost":
            assert ray.get(meter.in_flight.remote("lost")) == 20  # what a loss now would have scored again
        else:
            ray.get(meter.add.remote("tiny", "f.jsonl:1", rows=10, tokens=500, text_bytes=1_200, real=900, padded=1_000))
            ray.get(meter.end.remote("tiny", "f.jsonl:1"))
    ray.get(meter.begin.remote("tiny", "f.jsonl:21", "left", 5))
    ray.get(meter.add.remote("tiny", "f.jsonl:21", unscored=5, unscored_bytes=300, real=90, padded=100))
    assert ray.get(meter.in_flight.remote("left")) == 5 and ray.get(meter.in_flight.remote("lost")) == 0
    ray.get(meter.end.remote("tiny", "f.jsonl:21"))
    done = ray.get(meter.read.remote())
    assert (done["rows"], done["tokens"], done["text_bytes"], done["unscored"]) == (20, 900, 2_200, 5)
    assert padding_efficiency(done) == {"tiny": 990 / 1_100}
    assert done["redone"] == 20  # the block begun again
