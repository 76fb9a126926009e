"""`lorafit serve`: an OpenAI-compatible HTTP server for one base model and many adapters (lorafit.serve)."""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import signal
import socket
import sys
from pathlib import Path

from ..devices import resolve_device
from ..errors import ConfigError
from ..hf import DTYPES
from .common import add_device_flag, add_model_flag, device_line, positive_int

SERVE_NEEDS = ("transformers", "fastapi", "uvicorn")


def parse_adapters(values: list[str]) -> dict[str, Path]:
    """--adapter NAME=PATH (or PATH alone: the folder's name)."""
    found: dict[str, Path] = {}
    for value in values or []:
        name, sep, path = value.partition("=")
        if not sep:
            name, path = Path(value).name, value
        name = name.strip()
        if not name or not path:
            raise ConfigError(f"--adapter {value!r} is invalid: expected NAME=PATH, e.g. --adapter sql=runs/sql")
        if name in found:
            raise ConfigError(f"--adapter: the name {name!r} is given twice; give each adapter its own name")
        folder = Path(path).expanduser()
        if not folder.is_dir():
            raise ConfigError(f"--adapter {name}={path}: no such folder; give the folder a `lorafit train` run or "
                              "PEFT's save_pretrained wrote")
        found[name] = folder
    return found


def _listening_socket(host: str, port: int) -> socket.socket:
    """The server's socket, bound now, so that a port in use is one error line before the model loads."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port} ({e.strerror or e}); choose another --port or stop the "
                          "program using it") from None
    sock.set_inheritable(True)
    return sock


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from ..generate import attach_adapter, load_for_inference
    from ..hf import check_model_dir
    from ..peft_format import read_adapter
    from ..serve.app import Served, api_key_from, build_app
    from ..serve.engine import Engine

    device, why = resolve_device(args.device)  # every flag is checked before the model loads
    model_dir = check_model_dir(args.model)
    adapters = parse_adapters(args.adapter)
    for name, folder in adapters.items():
        read_adapter(folder)  # a broken adapter: one line, before the model load
    root = None
    if args.adapter_root is not None:
        root = Path(args.adapter_root).expanduser()
        if not root.is_dir():
            raise ConfigError(f"--adapter-root {args.adapter_root}: no such folder")
    base_name = args.served_model_name or model_dir.name
    if base_name in adapters:
        raise ConfigError(f"--adapter {base_name}: the base model is served under that name; pick another "
                          "(or --served-model-name)")
    api_key = api_key_from(args.api_key)
    sock = _listening_socket(args.host, args.port)
    print(device_line(device, DTYPES[args.dtype], why), file=sys.stderr, flush=True)
    model, tok = load_for_inference(model_dir, None, dtype=args.dtype, chat_template=args.chat_template,
                                    device=device)
    for name, folder in adapters.items():
        attach_adapter(model, folder, model_dir, name=name)
    model.eval()
    context = int(getattr(model.config, "max_position_embeddings", None) or 2048)
    engine = Engine(model, tok, max_batch=args.max_batch).start()
    served = Served(engine, tok, base_name, {n: str(f) for n, f in adapters.items()}, root, api_key, context,
                    vocab=model.get_input_embeddings().num_embeddings, default_max_tokens=args.max_tokens)
    app = build_app(served)
    if not _is_loopback(args.host) and api_key is None:
        print(f"warning: serving on {args.host} without an API key: anyone who can reach this port can use the "
              "model; set --api-key or LORAFIT_API_KEY", file=sys.stderr, flush=True)
    url = f"http://{args.host if ':' not in args.host else '[' + args.host + ']'}:{sock.getsockname()[1]}/v1"
    print(f"lorafit serve: {url} | models: {', '.join([base_name, *adapters])}"
          + (" | runtime adapter loading from " + str(root) if root else "")
          + (" | API key required" if api_key else ""), flush=True)
    server = _server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=args.shutdown_timeout,
                                    limit_concurrency=args.max_connections))
    try:
        server.run(sockets=[sock])
    finally:
        engine.stop()
    print("lorafit serve: stopped", flush=True)
    return 0


def _server(config):
    """uvicorn's server, whose SIGINT/SIGTERM stop it gracefully and then exit 0 (uvicorn itself re-raises the signal
    after its shutdown, which ends the process with the signal's status). Built here: uvicorn is an optional extra."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            previous = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for s, handler in previous.items():
                    signal.signal(s, handler)
    return Server(config)


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve a model and its adapters over OpenAI's API (completions, chat "
                       "completions, models), batching requests for different adapters together",
                       description="An OpenAI-compatible server: /v1/models, /v1/completions, /v1/chat/completions "
                                   "(streaming with stream: true), /v1/load_lora_adapter and /v1/unload_lora_adapter "
                                   "(with --adapter-root), /health. Pick the base model or an adapter with the "
                                   "request's 'model'. SIGTERM or Ctrl-C stops it; exit code 0.")
    add_model_flag(p, required=True)
    p.add_argument("--adapter", action="append", metavar="NAME=PATH", help="an adapter folder served as NAME "
                   "(repeat for several; PATH alone serves it under its folder's name) (default: none)")
    p.add_argument("--served-model-name", metavar="NAME", help="the base model's name in the API (default: the "
                   "model folder's name)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on; 0.0.0.0 for every interface "
                   "(default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on; 0 picks a free one (default: 8000)")
    p.add_argument("--api-key", metavar="KEY", help="require 'Authorization: Bearer KEY' on every request "
                   "(default: $LORAFIT_API_KEY, else none)")
    p.add_argument("--adapter-root", metavar="DIR", help="allow /v1/load_lora_adapter, for folders inside DIR only "
                   "(default: off)")
    p.add_argument("--max-batch", type=positive_int, default=16, metavar="N", help="rows decoded together; more "
                   "requests wait for a free row (default: 16)")
    p.add_argument("--max-tokens", type=positive_int, default=256, metavar="N", help="new tokens of an answer "
                   "whose request gives no max_tokens (default: 256)")
    p.add_argument("--max-connections", type=positive_int, default=256, metavar="N", help="open connections at "
                   "most; more get 503 (default: 256)")
    p.add_argument("--shutdown-timeout", type=positive_int, default=5, metavar="S", help="seconds running "
                   "requests get to finish after SIGTERM or Ctrl-C (default: 5)")
    p.add_argument("--chat-template", metavar="FILE", help="Jinja chat template file replacing (or supplying) the "
                   "tokenizer's (default: the tokenizer's)")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32", help="weights dtype (default: float32)")
    add_device_flag(p)
    p.set_defaults(func=cmd_serve, needs=SERVE_NEEDS)
