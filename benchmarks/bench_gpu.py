"""GPU benchmark of the scoring core in one command, with no Ray and no project install:

  python -m benchmarks.bench_gpu                          # the Qwen2.5-7B shape, bfloat16, on the GPU
  python -m benchmarks.bench_gpu --tiny --device cpu      # the same code on a tiny shape, in under a minute

A random-weight student of the shape in `--config` (default: benchmarks/configs/qwen2.5-7b-shape.json, the
Qwen2.5-7B architecture) scores synthetic trajectories of 2k, 8k and 32k response tokens after a
256-token prompt, and one 4k-token prompt shared by eight 1k-token continuations. Per shape it prints
the core's scored tokens/s, model FLOP utilisation against a bfloat16 matrix product timed in the same
run, peak device memory against the weights, the reference algorithm's tokens/s at its best batch
(`../shared/bench/reference_rsr.py`'s logic inlined: padded batches, full [B, T, V] logits, float32
log-sum-exp, top-k rank) and the ratio; then float32 parity of the two on a small shape (max |dRSR|),
and one summary line. Exit status 1 when parity fails.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import types
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from pipeline.scoring.device import DevicePolicy
from pipeline.scoring.student import ScoringOptions, Student
from pipeline.tokens.spans import EncodedConversation

QWEN_7B_SHAPE = Path(__file__).with_name("configs") / "qwen2.5-7b-shape.json"
TINY_SHAPE = {"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1024, "max_position_embeddings": 4096,
              "tie_word_embeddings": False}  # fmt: skip
PARITY_LIMIT = 1e-4
PROMPT_TOKENS = 256


def load_shape(path: Path | None, tiny: bool):
    if tiny:
        return AutoConfig.for_model(**TINY_SHAPE)
    fields = json.loads((path or QWEN_7B_SHAPE).read_text())
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def random_student(config, policy: DevicePolicy, seed: int = 0) -> Student:
    torch.manual_seed(seed)
    with torch.device(policy.device):  # random weights made on the device: seconds, not minutes, for 7B
        model = AutoModelForCausalLM.from_config(config, dtype=policy.torch_dtype, attn_implementation=policy.attention)
    for parameter in model.parameters():  # spread the logits so that ranks and surprisals vary
        parameter.data.normal_(0.0, 0.05)
    pad = types.SimpleNamespace(pad_token_id=0, eos_token_id=0)  # synthetic ids need no tokenizer
    return Student(model, pad, ScoringOptions(), policy=policy)


def synthetic_rows(vocab: int, response_tokens: int, n_rows: int, prompt_tokens: int, seed: int, shared_prompt: bool = False):
    generator = torch.Generator().manual_seed(seed)
    prompt = torch.randint(1, vocab, (prompt_tokens,), generator=generator).tolist()
    rows = []
    for _ in range(n_rows):
        if not shared_prompt:
            prompt = torch.randint(1, vocab, (prompt_tokens,), generator=generator).tolist()
        response = torch.randint(1, vocab, (response_tokens,), generator=generator).tolist()
        rows.append(EncodedConversation(prompt + response, list(range(prompt_tokens, prompt_tokens + response_tokens)), False))
    return rows


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(device: str, fn):
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return result, time.perf_counter() - start


def matmul_peak(device: str, dtype: torch.dtype, n: int) -> float:
    """FLOP/s of an n x n x n matrix product in `dtype` (the best of a few)."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    a @ b
    best = min(timed(device, lambda: a @ b)[1] for _ in range(5))
    return 2 * n**3 / best


def model_flops(config, rows) -> float:
    """Useful FLOPs: the body's matrix products over each row's tokens up to its last response token,
    causal attention over them, and the vocabulary projection at the response positions."""
    h, layers = config.hidden_size, config.num_hidden_layers
    kv = h * config.num_key_value_heads // config.num_attention_heads
    per_token = 2 * layers * (2 * h * h + 2 * h * kv + 3 * h * config.intermediate_size)
    total = 0.0
    for row in rows:
        n = row.response_positions[-1]
        total += n * per_token + 2 * layers * h * n * n  # QK^T and PV over the causal half
        total += 2 * h * config.vocab_size * len(row.response_positions)
    return total


@torch.inference_mode()
def reference_scores(model, rows, batch_size: int, rank_clip: int = 100) -> list[float]:
    """The reference algorithm: padded batches in order, full logits, float32 log-sum-exp, top-k rank."""
    rsr = []
    device = next(model.parameters()).device
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        longest = max(len(r.input_ids) for r in batch)
        ids = torch.tensor([r.input_ids + [0] * (longest - len(r.input_ids)) for r in batch], device=device)
        mask = torch.tensor([[1] * len(r.input_ids) + [0] * (longest - len(r.input_ids)) for r in batch], device=device)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        for b, row in enumerate(batch):
            positions = torch.tensor(row.response_positions, device=device)
            selected = logits[b, positions - 1]
            target_ids = ids[b, positions]
            target = selected.float().gather(1, target_ids[:, None]).squeeze(1)
            surprisal = torch.logsumexp(selected.float(), -1) - target
            top = torch.topk(selected, k=min(rank_clip, selected.shape[-1]), dim=-1).values.float()
            rank = torch.clamp(1 + (top > target[:, None]).sum(-1), max=rank_clip)
            rsr.append(rank.sum().item() / max(surprisal.double().sum().item(), 1e-12))
        del logits
    return rsr


