"""Server benchmark: a seeded, bounded load over loopback, with overload and forced switches.

Starts ``helios-rl serve`` as a subprocess (or uses ``--url``), then drives it with the official
request shapes (completions and chat, half of them streamed) in phases:

1. ``warmup`` (8 closed-loop clients: the controller starts up, HELIOS profiles its candidates), then
   ``capacity``: a closed loop as wide as the server's batch cap measures what the server completes
   per second (its capacity, in requests/s);
2. ``nominal``: Poisson arrivals at 1x capacity;
3. ``overload``: Poisson arrivals at 3x capacity (the bounded queue fills; 429s with Retry-After);
4. ``recovery``: 0.5x capacity, then every accepted request is awaited.

During 2-4 the admin endpoint forces model switches and depth changes (pinned, then released to the
controller). A request is *lost* when it was accepted (HTTP 200) but never completed (no finish
reason / no ``[DONE]``, or fewer tokens than asked: outputs ignore EOS so every request asks for an
exact count). Writes ``summary`` (requests_sent, requests_ok, requests_rejected_429, requests_lost,
server_errors_5xx, decision_p99_ms, switches, ...) plus per-phase figures to ``--out``.

    python benchmarks/server.py --scenario envs/helios-paper.yaml --out /tmp/server.json
    python benchmarks/server.py --model smollm2-135m --out /tmp/server.json
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


@dataclass
class Outcome:
    phase: str
    kind: str  # completion | chat
    stream: bool
    status: int = 0  # 0: no HTTP response
    accepted: bool = False
    completed: bool = False
    tokens: int = 0
    latency_s: float = 0.0
    ttft_s: float | None = None
    error: str | None = None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--scenario", help="scenario YAML (models, budget, controller params, prompts)")
    src.add_argument("--model", help="one model, no scenario")
    p.add_argument("--url", default=None, help="drive a running server instead of starting one")
    p.add_argument("--out", required=True)
    p.add_argument("--controller", default=None, help="default: helios with a scenario, static with --model")
    p.add_argument("--shadow", default="static")
    p.add_argument("--profiles", default="facts", choices=("auto", "facts"),
                   help="serve --profiles (facts: fast start; auto: measured model repository)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-tokens", type=int, default=8, help="tokens per request (short outputs)")
    p.add_argument("--max-queue", type=int, default=16)
    p.add_argument("--concurrency", type=int, default=None,
                   help="closed-loop clients of the capacity phase (default: the server's batch cap, at most 64)")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every phase duration")
    p.add_argument("--max-inflight", type=int, default=512, help="client-side bound on open requests")
    p.add_argument("--drain-timeout", type=float, default=150.0)
    return p.parse_args(argv)


def load_prompts(args: argparse.Namespace) -> list[tuple[str, bool]]:
    """(text, is_chat) pairs from the scenario's workload (or a default mix), seeded."""
    from helios_rl.workload.spec import WorkloadSpec
    from helios_rl.workload.workload import build_workload

    if args.scenario:
        from helios_rl.scenario import Scenario

        spec = Scenario.from_yaml(args.scenario).workload
    else:
        spec = WorkloadSpec.from_dict({"arrival": {"kind": "poisson", "rate": 1.0}, "num_requests": 64,
                                       "max_prompt_tokens": 96, "split": "heldout"})
    spec = replace(spec, num_requests=96, seed=args.seed, duration_s=None)
    return [(r.prompt_text, r.chat) for r in build_workload(spec)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: argparse.Namespace, out_dir: Path) -> tuple[subprocess.Popen, str, Path]:
    port = free_port()
    controller = args.controller or ("helios" if args.scenario else "static")
    cmd = [sys.executable, "-m", "helios_rl.cli", "serve", *([args.scenario] if args.scenario else ["--model", args.model]),
           "--controller", controller, "--port", str(port), "--max-queue", str(args.max_queue),
           "--log-level", "warning", "--shadow-log", str(out_dir / "shadow.jsonl")]
    if args.shadow:
        cmd += ["--shadow", args.shadow]
    if args.scenario:
        cmd += ["--profiles", args.profiles]
    log = out_dir / "server.log"
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    while time.monotonic() - t0 < 600:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}; see {log}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url, log
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"server did not come up in 600 s; see {log}")


