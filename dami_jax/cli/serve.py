"""``dami-jax serve``: the OpenAI-compatible HTTP server (:mod:`dami_jax.server`) on the engine."""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
from pathlib import Path

from dami_jax.cli.common import (
    TEMPLATES, Command, UsageError, add_cache, add_models, add_processes, check_pair_args, join_processes, nonnegative_int,
    pair_cache_config, pair_from, pair_name, positive_float, positive_int, processes_from,
)

PORTS = range(0, 65536)
API_KEY_ENV = "DAMI_JAX_API_KEY"
MAX_BODY_BYTES = 8 * 2**20  # dami_jax.server.app.MAX_BODY_BYTES (a test keeps them equal)


def _effort_map(path: str | None) -> dict[str, float] | None:
    """--effort-map: a JSON object {minimal, low, medium, high} or a route-eval summary.json."""
    from dami_jax.server.intensity import check_effort_map, effort_map_from_summary

    if path is None:
        return None
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise UsageError(f"--effort-map {path}: {error}") from None
    if isinstance(data, list):
        return effort_map_from_summary(path)
    if not isinstance(data, dict):
        raise UsageError(f"--effort-map {path}: a JSON object of efforts or a route-eval summary.json")
    return check_effort_map(data, f"--effort-map {path}")


def api_key_from(args: argparse.Namespace) -> str | None:
    """--api-key, --api-key-file (its first line) or $DAMI_JAX_API_KEY, in that order; None: no key."""
    if args.api_key is not None and args.api_key_file is not None:
        raise UsageError("--api-key and --api-key-file: give one (or set DAMI_JAX_API_KEY)")
    if args.api_key_file is not None:
        try:
            lines = Path(args.api_key_file).read_text().splitlines()
        except (OSError, UnicodeDecodeError) as error:
            raise UsageError(f"--api-key-file {args.api_key_file}: {error}") from None
        key, source = (lines[0].strip() if lines else ""), f"--api-key-file {args.api_key_file}"
    else:
        key, source = (args.api_key, "--api-key") if args.api_key is not None else (os.environ.get(API_KEY_ENV), API_KEY_ENV)
    if key is not None and (not key or not key.isprintable() or not key.isascii() or " " in key):
        raise UsageError(f"{source}: an API key is one word of printable ASCII characters")
    return key


