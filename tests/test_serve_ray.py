"""gemma3-serve on Ray Serve: a local Ray instance (2 CPUs, no dashboard) with two replicas of the app on the tiny
model, spoken to with the real `openai` client through Ray's HTTP proxy. Answers equal the runtime's own, streamed
or not; requests reach both replicas (the X-Gemma3-Replica header); a replica killed while it streams fails that
stream with a connection error and requests waiting on it with a 500 (not a hang), the other replica serves new
requests, and Ray starts a replacement.
Also the options and the `serve run` config without a cluster, and that the plain server never imports ray."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import ray
import yaml
from ray import serve
from ray.serve.schema import ServeDeploySchema

from gemma3.runtime.api import Model, load
from gemma3.runtime.jobs import Engine
from gemma3.serve.engines import make_engine
from gemma3.serve.ray_app import APP_NAME, REPLICA_HEADER, RayServeOptions, build_app, make_deployment
from tests.serve_live import MODEL_ID, slowed

ROOT = Path(__file__).resolve().parent.parent
HELLO = [{"role": "user", "content": "Tell me a story"}]
STEP_DELAY_S = 0.02  # per decoding step in the replicas: a 200-token stream lasts 4 s, long enough to kill it in
KILL_TIMEOUT_S = 20  # a stream on a killed replica must fail within this

def slow_loader(options: RayServeOptions) -> tuple[Model, Engine]:
    """Each replica's model, slowed per step (runs in the replica: Ray finds it by name, tests/ on PYTHONPATH)."""
    model = slowed(load(options.model, threads=options.threads), STEP_DELAY_S)
    return model, make_engine(model, options.max_batch, options.max_queue)


@pytest.fixture(scope="module")
def proxy(tiny_model):
    """http://127.0.0.1:<port> of Ray's proxy in front of two replicas; Ray is shut down after the module."""
    started = time.monotonic()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        options = RayServeOptions(model=str(tiny_model.manifest.root), served_model_name=MODEL_ID, replicas=2,
                                  threads=1, max_batch=1, shutdown_timeout=2)
        # health checks every second: the controller notices the killed replica and replaces it soon
        app = make_deployment(options, slow_loader).options(health_check_period_s=1).bind()
        serve.run(app, name=APP_NAME, route_prefix="/")
        print(f"\nRay + Serve + 2 replicas ready in {time.monotonic() - started:.1f} s")
        yield f"http://127.0.0.1:{port}"
    finally:
        stopping = time.monotonic()
        serve.shutdown()
        ray.shutdown()
        print(f"\nRay shut down in {time.monotonic() - stopping:.1f} s")


def client(url: str, timeout: float = 60) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=timeout)


def test_chat_through_the_ray_proxy(tiny_model, proxy):
    c = client(proxy)
    raw = c.chat.completions.with_raw_response.create(model=MODEL_ID, messages=HELLO, max_tokens=8, seed=3,
                                                      temperature=0.9)
    out = raw.parse()
    want = tiny_model.generate(HELLO, max_new_tokens=8, seed=3, temperature=0.9)
    assert out.choices[0].message.content == want.text and out.usage.completion_tokens == 8
    assert raw.headers[REPLICA_HEADER].startswith("SERVE_REPLICA::")
    assert [m.id for m in c.models.list().data] == [MODEL_ID]


def test_streaming_through_the_ray_proxy(proxy):
    c = client(proxy)
    args = {"model": MODEL_ID, "messages": HELLO, "max_tokens": 10, "seed": 5, "temperature": 1.0}
    whole = c.chat.completions.create(**args)
    chunks = list(c.chat.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 10


def answered_by(c: openai.OpenAI, requests: int) -> set[str]:
    """The replicas that answered `requests` one-token completions, one after another."""
    return {c.completions.with_raw_response.create(model=MODEL_ID, prompt="Once", max_tokens=1).headers[REPLICA_HEADER]
            for _ in range(requests)}


def test_requests_reach_both_replicas(proxy):
    # Ray's router picks between two idle replicas at random: all 16 on one is 2**-15
    assert len(answered_by(client(proxy), 16)) == 2


def test_a_killed_replica_fails_its_requests_and_is_replaced(proxy):
    c = client(proxy, timeout=KILL_TIMEOUT_S)
    raw = c.chat.completions.with_raw_response.create(model=MODEL_ID, messages=HELLO, max_tokens=200, seed=1,
                                                      temperature=1.0, stream=True)
    victim = raw.headers[REPLICA_HEADER]
    stream = raw.parse()
    next(stream)  # the stream is running on the victim
    # more requests while it runs: Ray's router puts some on each replica (on the victim, queued behind the stream)
    with ThreadPoolExecutor(4) as pool:
        others = [pool.submit(outcome, c) for _ in range(4)]
        time.sleep(0.5)  # let them reach their replicas
        started = time.monotonic()
        chunks = 1
        with pytest.raises(openai.APIConnectionError):  # the proxy drops the connection mid-body: the client raises
            for _ in stream:
                chunks += 1
                if chunks == 2:
                    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        assert chunks < 100 and time.monotonic() - started < KILL_TIMEOUT_S
        ends = [f.result() for f in others]  # each within the client's timeout: answered elsewhere, or an error
    print(f"\nrequests in flight during the kill: {ends}")
    assert all(e in ("answered", "5xx", "connection error") for e in ends), ends
    # new requests are served at once by the survivor, then Ray's controller starts a replacement
    survivors = answered_by(c, 4)
    assert len(survivors) == 1 and victim not in survivors
    deadline = time.monotonic() + 60
    while not answered_by(c, 8) - survivors:
        assert time.monotonic() < deadline, "no replacement replica answered within 60 s"
        time.sleep(0.2)


def outcome(c: openai.OpenAI) -> str:
    """How a 20-token completion ended: 'answered', '5xx', 'connection error' (a timeout is a failure)."""
    try:
        c.completions.create(model=MODEL_ID, prompt="Once", max_tokens=20, seed=1)
        return "answered"
    except openai.APIStatusError as e:
        return "5xx" if e.status_code >= 500 else f"status {e.status_code}"
    except openai.APITimeoutError:
        return "timeout"
    except openai.APIConnectionError:
        return "connection error"


def test_options_from_serve_run_args():
    o = RayServeOptions.from_args({"model": "/m", "replicas": "3", "threads": "2", "allow-local-images": "true",
                                   "num_gpus": "1", "target_ongoing_requests": 4})
    assert (o.replicas, o.threads, o.allow_local_images, o.num_gpus) == (3, 2, True, 1.0)
    d = o.deployment_options()
    assert d["num_replicas"] == 3 and d["ray_actor_options"] == {"num_cpus": 2, "num_gpus": 1.0}
    assert d["max_ongoing_requests"] == 16 and "autoscaling_config" not in d
    auto = RayServeOptions(model="/m", min_replicas=0, max_replicas=4, max_batch=4).deployment_options()
    assert auto["autoscaling_config"] == {"min_replicas": 0, "max_replicas": 4, "initial_replicas": 1,
                                          "target_ongoing_requests": 4}
    assert "num_replicas" not in auto
    with pytest.raises(ValueError, match="unknown argument.*'replica'"):
        RayServeOptions.from_args({"model": "/m", "replica": 2})
    with pytest.raises(ValueError, match="'model'"):
        RayServeOptions.from_args({"replicas": 2})
    with pytest.raises(ValueError, match="above max_replicas"):
        RayServeOptions(model="/m", min_replicas=3, max_replicas=2)
    with pytest.raises(ValueError, match="threads must be >= 1"):
        RayServeOptions(model="/m", threads=0)


def test_the_serve_run_config_is_valid():
    config = yaml.safe_load((ROOT / "serve" / "ray_config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(config)
    (app,) = schema.applications
    assert app.import_path == "gemma3.serve.ray_app:build_app"
    built = build_app(app.args)  # binding needs no cluster
    assert built._bound_deployment.name == APP_NAME


def test_the_plain_server_never_imports_ray():
    code = ("import sys; from gemma3.serve import app, cli, engines, routes; cli.build_parser(); "
            "assert 'ray' not in sys.modules, 'ray imported'")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_the_cli_hands_its_flags_to_ray(tiny_model, monkeypatch):
    from gemma3.serve import cli, ray_app

    calls = []
    monkeypatch.setattr(ray_app, "run", lambda *a: calls.append(a) or 0)
    argv = ["--model", str(tiny_model.manifest.root), "--ray", "--ray-address", "auto", "--min-replicas", "1",
            "--max-replicas", "3", "--threads", "2", "--num-gpus", "1", "--port", "9000", "--max-batch", "4"]
    assert cli.main(argv) == 0
    ((options, address, host, port),) = calls
    assert (address, host, port) == ("auto", "127.0.0.1", 9000)
    assert (options.min_replicas, options.max_replicas, options.threads, options.num_gpus) == (1, 3, 2, 1.0)
    assert options.deployment_options()["autoscaling_config"]["target_ongoing_requests"] == 4
    assert cli.main(["--model", "/nowhere", "--ray"]) == cli.EXIT_USAGE  # checked here before Ray starts
    with pytest.raises(SystemExit):
        cli.main(["--model", str(tiny_model.manifest.root), "--replicas", "2"])  # Ray's flags need --ray
