"""The device policy for CPU and for a (mocked) CUDA device, and out-of-memory back-off: a batch that
does not fit is halved, the token budget drops, a row that alone does not fit becomes a reject, and
the numbers do not depend on any of it."""

import types

import pyarrow as pa
import pytest
import torch
from transformers import AutoConfig

from pipeline import errors
from pipeline.run.job import check_students
from pipeline.run.schema import RowContract
from pipeline.run.settings import resolve_settings
from pipeline.run.stages.score import ScoreActor
from pipeline.scoring.device import CPU_STATISTICS_ROWS, CPU_TOKEN_BUDGET, DevicePolicy
from pipeline.scoring.student import Rejected, Student
from pipeline.tokens.spans import encode_conversation
from tests.test_job import job_config

GiB = 2**30


def test_the_cpu_policy():
    policy = DevicePolicy.choose("cpu")
    assert (policy.dtype, policy.attention, policy.token_budget, policy.statistics_rows) == (
        "float32", "cpu_row_eager", CPU_TOKEN_BUDGET, CPU_STATISTICS_ROWS
    )  # fmt: skip
    assert policy.reuse_cpu_heap and policy.sized_for(object()) is policy
    assert "device cpu, float32, attention cpu_row_eager, 2048 tokens per pass" in policy.describe()


def test_the_policy_for_a_cuda_device_sizes_itself_from_free_memory(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (40 * GiB, 80 * GiB))
    config = AutoConfig.for_model("qwen2", hidden_size=3584, intermediate_size=18944, vocab_size=152064, num_attention_heads=28)
    student_7b = types.SimpleNamespace(config=config, dtype=torch.bfloat16)
    policy = DevicePolicy.choose("cuda")
    assert (policy.dtype, policy.attention, policy.reuse_cpu_heap) == ("bfloat16", "sdpa", False)
    sized = policy.sized_for(student_7b)
    per_token = 2 * (6 * 3584 + 3 * 18944)  # one layer's activations, bfloat16
    assert sized.token_budget == int(0.5 * 40 * GiB / per_token) // 1024 * 1024 == 136192
    assert sized.logits_chunk_tokens == int(0.1 * 40 * GiB / (2 * 152064)) == 14122
    assert sized.statistics_rows == 512 * 2**20 // (8 * 152064)  # float32 temporaries of a step: 512 MiB
    explicit = DevicePolicy.choose("cuda:1", dtype="float16", token_budget=5000, logits_chunk_tokens=64).sized_for(student_7b)
    assert (explicit.device, explicit.dtype, explicit.token_budget, explicit.logits_chunk_tokens) == (
        "cuda:1",
        "float16",
        5000,
        64,
    )


def inject_out_of_memory(student: Student, max_tokens: int) -> list[int]:
    """Make the student's body raise out-of-memory for passes over more than `max_tokens` padded tokens;
    return the padded sizes of the passes that ran."""
    body, passes = student.body, []

    def limited_body(input_ids, **kwargs):
        if input_ids.numel() > max_tokens:
            raise torch.OutOfMemoryError(f"injected: {input_ids.numel()} tokens")
        passes.append(input_ids.numel())
        return body(input_ids=input_ids, **kwargs)

    student.body = limited_body
    return passes


@pytest.fixture(scope="module")
def encoded(student_dirs, corpus):
    student = Student.load(str(student_dirs["chatml"]), dtype="float32", device="cpu")
    return [encode_conversation(student.tokenizer, row["messages"]) for row in corpus]


def test_out_of_memory_halves_the_batch_lowers_the_budget_and_changes_no_number(student_dirs, encoded):
    policy = DevicePolicy.choose("cpu", "float32", token_budget=100_000)  # every row in one pass
    clean = Student.load(str(student_dirs["chatml"]), policy=policy).score(encoded)
    student = Student.load(str(student_dirs["chatml"]), policy=policy)
    longest = max(c.response_positions[-1] for c in encoded)
    passes = inject_out_of_memory(student, max_tokens=4 * longest)
    backed_off = student.score(encoded)
    assert max(passes) <= 4 * longest and student.policy.token_budget < 100_000
    for want, got in zip(clean, backed_off):
        assert got["resp_token_length"] == want["resp_token_length"]
        for column in ("avg_rank_clip", "avg_surprisal", "rank_surprisal_ratio"):
            assert got[column] == pytest.approx(want[column], abs=1e-6)