async def one(h: httpx.AsyncClient, prompt: tuple[str, bool], stream: bool, phase: str, max_tokens: int,
              model: str) -> Outcome:
    text, chat = prompt
    out = Outcome(phase, "chat" if chat else "completion", stream)
    body: dict = {"model": model, "max_tokens": max_tokens, "ignore_eos": True, "stream": stream}
    if chat:
        body["messages"] = [{"role": "user", "content": text}]
    else:
        body["prompt"] = text
    path = "/v1/chat/completions" if chat else "/v1/completions"
    t0 = time.perf_counter()
    try:
        if not stream:
            r = await h.post(path, json=body)
            out.status, out.accepted = r.status_code, r.status_code == 200
            if out.accepted:
                data = r.json()
                out.tokens = data["usage"]["completion_tokens"]
                out.completed = data["choices"][0]["finish_reason"] in ("length", "stop") and out.tokens == max_tokens
        else:
            async with h.stream("POST", path, json=body) as r:
                out.status, out.accepted = r.status_code, r.status_code == 200
                if not out.accepted:
                    await r.aread()
                else:
                    finish, done = None, False
                    async for line in r.aiter_lines():
                        if not line.startswith("data: "):
                            continue
                        if line == "data: [DONE]":
                            done = True
                            break
                        chunk = json.loads(line[6:])
                        if "error" in chunk:
                            out.error = chunk["error"]["message"]
                            break
                        ch = chunk["choices"][0]
                        piece = ch.get("text") if not chat else (ch.get("delta") or {}).get("content")
                        if piece and out.ttft_s is None:
                            out.ttft_s = time.perf_counter() - t0
                        finish = ch.get("finish_reason") or finish
                    out.completed = done and finish in ("length", "stop")
    except (httpx.HTTPError, json.JSONDecodeError, KeyError) as exc:
        out.error = f"{type(exc).__name__}: {exc}"
    out.latency_s = time.perf_counter() - t0
    return out


class Load:
    """Open- and closed-loop request generation with a client-side bound on open requests."""

    def __init__(self, h: httpx.AsyncClient, prompts: list[tuple[str, bool]], args: argparse.Namespace, model: str):
        self.h, self.prompts, self.args, self.model = h, prompts, args, model
        self.rng = np.random.default_rng(args.seed)
        self.sem = asyncio.Semaphore(args.max_inflight)
        self.tasks: list[asyncio.Task] = []
        self.dropped = 0

    def _launch(self, phase: str) -> asyncio.Task | None:
        if self.sem.locked():
            self.dropped += 1
            return None
        prompt = self.prompts[int(self.rng.integers(len(self.prompts)))]
        stream = bool(self.rng.random() < 0.5)

        async def run() -> Outcome:
            async with self.sem:
                return await one(self.h, prompt, stream, phase, self.args.max_tokens, self.model)
        task = asyncio.create_task(run())
        self.tasks.append(task)
        return task

    async def closed(self, phase: str, clients: int, seconds: float) -> float:
        """``clients`` loops sending back to back for ``seconds``; returns completed requests/s."""
        end = time.perf_counter() + seconds
        done = 0

        async def client() -> None:
            nonlocal done
            while time.perf_counter() < end:
                task = self._launch(phase)
                if task is None:
                    await asyncio.sleep(0.05)
                    continue
                res = await task
                done += res.completed
                if res.status == 429:
                    await asyncio.sleep(0.5)
        t0 = time.perf_counter()
        await asyncio.gather(*[client() for _ in range(clients)])
        return done / max(time.perf_counter() - t0, 1e-9)

    async def open(self, phase: str, rate: float, seconds: float) -> None:
        """Poisson arrivals at ``rate``/s for ``seconds`` (seeded gaps)."""
        end = time.perf_counter() + seconds
        while True:
            await asyncio.sleep(float(self.rng.exponential(1.0 / rate)))
            if time.perf_counter() >= end:
                return
            self._launch(phase)


