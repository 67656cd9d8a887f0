"""A student model that scores encoded conversations: length-sorted batches under a token budget,
one pass of the model body, the vocabulary projection only at positions that predict response tokens.
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from transformers import AutoModelForCausalLM, DynamicCache

from pipeline.rsr import project_and_score, trajectory_stats
from pipeline.spans import EncodedConversation, load_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Padded tokens per forward pass on CPU: 1024-2048 are fastest on SmolLM2-135M shapes (4096 is 20%
# slower: activations leave the cache); README "Defaults and the numbers behind them".
CPU_TOKEN_BUDGET = 2048
# On GPU, the budget fills this fraction of the memory left free after loading the student with one
# layer's activations (the rest: logits chunks, attention workspace, allocator slack).
GPU_ACTIVATION_FRACTION = 0.5
GPU_TOKEN_BUDGET_RANGE = (8192, 262144)


@dataclass(frozen=True)
class ScoringOptions:
    rank_clip: int = 100
    token_budget: int | None = None  # padded tokens (rows x longest row) per forward pass; None: auto_token_budget
    logits_chunk_tokens: int = 256  # response positions projected to the vocabulary at a time
    metrics: tuple[str, ...] = ("rsr",)  # pipeline.rsr.METRICS: companion columns beside RSR's
    per_token: bool = False  # also return the per-token clipped ranks and surprisals (debugging)
    share_prompts: bool = True  # run a prompt shared by several trajectories through the body once
    min_shared_prompt: int = 16  # shorter shared prompts are not worth a separate pass
    prompt_cache_tokens: int = 16384  # shared-prompt tokens whose keys and values are held at a time


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def attention_for(device: str) -> str:
    """SDPA on GPU; on CPU, explicit attention a few rows at a time (see pipeline.attention)."""
    if device.startswith("cuda"):
        return "sdpa"
    from pipeline import attention

    return attention.NAME


def reuse_freed_cpu_memory() -> None:
    """Let glibc serve tensors up to 32 MB from its heap and keep up to 256 MB of freed heap for reuse.

    By default it hands each large tensor fresh pages from the kernel and returns them on free, so every
    forward pass pays page faults on all its activations (measured here: the first pass over 120 GSM8K
    rows 27% slower, later ones 6%; peak memory +4%). Affects the whole process: call it in processes
    that score. No-op where the C library is not glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    libc.mallopt(m_mmap_threshold, 32 * 2**20)
    libc.mallopt(m_trim_threshold, 256 * 2**20)


def resolve_dtype(dtype: str | None, device: str) -> torch.dtype:
    """bfloat16 on GPU and float32 on CPU unless set."""
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)} or auto, got {dtype!r}")
    return DTYPES[dtype]


def auto_token_budget(model, device: str) -> int:
    """`scoring.token_budget: auto`: CPU_TOKEN_BUDGET on CPU; on GPU, as many tokens as fit one layer's
    activations (hidden states, q/k/v/o and the MLP's gate, up and product) in GPU_ACTIVATION_FRACTION
    of the free memory, within GPU_TOKEN_BUDGET_RANGE."""
    if not device.startswith("cuda"):
        return CPU_TOKEN_BUDGET
    config = model.config.get_text_config(decoder=True)
    bytes_per_token = model.dtype.itemsize * (6 * config.hidden_size + 3 * config.intermediate_size)
    free_bytes, _ = torch.cuda.mem_get_info(torch.device(device))
    budget = int(GPU_ACTIVATION_FRACTION * free_bytes / bytes_per_token) // 1024 * 1024
    low, high = GPU_TOKEN_BUDGET_RANGE
    return max(low, min(budget, high))


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


def shared_prompt_lengths(conversations: Sequence[EncodedConversation], min_prompt: int) -> list[int]:
    """Per conversation, the length of its prompt if another conversation has the same prompt (at least
    `min_prompt` tokens), else 0."""
    prompts = [tuple(c.input_ids[: prompt_length(c)]) for c in conversations]
    counts = Counter(prompts)
    return [len(prompt) if len(prompt) >= min_prompt and counts[prompt] > 1 else 0 for prompt in prompts]


