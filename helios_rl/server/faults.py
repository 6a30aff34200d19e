"""Fault injection for tests and ``benchmarks/faults.py`` only: present when the server is started with
``ServerSettings.fault_injection`` (``helios-rl serve --enable-fault-injection``), absent otherwise.

``POST /admin/faults`` arms one fault, which fires on the next matching operation:

* ``load``: the next load of ``model`` raises (``oom``: out of memory; ``missing``: a file not found;
  ``truncated``: a safetensors read past the end), ``times`` times in a row (so a rollback's reload
  of the previous model can be made to fail too);
* ``pool_oom``: the next KV-pool resize runs out of memory half-way through its layers;
* ``layer``: layer ``layer`` of the active model raises in its next ``times`` forward passes.
"""

from __future__ import annotations

from typing import Any

from helios_rl.engine.kv_cache import KVPool

ERRORS = {"oom": lambda m: RuntimeError(f"CPU out of memory while loading {m} (injected)"),
          "missing": lambda m: FileNotFoundError(f"{m}/model.safetensors: no such file (injected)"),
          "truncated": lambda m: OSError(f"{m}/model.safetensors: incomplete metadata, file not fully covered "
                                          f"(injected truncation)")}


class FaultInjector:
    def __init__(self) -> None:
        self.loads: dict[str, list[str]] = {}
        self.fired: list[dict] = []

    def wrap_loader(self, loader):
        def load(name: str, depth: int | None = None):
            queue = self.loads.get(name)
            if queue:
                kind = queue.pop(0)
                self.fired.append({"fault": "load", "model": name, "kind": kind})
                raise ERRORS[kind](name)
            return loader(name, depth)
        for attr in ("validate",):
            if hasattr(loader, attr):
                setattr(load, attr, getattr(loader, attr))
        return load

    def arm(self, engine, spec: dict[str, Any]) -> dict:
        """Arm ``spec`` (runs on the engine thread)."""
        fault = spec.get("fault")
        times = int(spec.get("times", 1))
        if fault == "load":
            kind = spec.get("kind", "oom")
            if kind not in ERRORS:
                raise ValueError(f"kind must be one of {sorted(ERRORS)}, got {kind!r}")
            self.loads.setdefault(str(spec["model"]), []).extend([kind] * times)
        elif fault == "pool_oom":
            pool = engine.pool
            real = KVPool._moved
            state = {"n": 0}

            def flaky(old, num_slots, src, dst, _pool=pool):
                state["n"] += 1
                if state["n"] == 2:
                    del _pool._moved  # fires once
                    self.fired.append({"fault": "pool_oom"})
                    raise RuntimeError("CPU out of memory allocating the KV pool (injected)")
                return real(_pool, old, num_slots, src, dst)
            pool._moved = flaky
        elif fault == "layer":
            layer = engine.model.family.layers[int(spec.get("layer", 0))]
            state = {"left": times}
            real_forward = layer.forward

            def broken(*a, **k):
                if state["left"] > 0:
                    state["left"] -= 1
                    if state["left"] == 0:
                        layer.forward = real_forward
                    self.fired.append({"fault": "layer"})
                    raise RuntimeError("exception in a decoder layer (injected)")
                return real_forward(*a, **k)
            layer.forward = broken
        else:
            raise ValueError(f"fault must be load, pool_oom or layer, got {fault!r}")
        return {"armed": spec}
