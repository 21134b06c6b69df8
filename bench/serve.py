"""Serving under concurrency: gemma3-serve against llama.cpp's OpenAI server on the real Gemma 3 270M.

    python -m bench.serve [--clients 1,2,4,8] [--max-tokens 128] [--rounds 2] [--precisions int8-head4-fast,int8]
    python -m bench.serve --clients 1,2 --max-tokens 32 --rounds 1 --quiet-wait 0 --out /tmp/serve-smoke.json

Every server is started once as a subprocess with 2 threads and warmed up with one request. Then, per round and
per concurrency N, each server in turn gets N simultaneous streaming `/v1/completions` clients
(`bench.serve_client`, the same code and request bodies for every server); the server order is reversed every
other round so that drift on this shared machine cancels in the per-round ratios. Writes
bench/results/serve.json and prints per-round figures, a summary table, the ratios ours/llama.cpp and our
scaling (aggregate at the most clients over the single-stream rate).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench import ours
from bench.common import THREADS, _cpu_ticks, child_env, peers_python, wait_until_quiet
from bench.serve_client import percentile, request_body, run_clients, summarize

RESULTS = Path(__file__).resolve().parent / "results"
MODEL_ID = "bench"  # both servers answer to this name, so the request bodies are byte-identical
LLAMA = "llama.cpp"
SEED = 1234
SCALING_TARGET = 3.0  # aggregate at 8 clients >= 3x our single stream, once the batching engine lands
START_TIMEOUT_S = 300.0
PROMPT_BUDGET = 96  # tokens of prompt(i) at most (75 with Gemma's tokenizer, bos included)


def prompt(index: int) -> str:
    """Client `index`'s prompt: a count the 270M base model continues greedily without ending it (no eos in
    128 tokens). A letter first so that the prompts differ from their first token on: llama-cpp-python reuses
    the longest common prefix of its one context's previous sequence, which identical prompts would turn into
    skipped prefills. Same token length for every index < 26."""
    return (f"Sequence {chr(ord('A') + index % 26)}. The whole numbers from 1 to 1000, in order: "
            + ", ".join(str(n) for n in range(1, 17)) + ",")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _proc_ticks(pid: int) -> int:
    """utime + stime of process `pid` (all its threads), USER_HZ; 0 when gone."""
    try:
        return sum(int(x) for x in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[11:13])
    except (OSError, ValueError):
        return 0


def _vm_hwm_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


@dataclass
class Server:
    """A server subprocess: `cmd` must listen on `port`; it is ready when GET `ready_path` answers 200."""

    name: str
    cmd: list[str]
    port: int
    ready_path: str
    settings: dict[str, Any] = field(default_factory=dict)
    proc: subprocess.Popen | None = None
    log: Path | None = None
    load_s: float | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        fd, name = tempfile.mkstemp(prefix=f"bench-serve-{self.port}-", suffix=".log")
        os.close(fd)
        self.log = Path(name)
        t0 = time.perf_counter()
        with self.log.open("wb") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, env=child_env(),
                                         cwd=tempfile.gettempdir())  # not the repo: nothing there shadows a module
        while time.perf_counter() - t0 < START_TIMEOUT_S:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + self.ready_path, timeout=2).status_code == 200:
                    self.load_s = round(time.perf_counter() - t0, 2)
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"{self.name} not ready after {START_TIMEOUT_S:.0f} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:]) if self.log else ""

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()  # both shut down on SIGTERM (uvicorn)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def our_server(precision: str, gguf: Path, max_batch: int) -> Server:
    folder = ours.export_dir(precision, gguf)
    port = free_port()
    cmd = [str(Path(sys.executable).with_name("gemma3-serve")), "--model", str(folder), "--threads", str(THREADS),
           "--max-batch", str(max_batch), "--port", str(port), "--served-model-name", MODEL_ID]
    return Server(f"ours {precision}", cmd, port, "/health",
                  {"export": str(folder), "threads": THREADS, "max_batch": max_batch})


def llama_server(gguf: Path, n_ctx: int) -> Server:
    """llama-cpp-python's server with what batching it has. It holds one llama_context with one sequence and
    serves one request at a time behind a lock (no n_parallel / continuous batching in 0.3.36), so: n_ctx for
    all clients' prompts + answers anyway (the brief's 8 x (prompt + max_tokens); one sequence uses its part),
    n_batch = n_ubatch = 512 (a whole prompt per decode call), logits_all off (the server's default is on, which
    computes the 262k-wide logits of every prompt token), interrupt_requests off (on, its default, a new
    request ends the running stream early), its prompt cache off (default)."""
    port = free_port()
    settings = {"n_threads": THREADS, "n_threads_batch": THREADS, "n_ctx": n_ctx, "n_batch": 512, "n_ubatch": 512,
                "logits_all": False, "interrupt_requests": False, "flash_attn": False, "cache": False}
    cmd = [str(peers_python()), "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", MODEL_ID,
           "--host", "127.0.0.1", "--port", str(port), "--verbose", "False"]
    for key, value in settings.items():
        cmd += [f"--{key}", str(value)]
    return Server(LLAMA, cmd, port, "/v1/models", settings)


def measure(server: Server, clients: int, max_tokens: int) -> dict[str, Any]:
    """`clients` simultaneous streams (client i gets prompt(i)); the share of the machine other processes used."""
    bodies = [request_body(MODEL_ID, prompt(i), max_tokens, SEED) for i in range(clients)]
    assert server.proc is not None
    pid = server.proc.pid
    busy0, own0 = _cpu_ticks()
    srv0, wall0 = _proc_ticks(pid), time.perf_counter()
    streams = run_clients(server.url, bodies)
    busy1, own1 = _cpu_ticks()
    srv1, wall = _proc_ticks(pid), time.perf_counter() - wall0
    capacity = wall * os.sysconf("SC_CLK_TCK") * (os.cpu_count() or 1)
    out = summarize(streams)
    out["server_cpu_share"] = round((srv1 - srv0) / capacity, 3) if capacity else None
    foreign = (busy1 - busy0) - (own1 - own0) - (srv1 - srv0)  # not the server, not our clients
    out["foreign_cpu_share"] = round(max(0, foreign) / capacity, 3) if capacity else None
    return out


def _fmt(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def summary(rounds: list[dict], names: list[str], clients: list[int]) -> dict[str, Any]:
    """Per concurrency and server: median aggregate tok/s over rounds, TTFT / ITL percentiles over every
    round's streams, tokens per client; the per-round ratios ours/llama.cpp of the aggregate rate."""
    table: dict[str, Any] = {}
    for n in clients:
        row: dict[str, Any] = {}
        for name in names:
            runs = [r["results"][str(n)][name] for r in rounds]
            ttft = [v for run in runs for v in run["ttft_ms"]]
            row[name] = {
                "aggregate_tok_s": statistics.median(run["aggregate_tok_s"] or 0 for run in runs),
                "aggregate_per_round": [run["aggregate_tok_s"] for run in runs],
                "ttft_p50_ms": percentile(ttft, 50), "ttft_p95_ms": percentile(ttft, 95),
                # ITL percentiles: the median of the rounds' own (each pools all its clients' gaps)
                "itl_p50_ms": _median(run["itl_p50_ms"] for run in runs),
                "itl_p95_ms": _median(run["itl_p95_ms"] for run in runs),
                "tokens_min": min(min(run["tokens_per_client"]) for run in runs),
                "tokens_max": max(max(run["tokens_per_client"]) for run in runs),
                "errors": sum(len(run["errors"]) for run in runs),
            }
            if LLAMA in names and name != LLAMA:
                ratios = [ours_r / llama_r for ours_r, llama_r in zip(
                    row[name]["aggregate_per_round"], [r["results"][str(n)][LLAMA]["aggregate_tok_s"] for r in rounds])
                    if ours_r and llama_r]
                row[name]["ratio_vs_llama_per_round"] = ratios
                row[name]["ratio_vs_llama"] = statistics.median(ratios) if ratios else None
        table[str(n)] = row
    return table


