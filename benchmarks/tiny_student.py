"""Build a small random-weight student offline: a byte-level BPE tokenizer trained on a corpus, a chat
template, and a Llama model of a chosen shape. For plumbing demos and tests: its scores mean nothing.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from pipeline.tokens.tokenizer import BUILTIN_TEMPLATES

# No special markers at all: spans can only come from rendering the template.
PLAIN_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | capitalize + ': ' + message['content'] + '\n\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}"
)
TEMPLATES = {**BUILTIN_TEMPLATES, "plain": PLAIN_TEMPLATE}
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
]  # fmt: skip


def corpus_texts(jsonl_path: str | Path) -> Iterable[str]:
    """Message contents of a chat JSONL corpus, for tokenizer training (bad lines are skipped here)."""
    with open(jsonl_path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                row = json.loads(line)
                yield from (m["content"] for m in row["messages"] if isinstance(m.get("content"), str))
            except (ValueError, KeyError, TypeError, AttributeError):
                continue


def train_tokenizer(texts: Iterable[str], template: str = "chatml", vocab_size: int = 512) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    end_of_turn = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "plain": "<|endoftext|>"}[template]
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|begin_of_text|>" if template == "llama3" else "<|im_start|>",
        eos_token=end_of_turn,
        pad_token=end_of_turn,
        unk_token="<|endoftext|>",
        chat_template=TEMPLATES[template],
    )


def random_llama(vocab_size: int, seed: int = 0, hidden_size: int = 64, layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=8192,
        initializer_range=0.2,  # spread the logits so ranks and surprisals vary between tokens
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


def build_tiny_student(
    out_dir: str | Path, corpus_jsonl: str | Path, template: str = "chatml", seed: int = 0, vocab_size: int = 512
) -> Path:
    """Write a tokenizer and a random-weight Llama student to `out_dir` and return it."""
    out_dir = Path(out_dir)
    tokenizer = train_tokenizer(corpus_texts(corpus_jsonl), template, vocab_size)
    model = random_llama(len(tokenizer), seed)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