def _listen(host: str, port: int) -> socket.socket:
    """The server's listening socket, bound before the models load: a port in use is a one-line
    error at once, not after a minute of loading (and the port stays taken while they load)."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET  # as uvicorn picks it
        address = socket.getaddrinfo(host, port, family=family, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][4]
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as error:
        raise UsageError(f"--host {host}: {error.strerror or error}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as error:
        sock.close()
        raise UsageError(f"--port {port}: cannot listen on {host}:{port} ({error.strerror or error})") from None
    return sock


def _serve(args: argparse.Namespace) -> None:
    check_pair_args(args)
    if args.port not in PORTS:
        raise UsageError(f"--port {args.port}: must be in 0-65535")
    api_key = api_key_from(args)
    efforts = _effort_map(args.effort_map)
    if args.router not in (None, "conf"):
        from dami_jax.dami.pref_router import META_FILE

        if not (Path(args.router) / META_FILE).is_file():
            raise UsageError(f"--router {args.router}: not a router folder (no {META_FILE}; make one with dami-jax train-router) nor conf")
    processes = processes_from(args)
    if processes is not None and args.router is not None:
        raise UsageError("--router: a router runs the models outside the engine, which a server over several processes cannot yet")
    follower = processes is not None and processes[2] != 0
    sock = None if follower else _listen(args.host, args.port)

    import jax
    import uvicorn

    from dami_jax.engine.engine import Engine
    from dami_jax.engine.lockstep import follow
    from dami_jax.models.assets import cache_dir
    from dami_jax.server.app import ServerConfig, Service, create_app
    from dami_jax.server.intensity import Intensity, load_router

    join_processes(processes)
    # Compiled programs persist across starts: a restart loads the warm-up's compilations from disk.
    jax.config.update("jax_compilation_cache_dir", str(cache_dir() / "xla"))
    pair = pair_from(args, across_processes=processes is not None)
    router, router_name = load_router(args.router, pair) if args.router else (None, None)
    engine = Engine(pair, slots=args.slots, max_len=args.max_len, steps_per_call=args.steps_per_call,
                    cache=pair_cache_config(args.cache, pair), max_new_tokens=args.max_new_tokens)  # fmt: skip
    print(f"dami-jax: {engine.sizing.describe()}; compiling every shape it can run ...", file=sys.stderr, flush=True)
    warmup_s = engine.warmup()
    if follower:
        print(f"dami-jax: process {processes[2]} of {processes[1]} follows process 0's engine (compiled in {warmup_s:.1f} s)",
              file=sys.stderr, flush=True)  # fmt: skip
        steps = follow(engine)
        print(f"dami-jax: process 0 stopped; this process took {steps} engine steps with it", file=sys.stderr)
        return
    named = pair_name(args)
    name = args.model_name or (f"dami-{named}" if named else f"dami:{Path(args.instruct).name}+{Path(args.thinking).name}")
    config = ServerConfig(name, args.template, api_key, args.max_queue, args.drain_timeout, args.max_body_bytes,
                          across_processes=processes is not None)  # fmt: skip
    intensity = Intensity(router=router) if efforts is None else Intensity(efforts, router)
    service = Service(pair, engine, intensity, config)

    class Server(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if self.started:
                host, port = self.servers[0].sockets[0].getsockname()[:2]
                spread = "" if processes is None else f", over {processes[1]} processes and {jax.device_count()} devices"
                print(f"dami-jax: serving {name} on http://{host}:{port}/v1 ({engine.slots} slots{spread}, "
                      f"{engine.context} tokens per request, {args.cache} cache, router: {router_name or 'none'}; "
                      f"compiled in {warmup_s:.1f} s)",
                      flush=True)  # fmt: skip

    server = Server(uvicorn.Config(create_app(service), host=args.host, port=args.port, log_level="warning",
                                   timeout_graceful_shutdown=int(args.drain_timeout)))  # fmt: skip
    # uvicorn shuts down gracefully on SIGTERM / Ctrl-C, then raises the signal again under the
    # handler it found: a no-op here, so that a drained server exits 0.
    for stop_signal in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop_signal, lambda *_: None)
    server.run(sockets=[sock])
    print("dami-jax: stopped", file=sys.stderr)


def register(command: Command) -> None:
    serve = command("serve", "an OpenAI-compatible HTTP server: every request on theta(lambda), lambda per request", _serve)
    add_models(serve)
    serve.add_argument("--router", metavar="DIR|conf",
                       help="pick lambda for requests that give none (or lambda 'auto'): a train-router folder "
                            "(DAMI-Pref) or conf (DAMI-Conf)")  # fmt: skip
    serve.add_argument("--effort-map", metavar="FILE",
                       help="reasoning_effort -> lambda: a JSON object {minimal, low, medium, high} or a route-eval "
                            "summary.json (default: 0, 0.3, 0.6, 1)")  # fmt: skip
    serve.add_argument("--template", choices=TEMPLATES, default="thinking", help="whose chat template renders a request")
    serve.add_argument("--slots", type=positive_int, metavar="N",
                       help="requests decoded together (default: 8, fewer if rows of 2048 tokens do not fit)")
    serve.add_argument("--max-len", type=positive_int, metavar="N",
                       help="prompt + answer tokens per request (default: what fits in the free memory, at most the model's)")
    add_cache(serve)
    serve.add_argument("--max-new-tokens", type=positive_int, metavar="N",
                       help="the most tokens a request may generate (default: what its context leaves); with TailorKV it "
                            "sizes each slot's device store of generated tokens")  # fmt: skip
    serve.add_argument("--steps-per-call", type=positive_int, metavar="N", default=4, help="decode steps between looks at new requests")
    serve.add_argument("--max-queue", type=positive_int, metavar="N", default=64, help="waiting requests before 429")
    serve.add_argument("--drain-timeout", type=positive_float, metavar="S", default=30.0,
                       help="on SIGTERM, seconds that requests in flight may take to finish")  # fmt: skip
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=nonnegative_int, metavar="N", default=8000, help="port (0: any free one)")
    serve.add_argument("--api-key", metavar="KEY",
                       help="require 'Authorization: Bearer KEY' (other local users see command lines: prefer "
                            f"--api-key-file or ${API_KEY_ENV})")  # fmt: skip
    serve.add_argument("--api-key-file", metavar="FILE", help=f"the API key, from the first line of FILE (else ${API_KEY_ENV})")
    serve.add_argument("--max-body-bytes", type=positive_int, metavar="N", default=MAX_BODY_BYTES,
                       help="larger request bodies get 413 before they are read")  # fmt: skip
    add_processes(serve, "process 0 runs the HTTP server and the engine's scheduler; every process holds its share of the "
                         "weights and KV cache (the mesh spans all their devices) and takes each engine step with it")  # fmt: skip
    serve.add_argument("--model-name", metavar="NAME", help="the model id clients name (default: dami-<pair>, e.g. dami-toy, or from the folders)")
