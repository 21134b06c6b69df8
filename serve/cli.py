"""gemma3-serve: an OpenAI-compatible HTTP server over an exported Gemma 3 folder.

    gemma3-serve --model out/gemma-3-270m-it
    gemma3-serve --model out/gemma-3-4b-it --host 0.0.0.0 --port 8080 --api-key "$KEY" --max-batch 8
    gemma3-serve --model out/gemma-3-270m-it --ray --replicas 4 --threads 2     # Ray Serve replicas (serve/ray_app.py)
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from gemma3.runtime.cli import HelpFormatter
from gemma3.runtime.manifest import ManifestError, check_files, load_manifest
from gemma3.serve.state import DEFAULT_MAX_BODY_MB, Settings

PROG = "gemma3-serve"
EXIT_USAGE = 2
RAY_ONLY = ("ray_address", "replicas", "min_replicas", "max_replicas", "target_ongoing_requests",
            "max_ongoing_requests", "num_gpus")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, formatter_class=HelpFormatter,
        description="Serve a Gemma 3 model exported by gemma3-export over OpenAI's HTTP API: /v1/chat/completions, "
        "/v1/completions, /v1/models, plus /health, /metrics (Prometheus) and a chat page at /.",
        epilog="Sampling defaults come from the model's manifest; requests override them (top_k, min_p, "
        "repetition_penalty and pan_and_scan as extra body fields). SIGTERM or Ctrl-C: stop accepting, finish the "
        "running requests (up to --shutdown-timeout), then exit.",
    )
    p.add_argument("--model", "-m", required=True, metavar="DIR", help="exported model folder (with manifest.json)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="TCP port")
    p.add_argument("--api-key", metavar="KEY", default=os.environ.get("GEMMA3_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 routes (default: $GEMMA3_API_KEY, else open)")
    p.add_argument("--served-model-name", metavar="NAME", help="the model id clients use (default: the folder name)")
    p.add_argument("--max-batch", type=int, default=8, metavar="N",
                   help="sequences generated together, where the export and engine can batch (else 1)")
    p.add_argument("--max-queue", type=int, default=64, metavar="N",
                   help="requests waiting for the engine at most; more are refused with 429 and Retry-After")
    p.add_argument("--threads", type=int, metavar="N", help="ONNX Runtime intra-op threads (default: all cores)")
    p.add_argument("--allow-local-images", action="store_true",
                   help="let image_url name files on this machine (only data: URLs otherwise)")
    p.add_argument("--max-body-mb", type=float, default=DEFAULT_MAX_BODY_MB, metavar="MB",
                   help="largest request body (base64 images included); larger ones get 413")
    p.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="S",
                   help="on SIGTERM, seconds to let running requests finish before they are cancelled")
    p.add_argument("-v", "--verbose", action="store_true", help="log requests and loading details")
    ray = p.add_argument_group("Ray Serve (pip install 'gemma3-export[ray]')", "the same routes served by replicas "
                               "of the app on a Ray cluster, each loading the model itself; Ray's HTTP proxy spreads "
                               "requests over them (--threads: each replica's threads and reserved CPUs, default 1)")
    ray.add_argument("--ray", action="store_true", help="serve as a Ray Serve application")
    ray.add_argument("--ray-address", metavar="ADDR",
                     help="join this Ray cluster ('auto': the one `ray start` made here); default: a local instance")
    ray.add_argument("--replicas", type=int, default=1, metavar="N",
                     help="replicas (with autoscaling: how many start)")
    ray.add_argument("--min-replicas", type=int, metavar="N", help="autoscale, down to N replicas (0: scale to zero)")
    ray.add_argument("--max-replicas", type=int, metavar="N", help="autoscale, up to N replicas")
    ray.add_argument("--target-ongoing-requests", type=float, metavar="R",
                     help="autoscaling aims at R requests per replica (default: --max-batch)")
    ray.add_argument("--max-ongoing-requests", type=int, metavar="N",
                     help="requests a replica takes before Ray's router queues the rest (default: 2 * --max-batch)")
    ray.add_argument("--num-gpus", type=float, default=0.0, metavar="G",
                     help="GPUs per replica (1 for TensorRT engines: replicas go to GPU nodes)")
    return p


def serve_ray(args: argparse.Namespace) -> int:
    """--ray: the same app on Ray Serve replicas (imported here only: the plain server never imports ray)."""
    try:
        from gemma3.serve.ray_app import RayServeOptions, run
    except ImportError as e:
        print(f"{PROG}: error: {e}: install Ray Serve with pip install 'gemma3-export[ray]'", file=sys.stderr)
        return EXIT_USAGE
    names = ("model", "served_model_name", "api_key", "allow_local_images", "max_body_mb", "max_batch", "max_queue",
             "replicas", "min_replicas", "max_replicas", "target_ongoing_requests", "max_ongoing_requests",
             "num_gpus", "shutdown_timeout")
    try:
        options = RayServeOptions(threads=args.threads or 1, **{n: getattr(args, n) for n in names})
        if args.ray_address is None:  # a local instance: the replicas read this folder, so check it here first
            check_files(load_manifest(options.model))
    except (ManifestError, ValueError, OSError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    return run(options, args.ray_address, args.host, args.port)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("max_batch", "max_queue", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.max_body_mb <= 0:
        parser.error("--max-body-mb must be > 0")
    level = logging.INFO if args.verbose else logging.WARNING
    logging.basicConfig(level=level, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("gemma3").setLevel(level)
    if args.ray:
        return serve_ray(args)
    given = [f"--{n.replace('_', '-')}" for n in RAY_ONLY if getattr(args, n) != parser.get_default(n)]
    if given:
        parser.error(f"{', '.join(given)}: only with --ray")
    try:
        import uvicorn

        from gemma3.runtime.api import load
        from gemma3.serve.app import create_app
        from gemma3.serve.engines import make_engine
    except ImportError as e:  # the serve extra is missing
        print(f"{PROG}: error: {e}: install the server with pip install 'gemma3-export[serve]'", file=sys.stderr)
        return EXIT_USAGE
    try:
        model = load(args.model, threads=args.threads)
    except (ManifestError, ValueError, OSError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    name = args.served_model_name or os.path.basename(os.path.normpath(args.model))
    settings = Settings(model_id=name, api_key=args.api_key or None, allow_local_images=args.allow_local_images,
                        max_body_bytes=int(args.max_body_mb * 2**20))
    app = create_app(model, make_engine(model, args.max_batch, args.max_queue), settings)
    uvicorn.run(app, host=args.host, port=args.port, timeout_graceful_shutdown=args.shutdown_timeout,
                log_level="info" if args.verbose else "warning", access_log=args.verbose)
    return 0


if __name__ == "__main__":
    sys.exit(main())
