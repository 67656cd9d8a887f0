"""jobs.decide end to end on a real local Ray runtime with a tiny student: waves of nested problem samples
scored incrementally into the job's output, stopped once the decision is made; an undecided verdict that
names the teachers and their bound; bad input refused before anything is scored."""

import json

import pandas as pd
import pytest

from jobs.decide import main as decide_main
from pipeline.decide.query import latest_scores
from tests.conftest import start_ray, write_jsonl
from tests.test_job import job_config

PROMPTS = ["What is the sum of the two numbers", "How many are left at the end", "Find the answer to this one"]


def rows(n_problems: int, replies: dict[str, str]) -> list[dict]:
    """Every teacher answers every problem with its own reply (the prompt varies with the problem)."""
    return [
        {
            "id": f"p{p:02d}-{teacher}",
            "problem_id": f"p{p:02d}",
            "source": teacher,
            "messages": [
                {"role": "user", "content": f"{PROMPTS[p % 3]} {p}?"},
                {"role": "assistant", "content": reply},
            ],
        }
        for p in range(n_problems)
        for teacher, reply in replies.items()
    ]


def config_file(tmp_path, corpus: list[dict], student) -> tuple[str, str]:
    data = write_jsonl(tmp_path / "corpus.jsonl", corpus)
    out = tmp_path / "scores"
    job_config(tmp_path, [str(data)], str(out), {"tiny": student})  # writes tmp_path/job.yaml
    return str(tmp_path / "job.yaml"), str(out)


def decide(config: str, out, *options: str) -> int:
    return decide_main(["--config", config, "--by", "problem_id", "--teacher-column", "source", "--out", str(out), *options])


def test_waves_stop_once_a_clear_teacher_is_decided(tmp_path, student_dirs, capsys):
    start_ray()
    # One teacher repeats one word, the other another: every problem puts them in the same order.
    corpus = rows(32, {"same": " ".join(["the"] * 30), "other": " ".join(["of"] * 30)})
    config, scores_path = config_file(tmp_path, corpus, student_dirs["chatml"])
    assert decide(config, tmp_path / "decision", "--start", "4") == 0

    decision = json.loads((tmp_path / "decision" / "decision.json").read_text())
    verdict = decision["students"]["tiny"]
    assert decision["schedule"] == [4, 8, 16, 32]
    assert verdict["verdict"] == "decided" and verdict["n_problems"] < 32, verdict
    waves = verdict["waves"]
    assert [w["n_problems"] for w in waves] == decision["schedule"][: len(waves)]
    assert not any(w["decided"] for w in waves[:-1]) and waves[-1]["decided"]
    assert verdict["teacher"] == waves[-1]["leader"] and verdict["undecided"] is None
    # Each wave scored only its new problems: the output holds the last wave's problems, each row once.
    scores = latest_scores(scores_path)
    assert len(scores) == 2 * verdict["n_problems"] == verdict["rows_scored"] == decision["rows_scored"]
    assert [w["rows_scored"] for w in decision["waves"]] == [2 * n for n in [4, 4, 8, 16][: len(waves)]]
    assert decision["share_of_corpus"] == pytest.approx(len(scores) / len(corpus))
    assert verdict["tokens_scored"] == scores["resp_token_length"].sum()
    # The final wave's report beside it, on the same problems, with the same verdict.
    teachers = pd.read_csv(tmp_path / "decision" / "teachers.csv")
    assert teachers["teacher"].iloc[0] == verdict["teacher"] and (teachers["n_problems"] == verdict["n_problems"]).all()
    printed = capsys.readouterr().out
    assert printed.count("\nwave ") + printed.startswith("wave ") == len(waves)
    assert f"tiny: decided on {verdict['n_problems']} problems: {verdict['teacher']} is the most suitable teacher" in printed


def test_teachers_that_cannot_be_separated_leave_an_undecided_verdict_with_its_bound(tmp_path, student_dirs, capsys):
    start_ray()
    reply = "The sum is 12 and that is the answer."
    corpus = rows(6, {"a": reply, "b": reply, "c": " ".join(["of"] * 20)})
    config, _ = config_file(tmp_path, corpus, student_dirs["chatml"])
    assert decide(config, tmp_path / "decision", "--start", "3", "--max-problems", "6") == 0

    verdict = json.loads((tmp_path / "decision" / "decision.json").read_text())["students"]["tiny"]
    assert verdict["verdict"] == "undecided" and verdict["n_problems"] == 6 and len(verdict["waves"]) == 2
    assert set(verdict["undecided"]["teachers"]) >= {"a", "b"}
    tied = verdict["waves"][-1]
    assert tied["rsr"]["a"] == tied["rsr"]["b"]
    assert "tiny: undecided on 6 problems:" in capsys.readouterr().out


@pytest.mark.parametrize(
    "bad_rows, options, message",
    [
        (rows(4, {"only": "One teacher."}), [], "has one teacher (only): nothing to decide"),
        (rows(2, {"a": "x y."}) + [{**r, "problem_id": f"q{r['problem_id']}"} for r in rows(2, {"b": "x y."})], [],
         "no problem_id is answered by every one of the 2 teachers"),
        (rows(4, {"a": "x y.", "b": "y x."}), ["--start", "5"], "--start 5 is more than the 4 problem_id answered by every teacher"),
        (rows(4, {"a": "x y.", "b": "y x."}), ["--by", "missing"], "--by 'missing' is not a column of the scored rows"),
    ],
)  # fmt: skip
def test_bad_input_is_refused_before_anything_is_scored(tmp_path, student_dirs, capsys, bad_rows, options, message):
    start_ray()
    config, _ = config_file(tmp_path, bad_rows, student_dirs["chatml"])
    by = [] if "--by" in options else ["--by", "problem_id"]
    code = decide_main(["--config", config, *by, "--teacher-column", "source", "--out", str(tmp_path / "d"), *options])
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "scores").exists() and not (tmp_path / "d").exists()
