"""Where a student's weights and tokens come from: a local model folder, a hub id, or a GGUF file (local
or s3://, copied once per node to a local cache), with the model's own tokenizer or the GGUF's.

`StudentSource` owns that resolution; the driver checks it before Ray starts (tokens, template, window)
and every scoring actor loads the same weights through it. No Ray here.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import fsspec

from pipeline.tokens.tokenizer import load_chat_template, load_tokenizer

GGUF_SUFFIX = ".gguf"
CACHE_DIR = Path(os.environ.get("RSR_CACHE_DIR", Path.home() / ".cache" / "rsr-pipeline"))
# llama.cpp's name for the GPT-2 pre-tokenizer, which a byte-level vocabulary gets without a split regex.
GPT2_PRE_TOKENIZERS = ("gpt-2", "default")


class StudentSourceError(ValueError):
    """A student whose weights or tokens cannot be used; the message says what is missing."""


def is_gguf(path: str) -> bool:
    return path.lower().endswith(GGUF_SUFFIX)


def file_sha256(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def local_copy(url: str, endpoint_url: str | None = None) -> Path:
    """A local path for `url`: itself when local, else a copy in CACHE_DIR made once per node (written
    under a temporary name, then renamed, so concurrent actors never read half a file)."""
    if not url.startswith("s3://"):
        return Path(os.path.expanduser(url))
    fs = fsspec.filesystem("s3", endpoint_url=endpoint_url)
    info = fs.info(url)
    version = str(info.get("ETag") or info.get("LastModified") or info.get("size")).strip('"')
    target = CACHE_DIR / "models" / hashlib.sha256(f"{url}@{version}".encode()).hexdigest()[:16] / url.rsplit("/", 1)[-1]
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
        fs.get_file(url, str(partial))
        os.replace(partial, target)
    return target


@dataclass(frozen=True)
class StudentSource:
    """A student's weights (`path`: folder, hub id or .gguf) and tokens (`tokenizer`: a folder or hub id
    with the model's tokenizer.json; None: the weights' own, for a GGUF its metadata after a check)."""

    path: str
    tokenizer: str | None = None
    chat_template: str | None = None
    endpoint_url: str | None = None

    @property
    def gguf(self) -> bool:
        return is_gguf(self.path)

    def weights(self) -> str:
        """The local weights path (a GGUF on S3 is fetched once per node)."""
        return str(local_copy(self.path, self.endpoint_url)) if self.gguf else os.path.expanduser(self.path)

    def load_tokenizer(self):
        """The tokenizer the student scores with, loaded once per process (the tokenize stage and the
        scoring actor share it); see `tokens_from` for where it comes from."""
        return _source_tokenizer(self)

    def tokens_from(self) -> str:
        """Where the tokens come from, for the log and the run manifest."""
        if self.tokenizer:
            return f"tokenizer.json of {self.tokenizer}"
        if self.gguf:
            return f"the GGUF's own vocabulary and merges, pre-tokenizer {gguf_metadata(self.weights())['pre']!r} (checked)"
        return f"tokenizer.json of {self.path}"

    def model_folder(self) -> str:
        """A folder or hub id that `from_pretrained` loads: for a GGUF, its float32 conversion (once per node)."""
        return str(converted_gguf(Path(self.weights()))) if self.gguf else os.path.expanduser(self.path)

    def config(self):
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(self.model_folder())

    def window(self) -> int:
        """Positions the student was trained on: `max_position_embeddings`, or what its rope scaling
        extends the original window to."""
        config = self.config().get_text_config(decoder=True)
        window = config.max_position_embeddings
        rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
        if rope.get("factor") and rope.get("original_max_position_embeddings"):
            window = max(window, int(rope["factor"] * rope["original_max_position_embeddings"]))
        return window

    def load_model(self, dtype, attention: str):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(self.model_folder(), dtype=dtype, attn_implementation=attention)

    def revision(self) -> str:
        """A stable id of everything the numbers depend on: the GGUF file's hash (and a separate tokenizer
        folder's), else a hash of the model folder's files, else the hub commit."""
        if not self.gguf:
            return model_revision(os.path.expanduser(self.path))
        digest = file_sha256(self.weights())[:16]
        return f"{digest}+{model_revision(os.path.expanduser(self.tokenizer))}" if self.tokenizer else digest


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


def converted_gguf(gguf: Path) -> Path:
    """The GGUF's weights dequantized to float32 in a model folder (config.json and safetensors), made once
    per node in CACHE_DIR and keyed by the file's hash. Loading a GGUF through transformers takes tens of
    seconds (and marks the model quantized, which `save_pretrained` refuses); a folder loads in one or two
    and into any dtype."""
    target = CACHE_DIR / "gguf" / f"{file_sha256(gguf)[:16]}-float32"
    if (target / "config.json").exists():
        return target
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    try:
        config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
        with torch.device("meta"):  # no random initialisation: every tensor comes from the file
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        state = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model, torch_dtype=torch.float32)["tensors"]
    except (ValueError, KeyError, NotImplementedError) as exc:
        raise StudentSourceError(f"{gguf}: transformers cannot load this GGUF ({type(exc).__name__}: {exc})") from exc
    result = model.load_state_dict(state, strict=False, assign=True)
    tied = {"lm_head.weight"} if config.get_text_config(decoder=True).tie_word_embeddings else set()
    if set(result.missing_keys) - tied or result.unexpected_keys:
        missing = sorted(set(result.missing_keys) - tied)
        raise StudentSourceError(
            f"{gguf}: the GGUF's tensors do not fill the model (missing {missing[:5]}, unexpected {result.unexpected_keys[:5]})"
        )
    model.tie_weights()
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
    model.save_pretrained(partial)
    try:
        os.replace(partial, target)
    except OSError:  # another process on this node converted it first
        shutil.rmtree(partial, ignore_errors=True)
    return target


def gguf_metadata(path: str) -> dict:
    """The tokenizer metadata of a GGUF file: model kind, pre-tokenizer name, token list."""
    from transformers.integrations.gguf.reader import read_gguf_metadata

    metadata, _ = read_gguf_metadata(path, ("tokenizer.ggml.tokens",))
    return {key: metadata.get(f"tokenizer.ggml.{key}") for key in ("model", "pre", "tokens")}


@functools.lru_cache(maxsize=8)
def _source_tokenizer(source: StudentSource):
    if source.tokenizer or not source.gguf:
        tokenizer = load_tokenizer(os.path.expanduser(source.tokenizer or source.path), source.chat_template)
    else:
        tokenizer = gguf_tokenizer(source.weights())
        if source.chat_template:
            tokenizer.chat_template = load_chat_template(source.chat_template)
    # Rows are cut at the student's window by the job itself (`max_model_len`, flagged truncated);
    # the tokenizer's own limit would only print a warning per long row.
    tokenizer.model_max_length = sys.maxsize
    return tokenizer


def gguf_tokenizer(path: str):
    """The tokenizer transformers builds from a GGUF's metadata, used only when it reproduces the file:
    the same vocabulary (every token at its id), and a pre-tokenizer that transformers knows for the
    file's `tokenizer.ggml.pre` (an unknown one falls back to GPT-2's split, which is another tokenizer)."""
    from transformers import AutoTokenizer
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    metadata = gguf_metadata(path)
    fix = "set the student's `tokenizer` to a folder or hub id holding the model's tokenizer.json"
    pre = metadata["pre"]
    if metadata["model"] == "gpt2" and pre not in GGUF_PRE_TOKENIZER_SPLITS and pre not in GPT2_PRE_TOKENIZERS:
        raise StudentSourceError(
            f"{path}: transformers cannot reproduce this GGUF's pre-tokenizer {pre!r} (it would split text as GPT-2 does): {fix}"
        )
    file = Path(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
    except (ValueError, KeyError) as exc:
        raise StudentSourceError(f"{path}: transformers cannot build a tokenizer from this GGUF ({exc}): {fix}") from exc
    vocab = tokenizer.get_vocab()
    tokens = metadata["tokens"] or []
    wrong = [t for i, t in enumerate(tokens) if vocab.get(_byte_level(t) if metadata["model"] == "gpt2" else t) != i]
    if wrong or not tokens:
        raise StudentSourceError(
            f"{path}: the tokenizer built from the GGUF misplaces {len(wrong)} of its {len(tokens)} tokens: {fix}"
        )
    return tokenizer


def _byte_level(token: str) -> str:
    """A GGUF token in the byte-level alphabet that GPT-2-style vocabularies use (as transformers spells it)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    return token if set(token) <= alphabet else "".join(spelling[b] for b in token.encode("utf-8"))