def _median(values: Any) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def print_table(table: dict[str, Any], names: list[str]) -> None:
    head = ("clients", "server", "agg tok/s", "TTFT p50 ms", "TTFT p95 ms", "ITL p50 ms", "ITL p95 ms",
            "tokens/client", f"ours/{LLAMA}")
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for n, row in table.items():
        for name in names:
            r = row[name]
            tokens = str(r["tokens_min"])
            if r["tokens_max"] != r["tokens_min"]:
                tokens += f"-{r['tokens_max']}"
            if r["errors"]:
                tokens += f" ({r['errors']} errors)"
            ratio = r.get("ratio_vs_llama")
            cells = (n, name, _fmt(r["aggregate_tok_s"]), _fmt(r["ttft_p50_ms"], 0), _fmt(r["ttft_p95_ms"], 0),
                     _fmt(r["itl_p50_ms"]), _fmt(r["itl_p95_ms"]), tokens, _fmt(ratio, 2) if ratio is not None else "")
            print("| " + " | ".join(cells) + " |")


def scaling(table: dict[str, Any], names: list[str], clients: list[int]) -> dict[str, Any]:
    """Ours: aggregate at the most clients over the single-stream (1 client) rate, against SCALING_TARGET."""
    out: dict[str, Any] = {}
    if 1 not in clients or max(clients) == 1:
        return out
    most = max(clients)
    for name in names:
        single, many = table["1"][name]["aggregate_tok_s"], table[str(most)][name]["aggregate_tok_s"]
        x = many / single if single else None
        out[name] = {"single_stream_tok_s": single, f"aggregate_{most}_tok_s": many, "scaling": x}
        verdict = "" if name == LLAMA else f" (target >= {SCALING_TARGET:.0f}x at 8 clients)"
        print(f"{name}: single stream {_fmt(single)} tok/s, {most} clients {_fmt(many)} tok/s aggregate = "
              f"{_fmt(x, 2)}x{verdict}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="1,2,4,8", help="comma-separated concurrency levels")
    parser.add_argument("--max-tokens", type=int, default=128, help="tokens each client asks for")
    parser.add_argument("--rounds", type=int, default=2, help="rounds; the server order flips every other one")
    parser.add_argument("--precisions", default="int8-head4-fast,int8", help="our exports (bench.ours, cached)")
    parser.add_argument("--max-batch", type=int, default=8, help="gemma3-serve --max-batch")
    parser.add_argument("--no-llamacpp", action="store_true", help="ours only")
    parser.add_argument("--quiet-wait", type=float, default=300.0,
                        help="before each round, wait up to S seconds for other processes to use < 15%% of the CPU")
    parser.add_argument("--out", type=Path, default=RESULTS / "serve.json")
    args = parser.parse_args()
    clients = sorted({int(c) for c in args.clients.split(",")})
    precisions = [p for p in args.precisions.split(",") if p]
    for p in precisions:
        if p not in ours.PRECISIONS:
            parser.error(f"unknown precision {p!r}: one of {', '.join(ours.PRECISIONS)}")

    from gemma3.graphs.loaders.embedded import embedded_270m_gguf

    gguf = embedded_270m_gguf()
    servers = [our_server(p, gguf, args.max_batch) for p in precisions]
    if not args.no_llamacpp:
        from bench.setup_peers import ensure_llama_cpp_server

        problem = ensure_llama_cpp_server()
        if problem:
            sys.exit(f"llama.cpp's server is not available ({problem}); --no-llamacpp to run ours only")
        n_ctx = -(-max(clients) * (PROMPT_BUDGET + args.max_tokens) // 256) * 256
        servers.append(llama_server(gguf, n_ctx))
    names = [s.name for s in servers]
    report: dict[str, Any] = {"model": str(gguf), "clients": clients, "max_tokens": args.max_tokens,
                              "rounds_asked": args.rounds, "seed": SEED, "temperature": 0.0,
                              "prompt_example": prompt(0), "servers": {}, "rounds": []}
    try:
        for server in servers:
            server.start()
            warm = run_clients(server.url, [request_body(MODEL_ID, prompt(25), args.max_tokens, SEED)])[0]
            if warm.error:
                raise RuntimeError(f"{server.name} warm-up failed: {warm.error}\n{server.log_tail()}")
            engine = None
            if server.ready_path == "/health":
                engine = httpx.get(server.url + "/health", timeout=5).json().get("engine")
            report["servers"][server.name] = {"cmd": server.cmd, "settings": server.settings, "load_s": server.load_s,
                                              "engine": engine, "warmup_tokens": warm.tokens}
            print(f"{server.name}: ready in {server.load_s} s" + (f", engine {engine}" if engine else "")
                  + f"; warm-up {warm.tokens} tokens", flush=True)
        for index in range(args.rounds):
            share = wait_until_quiet(args.quiet_wait, threshold=0.15) if args.quiet_wait > 0 else None
            order = servers if index % 2 == 0 else servers[::-1]
            results: dict[str, dict[str, Any]] = {}
            for n in clients:
                results[str(n)] = {}
                for server in order:
                    r = measure(server, n, args.max_tokens)
                    results[str(n)][server.name] = r
                    print(f"round {index + 1}, {n} clients, {server.name}: {_fmt(r['aggregate_tok_s'])} tok/s "
                          f"aggregate, TTFT p50 {_fmt(r['ttft_p50_ms'], 0)} ms, ITL p50 {_fmt(r['itl_p50_ms'])} "
                          f"p95 {_fmt(r['itl_p95_ms'])} ms, tokens {r['tokens_per_client']}, foreign CPU "
                          f"{r['foreign_cpu_share']}" + (f", errors {r['errors']}" if r["errors"] else ""), flush=True)
            report["rounds"].append({"order": [s.name for s in order], "quiet_share_before": share,
                                     "results": results})
        for server in servers:
            if server.proc is not None:
                report["servers"][server.name]["peak_rss_mb"] = _vm_hwm_mb(server.proc.pid)
    finally:
        for server in servers:
            server.stop()
    table = summary(report["rounds"], names, clients)
    report["summary"] = table
    print()
    print_table(table, names)
    print()
    report["scaling"] = scaling(table, names, clients)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
