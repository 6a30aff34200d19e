"""Engine settings (fixed for an engine's life) and ServingConfig (what controllers change)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from helios_rl.models.heads import CONFIDENCE_MEASURES

KV_STRATEGIES = ("recompute", "copy")


@dataclass
class ServingConfig:
    """The control knobs a controller sets at a step boundary. ``None`` keeps the current value.

    - ``model``: name of the active model.
    - ``depth``: number of loaded layers (partial load of layers 0..depth-1).
    - ``max_batch``: cap on running requests (never above what the memory budget admits).
    - ``threshold``: one confidence threshold for every exit layer, ``{layer: threshold}``, or
      ``"calibrated"`` (the model's calibrated thresholds); ``None`` keeps the current one.
    - ``exit_layers``: layers (0-based) where a token may exit; ``()`` disables early exit.
    - ``measure``: confidence measure (max_prob, margin, entropy).
    - ``target``: a calibrated *precision target* (e.g. 0.95: tokens leaving early agree with the
      model's own final layer at that rate on held-out text). It names both the exit layers and
      their thresholds, as ``tune-exits`` calibrated them for the target, so it means the same on
      every model; it replaces ``exit_layers`` and ``threshold``. A model without calibrated
      targets serves a target without early exits. Target 1.0 is no early exit on every model
      (only the final layer is sure to agree with itself).
    """

    model: str | None = None
    depth: int | None = None
    max_batch: int | None = None
    threshold: float | dict[int, float] | str | None = None
    exit_layers: tuple[int, ...] | None = None
    measure: str | None = None
    target: float | None = None

    def merged_over(self, base: "ServingConfig") -> "ServingConfig":
        """This config's set fields over ``base``'s."""
        out = replace(base)
        for k, v in asdict(self).items():
            if v is not None:
                setattr(out, k, v)
        if self.target is not None:  # a target names layers and thresholds itself
            out.threshold, out.exit_layers = None, None
        elif self.threshold is not None or self.exit_layers is not None:
            out.target = None
        return out

    def to_dict(self) -> dict:
        d = asdict(self)
        if isinstance(d["threshold"], dict):
            d["threshold"] = {str(k): v for k, v in d["threshold"].items()}
        if d["exit_layers"] is not None:
            d["exit_layers"] = list(d["exit_layers"])
        return d


@dataclass
class EngineSettings:
    """Fixed engine settings.

    - ``memory_budget_bytes``: resident weights + KV storage must fit; the admissible batch follows.
      ``None``: no budget, ``max_batch`` alone caps the batch.
    - ``max_batch``: upper cap on running requests.
    - ``max_model_len``: tokens of KV storage per request slot (prompt + output).
    - ``kv_strategy``: ``recompute`` (exact) or ``copy`` (CALM-style) KV for skipped layers.
    - ``pending_window``: at most this many positions of a request may wait for deeper-layer KV
      (``recompute``); when full, its next token runs to the last loaded layer.
    - ``max_prefill_tokens``: prompt (and re-prefill) positions run in one step: longer prompts are
      prefilled in chunks over several steps; its activations are counted in the budget.
    - ``exit_replay``: an :class:`~helios_rl.engine.exits.ExitReplay` to replay a measured exit-layer
      distribution instead of deciding by confidence (speed studies on random-weight models only;
      telemetry then says ``exit_mode: "replay"``). ``None``: real, confidence-based exits.
    - ``energy``: read the GPU's NVML energy counter around every step (CUDA with nvidia-ml-py only;
      elsewhere the records carry ``None``).
    """

    memory_budget_bytes: int | None = None
    max_batch: int = 16
    max_model_len: int = 1024
    kv_strategy: str = "recompute"
    pending_window: int = 32
    max_prefill_tokens: int = 1024
    measure: str = "max_prob"
    default_threshold: float = 0.9
    device: str | None = None
    dtype: str | None = None
    exit_replay: Any = None
    energy: bool = True
    extra: dict = field(default_factory=dict)

    def validate(self) -> None:
        if self.kv_strategy not in KV_STRATEGIES:
            raise ValueError(f"kv_strategy must be one of {KV_STRATEGIES}, got {self.kv_strategy!r}")
        if self.measure not in CONFIDENCE_MEASURES:
            raise ValueError(f"measure must be one of {CONFIDENCE_MEASURES}, got {self.measure!r}")
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if self.pending_window < 2:
            raise ValueError(f"pending_window must be >= 2, got {self.pending_window}")
        if self.exit_replay is not None and getattr(self.exit_replay, "mode", None) != "replay":
            raise ValueError(f"exit_replay must be an ExitReplay, got {type(self.exit_replay).__name__}")
        if self.memory_budget_bytes is not None and self.memory_budget_bytes <= 0:
            raise ValueError(f"memory_budget_bytes must be > 0, got {self.memory_budget_bytes}")
