"""The RSR math, in torch only.

For a response token t with logits z at the position before it:
    surprisal s_t = logsumexp(z) - z[t]              (float32)
    rank      k_t = min(1 + #{v : z[v] > z[t]}, r)   (strictly greater: ties do not count)
Per trajectory: avg_rank_clip = mean k, avg_surprisal = mean s, rank_surprisal_ratio = sum k / max(sum s, 1e-12).

Companion metrics from the same logits (`metrics`, the registry in `pipeline.scoring.metrics`), per trajectory:
    entropy      avg_entropy       mean of -sum_v p_v log p_v (nats, float32 per token)
    top1         top1_rate         fraction of tokens of unclipped rank 1 (ties count as rank 1)
    rank         avg_rank          mean unclipped rank 1 + #{v : z[v] > z[t]}
    logprob_std  avg_log_prob_std  population standard deviation (ddof 0) of the token log-probabilities
Only the entropy costs another pass over the vocabulary; the others come from the rank and surprisal.

Counting the logits above the target gives the same clipped rank as the reference's top-r, in one
compare-and-sum pass over the logits in their own dtype (a bfloat16 comparison decides exactly as a
float32 one). The surprisal comes from one fused float32 log-softmax pass. Logits exist only for
response positions and only `chunk_tokens` rows at a time, so memory is O(chunk_tokens x vocab),
whatever the batch or sequence length.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from pipeline.scoring.metrics import COMPANIONS, MIN_SURPRISAL_SUM, TokenStats


def token_statistics(
    logits: torch.Tensor, targets: torch.Tensor, with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Unclipped ranks (int64), float32 surprisals and, if asked, float32 entropies of `targets` under
    `logits` [n, vocab]."""
    target_logits = logits.gather(1, targets[:, None])
    rank = 1 + (logits > target_logits).sum(dim=-1)
    log_probs = torch.log_softmax(logits, dim=-1, dtype=torch.float32)
    surprisal = -log_probs.gather(1, targets[:, None]).squeeze(1)
    entropy = torch.special.entr(log_probs.exp_()).sum(dim=-1) if with_entropy else None  # entr(0) = 0
    return rank, surprisal, entropy


@contextmanager
def bfloat16_matmul():
    """oneDNN's bfloat16 kernels for float32 matrix products on CPU (float32 accumulation and output)."""
    matmul = torch.backends.mkldnn.matmul
    saved, matmul.fp32_precision = matmul.fp32_precision, "bf16"
    try:
        yield
    finally:
        matmul.fp32_precision = saved


@dataclass(frozen=True)
class VocabHead:
    """The vocabulary projection as the scoring core applies it: logits `hidden @ weight.T + bias` in
    `logits_dtype`. Build it with `VocabHead.of`, which prepares the weight for that dtype."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    logits_dtype: torch.dtype
    bfloat16_head: bool = False  # the weight is a float32 copy of a bfloat16 head

    @classmethod
    def of(cls, weight: torch.Tensor, bias: torch.Tensor | None, logits_dtype: torch.dtype) -> VocabHead:
        """A half-precision CUDA matrix product accumulates in float32 and can return that result, so the
        weight stays as it is; CPU matrix products return their inputs' dtype, so a float32 copy of the head
        (a bfloat16 one is then projected by bfloat16 kernels: `__call__`)."""
        if logits_dtype == weight.dtype or weight.is_cuda:
            return cls(weight, bias, logits_dtype)
        bias = bias.to(logits_dtype) if bias is not None else None
        exact = weight.dtype == torch.bfloat16 and logits_dtype == torch.float32
        return cls(weight.to(logits_dtype), bias, logits_dtype, bfloat16_head=exact)

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.logits_dtype != self.weight.dtype:  # CUDA: keep the float32 accumulation
            logits = torch.mm(hidden, self.weight.t(), out_dtype=self.logits_dtype)
            return logits + self.bias.to(self.logits_dtype) if self.bias is not None else logits
        if self.bfloat16_head and hidden.dtype == torch.bfloat16:
            # Every input is a bfloat16 value: bfloat16 kernels read them exactly and accumulate in float32,
            # at about twice the speed of float32 ones (the sums differ only in their order).
            with bfloat16_matmul():
                return torch.nn.functional.linear(hidden.float(), self.weight, self.bias)
        return torch.nn.functional.linear(hidden.to(self.weight.dtype), self.weight, self.bias)


def project_and_score(
    hidden: torch.Tensor,
    head: VocabHead,
    targets: torch.Tensor,
    chunk_tokens: int,
    with_entropy: bool = False,
    statistics_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Apply the vocabulary projection `head` to `hidden` [n, d] in chunks of `chunk_tokens` rows and take
    `token_statistics` of each row's target, `statistics_rows` logit rows at a time (None: a chunk), so
    that the float32 temporaries stay small (`pipeline.scoring.device` sizes both). A bfloat16 student's logits
    rounded to bfloat16 move ranks far more than the gap between teachers, so the scoring core asks for
    float32 ones.

    Results go into tensors allocated up front: small per-chunk results kept alive between the large
    per-chunk logits fragment the CPU heap until its size grows like n x vocab.
    """
    n = hidden.shape[0]
    ranks = torch.empty(n, dtype=torch.long, device=hidden.device)
    surprisals = torch.empty(n, dtype=torch.float32, device=hidden.device)
    entropies = torch.empty(n, dtype=torch.float32, device=hidden.device) if with_entropy else None
    statistics_rows = min(statistics_rows or chunk_tokens, chunk_tokens)
    for start in range(0, n, chunk_tokens):
        logits = head(hidden[start : start + chunk_tokens])
        for row in range(0, logits.shape[0], statistics_rows):
            rows = slice(start + row, start + row + statistics_rows)
            rank, surprisal, entropy = token_statistics(logits[row : row + statistics_rows], targets[rows], with_entropy)
            ranks[rows], surprisals[rows] = rank, surprisal
            if with_entropy:
                entropies[rows] = entropy
    return ranks, surprisals, entropies


def trajectory_stats(
    ranks: torch.Tensor,
    surprisals: torch.Tensor,
    rank_clip: int,
    entropies: torch.Tensor | None = None,
    metrics: Sequence[str] = ("rsr",),
) -> dict[str, float | int]:
    """One trajectory's columns (`stat_columns(metrics)`) from its unclipped token ranks, surprisals
    and, for the entropy metric, entropies."""
    n = ranks.numel()
    rank_sum = float(ranks.clamp(max=rank_clip).sum())
    surprisal_sum = float(surprisals.double().sum())
    stats = {
        "resp_token_length": n,
        "avg_rank_clip": rank_sum / n,
        "avg_surprisal": surprisal_sum / n,
        "rank_surprisal_ratio": rank_sum / max(surprisal_sum, MIN_SURPRISAL_SUM),
    }
    tokens = TokenStats(ranks, surprisals, entropies)
    stats.update({m.column: m.reduce(tokens) for m in COMPANIONS if m.name in metrics})
    return stats
