"""`vss serve`: run the HTTP + websocket server (uvicorn, one process; run one per GPU).

SIGTERM (or Ctrl+C) drains before uvicorn's own shutdown (``service/drain.py``): not ready, new work
refused, streams closed with 1012 and a JSON reason, in-flight uploads finished within
``VSS_DRAIN_TIMEOUT_S``; then the process exits 0. A second signal stops waiting.
"""

from __future__ import annotations

import argparse
import ipaddress

from service.cli import CLIError

SHUTDOWN_GRACE_S = 5  # uvicorn's own graceful shutdown, after the drain: leftovers are cancelled then


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the segmentation server",
                       description="Serve /v1/segment, /v1/stream, /v1/models, /healthz, /readyz, /metrics and "
                                   "the web page. Flags override the VSS_* environment variables.")
    p.add_argument("--host", default=None, help="bind address (default: $VSS_HOST or 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="TCP port (default: $VSS_PORT or 8000)")
    p.add_argument("--model-dir", default=None, metavar="DIR",
                   help="model registry directory or s3://bucket/prefix (default: $VSS_MODEL_DIR or var/models)")
    p.add_argument("--engine", choices=("torch", "onnx"), default=None, help="inference backend")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None)
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default=None)
    p.add_argument("--insecure", action="store_true",
                   help="allow binding a non-loopback address without VSS_API_KEY (anyone can activate models)")
    p.set_defaults(func=run)


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a hostname may resolve to anything: treat it as public


def check_bind(host: str, api_key: str | None, insecure: bool) -> None:
    """Refuse to expose the mutating routes to the network without an API key."""
    if not is_loopback(host) and api_key is None and not insecure:
        raise CLIError(f"refusing to listen on {host} without an API key: set VSS_API_KEY, "
                       "bind 127.0.0.1, or pass --insecure")


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from service.settings import Settings

    overrides = {"host": args.host, "port": args.port, "model_dir": args.model_dir, "engine": args.engine,
                 "device": args.device, "log_level": args.log_level}
    try:
        settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as e:
        raise CLIError(f"invalid settings: {e.errors()[0]['loc'][0]}: {e.errors()[0]['msg']}") from e
    check_bind(settings.host, settings.api_key_value(), args.insecure)
    import uvicorn  # heavy imports (torch) only once the arguments are known to be good

    from service.app import create_app
    from service.drain import DrainingServer
    from service.metrics import configure_logging

    configure_logging(settings.log_level, settings.log_json)
    app = create_app(settings)
    shown = f"[{settings.host}]" if ":" in settings.host else settings.host
    url = f"http://{shown}:{settings.port}"
    auth = "API key required for mutating routes" if settings.api_key_value() else "no API key"
    print(f"vss: serving on {url} (docs {url}/docs; {settings.engine} engine; models in {settings.model_dir}; "
          f"{auth})", flush=True)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None, access_log=False,
                            timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
                            # uvicorn refuses a message over the budget while it arrives (close 1009, never
                            # buffered whole); video frames do not compress, so per-message deflate only costs CPU.
                            ws_max_size=settings.ws_max_message_bytes, ws_per_message_deflate=False,
                            server_header=False)
    server = DrainingServer(config, app.state.drain, settings.drain_timeout_s)
    server.run()
    return 0 if server.started else 3  # 3: uvicorn's startup failure (e.g. the port is taken)

