"""The RSR math, in torch only.

For a response token t with logits z at the position before it:
    surprisal s_t = logsumexp(z) - z[t]              (float32)
    rank      k_t = min(1 + #{v : z[v] > z[t]}, r)   (strictly greater: ties do not count)
Per trajectory: avg_rank_clip = mean k, avg_surprisal = mean s, rank_surprisal_ratio = sum k / max(sum s, 1e-12).

Counting the logits above the target gives the same clipped rank as the reference's top-r, in one
compare-and-sum pass over the logits in their own dtype (a bfloat16 comparison decides exactly as a
float32 one). The surprisal comes from one fused float32 log-softmax pass. Logits exist only for
response positions and only `chunk_tokens` rows at a time, so memory is O(chunk_tokens x vocab),
whatever the batch or sequence length.
"""

from __future__ import annotations

import torch

MIN_SURPRISAL_SUM = 1e-12
# On CPU the statistics run over this many logit rows at a time: a few 49k-wide float32 rows stay in
# the core's cache across the passes (measured here: 2.4x faster statistics than 64 rows at once).
CPU_STATISTICS_ROWS = 16


def rank_and_surprisal(logits: torch.Tensor, targets: torch.Tensor, rank_clip: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped ranks (int64) and float32 surprisals of `targets` under `logits` [n, vocab]."""
    target_logits = logits.gather(1, targets[:, None])
    rank = (1 + (logits > target_logits).sum(dim=-1)).clamp_(max=rank_clip)
    surprisal = -torch.log_softmax(logits, dim=-1, dtype=torch.float32).gather(1, targets[:, None]).squeeze(1)
    return rank, surprisal


def project_and_score(
    hidden: torch.Tensor,
    head_weight: torch.Tensor,
    head_bias: torch.Tensor | None,
    targets: torch.Tensor,
    rank_clip: int,
    chunk_tokens: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply the vocabulary projection to `hidden` [n, d] in chunks and score each row's target.

    Results go into tensors allocated up front: small per-chunk results kept alive between the large
    per-chunk logits fragment the CPU heap until its size grows like n x vocab.
    """
    n = hidden.shape[0]
    ranks = torch.empty(n, dtype=torch.long, device=hidden.device)
    surprisals = torch.empty(n, dtype=torch.float32, device=hidden.device)
    statistics_rows = min(CPU_STATISTICS_ROWS, chunk_tokens) if hidden.device.type == "cpu" else chunk_tokens
    for start in range(0, n, chunk_tokens):
        logits = torch.nn.functional.linear(hidden[start : start + chunk_tokens], head_weight, head_bias)
        for row in range(0, logits.shape[0], statistics_rows):
            rows = slice(start + row, start + row + statistics_rows)
            ranks[rows], surprisals[rows] = rank_and_surprisal(logits[row : row + statistics_rows], targets[rows], rank_clip)
    return ranks, surprisals


def trajectory_stats(ranks: torch.Tensor, surprisals: torch.Tensor) -> dict[str, float | int]:
    """The official per-trajectory columns from one trajectory's token ranks and surprisals."""
    n = ranks.numel()
    rank_sum = float(ranks.sum())
    surprisal_sum = float(surprisals.double().sum())
    return {
        "resp_token_length": n,
        "avg_rank_clip": rank_sum / n,
        "avg_surprisal": surprisal_sum / n,
        "rank_surprisal_ratio": rank_sum / max(surprisal_sum, MIN_SURPRISAL_SUM),
    }
