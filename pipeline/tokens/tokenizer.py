"""The student's tokenizer: loaded once per process for each (path, chat template), encoding exactly as
the model's own tokenizer.json does (checked on probe texts), with a built-in or .jinja chat template
instead of its own when asked.
"""

from __future__ import annotations

import functools

# Templates for students that ship none (base models), by name: `students[i].chat_template: chatml`.
BUILTIN_TEMPLATES = {
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
}
# Texts on which a loaded tokenizer must encode exactly as its own tokenizer.json does: newline runs
# before digits, runs of spaces, CJK, emoji, mixed scripts.
TOKENIZER_PROBES = (
    "x\n\n3 apples", "Total:\n\n\n42.\n 7", "a  b   c    d", "\t\tindent\n    code()", "你好，世界。日本語のテキスト",
    "emoji 🙂👍🏽 and ZWJ 👨‍👩‍👧", "Ünïcödé façade naïve – “quotes”", "1234567890 + 0.5e-3 = x^2\n\n\n\n5",
)  # fmt: skip


def load_chat_template(spec: str) -> str:
    """A built-in template's text by name, else the text of a .jinja file."""
    if spec in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[spec]
    with open(spec, encoding="utf-8") as f:
        return f.read()


class TokenizerMismatch(ValueError):
    """The loaded tokenizer does not encode as the model's own tokenizer.json."""


def _reference_tokenizer(path: str):
    """The model's tokenizer.json applied by the `tokenizers` library, or None when it ships none."""
    from tokenizers import Tokenizer
    from transformers.utils import cached_file

    file = cached_file(path, "tokenizer.json", _raise_exceptions_for_missing_entries=False)
    return Tokenizer.from_file(file) if file else None


def _mismatch(tokenizer, reference) -> str | None:
    for text in TOKENIZER_PROBES:
        got = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        if got != reference.encode(text, add_special_tokens=False).ids:
            return f"{text!r} -> {tokenizer.convert_ids_to_tokens(got)}"
    return None


def load_tokenizer(path: str, chat_template: str | None = None):
    """The student's tokenizer, encoding exactly as its own tokenizer.json does, with `chat_template`
    (see `load_chat_template`) instead of its own when set. Loaded once per process for each (path,
    chat_template): every caller gets the same object, so none may change how it encodes or renders.

    transformers 5 rebuilds some tokenizer classes from their vocabulary and drops the file's
    pre-tokenizer (SmolLM2's `GPT2Tokenizer`: "x\\n\\n3" becomes x, Ċ, Ċ, 3 instead of x, ĊĊ, 3); such a
    tokenizer is loaded through the file itself instead. Raises TokenizerMismatch when neither way
    reproduces the file on TOKENIZER_PROBES.
    """
    return _checked_tokenizer(path, chat_template)


@functools.lru_cache(maxsize=8)
def _checked_tokenizer(path: str, chat_template: str | None):
    from transformers import AutoTokenizer, TokenizersBackend

    tokenizer = AutoTokenizer.from_pretrained(path)
    reference = _reference_tokenizer(path)
    if reference is not None and _mismatch(tokenizer, reference):
        tokenizer = TokenizersBackend.from_pretrained(path)
        if problem := _mismatch(tokenizer, reference):
            raise TokenizerMismatch(f"the tokenizer of {path!r} does not encode as its tokenizer.json: {problem}")
    if chat_template:
        tokenizer.chat_template = load_chat_template(chat_template)
    return tokenizer
