"""gemma3-serve as a process: the console entry point serves, and SIGTERM lets a running stream finish cleanly
(uvicorn's graceful shutdown, then the engine's close) before the process exits. Also the engine factory and
the SerialEngine's contract directly."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from gemma3.runtime.chat import STOP_IDS
from gemma3.runtime.jobs import Job, TokenLogprobs
from gemma3.serve.engines import SerialEngine, make_engine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_finishes_the_running_stream(tiny_model):
    port = free_port()
    cmd = [sys.executable, "-m", "gemma3.serve.cli", "--model", str(tiny_model.manifest.root), "--port", str(port),
           "--threads", "1", "--served-model-name", "tiny"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else ""
            time.sleep(0.1)
        body = {"model": "tiny", "prompt": "Once", "max_tokens": 200, "temperature": 0, "stream": True}
        events = []
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if not line:
                    continue
                if not events:
                    proc.send_signal(signal.SIGTERM)  # mid-stream
                events.append(line.removeprefix("data: "))
        assert events[-1] == "[DONE]"
        last = json.loads(events[-2])
        assert last["choices"][0]["finish_reason"] == "length"
        # uvicorn re-raises the signal once it has shut down, so the process reports it (as a killed one would)
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_refuses_bad_settings(capsys, tmp_path):
    from gemma3.serve import cli

    with pytest.raises(SystemExit):
        cli.main(["--model", str(tmp_path), "--max-queue", "0"])
    assert "--max-queue must be >= 1" in capsys.readouterr().err
    assert cli.main(["--model", str(tmp_path / "missing")]) == 2
    assert "gemma3-serve: error:" in capsys.readouterr().err


def test_serial_engine_gives_the_runtimes_tokens_and_logprobs(tiny_model):
    model = tiny_model
    params = model.sampling(temperature=0.8, seed=9, repetition_penalty=1.2)
    ids = model.prompt_ids("Tell me a story")
    got: list[tuple[int, TokenLogprobs | None]] = []
    ends: list[str] = []
    engine = make_engine(model, max_batch=1, max_queue=4)
    assert isinstance(engine, SerialEngine)
    engine.submit(Job(ids, params, 10, STOP_IDS, lambda t, lp: got.append((t, lp)),
                      lambda reason, error: ends.append(reason), logprobs=2))
    engine.close()  # finishes the queued job first
    want = model.generate("Tell me a story", max_new_tokens=10, temperature=0.8, seed=9, repetition_penalty=1.2)
    assert [t for t, _ in got] == want.token_ids and ends == [want.finish_reason]
    for _, lp in got:
        assert lp is not None and len(lp.top_ids) == 2 and lp.logprob <= lp.top_logprobs[0] + 1e-9
        assert lp.top_logprobs[0] >= lp.top_logprobs[1]
    with pytest.raises(RuntimeError):
        engine.submit(Job(ids, params, 1, STOP_IDS, lambda t, lp: None, lambda r, e: None))


def test_the_server_imports_without_torch():
    """A serving box has the runtime and serve extras only: every serve module imports with torch blocked."""
    blocked = ("torch", "transformers", "onnx", "onnxscript", "gemma3.graphs", "gemma3.exporter")
    code = "; ".join(["import sys", *[f"sys.modules[{name!r}] = None" for name in blocked],
                      "import gemma3.serve.app, gemma3.serve.cli, gemma3.serve.engines"])
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