async def forced_changes(h: httpx.AsyncClient, scale: float, t0: float, log: list[dict]) -> None:
    """Forced switches and depth changes (seconds after the nominal phase starts), each relative to the
    config in force at that moment: switch to another candidate at half depth (pinned), load a quarter
    more layers, switch again at two thirds depth, then release the pin (the controller decides again)."""
    plan = [(12, "switch", 1 / 2), (36, "deeper", 1 / 4), (62, "switch", 2 / 3), (74, "release", 0.0)]
    for at, kind, frac in plan:
        await asyncio.sleep(max(0.0, t0 + at * scale - time.perf_counter()))
        st = (await h.get("/admin/config")).json()
        model, depth, layers = st["config"]["model"], st["config"]["depth"], st["num_layers"]
        others = [m for m in st["models"] if m != model]
        if kind == "switch":  # with one model, a depth change stands in for the switch
            target = others[0] if others else model
            body = {"model": target, "depth": max(1, int(layers[target] * frac)), "pin": True}
        elif kind == "deeper":
            body = {"depth": min(layers[model], depth + max(1, int(layers[model] * frac)))}
        else:  # the controller decides again from here
            body = {"pin": False}
        t = time.perf_counter()
        r = await h.post("/admin/config", json=body, timeout=600)
        log.append({"at_s": round(t - t0, 2), "from": {"model": model, "depth": depth}, "body": body,
                    "status": r.status_code, "apply_s": round(time.perf_counter() - t, 3),
                    "config": r.json().get("config") if r.status_code == 200 else r.json()})


def scrape(url: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=30).text):
        for s in fam.samples:
            out[s.name] = out.get(s.name, 0.0) + s.value
    return out


def pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 4) if values else None


async def drive(url: str, args: argparse.Namespace) -> dict:
    prompts = load_prompts(args)
    limits = httpx.Limits(max_connections=args.max_inflight, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(args.drain_timeout + 300), limits=limits) as h:
        state = (await h.get("/admin/config")).json()
        alias = (await h.get("/v1/models")).json()["data"][0]["id"]  # the served name: the controller picks
        load = Load(h, prompts, args, alias)
        s = args.scale
        phases: dict[str, dict] = {}
        t = time.perf_counter()
        await load.closed("warmup", 8, 15 * s)  # the controller's start-up (HELIOS profiles its candidates)
        phases["warmup"] = {"seconds": round(time.perf_counter() - t, 2), "rate_rps": None, "clients": 8}
        state = (await h.get("/admin/config")).json()
        clients = args.concurrency or min(64, max(1, state["effective_max_batch"]))  # saturate the batch
        t = time.perf_counter()
        capacity = max(0.2, await load.closed("capacity", clients, 20 * s))
        phases["capacity"] = {"seconds": round(time.perf_counter() - t, 2), "rate_rps": None, "clients": clients}
        changes: list[dict] = []
        t0 = time.perf_counter()
        forced = asyncio.create_task(forced_changes(h, s, t0, changes))
        for name, mult, seconds in (("nominal", 1.0, 25 * s), ("overload", 3.0, 30 * s), ("recovery", 0.5, 30 * s)):
            t = time.perf_counter()
            await load.open(name, capacity * mult, seconds)
            phases[name] = {"seconds": round(time.perf_counter() - t, 2), "rate_rps": round(capacity * mult, 3)}
        await forced
        t = time.perf_counter()
        done, pending = await asyncio.wait(load.tasks, timeout=args.drain_timeout)
        for task in pending:
            task.cancel()
        drain_s = time.perf_counter() - t
        results = [task.result() for task in done if not task.cancelled()]
        unfinished = len(pending)
        control = (await h.get("/admin/controller")).json()
    metrics = scrape(url)
    return {"prompts": len(prompts), "capacity_rps": round(capacity, 3), "phases": phases, "changes": changes,
            "results": results, "unfinished": unfinished, "drain_s": round(drain_s, 2), "control": control,
            "metrics": metrics, "dropped_client_side": load.dropped}


