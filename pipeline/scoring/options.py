"""What the scoring core computes, as options with no torch in them: the driver resolves them with the
run's settings (`pipeline.run.settings`) and hands them to every student."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ScoringOptions:
    """What the scoring core computes, on any device (the per-pass sizes are the `DevicePolicy`'s)."""

    rank_clip: int = 100
    metrics: tuple[str, ...] = ("rsr",)  # pipeline.scoring.metrics.METRICS: companion columns beside RSR's
    per_token: bool = False  # also return the per-token clipped ranks and surprisals (debugging)
    share_prompts: bool = True  # run a prompt shared by several trajectories through the body once
    min_shared_prompt: int = 16  # shorter shared prompts are not worth a separate pass
    prompt_cache_tokens: int = 16384  # shared-prompt tokens whose keys and values are held at a time
    logits_dtype: str = "float32"  # float32: vocabulary logits in float32 whatever the model's dtype | model: its dtype