def test_a_row_that_alone_does_not_fit_is_rejected_and_the_rest_scored(student_dirs, encoded):
    student = Student.load(str(student_dirs["chatml"]), dtype="float32", device="cpu")
    clean = student.score(encoded)
    lengths = sorted(c.response_positions[-1] for c in encoded)
    inject_out_of_memory(student, max_tokens=lengths[-2])  # only the longest row cannot fit
    results = student.score(encoded)
    too_long = [r for r in results if isinstance(r, Rejected)]
    assert len(too_long) == 1 and too_long[0].reason == errors.TOO_LONG_FOR_DEVICE
    assert f"{lengths[-1]} tokens" in too_long[0].detail and "n/a on CPU" in too_long[0].detail
    for want, got in zip(clean, results):
        if not isinstance(got, Rejected):
            assert got["rank_surprisal_ratio"] == pytest.approx(want["rank_surprisal_ratio"], abs=1e-6)


def test_the_scoring_actor_turns_a_row_too_long_for_the_device_into_a_reject(tmp_path, student_dirs, encoded):
    cfg = job_config(tmp_path, ["unused"], str(tmp_path / "out"), {"tiny": student_dirs["chatml"]})
    actor = ScoreActor(0, resolve_settings(cfg, RowContract.of(cfg), check_students(cfg), cluster_gpus=0))
    longest = max(range(len(encoded)), key=lambda k: encoded[k].response_positions[-1])
    inject_out_of_memory(actor.student, max_tokens=encoded[longest].response_positions[-1] - 1)
    n = len(encoded)
    batch = pa.table({
        "text_bytes": pa.array([0] * n, pa.int64()),  # measures progress only
        "ids_0": pa.array([c.input_ids for c in encoded], pa.list_(pa.int32())),
        "positions_0": pa.array([c.response_positions for c in encoded], pa.list_(pa.int32())),
        "reject_reason_0": pa.array([None] * n, pa.string()), "reject_detail_0": pa.array([None] * n, pa.string()),
    })  # fmt: skip
    out = actor(batch).to_pylist()
    assert [r["reject_reason_0"] for r in out].count(errors.TOO_LONG_FOR_DEVICE) == 1
    assert out[longest]["reject_reason_0"] == errors.TOO_LONG_FOR_DEVICE and out[longest]["rank_surprisal_ratio_0"] is None
    assert all(r["rank_surprisal_ratio_0"] is not None for k, r in enumerate(out) if k != longest)


def test_the_meter_tells_apart_blocks_that_start_in_the_same_corpus_row(tmp_path, student_dirs, encoded):
    """A corpus row of several candidates may start two blocks: each block counts its own rows."""
    import ray

    from pipeline.run.results import ScoringMeter
    from tests.conftest import start_ray

    start_ray()
    cfg = job_config(tmp_path, ["unused"], str(tmp_path / "out"), {"tiny": student_dirs["chatml"]})
    meter = ScoringMeter.remote()
    actor = ScoreActor(0, resolve_settings(cfg, RowContract.of(cfg), check_students(cfg), cluster_gpus=0), meter=meter)
    candidates = encoded[:6]  # one corpus row's six candidates, cut into two blocks
    for block in (range(0, 3), range(3, 6)):
        actor(pa.table({
            "source_file": ["/c/a.jsonl"] * 3, "row_number": [1] * 3, "sample_id": [f"row#{k}" for k in block],
            "text_bytes": pa.array([100] * 3, pa.int64()),
            "ids_0": pa.array([candidates[k].input_ids for k in block], pa.list_(pa.int32())),
            "positions_0": pa.array([candidates[k].response_positions for k in block], pa.list_(pa.int32())),
            "reject_reason_0": pa.array([None] * 3, pa.string()), "reject_detail_0": pa.array([None] * 3, pa.string()),
        }))  # fmt: skip
    done = ray.get(meter.read.remote())
    assert (done["rows"], done["text_bytes"]) == (6, 600)
    assert done["tokens"] == sum(len(c.response_positions) for c in candidates)
