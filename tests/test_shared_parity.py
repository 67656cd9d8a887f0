"""Parity on the shared GSM8K corpus with the real SmolLM2 tokenizer and the shipped reference script.

Opt in: `pytest -m slow` (needs ../shared; the scoring half takes a few minutes on 2 CPU cores).
"""

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from pipeline.spans import encode_conversation
from pipeline.student import ScoringOptions, Student
from tests.conftest import SHARED
from tests.reference import CHATML_MARKERS, marker_ids, marker_positions

SMOLLM = SHARED / "models" / "smollm2-135m-instruct"
GSM8K = SHARED / "data" / "gsm8k_multisource_300.jsonl"
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not GSM8K.exists(), reason="needs ../shared")]


def gsm8k_rows(limit=None):
    with open(GSM8K) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return rows[:limit]


def test_response_token_counts_match_reference_scanner_on_all_rows():
    tokenizer = AutoTokenizer.from_pretrained(SMOLLM)
    head, end = marker_ids(tokenizer, CHATML_MARKERS)
    rows = gsm8k_rows()
    assert len(rows) == 1800
    for row in rows:
        encoded = encode_conversation(tokenizer, row["messages"])
        assert encoded.response_positions == marker_positions(encoded.input_ids, head, end), row["id"]


def test_random_smollm_shape_matches_reference_script(tmp_path):
    """Scores of a random-weight SmolLM2-shape student equal reference_rsr.py --dtype float32."""
    n_rows = 60
    student_dir = tmp_path / "student"
    tokenizer = AutoTokenizer.from_pretrained(SMOLLM)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(SMOLLM), dtype=torch.float32)
    model.save_pretrained(student_dir)
    tokenizer.save_pretrained(student_dir)

    corpus = tmp_path / "corpus.jsonl"
    rows = gsm8k_rows(n_rows)
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    reference_out = tmp_path / "reference.jsonl"
    subprocess.run(
        [
            sys.executable,
            str(SHARED / "bench" / "reference_rsr.py"),
            str(student_dir),
            str(corpus),
            str(reference_out),
            "--dtype",
            "float32",
            "--threads",
            "2",
        ],
        check=True,
    )
    expected = {r["id"]: r for r in map(json.loads, reference_out.read_text().splitlines())}

    student = Student.load(str(student_dir), dtype="float32", device="cpu", options=ScoringOptions(token_budget=8192))
    got = student.score([encode_conversation(student.tokenizer, r["messages"]) for r in rows])
    for row, stats in zip(rows, got):
        ref = expected[row["id"]]
        assert stats["resp_token_length"] == ref["n_tokens"]
        assert abs(stats["rank_surprisal_ratio"] - ref["rsr"]) <= 1e-4
        assert abs(stats["avg_rank_clip"] - ref["avg_rank"]) <= 1e-4
        assert abs(stats["avg_surprisal"] - ref["avg_surprisal"]) <= 1e-4
