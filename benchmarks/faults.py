"""Benchmark: the server under faults, driven over loopback with the fault-injection hooks of a test flag.

Starts ``helios-rl serve``'s app on 127.0.0.1 (the embedded default scenario: SmolLM2-135M and
Gemma3-270M under a 1 GiB budget, static controller, changes forced through ``/admin/config``),
keeps it under load from concurrent clients, and walks a sequence of changes and injected faults:
batch-cap, depth and model changes; a switch whose load runs out of memory, one whose weights file
is truncated, one whose file is missing; a pool resize that runs out of memory; a decoder layer that
raises; a switch after which the previous model cannot be reloaded either (the engine is unavailable
until it recovers). Then 200 streaming clients disconnect mid-stream.

``summary``:

* ``requests_lost``: accepted (HTTP 200 or a started stream), then neither completed nor answered
  with an error (goal 0);
* ``recovered_after_failed_switch``: after every injected failure, requests complete on the config
  that was serving before it;
* ``health_truthful``: ``/health`` answered 503 while the engine could not serve and 200 after it
  recovered;
* ``peak_over_budget``: the engine's largest footprint at any config change (weights, exit heads,
  KV pool, pending rings; transients of a pool resize included), over the budget, minus 1 (goal <= 0.05);
* ``disconnect_leaks``: slots and queue places still held after 200 clients disconnected mid-stream;
* ``long_prompt_prefill_peak_ratio``: the process's peak resident memory growth while prefilling a
  2,048-token prompt with chunked prefill (256 tokens a step) over the same without chunking (each
  measured in a fresh process; goal <= 0.5).

    python benchmarks/faults.py --out faults.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

PREFILL_PROBE = r"""
import json, sys, torch
torch.set_num_threads(1)
from helios_rl.engine import Engine, EngineSettings, SamplingParams
from helios_rl.models.registry import load_model

def status(key):  # kB, from /proc/self/status
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])

chunk = int(sys.argv[1])
model = load_model("smollm2-135m", heads="shared", progress=False)
eng = Engine(model, EngineSettings(max_batch=1, max_model_len=2304, max_prefill_tokens=chunk))
prompt = list(range(100, 100 + 2048))
eng.generate([[5]], SamplingParams(max_new_tokens=1))  # warm-up: allocator and kernels
open("/proc/self/clear_refs", "w").write("5")  # reset the peak resident set (VmHWM) to the current one
base = status("VmRSS")
eng.generate([prompt], SamplingParams(max_new_tokens=1, ignore_eos=True))
print(json.dumps({"chunk": chunk, "peak_growth_kib": status("VmHWM") - base, "rss_before_kib": base,
                  "prefill_steps": sum(1 for s in eng.telemetry.steps if s.prefill_tokens)}))