def summarize(run: dict, args: argparse.Namespace) -> dict:
    res: list[Outcome] = run["results"]
    ok = [r for r in res if r.accepted and r.completed]
    lost = [r for r in res if r.accepted and not r.completed]
    by_phase = {}
    for name in ("warmup", "capacity", "nominal", "overload", "recovery"):
        rs = [r for r in res if r.phase == name]
        good = [r for r in rs if r.completed]
        by_phase[name] = {**run["phases"].get(name, {}), "sent": len(rs), "ok": len(good),
                          "rejected_429": sum(r.status == 429 for r in rs),
                          "latency_p50_s": pct([r.latency_s for r in good], 50),
                          "latency_p99_s": pct([r.latency_s for r in good], 99),
                          "stream_ttft_p50_s": pct([r.ttft_s for r in good if r.ttft_s is not None], 50)}
    m, c = run["metrics"], run["control"]
    summary = {
        "requests_sent": len(res) + run["unfinished"],
        "requests_ok": len(ok),
        "requests_rejected_429": sum(r.status == 429 for r in res),
        "requests_lost": len(lost) + run["unfinished"],
        "server_errors_5xx": sum(r.status >= 500 for r in res),
        "other_4xx": sum(400 <= r.status < 500 and r.status != 429 for r in res),
        "client_errors": sum(r.status == 0 for r in res),
        "decision_p99_ms": c["decide_ms"]["p99"], "decision_p50_ms": c["decide_ms"]["p50"],
        "decision_max_ms": c["decide_ms"]["max"], "decision_cpu_p99_ms": c["decide_cpu_ms"]["p99"],
        "decisions": c["decisions"], "fallbacks": c["fallbacks"],
        "switches": int(m.get("helios_model_switches_total", 0)),
        "layer_loads": int(m.get("helios_layer_loads_total", 0)),
        "forced_changes_ok": sum(ch["status"] == 200 for ch in run["changes"]),
        "forced_changes": len(run["changes"]),
        "capacity_rps": run["capacity_rps"],
        "generated_tokens": int(m.get("helios_generation_tokens_total", 0)),
    }
    return {"summary": summary, "phases": by_phase, "changes": run["changes"], "controller": c,
            "lost_examples": [asdict(r) for r in lost[:10]], "drain_s": run["drain_s"],
            "dropped_client_side": run["dropped_client_side"], "prompts": run["prompts"]}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = out.with_suffix("")
    work.mkdir(parents=True, exist_ok=True)
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    proc, url, log = (None, args.url, None) if args.url else start_server(args, work)
    startup = time.perf_counter() - t0
    try:
        run = asyncio.run(drive(url, args))
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)  # graceful: uvicorn drains, the lifespan stops the engine
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    report = summarize(run, args)
    shadow = work / "shadow.jsonl"
    report.update({
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "gpu": None,
                    "load_avg_start": [round(x, 2) for x in load0],
                    "load_avg_end": [round(x, 2) for x in os.getloadavg()]},
        "startup_s": round(startup, 2), "wall_s": round(time.perf_counter() - t0, 2),
        "shadow_log_records": sum(1 for _ in shadow.open()) if shadow.exists() else 0,
        "server_log": str(log) if log else None, "args": vars(args)})
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report["summary"], indent=2))
    return 0 if report["summary"]["requests_lost"] == 0 and report["summary"]["server_errors_5xx"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