def full_attention_only(config) -> bool:
    """Whether every layer attends to all earlier tokens: a gathered prompt cache with masked gaps is only
    exact then (a sliding window would count the gaps)."""
    layer_types = getattr(config.get_text_config(decoder=True), "layer_types", None)
    if layer_types:
        return all(kind == "full_attention" for kind in layer_types)
    return getattr(config, "sliding_window", None) is None


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
        if self.device == "cpu":
            reuse_freed_cpu_memory()
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        if options.token_budget is None:
            options = dataclasses.replace(options, token_budget=auto_token_budget(self.model, self.device))
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
        return cls(model, load_tokenizer(path), options, device)

    @torch.inference_mode()
    def score(self, conversations: Sequence[EncodedConversation]) -> list[dict]:
        """Per-trajectory stats, in the order given; results do not depend on how rows are batched.

        Trajectories of one prompt (several teachers answering one problem) share the prompt's tokens:
        with `share_prompts`, each distinct prompt runs through the body once, and its keys and values
        serve every trajectory of the prompt. Batches are planned over the remaining tokens of all rows
        together, so rows of different prompts and rows without a shared prompt fill the same batches.
        The keys and values of at most `prompt_cache_tokens` prompt tokens are held at a time: rows are
        scored in windows of whole prompt groups.
        """
        share = self.options.share_prompts and full_attention_only(self.model.config)
        lengths = shared_prompt_lengths(conversations, self.options.min_shared_prompt) if share else [0] * len(conversations)
        prompts = [tuple(c.input_ids[:n]) for c, n in zip(conversations, lengths)]  # () without a shared prompt
        results: list[dict] = [{}] * len(conversations)
        for window in self._prompt_windows(prompts):
            prompt_states = self._prompt_states(list(dict.fromkeys(prompts[i] for i in window if prompts[i])))
            remaining = [conversations[i].response_positions[-1] - len(prompts[i]) for i in window]
            for batch in plan_batches(remaining, self.options.token_budget):
                rows = [(conversations[window[j]], prompts[window[j]]) for j in batch]
                for j, stats in zip(batch, self._score_batch(rows, prompt_states)):
                    results[window[j]] = stats
        return results

    def _prompt_windows(self, prompts: Sequence[tuple]) -> list[list[int]]:
        """Indices in windows whose distinct shared prompts hold at most `prompt_cache_tokens` tokens
        (a larger one gets a window of its own); rows without a shared prompt hold nothing and join a window."""
        groups: dict[tuple, list[int]] = {}
        for i, prompt in enumerate(prompts):
            groups.setdefault(prompt, []).append(i)
        windows, held = [[]], 0
        for prompt, members in groups.items():
            if prompt and held and held + len(prompt) > self.options.prompt_cache_tokens:
                windows.append([])
                held = 0
            windows[-1] += members
            held += len(prompt)
        return windows

    def _prompt_states(self, distinct: Sequence[tuple]) -> dict[tuple, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Per distinct prompt, each layer's keys and values [kv_heads, length, head_dim], from batched body passes."""
        states = {}
        for batch in plan_batches([len(p) for p in distinct], self.options.token_budget):
            input_ids, attention_mask = self._right_padded([distinct[i] for i in batch])
            cache = self.body(input_ids=input_ids, attention_mask=attention_mask, use_cache=True).cache
            for row, i in enumerate(batch):
                n = len(distinct[i])
                states[distinct[i]] = [(keys[row, :, :n], values[row, :, :n]) for keys, values, *_ in cache]
        return states

    def _right_padded(self, sequences: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        input_ids = torch.full((len(sequences), max(map(len, sequences))), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, ids in enumerate(sequences):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention_mask[row, : len(ids)] = 1
        return input_ids.to(self.device), attention_mask.to(self.device)

    @staticmethod
    def _gathered_cache(row_states: Sequence[list | None], width: int) -> DynamicCache:
        """A cache whose row b holds its prompt's keys and values in its first positions, zeros after
        (masked out) up to `width`; rows without a shared prompt are all zeros."""
        first = next(states for states in row_states if states)
        layers = []
        for layer, (keys, values) in enumerate(first):
            gathered = [keys.new_zeros((len(row_states), keys.shape[0], width, keys.shape[2])) for _ in range(2)]
            for row, states in enumerate(row_states):
                if states:
                    for tensor, part in zip(gathered, states[layer]):
                        tensor[row, :, : part.shape[1]] = part
            layers.append(tuple(gathered))
        return DynamicCache(layers)

    def _score_batch(self, batch: Sequence[tuple[EncodedConversation, tuple]], prompt_states: dict) -> list[dict]:
        """Score (conversation, shared prompt tokens) pairs; a shared prompt's keys and values come from
        `prompt_states`.

        Each row's inputs are its tokens after its shared prompt, up to the one before its last response
        token (later ones predict nothing that is scored). Key positions are [prompt cache | inputs]: row b
        attends to the first prompts[b] keys of its own prompt and, causally, to its own inputs.
        """
        prompts = [len(prompt) for _, prompt in batch]
        width = max(prompts)
        inputs = [c.input_ids[p : c.response_positions[-1]] for (c, _), p in zip(batch, prompts)]
        input_ids, input_mask = self._right_padded(inputs)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long, device=self.device)
        for b, prompt in enumerate(prompts):
            attention_mask[b, :prompt] = 1
        attention_mask = torch.cat([attention_mask, input_mask], dim=1)
        position_ids = torch.tensor(prompts, device=self.device)[:, None] + torch.arange(input_ids.shape[1], device=self.device)
        rows, positions, targets = [], [], []
        for b, ((conversation, _), prompt) in enumerate(zip(batch, prompts)):
            rows.append(torch.full((len(conversation.response_positions),), b))
            positions.append(torch.tensor(conversation.response_positions) - prompt)
            targets.append(torch.tensor([conversation.input_ids[q] for q in conversation.response_positions]))
        rows, positions, targets = (torch.cat(t).to(self.device) for t in (rows, positions, targets))

        body_inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        if width:
            row_states = [prompt_states.get(prompt) for _, prompt in batch]
            body_inputs.update(cache=self._gathered_cache(row_states, width), use_cache=True)
        else:
            body_inputs.update(use_cache=False)
        hidden = self.body(**body_inputs).last_hidden_state
        # Only the positions that predict response tokens are projected to the vocabulary.
        metrics = self.options.metrics
        ranks, surprisals, entropies = project_and_score(
            hidden[rows, positions - 1],
            self.head_weight,
            self.head_bias,
            targets,
            self.options.logits_chunk_tokens,
            with_entropy="entropy" in metrics,
        )
        ranks, surprisals = ranks.cpu(), surprisals.cpu()
        entropies = entropies.cpu() if entropies is not None else None
        results, start = [], 0
        for conversation, _ in batch:
            end = start + len(conversation.response_positions)
            row_entropies = entropies[start:end] if entropies is not None else None
            stats = trajectory_stats(ranks[start:end], surprisals[start:end], self.options.rank_clip, row_entropies, metrics)
            if self.options.per_token:
                stats["token_ranks"] = ranks[start:end].clamp(max=self.options.rank_clip).tolist()
                stats["token_surprisals"] = surprisals[start:end].tolist()
            results.append(stats)
            start = end
        return results
