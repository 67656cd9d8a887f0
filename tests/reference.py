"""A straightforward RSR reference for parity tests: the published algorithm step by step
(marker scan, padded batches in file order, full [B, T, V] logits, top-k rank)."""

from __future__ import annotations

import torch

CHATML_MARKERS = ("<|im_start|>assistant\n", "<|im_end|>")
LLAMA3_MARKERS = ("<|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>")


def marker_positions(input_ids, head, end) -> list[int]:
    """Tokens after each `head` run up to (not including) `end`, as the paper's code scans them."""
    ids, head, end = list(input_ids), list(head), list(end)
    positions, i, n = [], 0, len(ids)
    while i <= n - len(head):
        if ids[i : i + len(head)] == head:
            j = i + len(head)
            while j <= n - len(end) and ids[j : j + len(end)] != end:
                j += 1
            positions.extend(range(i + len(head), min(j, n)))
            i = j + len(end)
        else:
            i += 1
    return positions


def marker_ids(tokenizer, markers):
    return [tokenizer(m, add_special_tokens=False)["input_ids"] for m in markers]


@torch.inference_mode()
def reference_scores(model, tokenizer, items, batch_size=4, rank_clip=100):
    """items: [(input_ids, positions)] -> [{avg_rank_clip, avg_surprisal, rank_surprisal_ratio, n}]."""
    pad = tokenizer.pad_token_id
    out = []
    for s in range(0, len(items), batch_size):
        batch = items[s : s + batch_size]
        longest = max(len(ids) for ids, _ in batch)
        x = torch.tensor([ids + [pad] * (longest - len(ids)) for ids, _ in batch])
        mask = torch.tensor([[1] * len(ids) + [0] * (longest - len(ids)) for ids, _ in batch])
        logits = model(input_ids=x, attention_mask=mask, use_cache=False).logits
        for b, (ids, pos) in enumerate(batch):
            pos = [q for q in pos if 0 < q < len(ids)]
            lg = logits[b, [q - 1 for q in pos]].float()
            tgt = lg.gather(1, torch.tensor([ids[q] for q in pos])[:, None]).squeeze(1)
            nll = torch.logsumexp(lg, -1) - tgt
            top = torch.topk(lg, k=min(rank_clip, lg.shape[-1]), dim=-1).values
            rank = torch.clamp(1 + (top > tgt[:, None]).sum(-1), max=rank_clip).double()
            out.append(
                {
                    "resp_token_length": len(pos),
                    "avg_rank_clip": rank.mean().item(),
                    "avg_surprisal": nll.double().mean().item(),
                    "rank_surprisal_ratio": rank.sum().item() / max(nll.double().sum().item(), 1e-12),
                }
            )
    return out
