"""Attention for CPU scoring, registered with transformers as `cpu_row_eager`.

On CPU, two matrix products and a softmax beat torch's fused scaled-dot-product kernel at trajectory
lengths, but only while the attention scores stay in the cache: the explicit form runs a few batch
rows at a time, MAX_SCORES scores per step (measured here with a SmolLM2-135M body on GSM8K batches:
at or below the fused kernel's time from 160 to 520 tokens, 12% less at 520). A row whose own scores
exceed that budget (about 700+ tokens for 9 heads) goes to the fused, memory-lean kernel instead.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from pipeline.scoring.device import CPU_ATTENTION as NAME

MAX_SCORES = 4 * 2**20  # heads x queries x keys per step: 16 MB of float32 probabilities


def cpu_row_eager(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    batch, heads, q_len, head_dim = query.shape
    kv_len = key.shape[-2]
    rows_per_step = MAX_SCORES // (heads * q_len * kv_len)
    if rows_per_step == 0:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    groups = heads // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    scaling = scaling if scaling is not None else head_dim**-0.5
    # An additive mask: adding it to the scores is 5x faster than a broadcast masked_fill_.
    if attention_mask is None:  # the mask function left causality to the kernel: queries are the last q_len keys
        mask = torch.full((1, 1, q_len, kv_len), float("-inf"), dtype=query.dtype, device=query.device).triu_(kv_len - q_len + 1)
    else:
        mask = torch.zeros(attention_mask.shape, dtype=query.dtype, device=query.device).masked_fill_(
            ~attention_mask, float("-inf")
        )
    output = torch.empty(batch, q_len, heads, head_dim, dtype=query.dtype, device=query.device)
    for start in range(0, batch, rows_per_step):
        rows = slice(start, start + rows_per_step)
        scores = torch.matmul(query[rows], key[rows].transpose(2, 3)).mul_(scaling)
        scores.add_(mask[rows if mask.shape[0] > 1 else slice(None)])
        probabilities = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        output[rows] = torch.matmul(probabilities, value[rows]).transpose(1, 2)
    return output, None


AttentionInterface.register(NAME, cpu_row_eager)
ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)  # boolean masks, True = attend
