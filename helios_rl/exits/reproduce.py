"""Reproduce a heads folder (by default the heads shipped for a bundled model) from its manifest.

The manifest records everything that shaped the heads: settings, seed, data split, the batch-1 cost
table the layer selection used, threads and the git revision. A reproduction reruns ``tune_exits``
with those settings and that cost table (so a faster or busier machine does not change the selection)
and compares, per precision target, the selected exit layers (must be equal) and the calibrated
thresholds and held-out exit rates (must agree within ``tolerance``). Thresholds are observed
confidences on held-out tokens: a last-bit difference in training (another BLAS, other threads) can
move one to a neighbouring observed value, which the tolerance allows.
"""

from __future__ import annotations

from pathlib import Path

from helios_rl.exits.heads_io import read_manifest

TOLERANCE = 0.02  # absolute, on max-probability thresholds and held-out exit rates


def settings_from_manifest(manifest: dict):
    """The :class:`TuneSettings` a manifest was made with, including its cost table."""
    from helios_rl.exits.tune import TuneSettings

    raw = dict(manifest.get("settings") or {})
    if not raw:
        raise ValueError("manifest has no 'settings': it cannot be reproduced")
    known = set(TuneSettings.__dataclass_fields__)
    kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in raw.items() if k in known}
    kw["costs"] = {k: v for k, v in (manifest.get("costs_ms") or {}).items()}
    return TuneSettings(**kw)


def compare(shipped: dict, new: dict, tolerance: float = TOLERANCE) -> dict:
    """Per target: layers equal, largest threshold and exit-rate differences; ``ok`` overall."""
    rows, ok = {}, True
    for key, a in shipped.get("targets", {}).items():
        b = new.get("targets", {}).get(key)
        if b is None:
            rows[key] = {"ok": False, "reason": "target missing from the reproduction"}
            ok = False
            continue
        same_layers = a["layers"] == b["layers"]
        ta, tb = a["thresholds"].get("max_prob", {}), b["thresholds"].get("max_prob", {})
        dthr = max((abs(ta[k] - tb[k]) for k in ta if k in tb), default=0.0)
        drate = abs(a["heldout"]["exit_rate"] - b["heldout"]["exit_rate"])
        good = same_layers and dthr <= tolerance and drate <= tolerance
        ok &= good
        rows[key] = {"ok": good, "layers": a["layers"], "reproduced_layers": b["layers"],
                     "max_threshold_diff": round(dthr, 5), "exit_rate_diff": round(drate, 5)}
    return {"ok": ok, "tolerance": tolerance, "targets": rows}


def reproduce(model, source: str | Path, out: str | Path, tolerance: float = TOLERANCE, progress: bool = True,
              feature_cache: str | None = None) -> dict:
    """Rerun ``tune_exits`` from ``source``'s manifest into ``out`` and compare (see module docstring)."""
    from helios_rl.exits.tune import tune_exits

    shipped = read_manifest(source)
    settings = settings_from_manifest(shipped)
    new = tune_exits(model, settings, out=str(out), progress=progress, feature_cache=feature_cache)
    result = compare(shipped, new, tolerance)
    result.update(source=str(source), out=str(out), seed=settings.seed)
    return result