"""


class Load:
    """Concurrent clients sending short completions until stopped; every outcome is counted."""

    def __init__(self, url: str, clients: int = 6) -> None:
        self.url, self.stop = url, threading.Event()
        self.counts = {"sent": 0, "completed": 0, "error_answer": 0, "refused": 0, "lost": 0}
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)]

    def _bump(self, key: str) -> None:
        with self.lock:
            self.counts[key] += 1

    def _run(self, i: int) -> None:
        with httpx.Client(timeout=120) as c:
            k = 0
            while not self.stop.is_set():
                k += 1
                self._bump("sent")
                try:
                    r = c.post(f"{self.url}/v1/completions", json={"model": "default", "prompt": f"Story {i}.{k}:",
                                                                  "max_tokens": 12, "ignore_eos": True})
                except httpx.HTTPError:
                    self._bump("lost")  # no answer at all
                    continue
                if r.status_code == 200:
                    self._bump("completed")
                elif r.status_code in (429, 503) and "error" in r.json():
                    self._bump("refused")
                    time.sleep(0.2)
                elif "error" in r.json():
                    self._bump("error_answer")
                else:
                    self._bump("lost")

    def __enter__(self) -> "Load":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=180)


def admin(url: str, **body) -> httpx.Response:
    return httpx.post(f"{url}/admin/config", json=body, timeout=300)


def completes(url: str) -> bool:
    r = httpx.post(f"{url}/v1/completions", json={"model": "default", "prompt": "Check:", "max_tokens": 4,
                                                  "ignore_eos": True}, timeout=120)
    return r.status_code == 200


def prefill_probe(chunk: int) -> dict:
    out = subprocess.run([sys.executable, "-c", PREFILL_PROBE, str(chunk)], capture_output=True, text=True,
                         timeout=900)
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--scenario", default="default")
    ap.add_argument("--disconnects", type=int, default=200)
    ap.add_argument("--prefill-only", action="store_true", help="only the chunked-prefill memory probe")
    args = ap.parse_args(argv)
    if args.prefill_only:
        chunked, whole = prefill_probe(256), prefill_probe(4096)
        print(json.dumps({"chunked": chunked, "whole": whole,
                          "ratio": chunked["peak_growth_kib"] / max(whole["peak_growth_kib"], 1)}, indent=2))
        return 0
    from helios_rl.scenario import load_scenario
    from helios_rl.server import BackgroundServer, ServerSettings, create_app, runtime_from_scenario
    from helios_rl.utils.provenance import git_revision

    sc = load_scenario(args.scenario)
    settings = ServerSettings(served_name="default", interval_s=sc.backend.interval_s, fault_injection=True,
                              torch_threads=1, max_queue=32)
    rt = runtime_from_scenario(sc.path, "static", None, settings, profiles="facts", say=lambda s: None)
    budget = sc.engine.memory_budget_bytes
    steps: list[dict] = []
    health: list[tuple[str, int]] = []
    recovered: list[bool] = []

    def note(what: str, r: httpx.Response | None = None, **extra) -> None:
        steps.append({"t": round(time.perf_counter() - t0, 2), "step": what,
                      "status": None if r is None else r.status_code,
                      "answer": None if r is None else r.text[:300], **extra})
        print(f"{steps[-1]['t']:7.1f}s {what}: {steps[-1]['status']}", file=sys.stderr, flush=True)

    def fault(**spec) -> None:
        r = httpx.post(f"{url}/admin/faults", json=spec, timeout=60)
        note(f"arm {spec}", r)

    t0 = time.perf_counter()
    with BackgroundServer(create_app(rt)) as url:
        with Load(url) as load:
            time.sleep(2)
            for body in ({"max_batch": 4}, {"max_batch": 24}, {"depth": 15}, {"depth": 30}, {"max_batch": 8},
                         {"model": "gemma3-270m", "depth": 9}, {"model": "smollm2-135m", "depth": 30}):
                note(f"change {body}", admin(url, **body))
                time.sleep(1)
            for kind in ("oom", "truncated", "missing"):  # a switch that fails while loading
                before = rt.loop.state.model
                fault(fault="load", model="gemma3-270m", kind=kind)
                note(f"switch with {kind}", admin(url, model="gemma3-270m", depth=9))
                ok = completes(url) and rt.loop.state.model == before
                recovered.append(ok)
                health.append(("after failed switch", httpx.get(f"{url}/health").status_code))
            fault(fault="pool_oom")
            note("batch change with pool OOM", admin(url, max_batch=20))
            recovered.append(completes(url))
            fault(fault="layer", layer=3, times=2)
            time.sleep(2)
            recovered.append(completes(url))
            # the previous model cannot be reloaded either: unavailable until recovery succeeds
            fault(fault="load", model="gemma3-270m", kind="oom")
            fault(fault="load", model="smollm2-135m", kind="missing", times=2)
            note("unrecoverable switch", admin(url, model="gemma3-270m", depth=9))
            h = httpx.get(f"{url}/health")
            health.append(("unavailable", h.status_code))
            note("health while unavailable", h)
            deadline = time.time() + 120
            while httpx.get(f"{url}/health").status_code != 200 and time.time() < deadline:
                time.sleep(0.2)
            health.append(("recovered", httpx.get(f"{url}/health").status_code))
            recovered.append(completes(url))
            time.sleep(2)
        counts = dict(load.counts)
        # 200 clients that disconnect mid-stream
        def disconnect(i: int) -> None:
            with httpx.Client(timeout=120) as c:
                with c.stream("POST", f"{url}/v1/completions", json={"model": "default", "prompt": f"Tale {i}",
                                                                      "max_tokens": 200, "stream": True,
                                                                      "ignore_eos": True}) as r:
                    for line in r.iter_lines():
                        if line.startswith("data: {"):
                            break  # gone after the first chunk
        threads = [threading.Thread(target=disconnect, args=(i,)) for i in range(args.disconnects)]
        for i, t in enumerate(threads):
            t.start()
            if i % 20 == 19:
                time.sleep(0.5)
        for t in threads:
            t.join(timeout=300)
        deadline = time.time() + 120
        while (rt.loop.outstanding or rt.loop.state.unavailable) and time.time() < deadline:
            time.sleep(0.2)
        leaks = rt.loop.outstanding + len(rt.loop.engine.running) + len(rt.loop.engine.waiting)
        peak = rt.loop.engine.telemetry.memory_peak
    chunked, whole = prefill_probe(256), prefill_probe(4096)
    ratio = chunked["peak_growth_kib"] / max(whole["peak_growth_kib"], 1)
    truthful = (all(code == 200 for what, code in health if what != "unavailable")
                and any(what == "unavailable" and code == 503 for what, code in health))
    summary = {"requests_lost": counts["lost"], "recovered_after_failed_switch": all(recovered) and bool(recovered),
               "health_truthful": truthful, "peak_over_budget": round(max(0.0, peak / budget - 1.0), 4),
               "peak_bytes": peak, "budget_bytes": budget, "disconnect_leaks": leaks,
               "long_prompt_prefill_peak_ratio": round(ratio, 4), "load": counts}
    out = {"summary": summary, "steps": steps, "health": health, "recovered": recovered,
           "prefill": {"chunked": chunked, "whole": whole},
           "setup": {"scenario": sc.path, "machine": f"{platform.processor() or platform.machine()}",
                     "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                     "git_revision": git_revision(), "command": "python " + " ".join(sys.argv)}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0 if counts["lost"] == 0 and leaks == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
