"""The device policy: every device-specific choice of scoring, made in one place (`DevicePolicy.choose`,
where each `auto` is resolved) from the settings and the device. No Ray here, and no torch until the
policy meets a device: the driver resolves the policies of a run without loading torch.

CPU (measured on this project's 2-core CI class, README "Defaults and the numbers behind them"):
explicit attention a few rows at a time (`pipeline.scoring.attention`), float32, 2,048 padded tokens per pass,
statistics 16 logit rows at a time (they stay in the core's cache), glibc keeping freed heap for reuse.

GPU (not measured: no GPU has run this code yet): SDPA, bfloat16, a token budget that fills
GPU_ACTIVATION_FRACTION of the memory left free after loading the student with one layer's
activations, a logits chunk that fills GPU_LOGITS_FRACTION of it with bfloat16 logits (capped), and
statistics in steps whose float32 temporaries stay under GPU_STATISTICS_BYTES.
"""

from __future__ import annotations

import ctypes
import dataclasses
from dataclasses import dataclass

DTYPES = ("float32", "bfloat16", "float16")
CPU_ATTENTION = "cpu_row_eager"  # `pipeline.scoring.attention`, registered with transformers when a student loads
CPU_TOKEN_BUDGET = 2048
CPU_LOGITS_CHUNK_TOKENS = 256
CPU_STATISTICS_ROWS = 16  # measured here: 2.4x faster statistics than 64 rows at once
GPU_ACTIVATION_FRACTION = 0.5
GPU_TOKEN_BUDGET_RANGE = (8192, 262144)
GPU_LOGITS_FRACTION = 0.1
GPU_LOGITS_CHUNK_RANGE = (256, 16384)
GPU_STATISTICS_BYTES = 512 * 2**20


@dataclass(frozen=True)
class DevicePolicy:
    device: str  # "cpu" or "cuda", "cuda:1"
    dtype: str  # one of DTYPES
    attention: str  # the transformers attention implementation
    token_budget: int  # padded tokens per forward pass
    logits_chunk_tokens: int  # response positions projected to the vocabulary at a time
    statistics_rows: int | None  # logit rows per statistics step; None: the whole chunk
    reuse_cpu_heap: bool

    @property
    def is_cuda(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def torch_dtype(self):
        import torch

        return getattr(torch, self.dtype)

    @classmethod
    def choose(
        cls,
        device: str | None = None,
        dtype: str | None = None,
        token_budget: int | None = None,
        logits_chunk_tokens: int | None = None,
    ) -> DevicePolicy:
        """The policy for `device` (default: CUDA when visible, else CPU) before the student is loaded;
        settings given explicitly win, `auto` or None takes the device's default. `sized_for` then fills
        in the GPU sizes left open (0), which depend on the loaded student and the memory left free."""
        if device is None:
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        cuda = device.startswith("cuda")
        if dtype not in (None, "auto") and dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)} or auto, got {dtype!r}")
        return cls(
            device=device,
            dtype=dtype if dtype not in (None, "auto") else ("bfloat16" if cuda else "float32"),
            attention="sdpa" if cuda else CPU_ATTENTION,
            token_budget=token_budget or (0 if cuda else CPU_TOKEN_BUDGET),
            logits_chunk_tokens=logits_chunk_tokens or (0 if cuda else CPU_LOGITS_CHUNK_TOKENS),
            statistics_rows=None if cuda else CPU_STATISTICS_ROWS,
            reuse_cpu_heap=not cuda,
        )

    def sized_for(self, model) -> DevicePolicy:
        """Fill in the sizes left open (0) from the loaded student and the memory left free on its GPU."""
        if not self.is_cuda:
            return self
        import torch

        config = model.config.get_text_config(decoder=True)
        free_bytes, _ = torch.cuda.mem_get_info(torch.device(self.device))
        itemsize = model.dtype.itemsize
        budget, chunk = self.token_budget, self.logits_chunk_tokens
        if not budget:  # one layer's activations: hidden states, q/k/v/o, the MLP's gate, up and product
            per_token = itemsize * (6 * config.hidden_size + 3 * config.intermediate_size)
            budget = _within(int(GPU_ACTIVATION_FRACTION * free_bytes / per_token) // 1024 * 1024, GPU_TOKEN_BUDGET_RANGE)
        if not chunk:
            chunk = _within(int(GPU_LOGITS_FRACTION * free_bytes / (itemsize * config.vocab_size)), GPU_LOGITS_CHUNK_RANGE)
        rows = max(1, GPU_STATISTICS_BYTES // (8 * config.vocab_size))  # a float32 log-softmax and its exp
        return dataclasses.replace(self, token_budget=budget, logits_chunk_tokens=chunk, statistics_rows=min(rows, chunk))

    def prepare_process(self) -> None:
        """Process-wide settings of the policy (call in processes that score)."""
        if self.reuse_cpu_heap:
            reuse_freed_cpu_memory()

    def describe(self) -> str:
        return (
            f"device {self.device}, {self.dtype}, attention {self.attention}, {self.token_budget} tokens per pass, "
            f"logits {self.logits_chunk_tokens} positions at a time, statistics {self.statistics_rows or 'all'} rows per step"
        )

    def free_memory(self) -> str:
        """The device's free memory, for messages."""
        if not self.is_cuda:
            return "n/a on CPU"
        import torch

        torch.cuda.empty_cache()
        free_bytes, total = torch.cuda.mem_get_info(torch.device(self.device))
        return f"{free_bytes / 2**30:.1f} of {total / 2**30:.1f} GiB free"


def _within(value: int, bounds: tuple[int, int]) -> int:
    return max(bounds[0], min(value, bounds[1]))


def reuse_freed_cpu_memory() -> None:
    """Let glibc serve tensors up to 32 MB from its heap and keep up to 256 MB of freed heap for reuse.

    By default it hands each large tensor fresh pages from the kernel and returns them on free, so every
    forward pass pays page faults on all its activations (measured here: the first pass over 120 GSM8K
    rows 27% slower, later ones 6%; peak memory +4%). Affects the whole process. No-op where the C
    library is not glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    libc.mallopt(m_mmap_threshold, 32 * 2**20)
    libc.mallopt(m_trim_threshold, 256 * 2**20)
