"""A student model that scores encoded conversations: length-sorted batches under a token budget,
one pass of the model body, the vocabulary projection only at positions that predict response tokens.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.rsr import project_and_score, trajectory_stats
from pipeline.spans import EncodedConversation

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ScoringOptions:
    rank_clip: int = 100
    token_budget: int = 16384  # padded tokens (rows x longest row) per forward pass
    logits_chunk_tokens: int = 64  # response positions projected to the vocabulary at a time
    per_token: bool = False  # also return the per-token ranks and surprisals (debugging)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(dtype: str | None, device: str) -> torch.dtype:
    """bfloat16 on GPU and float32 on CPU unless set."""
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)} or auto, got {dtype!r}")
    return DTYPES[dtype]


def plan_batches(lengths: Sequence[int], token_budget: int) -> list[list[int]]:
    """Indices grouped longest first so that rows x longest row stays within `token_budget`.

    Sorting by length keeps padding small; a row longer than the budget gets a batch of its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= token_budget:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def model_revision(path: str) -> str:
    """A stable id for the student's weights: a hash of a local directory's files, else the hub commit.

    Raises FileNotFoundError when `path` is neither a local directory nor a reachable (or cached) hub id.
    """
    local = Path(path)
    if not local.is_dir():
        from huggingface_hub import snapshot_download

        try:  # only config.json is fetched: the snapshot folder is named by the commit
            return Path(snapshot_download(path, allow_patterns=["config.json"])).name
        except Exception as exc:
            raise FileNotFoundError(
                f"student {path!r} is not a local directory here and the hub lookup failed ({type(exc).__name__})"
            ) from exc
    digest = hashlib.sha256()
    for file in sorted(p for p in local.rglob("*") if p.is_file()):
        digest.update(file.relative_to(local).as_posix().encode())
        with open(file, "rb") as f:
            digest.update(hashlib.file_digest(f, "sha256").digest())
    return digest.hexdigest()[:16]


class Student:
    """A causal LM split into its body and its vocabulary projection, ready to score conversations."""

    def __init__(self, model, tokenizer, options: ScoringOptions = ScoringOptions(), device: str | None = None):
        self.device = device or default_device()
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.options = options
        self.body = getattr(model, model.base_model_prefix)
        head = model.get_output_embeddings()
        self.head_weight, self.head_bias = head.weight, head.bias
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id or 0

    @classmethod
    def load(cls, path: str, dtype: str | None = None, device: str | None = None, options=ScoringOptions()):
        device = device or default_device()
        model = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(dtype, device), attn_implementation="sdpa")
        return cls(model, AutoTokenizer.from_pretrained(path), options, device)

    @torch.inference_mode()
    def score(self, conversations: Sequence[EncodedConversation]) -> list[dict]:
        """Per-trajectory stats, in the order given; results do not depend on how rows are batched."""
        results: list[dict] = [{}] * len(conversations)
        lengths = [len(c.input_ids) for c in conversations]
        for batch in plan_batches(lengths, self.options.token_budget):
            for i, stats in zip(batch, self._score_batch([conversations[i] for i in batch])):
                results[i] = stats
        return results

    def _score_batch(self, batch: Sequence[EncodedConversation]) -> list[dict]:
        longest = max(len(c.input_ids) for c in batch)
        input_ids = torch.full((len(batch), longest), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), longest), dtype=torch.long)
        rows, positions = [], []
        for b, conversation in enumerate(batch):
            n = len(conversation.input_ids)
            input_ids[b, :n] = torch.tensor(conversation.input_ids)
            attention_mask[b, :n] = 1
            rows.append(torch.full((len(conversation.response_positions),), b))
            positions.append(torch.tensor(conversation.response_positions))
        rows, positions = torch.cat(rows).to(self.device), torch.cat(positions).to(self.device)
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)

        hidden = self.body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        # Only the positions that predict response tokens are projected to the vocabulary.
        ranks, surprisals = project_and_score(
            hidden[rows, positions - 1],
            self.head_weight,
            self.head_bias,
            input_ids[rows, positions],
            self.options.rank_clip,
            self.options.logits_chunk_tokens,
        )
        ranks, surprisals = ranks.cpu(), surprisals.cpu()
        results, start = [], 0
        for conversation in batch:
            end = start + len(conversation.response_positions)
            stats = trajectory_stats(ranks[start:end], surprisals[start:end])
            if self.options.per_token:
                stats["token_ranks"] = ranks[start:end].tolist()
                stats["token_surprisals"] = surprisals[start:end].tolist()
            results.append(stats)
            start = end
        return results
