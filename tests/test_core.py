import math
import random

import pyarrow as pa
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline import errors
from pipeline.errors import RowError
from pipeline.scoring.aggregate import dataset_rsr
from pipeline.scoring.device import DevicePolicy
from pipeline.scoring.metrics import METRICS
from pipeline.scoring.rsr import VocabHead, project_and_score, token_statistics, trajectory_stats
from pipeline.scoring.student import ScoringOptions, Student, plan_batches, shared_prompt_lengths
from pipeline.tokens.spans import encode_conversation
from tests.reference import CHATML_MARKERS, LLAMA3_MARKERS, marker_ids, marker_positions, reference_scores

STAT_COLUMNS = ["avg_rank_clip", "avg_surprisal", "rank_surprisal_ratio"]


def load(student_dir):
    model = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(student_dir)


@pytest.mark.parametrize("template, markers", [("chatml", CHATML_MARKERS), ("llama3", LLAMA3_MARKERS)])
def test_spans_match_reference_marker_scan(student_dirs, corpus, template, markers):
    tokenizer = AutoTokenizer.from_pretrained(student_dirs[template])
    head, end = marker_ids(tokenizer, markers)
    for row in corpus:
        encoded = encode_conversation(tokenizer, row["messages"])
        expected_ids = tokenizer.apply_chat_template(row["messages"], tokenize=True, return_dict=True)["input_ids"]
        assert encoded.input_ids == list(expected_ids)
        assert encoded.response_positions == marker_positions(encoded.input_ids, head, end)
        assert not encoded.truncated


def test_spans_from_a_template_without_markers(student_dirs, corpus):
    tokenizer = AutoTokenizer.from_pretrained(student_dirs["plain"])
    for row in corpus:
        encoded = encode_conversation(tokenizer, row["messages"])
        decoded = tokenizer.decode([encoded.input_ids[q] for q in encoded.response_positions])
        contents = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
        # BPE may merge the space after "Assistant:" into the first content token; nothing else is added.
        assert decoded.replace(" ", "") == "".join(contents).replace(" ", "")
        assert len(decoded) <= sum(map(len, contents)) + len(contents)


def test_truncation_keeps_positions_inside_the_window(student_dirs, corpus):
    tokenizer = AutoTokenizer.from_pretrained(student_dirs["chatml"])
    full = encode_conversation(tokenizer, corpus[11]["messages"])
    cut = len(full.input_ids) - 5
    encoded = encode_conversation(tokenizer, corpus[11]["messages"], max_model_len=cut)
    assert encoded.truncated and encoded.input_ids == full.input_ids[:cut]
    assert encoded.response_positions == [q for q in full.response_positions if q < cut]
    with pytest.raises(RowError) as info:
        encode_conversation(tokenizer, corpus[11]["messages"], max_model_len=cut, truncate=False)
    assert info.value.reason == errors.TOO_LONG
    with pytest.raises(RowError) as info:
        encode_conversation(tokenizer, corpus[11]["messages"], max_model_len=full.response_positions[0])
    assert info.value.reason == errors.NO_RESPONSE_TOKENS


@pytest.mark.parametrize(
    "messages, reason",
    [
        (None, errors.MISSING_MESSAGES),
        ("hello", errors.MESSAGES_NOT_A_LIST),
        ([["user", "hi"]], errors.BAD_MESSAGE),
        ([{"content": "hi"}], errors.BAD_MESSAGE),
        ([{"role": "wizard", "content": "hi"}], errors.UNKNOWN_ROLE),
        ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}], errors.NON_STRING_CONTENT),
        ([{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}], errors.NON_STRING_CONTENT),
        ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": [{"type": "text"}]}], errors.NON_STRING_CONTENT),
        ([{"role": "user", "content": "hi"}], errors.NO_ASSISTANT_TURN),
        ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  \n"}], errors.EMPTY_ASSISTANT_CONTENT),
    ],
)
def test_bad_messages_raise_typed_errors(student_dirs, messages, reason):
    tokenizer = AutoTokenizer.from_pretrained(student_dirs["chatml"])
    with pytest.raises(RowError) as info:
        encode_conversation(tokenizer, messages)
    assert info.value.reason == reason


