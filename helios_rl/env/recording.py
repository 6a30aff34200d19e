"""Episode records: one JSONL file per episode (a header line, then one line per step), written atomically,
and their replay on a fresh environment (same scenario, backend settings, seed and actions)."""

from __future__ import annotations

import json
from pathlib import Path

from helios_rl.utils.io import atomic_write_text


def write_episode(path: str | Path, rows: list[dict]) -> Path:
    return atomic_write_text(path, "".join(json.dumps(r, default=_plain) + "\n" for r in rows))


def read_episode(path: str | Path) -> tuple[dict, list[dict]]:
    rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    if not rows or not rows[0].get("header"):
        raise ValueError(f"{path}: not an episode record (no header line)")
    return rows[0], rows[1:]


def replay_episode(path: str | Path, **overrides) -> dict:
    """Re-run a recorded episode; returns recorded and replayed rewards and whether they match."""
    from helios_rl.env.env import HeliosServingEnv

    header, steps = read_episode(path)
    kwargs = {**header["kwargs"], **overrides}
    if "thresholds" in kwargs:
        kwargs["thresholds"] = tuple(kwargs["thresholds"])
    env = HeliosServingEnv(header["scenario"], **kwargs)
    try:
        env.reset(seed=header["seed"])
        replayed = []
        for row in steps:
            _, r, term, trunc, _ = env.step(row["action"])
            replayed.append(r)
            if term or trunc:
                break
    finally:
        env.close()
    recorded = [row["reward"] for row in steps]
    return {"recorded": recorded, "replayed": replayed,
            "match": len(recorded) == len(replayed) and all(abs(a - b) <= 1e-9 * max(1, abs(a))
                                                            for a, b in zip(recorded, replayed))}


def _plain(x):
    try:
        return x.item()
    except AttributeError:
        return str(x)
