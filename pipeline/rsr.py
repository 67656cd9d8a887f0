"""The RSR math, in torch only.

For a response token t with logits z at the position before it:
    surprisal s_t = logsumexp(z) - z[t]              (float32)
    rank      k_t = min(1 + #{v : z[v] > z[t]}, r)   (strictly greater: ties do not count)
Per trajectory: avg_rank_clip = mean k, avg_surprisal = mean s, rank_surprisal_ratio = sum k / max(sum s, 1e-12).

Counting the logits above the target gives the same clipped rank as the reference's top-r, in one
compare-and-sum pass. Logits exist only for response positions and only `chunk_tokens` rows at a time,
so memory is O(chunk_tokens x vocab), whatever the batch or sequence length.
"""

from __future__ import annotations

import torch

MIN_SURPRISAL_SUM = 1e-12


def rank_and_surprisal(logits: torch.Tensor, targets: torch.Tensor, rank_clip: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped ranks (int64) and float32 surprisals of `targets` under `logits` [n, vocab]."""
    logits32 = logits.float()
    target_logits = logits32.gather(1, targets[:, None])
    surprisal = torch.logsumexp(logits32, dim=-1) - target_logits.squeeze(1)
    rank = (1 + (logits32 > target_logits).sum(dim=-1)).clamp_(max=rank_clip)
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
    for start in range(0, n, chunk_tokens):
        end = min(start + chunk_tokens, n)
        logits = torch.nn.functional.linear(hidden[start:end], head_weight, head_bias)
        ranks[start:end], surprisals[start:end] = rank_and_surprisal(logits, targets[start:end], rank_clip)
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