def test_template_failure_is_a_typed_error(student_dirs):
    tokenizer = AutoTokenizer.from_pretrained(student_dirs["chatml"])
    tokenizer.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(RowError) as info:
        encode_conversation(tokenizer, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
    assert info.value.reason == errors.TEMPLATE_ERROR and "roles must alternate" in str(info.value)


def test_known_logits_give_known_ranks_and_surprisals():
    logits = torch.tensor([[1.0, 3.0, 3.0, 2.0, 0.0], [5.0, 5.0, 5.0, 5.0, 5.0], [0.0, 1.0, 2.0, 3.0, 4.0]])
    targets = torch.tensor([2, 3, 0])
    rank, surprisal, entropy = token_statistics(logits, targets, with_entropy=True)
    # row 0: only the other 3.0 ties, nothing is greater -> 1; row 1: all tie -> 1; row 2: 4 greater -> 5
    assert rank.tolist() == [1, 1, 5]
    expected = [torch.logsumexp(logits[i], 0).item() - logits[i, t].item() for i, t in enumerate(targets.tolist())]
    assert surprisal.tolist() == pytest.approx(expected, abs=1e-6)
    assert surprisal[1].item() == pytest.approx(math.log(5), abs=1e-6)
    assert entropy[1].item() == pytest.approx(math.log(5), abs=1e-6)  # uniform over 5
    stats = trajectory_stats(rank, surprisal, rank_clip=3, entropies=entropy, metrics=METRICS)
    assert stats["resp_token_length"] == 3 and stats["avg_rank_clip"] == pytest.approx(5 / 3)  # 1, 1, clipped 3
    assert stats["rank_surprisal_ratio"] == pytest.approx(5 / sum(expected), rel=1e-6)
    assert stats["avg_rank"] == pytest.approx(7 / 3) and stats["top1_rate"] == pytest.approx(2 / 3)


def test_zero_surprisal_ratio_uses_the_floor():
    stats = trajectory_stats(torch.tensor([1, 1]), torch.tensor([0.0, 0.0]), rank_clip=100)
    assert stats["rank_surprisal_ratio"] == pytest.approx(2 / 1e-12)


def test_chunked_projection_equals_full_logits():
    torch.manual_seed(0)
    hidden, weight, bias = torch.randn(37, 16), torch.randn(300, 16), torch.randn(300)
    targets = torch.randint(0, 300, (37,))
    full_rank, full_surprisal, full_entropy = token_statistics(hidden @ weight.T + bias, targets, with_entropy=True)
    rank, surprisal, entropy = project_and_score(
        hidden, VocabHead(weight, bias, weight.dtype), targets, chunk_tokens=8, with_entropy=True
    )
    assert torch.equal(rank, full_rank)
    torch.testing.assert_close(surprisal, full_surprisal)
    torch.testing.assert_close(entropy, full_entropy)


def test_plan_batches_respects_the_budget_and_covers_every_row():
    lengths = [5, 40, 12, 33, 7, 100, 2]
    batches = plan_batches(lengths, token_budget=64)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for batch in batches:
        assert len(batch) == 1 or len(batch) * max(lengths[i] for i in batch) <= 64


@pytest.mark.parametrize("template, markers", [("chatml", CHATML_MARKERS), ("llama3", LLAMA3_MARKERS)])
def test_parity_with_reference_in_float32(student_dirs, corpus, template, markers):
    model, tokenizer = load(student_dirs[template])
    head, end = marker_ids(tokenizer, markers)
    max_model_len = 120  # long rows get truncated
    encoded, reference_items = [], []
    for row in corpus:
        enc = encode_conversation(tokenizer, row["messages"], max_model_len=max_model_len)
        encoded.append(enc)
        ids = tokenizer.apply_chat_template(row["messages"], tokenize=True, return_dict=True)["input_ids"]
        positions = [q for q in marker_positions(ids, head, end) if q < max_model_len]
        reference_items.append((list(ids)[:max_model_len], positions))
    assert sum(e.truncated for e in encoded) >= 5 and sum(e.truncated for e in encoded) < len(encoded)

    expected = reference_scores(model, tokenizer, reference_items, batch_size=4)
    got = Student(model, tokenizer, ScoringOptions(), policy=DevicePolicy.choose("cpu", token_budget=512)).score(encoded)
    for g, e in zip(got, expected):
        assert g["resp_token_length"] == e["resp_token_length"]
        for column in STAT_COLUMNS:
            assert abs(g[column] - e[column]) <= 1e-5, (column, g, e)
    assert len({g["avg_rank_clip"] for g in got}) > 5  # the student's ranks vary: the test can tell rows apart


def test_scores_do_not_depend_on_order_or_budget(student_dirs, corpus):
    model, tokenizer = load(student_dirs["chatml"])
    encoded = [encode_conversation(tokenizer, row["messages"]) for row in corpus]
    baseline = Student(model, tokenizer, ScoringOptions(), policy=DevicePolicy.choose("cpu", token_budget=4096)).score(encoded)
    order = list(range(len(encoded)))
    random.Random(1).shuffle(order)
    for budget in (1, 300, 100_000):
        student = Student(
            model, tokenizer, ScoringOptions(), policy=DevicePolicy.choose("cpu", token_budget=budget, logits_chunk_tokens=7)
        )
        shuffled = student.score([encoded[i] for i in order])
        for j, i in enumerate(order):
            for column in STAT_COLUMNS:
                assert abs(shuffled[j][column] - baseline[i][column]) <= 1e-5


def test_per_token_arrays_match_the_averages(student_dirs, corpus):
    model, tokenizer = load(student_dirs["chatml"])
    encoded = encode_conversation(tokenizer, corpus[3]["messages"])
    [stats] = Student(model, tokenizer, ScoringOptions(per_token=True), device="cpu").score([encoded])
    assert len(stats["token_ranks"]) == stats["resp_token_length"] == len(encoded.response_positions)
    assert sum(stats["token_ranks"]) / len(stats["token_ranks"]) == pytest.approx(stats["avg_rank_clip"])
    assert all(1 <= r <= 100 for r in stats["token_ranks"])


def test_dataset_rsr_groups():
    scores = pa.table(
        {
            "source": ["a", "a", "b"],
            "resp_token_length": [10, 20, 5],
            "avg_rank_clip": [2.0, 4.0, 3.0],
            "avg_surprisal": [1.0, 1.0, 0.5],
        }
    )
    table = dataset_rsr(scores, by=["source"]).sort_by("source").to_pylist()
    assert table[0] == {
        "source": "a",
        "n_trajectories": 2,
        "resp_tokens": 30,
        "mean_avg_rank_clip": 3.0,
        "mean_avg_surprisal": 1.0,
        "rsr": 3.0,
    }
    assert table[1]["rsr"] == pytest.approx(6.0)
    overall = dataset_rsr(scores).to_pylist()[0]
    assert overall["rsr"] == pytest.approx(9.0 / 2.5) and overall["n_trajectories"] == 3


def test_shared_prompts_give_the_same_scores(student_dirs, corpus):
    """Several teachers answering one prompt: each prompt's keys and values are computed once and serve
    its rows, in batches mixed with other prompts' rows and rows without a shared prompt; the numbers
    do not change."""
    model, tokenizer = load(student_dirs["chatml"])
    prompts = [row["messages"][:-1] for row in corpus[:5]]
    answers = [row["messages"][-1] for row in corpus[5:20]]
    rows = [prompts[i % 5] + [answers[i]] for i in range(15)] + [row["messages"] for row in corpus[20:30]]
    encoded = [encode_conversation(tokenizer, messages) for messages in rows]
    shared = Student(model, tokenizer, ScoringOptions(), policy=DevicePolicy.choose("cpu", token_budget=256))
    prompt_lengths = shared_prompt_lengths(encoded, shared.options.min_shared_prompt)
    assert all(prompt_lengths[:15]) and not any(prompt_lengths[15:])
    assert len(set(prompt_lengths[:5])) > 1, "prompts of different lengths share a batch's cache"
    one_prompt_at_a_time = Student(
        model, tokenizer, ScoringOptions(prompt_cache_tokens=1), policy=DevicePolicy.choose("cpu", token_budget=256)
    )
    windows = one_prompt_at_a_time._prompt_windows([tuple(c.input_ids[:n]) for c, n in zip(encoded, prompt_lengths)])
    assert len(windows) == 5 and sorted(i for window in windows for i in window) == list(range(len(encoded)))
    unshared = Student(model, tokenizer, ScoringOptions(share_prompts=False), policy=DevicePolicy.choose("cpu", token_budget=256))
    expected = unshared.score(encoded)
    for student in (shared, one_prompt_at_a_time):
        for a, b in zip(student.score(encoded), expected):
            assert a["resp_token_length"] == b["resp_token_length"]
            for column in STAT_COLUMNS:
                assert abs(a[column] - b[column]) <= 1e-5


@pytest.mark.parametrize("max_scores", [None, 4 * 60 * 60 * 2])
def test_cpu_attention_matches_sdpa(student_dirs, corpus, monkeypatch, max_scores):
    """The CPU attention gives SDPA's numbers, for rows stepped through a few at a time and for rows
    too long for its budget, with and without a shared prompt's cache."""
    from pipeline.scoring import attention

    fused_calls = []
    if max_scores:  # small enough that short rows go two at a time and rows over 85 tokens go to SDPA
        monkeypatch.setattr(attention, "MAX_SCORES", max_scores)
        sdpa = attention.sdpa_attention_forward
        monkeypatch.setattr(attention, "sdpa_attention_forward", lambda *a, **k: fused_calls.append(1) or sdpa(*a, **k))
    tokenizer = AutoTokenizer.from_pretrained(student_dirs["llama3"])
    shared_prompt_rows = [corpus[0]["messages"][:-1] + [row["messages"][-1]] for row in corpus[1:6]]
    encoded = [encode_conversation(tokenizer, row["messages"]) for row in corpus]
    encoded += [encode_conversation(tokenizer, messages) for messages in shared_prompt_rows]
    scores = {}
    for implementation in ("sdpa", attention.NAME):
        model = AutoModelForCausalLM.from_pretrained(
            student_dirs["llama3"], dtype=torch.float32, attn_implementation=implementation
        )
        scores[implementation] = Student(
            model, tokenizer, ScoringOptions(), policy=DevicePolicy.choose("cpu", token_budget=700)
        ).score(encoded)
    if max_scores:
        assert fused_calls, "no row was long enough to reach the fused kernel"
    for a, b in zip(*scores.values()):
        for column in STAT_COLUMNS:
            assert abs(a[column] - b[column]) <= 1e-5


def test_companion_metrics_equal_full_logits_in_float32(student_dirs, corpus):
    """Every metric column against full-vocabulary logits of each row alone, on rows of mixed lengths
    with tied logits (pairs of identical rows in the vocabulary projection)."""
    model, tokenizer = load(student_dirs["chatml"])
    head = model.get_output_embeddings().weight
    with torch.no_grad():
        head[1::2] = head[0::2][: head[1::2].shape[0]]  # token 2k+1 always ties with token 2k
    encoded = [encode_conversation(tokenizer, row["messages"]) for row in corpus]
    got = Student(model, tokenizer, ScoringOptions(metrics=METRICS), policy=DevicePolicy.choose("cpu", token_budget=700)).score(
        encoded
    )
    n_ties = 0
    for enc, stats in zip(encoded, got):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([enc.input_ids])).logits[0].float()
        z = logits[[q - 1 for q in enc.response_positions]]
        targets = torch.tensor([enc.input_ids[q] for q in enc.response_positions])
        target_z = z.gather(1, targets[:, None])
        n_ties += int(((z == target_z).sum(-1) > 1).sum())
        log_p = torch.log_softmax(z, dim=-1)
        rank = (1 + (z > target_z).sum(-1)).double()
        token_log_p = log_p.gather(1, targets[:, None]).squeeze(1).double()
        expected = {
            "avg_entropy": -(log_p.exp() * log_p).sum(-1).double().mean().item(),
            "top1_rate": (rank == 1).double().mean().item(),
            "avg_rank": rank.mean().item(),
            "avg_log_prob_std": token_log_p.std(correction=0).item(),
            "avg_rank_clip": rank.clamp(max=100).mean().item(),
            "avg_surprisal": -token_log_p.mean().item(),
        }
        for column, value in expected.items():
            assert abs(stats[column] - value) <= 1e-5, (column, stats[column], value)
    assert n_ties > 0 and len({s["top1_rate"] for s in got}) > 3
    rsr_only = Student(model, tokenizer, ScoringOptions(), policy=DevicePolicy.choose("cpu", token_budget=700)).score(encoded[:3])
    assert set(rsr_only[0]) == {"resp_token_length", "avg_rank_clip", "avg_surprisal", "rank_surprisal_ratio"}
