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
    share_prompts: bool = True  # run a prompt shared by several trajectories through the body once
    min_shared_prompt: int = 16  # shorter shared prompts are not worth a separate pass


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def attention_for(device: str) -> str:
    """SDPA on GPU; on CPU, explicit attention for short inputs and SDPA for long ones."""
    if device.startswith("cuda"):
        return "sdpa"
    from pipeline import attention

    return attention.NAME


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


def prompt_length(conversation: EncodedConversation) -> int:
    """Tokens before the position that predicts the first response token: the part that can be shared."""
    return conversation.response_positions[0] - 1


def group_by_prompt(conversations: Sequence[EncodedConversation], min_prompt: int) -> list[list[int]]:
    """Indices of conversations with identical prompts (at least `min_prompt` tokens), two or more a group."""
    groups: dict[tuple, list[int]] = {}
    for i, conversation in enumerate(conversations):
        if prompt_length(conversation) >= min_prompt:
            groups.setdefault(tuple(conversation.input_ids[: prompt_length(conversation)]), []).append(i)
    return [group for group in groups.values() if len(group) > 1]


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
        attention = attention_for(device)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(dtype, device), attn_implementation=attention)
        return cls(model, AutoTokenizer.from_pretrained(path), options, device)

    @torch.inference_mode()
    def score(self, conversations: Sequence[EncodedConversation]) -> list[dict]:
        """Per-trajectory stats, in the order given; results do not depend on how rows are batched.

        Trajectories of one prompt (several teachers answering one problem) share the prompt's
        tokens: with `share_prompts`, the prompt runs through the body once and its key/value cache
        serves every trajectory of the group.
        """
        results: list[dict] = [{}] * len(conversations)
        groups = group_by_prompt(conversations, self.options.min_shared_prompt) if self.options.share_prompts else []
        shared = {i for group in groups for i in group}
        singles = [i for i in range(len(conversations)) if i not in shared]
        # (shared prompt length, members): rows without a shared prompt form one unit with prompt 0
        units = [(prompt_length(conversations[group[0]]), group) for group in groups] + [(0, singles)]
        batches = []
        for prompt, members in units:
            lengths = [conversations[i].response_positions[-1] - prompt for i in members]
            batches += [(prompt, [members[j] for j in b]) for b in plan_batches(lengths, self.options.token_budget)]
        for prompt, batch in batches:
            for i, stats in zip(batch, self._score_batch([conversations[i] for i in batch], prompt)):
                results[i] = stats
        return results

    def _score_batch(self, batch: Sequence[EncodedConversation], prompt: int = 0) -> list[dict]:
        """Score rows whose first `prompt` tokens are identical (0: no shared prompt).

        Only tokens up to the one before the last response token are inputs: later ones predict nothing
        that is scored.
        """
        inputs = [c.input_ids[prompt : c.response_positions[-1]] for c in batch]
        longest = max(map(len, inputs))
        input_ids = torch.full((len(batch), longest), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), prompt + longest), dtype=torch.long)
        attention_mask[:, :prompt] = 1
        rows, positions, targets = [], [], []
        for b, (conversation, ids) in enumerate(zip(batch, inputs)):
            input_ids[b, : len(ids)] = torch.tensor(ids)
            attention_mask[b, prompt : prompt + len(ids)] = 1
            rows.append(torch.full((len(conversation.response_positions),), b))
            positions.append(torch.tensor(conversation.response_positions) - prompt)
            targets.append(torch.tensor([conversation.input_ids[q] for q in conversation.response_positions]))
        rows, positions, targets = (torch.cat(t).to(self.device) for t in (rows, positions, targets))
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)

        body_inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
        if prompt:
            prompt_ids = torch.tensor([batch[0].input_ids[:prompt]], device=self.device)
            cache = self.body(input_ids=prompt_ids, use_cache=True).past_key_values
            cache.batch_repeat_interleave(len(batch))
            positions_ids = torch.arange(prompt, prompt + longest, device=self.device).expand(len(batch), -1)
            body_inputs.update(past_key_values=cache, use_cache=True, position_ids=positions_ids)
        hidden = self.body(**body_inputs).last_hidden_state
        # Only the positions that predict response tokens are projected to the vocabulary.
        ranks, surprisals = project_and_score(
            hidden[rows, positions - 1],
            self.head_weight,
            self.head_bias,
            targets,
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
