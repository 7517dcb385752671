"""Watch a sweep in a browser: optuna-dashboard serving the sweep's Optuna journal, read-only.

    python -m cifar_ray.watch results/quickstart [--port 8080] [--host 127.0.0.1]

Works while the sweep runs (the page follows the journal as the driver appends to it) and after it
ended. Binds 127.0.0.1 unless --host says otherwise. Ctrl-C stops it. No account, nothing online.
"""
from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Optional
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from cifar_ray.files import printable
from cifar_ray.pipes import run_main
from cifar_ray.record import JOURNAL_FILE

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
WILDCARDS = ("0.0.0.0", "::", "")  # every interface: no one name to check a Host header against


class WatchError(ValueError):
    """No journal to serve, or an address that cannot be bound."""


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a browser's open request never holds the process at exit


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):  # `format`: the base class's parameter name
        pass  # one line per request would drown the sweep's table


def journal_of(results: str | Path) -> Path:
    folder = Path(results)
    if not folder.is_dir():
        raise WatchError(f"{results}: no such folder; give a sweep's results folder, e.g. results/quickstart")
    journal = folder / JOURNAL_FILE
    if journal.is_symlink():
        raise WatchError(f"{journal} is a symbolic link; a results folder holds plain files only")
    if not journal.is_file():
        raise WatchError(f"{folder}: no {JOURNAL_FILE}; the sweep writes it when it starts (sweeps run before "
                         "cifar_ray wrote journals have none: read them with python -m cifar_ray.report)")
    from cifar_ray.journal import check_journal

    try:
        check_journal(journal)
    except (ValueError, OSError) as err:
        raise WatchError(f"{journal}: not a readable Optuna journal: {err}; read the sweep with "
                         "python -m cifar_ray.report instead") from None
    return journal


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and localhost: reachable from this machine only."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def allowed_hosts(host: str, port: int) -> Optional[set[str]]:
    """The Host headers a request may carry: the bound address (and localhost's names when it is a
    loopback one), with or without the port; None for a wildcard bind (every name is possible). A page
    on another site that rebinds its DNS name to 127.0.0.1 sends its own name and is refused."""
    if host in WILDCARDS:
        return None
    names = {f"[{host}]" if ":" in host else host}
    if host in ("127.0.0.1", "::1"):
        names.add("localhost")
    if host == "localhost":
        names |= {"127.0.0.1", "[::1]"}
    return {n.lower() for n in names} | {f"{n}:{port}".lower() for n in names}


def check_host(app, allowed: Optional[set[str]]):
    """Answer 421 to a request whose Host header is not one of `allowed` (DNS rebinding)."""
    if allowed is None:
        return app

    def guarded(environ, start_response):
        if environ.get("HTTP_HOST", "").lower() in allowed:
            return app(environ, start_response)
        start_response("421 Misdirected Request", [("Content-Type", "text/plain")])
        return [b"this dashboard answers only to the address it listens on"]
    return guarded


def bind(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> tuple[WSGIServer, str]:
    """Listen on host:port (port 0: any free port) before anything is served; returns (server, url)."""
    def not_yet(environ, start_response):
        start_response("503 Service Unavailable", [("Content-Type", "text/plain")])
        return [b"the sweep's journal is not open yet; reload in a moment"]

    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    server_class = type("_Server6" if family == socket.AF_INET6 else "_Server4", (_Server,),
                        {"address_family": family})
    try:
        server: WSGIServer = make_server(host.strip("[]"), port, not_yet, server_class=server_class,
                                         handler_class=_QuietHandler)
    except OSError as exc:
        raise WatchError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); choose another port or "
                         "--host") from None
    shown = f"[{host}]" if ":" in host else host
    return server, f"http://{shown}:{server.server_port}/dashboard/"


READ_METHODS = ("GET", "HEAD", "OPTIONS")


def read_only(app):
    """The dashboard's buttons that write (create or delete a study, notes, tell) are answered 403
    before they reach it: the journal is the sweep's record. The storage refuses writes as well."""
    def guarded(environ, start_response):
        if environ.get("REQUEST_METHOD", "GET").upper() in READ_METHODS:
            return app(environ, start_response)
        start_response("403 Forbidden", [("Content-Type", "application/json")])
        return [b'{"reason": "cifar_ray.watch is read-only: the journal is the sweep\'s record"}']
    return guarded


def serve_journal(server, journal: Path, host: str) -> None:
    """Point the bound server at optuna-dashboard on the journal, opened read-only, answering only to
    requests addressed to `host`."""
    import optuna_dashboard

    from cifar_ray.journal import open_journal

    app = read_only(optuna_dashboard.wsgi(open_journal(journal, read_only=True)))
    server.set_app(check_host(app, allowed_hosts(host.strip("[]"), server.server_port)))


def exposure_warning(host: str) -> Optional[str]:
    if is_loopback(host):
        return None
    return (f"warning: listening on {host}: anyone who can reach this port can read the sweep's results "
            "(configurations, metrics, node names)")


def serve_in_background(server) -> threading.Thread:
    thread = threading.Thread(target=server.serve_forever, name="cifar_ray.watch", daemon=True)
    thread.start()
    return thread


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cifar_ray.watch",
                                description="Serve a sweep's Optuna journal with optuna-dashboard (read-only).")
    p.add_argument("results", help="the sweep's results folder, e.g. results/quickstart")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"default {DEFAULT_PORT}; 0 picks a free port")
    p.add_argument("--host", default=DEFAULT_HOST,
                   help=f"address to bind (default {DEFAULT_HOST}: this machine only; 0.0.0.0 opens it to the network)")
    args = p.parse_args(argv)
    if not 0 <= args.port <= 65535:
        print(f"error: --port {args.port}: must be 0-65535", file=sys.stderr)
        return 2
    try:
        journal = journal_of(args.results)
        server, url = bind(args.host, args.port)
        serve_journal(server, journal, args.host)
    except WatchError as err:
        print(f"error: {printable(err)}", file=sys.stderr)
        return 2
    warning = exposure_warning(args.host)
    if warning:
        print(warning, file=sys.stderr)
    print(f"dashboard: {url}  (Ctrl-C stops it)", flush=True)
    # Ctrl-C stops it even when started from a script that ignores SIGINT in background jobs; so does SIGTERM
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("\nstopped", file=sys.stderr)
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
