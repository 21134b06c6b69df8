"""gemma3-serve as a Ray Serve application: the same FastAPI app (`create_app`) in every replica, Ray's HTTP proxy
in front spreading requests over them, on one machine or a whole Ray cluster.

Each replica loads the model itself (`runtime.api.load` + `make_engine`) when Ray starts it, so a replica that
dies is replaced by a fresh one without the others noticing. Every response names the replica that answered in
the `X-Gemma3-Replica` header (its Ray actor name): where a request ran, and which actor to inspect or kill.

    gemma3-serve --model out/270m --ray --replicas 4 --threads 2          # a local Ray instance on this machine
    gemma3-serve --model /shared/270m --ray --ray-address auto --min-replicas 1 --max-replicas 8
    serve run serve/ray_config.yaml                                        # the same, from Ray's own CLI

Only `gemma3-serve --ray` and Ray itself import this module: the plain server never imports ray.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import ray
from fastapi import FastAPI
from ray import serve
from ray.serve import Application, Deployment
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gemma3.runtime.api import Model, load
from gemma3.runtime.jobs import Engine
from gemma3.serve.engines import make_engine
from gemma3.serve.state import DEFAULT_MAX_BODY_MB, Settings

log = logging.getLogger(__name__)

APP_NAME = "gemma3"  # the Ray Serve application (and deployment) name
REPLICA_HEADER = "X-Gemma3-Replica"


@dataclass(frozen=True)
class RayServeOptions:
    """What `gemma3-serve --ray` and `serve run`'s `args:` set: the server's own options plus Ray's scaling."""

    model: str  # exported model folder: the same path on every node that may run a replica
    served_model_name: str | None = None  # the model id clients use (default: the folder name)
    api_key: str | None = None  # Bearer key for /v1 routes; None: the replica's $GEMMA3_API_KEY, else open
    allow_local_images: bool = False
    max_body_mb: float = DEFAULT_MAX_BODY_MB
    max_batch: int = 8  # per replica, where the export and engine can batch
    max_queue: int = 64  # per replica: requests waiting for its engine (more: 429); also Ray's router bound (503)
    threads: int = 1  # ONNX Runtime threads per replica, and the CPUs Ray reserves for it (so replicas don't share)
    num_gpus: float = 0.0  # GPUs per replica: 1 for TensorRT engines, so Ray places replicas on GPU nodes
    replicas: int = 1  # the replica count; under autoscaling, how many start
    min_replicas: int | None = None  # either bound set: Ray's autoscaler keeps the count between them
    max_replicas: int | None = None
    target_ongoing_requests: float | None = None  # autoscaling aims at this many requests per replica
    max_ongoing_requests: int | None = None  # per replica before Ray's router queues (default: 2 * max_batch)
    shutdown_timeout: float = 30.0  # seconds a stopping replica lets running requests finish

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_queue", "threads", "replicas", "min_replicas", "max_replicas",
                     "max_ongoing_requests"):
            value = getattr(self, name)
            if value is not None and value < (0 if name == "min_replicas" else 1):
                raise ValueError(f"{name} must be >= {0 if name == 'min_replicas' else 1}, got {value}")
        if self.max_body_mb <= 0 or self.num_gpus < 0 or self.shutdown_timeout < 0:
            raise ValueError("max_body_mb must be > 0, num_gpus and shutdown_timeout >= 0")
        if self.target_ongoing_requests is not None and self.target_ongoing_requests <= 0:
            raise ValueError("target_ongoing_requests must be > 0")
        low, high = self.min_replicas, self.max_replicas
        if low is not None and high is not None and low > high:
            raise ValueError(f"min_replicas ({low}) is above max_replicas ({high})")

    @classmethod
    def from_args(cls, args: Mapping[str, Any]) -> RayServeOptions:
        """From `serve run`'s args (a YAML mapping or key=value pairs): the CLI's names, '-' or '_' alike."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        values = {str(k).replace("-", "_"): v for k, v in args.items()}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"unknown argument(s) {unknown}: use {sorted(known)}")
        if "model" not in values:
            raise ValueError("the 'model' argument (the exported model folder) is required")
        return cls(**{k: _coerce(known[k].type, v) for k, v in values.items()})

    @property
    def autoscaling(self) -> bool:
        return self.min_replicas is not None or self.max_replicas is not None

    def settings(self) -> Settings:
        name = self.served_model_name or os.path.basename(os.path.normpath(self.model))
        key = self.api_key or os.environ.get("GEMMA3_API_KEY")  # read in the replica: keys stay out of configs
        return Settings(model_id=name, api_key=key or None, allow_local_images=self.allow_local_images,
                        max_body_bytes=int(self.max_body_mb * 2**20))

    def deployment_options(self) -> dict[str, Any]:
        """`serve.deployment`'s keyword arguments."""
        out: dict[str, Any] = {
            "name": APP_NAME,
            "ray_actor_options": {"num_cpus": self.threads, "num_gpus": self.num_gpus},
            # a full batch running and one waiting per replica; the rest wait in Ray's router for whichever
            # replica frees up first, rather than in one replica's queue
            "max_ongoing_requests": self.max_ongoing_requests or 2 * self.max_batch,
            # past this many requests waiting in Ray's router (per proxy), Ray answers 503 at once instead of
            # queueing without bound: each replica's own --max-queue is never reached behind the router
            "max_queued_requests": self.max_queue,
            "graceful_shutdown_timeout_s": self.shutdown_timeout,
        }
        if self.autoscaling:
            low = self.min_replicas if self.min_replicas is not None else 1
            high = self.max_replicas if self.max_replicas is not None else max(low, self.replicas)
            out["autoscaling_config"] = {
                "min_replicas": low, "max_replicas": high, "initial_replicas": min(max(self.replicas, low), high),
                "target_ongoing_requests": self.target_ongoing_requests or self.max_batch,
            }
        else:
            out["num_replicas"] = self.replicas
        return out


def _coerce(kind: Any, value: Any) -> Any:
    """`serve run model=x replicas=2` passes strings: turn them into the field's type."""
    if not isinstance(value, str):
        return value
    kind = str(kind)
    if "bool" in kind:
        return value.strip().lower() in ("1", "true", "yes", "on")
    if "int" in kind:
        return int(value)
    if "float" in kind:
        return float(value)
    return value


Loader = Callable[[RayServeOptions], tuple[Model, Engine]]


def load_engine(options: RayServeOptions) -> tuple[Model, Engine]:
    """What each replica runs once when Ray starts it: the model and its engine."""
    model = load(options.model, threads=options.threads)
    return model, make_engine(model, options.max_batch, options.max_queue)


class ReplicaHeader:
    """Adds `X-Gemma3-Replica: <actor name>` to every response, streamed ones included."""

    def __init__(self, app: ASGIApp, replica: str) -> None:
        self.app, self.header = app, (REPLICA_HEADER.lower().encode(), replica.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, sending)


def replica_name() -> str:
    """This replica's Ray actor name (namespace "serve"), unique in the cluster: `ray.get_actor` finds it."""
    return ray.get_runtime_context().get_actor_name() or "unknown"


def make_deployment(options: RayServeOptions, loader: Loader = load_engine) -> Deployment:
    """The FastAPI app as a Ray Serve deployment; `loader` (a module-level function, so Ray can ship it by name)
    gives each replica its model and engine."""

    def asgi_app() -> FastAPI:  # runs in each replica as it starts
        from gemma3.serve.app import create_app

        model, engine = loader(options)
        app = create_app(model, engine, options.settings())
        app.add_middleware(ReplicaHeader, replica=replica_name())
        return app

    return serve.deployment(serve.ingress(asgi_app)(), **options.deployment_options())


def build_app(args: Mapping[str, Any]) -> Application:
    """`serve run gemma3.serve.ray_app:build_app model=DIR replicas=2`, or `import_path` in a config file (its
    `args:` are `RayServeOptions`' fields)."""
    return make_deployment(RayServeOptions.from_args(args)).bind()


def run(options: RayServeOptions, address: str | None, host: str, port: int) -> int:
    """`gemma3-serve --ray`: join (`address`) or start a Ray instance, serve until SIGINT / SIGTERM, then delete
    the application (its replicas drain for `shutdown_timeout`) and leave a joined cluster as it was."""
    stop = threading.Event()
    # "local": a new instance even where `ray start` left one running (ray.init() alone would join it); no
    # dashboard there (nothing reads it, and it costs seconds and memory)
    ray.init(address=address or "local", log_to_driver=False, **({} if address else {"include_dashboard": False}))
    for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, whose crash logger takes SIGTERM (and aborts)
        signal.signal(sig, lambda *_: stop.set())
    serve.start(http_options={"host": host, "port": port})
    serve.run(make_deployment(options).bind(), name=APP_NAME, route_prefix="/")
    if not stop.is_set():
        log.info("serving %s on http://%s:%d with %s", options.model, host, port,
                 "autoscaling" if options.autoscaling else f"{options.replicas} replica(s)")
    stop.wait()
    cleanup = threading.Thread(target=_stop, args=(address is None,), daemon=True)
    cleanup.start()
    cleanup.join(options.shutdown_timeout + 15)
    if cleanup.is_alive():
        # Ray itself is gone (a signal to the whole process group reaches its local services too): its client
        # threads would wait a minute for it, and then abort
        log.warning("Ray did not answer within %.0f s: exiting without it", options.shutdown_timeout + 15)
        os._exit(1)
    return 0


def _stop(own_instance: bool) -> None:
    serve.delete(APP_NAME)
    if own_instance:  # nothing else runs on it
        serve.shutdown()
    ray.shutdown()
