"""GGUF students: weights dequantized through transformers' GGUF support, tokens from the model's own
tokenizer.json or from the GGUF's metadata after a check, the file's hash as the revision; another
family (a tiny Qwen3) the same way. GGUF files are written here from tiny random models (gguf-py)."""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import Regex, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX as QWEN2_SPLIT

from benchmarks.tiny_student import corpus_texts, train_tokenizer
from pipeline.decide.query import latest_scores
from pipeline.run.config import ConfigError
from pipeline.run.job import check_students, run_job
from pipeline.scoring import models
from pipeline.scoring.models import StudentSource, StudentSourceError, file_sha256
from pipeline.scoring.student import ScoringOptions, Student
from pipeline.tokens.spans import encode_conversation
from tests.conftest import start_ray, write_jsonl
from tests.gguf_files import write_gguf
from tests.test_job import job_config


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Conversions land in this test's own cache (the first load converts, later loads reuse it)."""
    monkeypatch.setattr(models, "CACHE_DIR", tmp_path / "cache")


@pytest.fixture(scope="module")
def llama_gguf(tmp_path_factory, student_dirs):
    """The chatml tiny student as a GGUF (GPT-2 pre-tokenizer: the tiny tokenizer's own split)."""
    out = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    return write_gguf(student_dirs["chatml"], out, pre_tokenizer="gpt-2")


def score(source, corpus, dtype="float32"):
    student = Student.load(source, dtype=dtype, device="cpu", options=ScoringOptions(per_token=True))
    encoded = [encode_conversation(student.tokenizer, row["messages"]) for row in corpus[:12]]
    return encoded, student.score(encoded)


def test_a_gguf_scores_exactly_as_its_model_folder(llama_gguf, student_dirs, corpus):
    folder_encoded, expected = score(str(student_dirs["chatml"]), corpus)
    source = StudentSource(str(llama_gguf), tokenizer=str(student_dirs["chatml"]))
    encoded, got = score(source, corpus)
    assert [e.input_ids for e in encoded] == [e.input_ids for e in folder_encoded]
    for mine, theirs in zip(got, expected):
        assert mine["token_ranks"] == theirs["token_ranks"]
        assert mine["rank_surprisal_ratio"] == pytest.approx(theirs["rank_surprisal_ratio"], abs=1e-5)
    assert source.revision().startswith(file_sha256(llama_gguf)[:16])
    assert source.window() == 8192 and "tokenizer.json of" in source.tokens_from()


def test_the_gguf_tokenizer_is_used_only_after_it_reproduces_the_file(llama_gguf, student_dirs, corpus, tmp_path):
    own = StudentSource(str(llama_gguf))  # no tokenizer: the GGUF's vocabulary and merges
    tokenizer, reference = own.load_tokenizer(), StudentSource(str(student_dirs["chatml"])).load_tokenizer()
    for text in corpus_texts(write_jsonl(tmp_path / "c.jsonl", corpus)):
        assert tokenizer(text)["input_ids"] == reference(text)["input_ids"]
    assert "GGUF's own vocabulary" in own.tokens_from() and "'gpt-2'" in own.tokens_from()

    unknown = write_gguf(student_dirs["chatml"], tmp_path / "unknown-pre.gguf", pre_tokenizer="smollm")
    with pytest.raises(StudentSourceError, match="pre-tokenizer 'smollm'.*tokenizer.json"):
        StudentSource(str(unknown)).load_tokenizer()


def test_a_job_with_a_gguf_student_fails_before_ray_without_usable_tokens(tmp_path, student_dirs, corpus_path):
    unknown = write_gguf(student_dirs["chatml"], tmp_path / "unknown-pre.gguf", pre_tokenizer="smollm")
    cfg = job_config(tmp_path, [str(corpus_path)], str(tmp_path / "out"), {"g": str(unknown)})
    with pytest.raises(ConfigError, match="students.0 \\(g\\).*pre-tokenizer 'smollm'.*set the student's `tokenizer`"):
        check_students(cfg)


def test_a_job_scores_a_gguf_student_and_records_where_its_tokens_came_from(tmp_path, llama_gguf, student_dirs, corpus):
    start_ray()
    data = write_jsonl(tmp_path / "corpus.jsonl", corpus)
    out = tmp_path / "out"
    cfg = job_config(tmp_path, [str(data)], str(out), {"g": str(llama_gguf)})
    cfg.students[0].tokenizer = str(student_dirs["chatml"])
    result = run_job(cfg)
    folder_cfg = job_config(tmp_path, [str(data)], str(tmp_path / "folder"), {"g": str(student_dirs["chatml"])})
    run_job(folder_cfg)
    gguf, folder = latest_scores(str(out)), latest_scores(str(tmp_path / "folder"))
    assert result.counts.to_pylist()[0]["scored"] == len(gguf) == len(folder) > 0
    merged = gguf.merge(folder, on="sample_id", suffixes=("", "_folder"))
    assert (merged["resp_token_length"] == merged["resp_token_length_folder"]).all()
    assert (merged["rank_surprisal_ratio"] - merged["rank_surprisal_ratio_folder"]).abs().max() <= 1e-5
    manifest = json.loads(next((out / "_runs").glob("*Z-??????.json")).read_text())
    student = manifest["students"][0]
    assert student["tokens_from"].startswith("tokenizer.json of") and student["revision"].startswith(file_sha256(llama_gguf)[:16])


def tiny_qwen3(out_dir, corpus_path):
    """A tiny random Qwen3 with a byte-level BPE tokenizer split as Qwen2/3 split (llama.cpp: "qwen2")."""
    tokenizer = train_tokenizer(corpus_texts(corpus_path), "chatml")
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, **tokenizer.special_tokens_map,
                                        chat_template=tokenizer.chat_template)  # fmt: skip
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=False, initializer_range=0.2)  # fmt: skip
    Qwen3ForCausalLM(config).eval().save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def test_a_qwen3_gguf_works_the_same_way(tmp_path, corpus, corpus_path):
    folder = tiny_qwen3(tmp_path / "qwen3", corpus_path)
    gguf = write_gguf(folder, tmp_path / "tiny-qwen3.gguf", pre_tokenizer="qwen2")
    folder_encoded, expected = score(str(folder), corpus)
    encoded, got = score(StudentSource(str(gguf)), corpus)  # tokens from the GGUF itself
    assert [e.input_ids for e in encoded] == [e.input_ids for e in folder_encoded]
    for mine, theirs in zip(got, expected):
        assert mine["token_ranks"] == theirs["token_ranks"]
        assert mine["rank_surprisal_ratio"] == pytest.approx(theirs["rank_surprisal_ratio"], abs=1e-5)
    assert StudentSource(str(gguf)).window() == 4096


def test_a_gguf_on_s3_is_copied_once_per_node(tmp_path, llama_gguf, student_dirs, corpus, s3_endpoint):
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint)
    fs.mkdir("models")
    fs.put_file(str(llama_gguf), "models/tiny.gguf")
    source = StudentSource("s3://models/tiny.gguf", tokenizer=str(student_dirs["chatml"]), endpoint_url=s3_endpoint)
    local = source.weights()
    assert local.startswith(str(models.CACHE_DIR)) and file_sha256(local) == file_sha256(llama_gguf)
    assert source.weights() == local and len(list(models.CACHE_DIR.rglob("*.gguf"))) == 1  # fetched once
    _, expected = score(StudentSource(str(llama_gguf), tokenizer=str(student_dirs["chatml"])), corpus)
    _, got = score(source, corpus)
    assert [s["token_ranks"] for s in got] == [s["token_ranks"] for s in expected]