def best_time(device: str, fn, repeats: int) -> float:
    return min(timed(device, fn)[1] for _ in range(repeats))


def reference_best(model, rows, device: str, repeats: int) -> tuple[float, int]:
    """The reference's best time over batch sizes 1, 2, 4, ... up to the rows (or until out of memory)."""
    best, best_batch = math.inf, 0
    batch = 1
    while batch <= len(rows):
        try:
            reference_scores(model, rows[:batch], batch)  # warm-up
            seconds = best_time(device, lambda size=batch: reference_scores(model, rows, size), repeats)
        except torch.OutOfMemoryError:
            break
        finally:
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
        if seconds < best:
            best, best_batch = seconds, batch
        batch *= 2
    return best, best_batch


def peak_memory(device: str, fn, repeats: int) -> tuple[float, float]:
    """(best seconds, peak device memory in GiB) of `fn`; memory 0 on CPU."""
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    seconds = best_time(device, fn, repeats)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else 0.0
    return seconds, peak


def parity(device: str) -> float:
    """max |dRSR| between the core and the reference in float32 on the tiny shape."""
    policy = DevicePolicy.choose(device, "float32", token_budget=1024, logits_chunk_tokens=64)
    student = random_student(load_shape(None, tiny=True), policy, seed=1)
    rows = [r for n, k in ((24, 3), (96, 2), (300, 2)) for r in synthetic_rows(1024, n, k, 16, seed=n)]
    ours = [s["rank_surprisal_ratio"] for s in student.score(rows)]
    theirs = reference_scores(student.model, rows, batch_size=2)
    return max(abs(a - b) for a, b in zip(ours, theirs))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=None, help="a model config.json (default: the Qwen2.5-7B shape)")
    parser.add_argument("--tiny", action="store_true", help="a tiny shape and short rows: the plumbing, in seconds")
    parser.add_argument("--device", default=None, help="default: cuda when visible, else cpu")
    args = parser.parse_args(argv)

    policy = DevicePolicy.choose(args.device)
    config = load_shape(args.config, args.tiny)
    student = random_student(config, policy)
    weights_gib = sum(p.numel() * p.element_size() for p in student.model.parameters()) / 2**30
    peak_flops = matmul_peak(policy.device, policy.torch_dtype, 1024 if args.tiny else 8192)
    print(
        f"{student.policy.describe()}; weights {weights_gib:.2f} GiB; {policy.dtype} matrix peak {peak_flops / 1e12:.1f} TFLOP/s"
    )
    scale, repeats = (1 / 64, 3) if args.tiny else (1, 2)
    shapes = [
        (
            f"{int(2048 * scale)} tokens x 8",
            synthetic_rows(config.vocab_size, int(2048 * scale), 8, PROMPT_TOKENS // 8 if args.tiny else PROMPT_TOKENS, 0),
        ),
        (
            f"{int(8192 * scale)} tokens x 4",
            synthetic_rows(config.vocab_size, int(8192 * scale), 4, PROMPT_TOKENS // 8 if args.tiny else PROMPT_TOKENS, 1),
        ),
        (
            f"{int(32768 * scale)} tokens x 2",
            synthetic_rows(config.vocab_size, int(32768 * scale), 2, PROMPT_TOKENS // 8 if args.tiny else PROMPT_TOKENS, 2),
        ),
        (
            f"shared {int(4096 * scale)} + {int(1024 * scale)} x 8",
            synthetic_rows(config.vocab_size, int(1024 * scale), 8, int(4096 * scale), 3, shared_prompt=True),
        ),
    ]
    header = (
        f"{'shape':<26}{'tokens/s':>11}{'MFU':>7}{'peak GiB':>10}{'weights':>9}{'ref tokens/s':>14}{'ref batch':>10}{'ratio':>7}"
    )
    print(header)
    ratios, mfus = [], []
    for name, rows in shapes:
        tokens = sum(len(r.response_positions) for r in rows)
        student.score(rows[:1])  # warm-up
        seconds, peak = peak_memory(policy.device, lambda batch=rows: student.score(batch), repeats)
        mfu = model_flops(config, rows) / seconds / peak_flops
        reference_seconds, reference_batch = reference_best(student.model, rows, policy.device, repeats)
        ratio = reference_seconds / seconds
        ratios.append(ratio)
        mfus.append(mfu)
        reference_rate = f"{tokens / reference_seconds:,.0f}" if reference_batch else "out of memory"
        print(
            f"{name:<26}{tokens / seconds:>11,.0f}{mfu:>7.1%}{peak:>10.2f}{weights_gib:>9.2f}{reference_rate:>14}{reference_batch:>10}{ratio:>6.2f}x"
        )
    max_difference = parity(policy.device)
    ok = max_difference <= PARITY_LIMIT
    print(
        f"float32 parity on the tiny shape: max |dRSR| = {max_difference:.2e} ({'ok' if ok else 'FAILED'}, limit {PARITY_LIMIT:g})"
    )
    print(
        f"summary: {policy.device}, MFU {min(mfus):.1%}-{max(mfus):.1%}, {min(ratios):.2f}x-{max(ratios):.2f}x the reference at its best batch, parity {'ok' if ok else 'FAILED'}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
