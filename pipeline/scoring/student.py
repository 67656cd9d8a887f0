"""A student model that scores encoded conversations: length-sorted batches under a token budget,
one pass of the model body, the vocabulary projection only at positions that predict response tokens.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from pipeline import errors
from pipeline.errors import Rejected
from pipeline.scoring import attention  # noqa: F401  registers the CPU attention with transformers
from pipeline.scoring.device import DevicePolicy
from pipeline.scoring.metrics import COMPANIONS
from pipeline.scoring.models import StudentSource
from pipeline.scoring.options import ScoringOptions
from pipeline.scoring.rsr import VocabHead, project_and_score, trajectory_stats
from pipeline.tokens.spans import EncodedConversation

logger = logging.getLogger(__name__)


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


def padded_tokens(rows: Sequence[tuple[EncodedConversation, tuple]]) -> int:
    """Rows x longest row of a batch of (conversation, shared prompt) pairs: what the token budget bounds."""
    return len(rows) * max(c.response_positions[-1] - len(prompt) for c, prompt in rows)


def full_attention_only(config) -> bool:
    """Whether every layer attends to all earlier tokens: a gathered prompt cache with masked gaps is only
    exact then (a sliding window would count the gaps)."""
    layer_types = getattr(config.get_text_config(decoder=True), "layer_types", None)
    if layer_types:
        return all(kind == "full_attention" for kind in layer_types)
    return getattr(config, "sliding_window", None) is None


@dataclass
class Padding:
    """Real and padded tokens of the body passes: padding efficiency = real / padded."""

    real: int = 0
    padded: int = 0

    def add(self, real: int, padded: int) -> None:
        self.real += real
        self.padded += padded


class Student:
    """A causal LM split into its body and its vocabulary projection, ready to score conversations on
    the device its `DevicePolicy` chose."""

    def __init__(
        self,
        model,
        tokenizer,
        options: ScoringOptions = ScoringOptions(),
        device: str | None = None,
        policy: DevicePolicy | None = None,
    ):
        policy = policy or DevicePolicy.choose(device)
        policy.prepare_process()
        self.model = model.to(policy.device).eval()
        self.policy = policy.sized_for(self.model)
        self.tokenizer = tokenizer
        self.options = options
        self.body = getattr(model, model.base_model_prefix)
        head = model.get_output_embeddings()
        logits_dtype = torch.float32 if options.logits_dtype == "float32" else head.weight.dtype
        self.head = VocabHead.of(head.weight, head.bias, logits_dtype)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id or 0
        self.padding = Padding()  # of the body passes over rows (shared prompts run once, unpadded mostly)

    @property
    def device(self) -> str:
        return self.policy.device

    @classmethod
    def load(
        cls,
        source: StudentSource | str,
        dtype: str | None = None,
        device: str | None = None,
        options: ScoringOptions = ScoringOptions(),
        policy: DevicePolicy | None = None,
    ):
        """Load a student's weights and tokenizer (`source`: a StudentSource, or a model folder or hub id)
        under `policy`, or the policy chosen for `device` and `dtype`."""
        source = StudentSource(source) if isinstance(source, str) else source
        policy = policy or DevicePolicy.choose(device, dtype)
        return cls(source.load_model(policy.torch_dtype, policy.attention), source.load_tokenizer(), options, policy=policy)

    @torch.inference_mode()
    def score(
        self, conversations: Sequence[EncodedConversation], on_batch: Callable[[list[int], int], None] | None = None
    ) -> list[dict | Rejected]:
        """Per-trajectory stats, in the order given; results do not depend on how rows are batched.

        Trajectories of one prompt (several teachers answering one problem) share the prompt's tokens:
        with `share_prompts`, each distinct prompt runs through the body once, and its keys and values
        serve every trajectory of the prompt. Batches are planned over the remaining tokens of all rows
        together, so rows of different prompts and rows without a shared prompt fill the same batches.
        The keys and values of at most `prompt_cache_tokens` prompt tokens are held at a time: rows are
        scored in windows of whole prompt groups. `on_batch(the batch's indices into `conversations`, its
        response tokens)` follows each batch.
        """
        share = self.options.share_prompts and full_attention_only(self.model.config)
        lengths = shared_prompt_lengths(conversations, self.options.min_shared_prompt) if share else [0] * len(conversations)
        prompts = [tuple(c.input_ids[:n]) for c, n in zip(conversations, lengths)]  # () without a shared prompt
        results: list[dict | Rejected] = [{}] * len(conversations)
        for window in self._prompt_windows(prompts):
            prompt_states = self._prompt_states(list(dict.fromkeys(prompts[i] for i in window if prompts[i])))
            shared = {i: prompts[i] if prompts[i] in prompt_states else () for i in window}  # a prompt too long to hold: unshared
            remaining = [conversations[i].response_positions[-1] - len(shared[i]) for i in window]
            for batch in plan_batches(remaining, self.policy.token_budget):
                rows = [(conversations[window[j]], shared[window[j]]) for j in batch]
                for j, stats in zip(batch, self._score_fitting(rows, prompt_states)):
                    results[window[j]] = stats
                if on_batch:
                    on_batch([window[j] for j in batch], sum(len(c.response_positions) for c, _ in rows))
        return results

    def _score_fitting(self, rows: Sequence[tuple[EncodedConversation, tuple]], prompt_states: dict) -> list[dict | Rejected]:
        """`_score_batch` (body and projection) under the out-of-memory back-off; a row that alone does
        not fit gets a `too_long_for_device` reject instead of stats."""

        def too_long(row: tuple[EncodedConversation, tuple]) -> list[Rejected]:
            tokens = row[0].response_positions[-1] - len(row[1])
            detail = f"{tokens} tokens after any shared prompt do not fit one pass ({self.policy.free_memory()})"
            return [Rejected(errors.TOO_LONG_FOR_DEVICE, detail)]

        return self._halving(rows, lambda batch: self._score_batch(batch, prompt_states), too_long, padded_tokens)

    def _halving(
        self, items: Sequence, run: Callable[[Sequence], list], alone: Callable[[object], list], tokens: Callable
    ) -> list:
        """`run(items)`; where the device runs out of memory, the token budget drops to half of what the
        batch held (for the rest of the run) and each half runs again; an item that alone does not fit
        gets `alone(item)`. The one back-off for every pass: the body with the projection, the prompt pass."""
        try:
            return run(items)
        except torch.OutOfMemoryError:
            pass  # out of the handler first, so that the failed pass's tensors are freed
        if len(items) == 1:
            return alone(items[0])
        self._lower_token_budget(tokens(items) // 2)
        half = len(items) // 2
        return self._halving(items[:half], run, alone, tokens) + self._halving(items[half:], run, alone, tokens)

    def _lower_token_budget(self, budget: int) -> None:
        if budget < self.policy.token_budget:
            logger.warning(
                "out of device memory: token budget %d -> %d for the rest of the run", self.policy.token_budget, budget
            )
            self.policy = dataclasses.replace(self.policy, token_budget=max(1, budget))

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
        """Per distinct prompt, each layer's keys and values [kv_heads, length, head_dim], from batched body
        passes under the out-of-memory back-off; a prompt that alone does not fit is left unshared."""

        def states_of(prompts: Sequence[tuple]) -> list:
            input_ids, attention_mask = self._right_padded(prompts)
            cache = self.body(input_ids=input_ids, attention_mask=attention_mask, use_cache=True).cache
            return [
                [(keys[row, :, : len(p)], values[row, :, : len(p)]) for keys, values, *_ in cache]
                for row, p in enumerate(prompts)
            ]

        states = {}
        for batch in plan_batches([len(p) for p in distinct], self.policy.token_budget):
            prompts = [distinct[i] for i in batch]
            found = self._halving(prompts, states_of, lambda _: [None], lambda ps: len(ps) * max(map(len, ps)))
            states.update({prompt: state for prompt, state in zip(prompts, found) if state is not None})
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
        for layer, (keys, _) in enumerate(first):
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
        self.padding.add(sum(map(len, inputs)), input_ids.numel())
        prompt_mask = (torch.arange(width)[None, :] < torch.tensor(prompts)[:, None]).to(self.device, torch.long)
        attention_mask = torch.cat([prompt_mask, input_mask], dim=1)
        position_ids = torch.tensor(prompts, device=self.device)[:, None] + torch.arange(input_ids.shape[1], device=self.device)
        rows, positions, targets = [], [], []
        for b, ((conversation, _), prompt) in enumerate(zip(batch, prompts)):
            rows.append(torch.full((len(conversation.response_positions),), b))
            positions.append(torch.tensor(conversation.response_positions) - prompt)
            targets.append(torch.tensor([conversation.input_ids[q] for q in conversation.response_positions]))
        rows, positions, targets = (torch.cat(t).to(self.device) for t in (rows, positions, targets))

        body_inputs = {"input_ids": input_ids, "position_ids": position_ids}
        if width:
            row_states = [prompt_states.get(prompt) for _, prompt in batch]
            body_inputs.update(attention_mask=attention_mask, cache=self._gathered_cache(row_states, width), use_cache=True)
        else:  # right padding: causality alone keeps every real token from the pads (the fused causal kernel, no mask)
            body_inputs.update(use_cache=False)
        hidden = self.body(**body_inputs).last_hidden_state
        # Only the positions that predict response tokens are projected to the vocabulary.
        metrics = self.options.metrics
        ranks, surprisals, entropies = project_and_score(
            hidden[rows, positions - 1],
            self.head,
            targets,
            self.policy.logits_chunk_tokens,
            with_entropy=any(m.needs_entropy and m.name in metrics for m in COMPANIONS),
            statistics_rows=self.policy.statistics_rows,
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
