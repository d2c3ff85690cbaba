"""``medlora serve``: check the options, bind the socket, start uvicorn, and load the model in a background thread
(``/health`` answers 503 until it is ready). Without an API key only loopback addresses are served."""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
import threading
from pathlib import Path

from ..errors import MedloraError, log
from ..rundir import RunDir

API_KEY_ENV = "MEDLORA_API_KEY"


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def api_key(given: str | None) -> str | None:
    key = given if given is not None else os.environ.get(API_KEY_ENV)
    if key is not None and not key.strip():
        raise MedloraError("the API key is empty" + ("" if given is not None else f" (${API_KEY_ENV})"))
    key = key.strip() if key else None
    if key and not (key.isascii() and key.isprintable() and " " not in key):  # clients send it as ASCII
        raise MedloraError("the API key must be printable ASCII without spaces (an HTTP header carries it)" +
                           ("" if given is not None else f" (${API_KEY_ENV})"))
    return key


def check_binding(host: str, key: str | None, insecure: bool) -> None:
    if not key and not insecure and not is_loopback(host):
        raise MedloraError(f"--host {host} would let anyone who can reach this machine use the model: give "
                           f"--api_key KEY (or set {API_KEY_ENV}), or --insecure to serve it without a key")


def model_id(target: str | None, model: str | None, served_name: str | None) -> str:
    """The name /v1/models lists: --served_model_name, else the run folder's (or GGUF's) name, else --model."""
    if served_name:
        return served_name
    if target:
        path = Path(target)
        return path.stem if path.suffix == ".gguf" else RunDir.home(path).name
    return str(model)


def bind(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as e:
        raise MedloraError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def check_options(args) -> None:
    if args.run_dir is None and args.model is None:
        raise MedloraError("give a run folder, merged model or .gguf file (medlora serve runs/NAME), "
                           "or --model NAME for a base model")
    if args.run_dir is not None and not Path(args.run_dir).exists():
        raise MedloraError(f"{args.run_dir}: no such file or folder")
    # what open_backend would refuse once the port is bound, refused before it is
    from ..inference.loader import check_backend_choice, check_gguf_backend

    check_backend_choice(args.backend, args.threads)
    if args.run_dir is not None and Path(args.run_dir).is_file():
        if not check_gguf_backend(args.run_dir, args.backend):
            raise MedloraError(f"{args.run_dir}: a file, not a run or model folder (nor a .gguf file)")
    for name, low in (("port", 0), ("max_queue", 0), ("max_new_tokens", 1), ("max_tokens_limit", 1),
                      ("max_request_bytes", 1024)):
        if getattr(args, name) < low:
            raise MedloraError(f"--{name} must be >= {low}")
    if args.port > 65535:
        raise MedloraError("--port must be <= 65535")
    if args.emergency_number is not None and not args.emergency_number.strip():
        raise MedloraError("--emergency_number is empty")


def run(args) -> int:
    check_options(args)
    key = api_key(args.api_key)
    check_binding(args.host, key, args.insecure)
    try:
        import uvicorn

        from .app import ServerState, create_app
        from .schemas import Defaults
    except ImportError as e:
        raise MedloraError(f"medlora serve needs fastapi and uvicorn ({e.name} is missing): "
                           "pip install fastapi uvicorn") from None

    state = ServerState(model_id=model_id(args.run_dir, args.model, args.served_model_name),
                        defaults=Defaults(args.mode, args.max_new_tokens, args.max_tokens_limit), api_key=key,
                        max_queue=args.max_queue, max_request_bytes=args.max_request_bytes,
                        system_prompt=args.system_prompt)
    sock = bind(args.host, args.port)
    port = sock.getsockname()[1]
    host = f"[{args.host.strip('[]')}]" if ":" in args.host else args.host
    server = uvicorn.Server(uvicorn.Config(create_app(state), log_level="warning", access_log=False,
                                           timeout_graceful_shutdown=5, lifespan="off"))

    def load():
        from ..inference.guard import GuardedBackend
        from ..inference.loader import open_backend

        try:
            backend = open_backend(args.run_dir, args.model, args.backend, args.threads, args.trust_remote_code)
            # every answer the server gives passes the emergency guard (it cannot be switched off here)
            state.set_backend(GuardedBackend(backend, enabled=True, emergency_number=args.emergency_number))
        except Exception as e:  # noqa: BLE001 - one line, then the server stops
            state.load_error = str(e) if isinstance(e, MedloraError) else f"{type(e).__name__}: {e}"
            server.should_exit = True  # run() raises it: one line
            return
        log(f"ready: {state.description}; chat page and API at http://{host}:{port}/")

    log(f"listening on http://{host}:{port}/ (model '{state.model_id}' loading; /health answers 200 when ready"
        + (", API key required" if key else "") + ")")
    threading.Thread(target=load, name="medlora-load", daemon=True).start()
    # uvicorn shuts down gracefully on SIGINT and SIGTERM, then raises the signal again: both end here, exit code 0
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        if state.worker is not None:
            state.worker.stop()
        sock.close()
    if state.load_error:
        raise MedloraError(state.load_error)
    log("stopped")
    return 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt
