"""`algoplane-server [serve]` runs the service; `algoplane-server token --sub T` mints a token."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import signal
import sys
from datetime import timedelta

from server import engine_worker, event_loop, logs
from server.api.auth import mint_token, parse_ttl
from server.app import App, load_or_create_secret
from server.clock import SystemClock
from server.config import Settings, SettingsError, load_settings
from server.shutdown import shutdown_deadline, stop_within

DEMO_TENANT = "demo"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"algoplane: {exc}", file=sys.stderr)
        return 2
    worker_label = f"engine-worker-{args.index}" if args.command == "engine-worker" else ""
    logs.configure(settings.log_level, settings.log_format, process=worker_label)
    if args.command == "token":
        return _token(settings, args.sub, args.ttl)
    if args.command == "engine-worker":
        worker = engine_worker.run(settings, parent_pid=args.parent_pid, index=args.index)
        return event_loop.run(worker, settings.event_loop)
    try:
        return event_loop.run(serve(settings), settings.event_loop)
    except KeyboardInterrupt:  # pragma: no cover - the signal handler normally wins
        return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="algoplane-server")
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("serve", help="run the gRPC server (the default)")
    token = commands.add_parser("token", help="print a bearer token for a tenant")
    token.add_argument("--sub", required=True, help="the tenant the token speaks for")
    token.add_argument("--ttl", default="1d", help="lifetime: 90s, 15m, 12h, 1d (default 1d)")
    worker = commands.add_parser(
        "engine-worker",
        help="an engine-only process; the server starts these (ALGOPLANE_ENGINE_PROCESSES)",
    )
    worker.add_argument("--parent-pid", type=int, required=True, help="the server's pid")
    worker.add_argument("--index", type=int, default=1, help="which worker (for logs)")
    return parser


def _token(settings: Settings, tenant: str, ttl_text: str) -> int:
    try:
        ttl = parse_ttl(ttl_text)
        secret = settings.jwt_secret or load_or_create_secret(settings.data_dir)[0]
        print(mint_token(secret, tenant, ttl, SystemClock().now()))
    except ValueError as exc:
        print(f"algoplane: {exc}", file=sys.stderr)
        return 2
    return 0


async def serve(settings: Settings) -> int:
    logging.getLogger(__name__).info("starting on %s", event_loop.running())
    stop = asyncio.Event()
    again = asyncio.Event()  # a signal while stopping: give up on the rest
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        (again if stop.is_set() else stop).set()

    # SIGHUP too: a closed terminal hangs up its jobs, and the embedded redis-server, in a
    # session of its own, is stopped only by a server that shuts down cleanly.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, on_signal)
    app = App(settings)
    starting = asyncio.create_task(app.start())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():  # a signal while recovering: stop cleanly all the same
        starting.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await starting
        return await _stop(app, settings, again, 0)
    try:
        running = starting.result()
    except Exception as exc:  # noqa: BLE001 - any start failure is reported in one line
        stop.set()
        print(f"algoplane: cannot start: {exc}", file=sys.stderr)
        return await _stop(app, settings, again, 1)
    # What startup built (modules, the ORM's metadata, recovered state) lives as long as the
    # process; out of the collector's generations, a full collection no longer walks it,
    # which showed as pauses of tens of ms in stream delivery.
    gc.freeze()
    _announce(settings, running.port, running.jwt_secret, running.secret_generated)
    await stopping
    logging.getLogger(__name__).info("shutting down")
    return await _stop(app, settings, again, 0)


async def _stop(app: App, settings: Settings, again: asyncio.Event, code: int) -> int:
    """app.stop(), bounded (server.shutdown). Given up on, the embedded redis-server is
    still stopped (it writes its AOF out), and the process exits at once with 1: what did
    not stop would also hold up the loop's own teardown."""
    if await stop_within(app.stop, shutdown_deadline(settings.shutdown_grace_s), again):
        return code
    await app.abandon()
    logging.shutdown()
    sys.stdout.flush()
    os._exit(1)


def _announce(settings: Settings, port: int, secret: str, generated: bool) -> None:
    host = settings.grpc_addr.rsplit(":", 1)[0]
    print(f"algoplane: listening on {host}:{port}", flush=True)
    if settings.jwt_secret and not generated:
        return
    token = mint_token(secret, DEMO_TENANT, timedelta(days=1), SystemClock().now())
    print(f"algoplane: demo token (tenant {DEMO_TENANT}, 1 day):\n{token}", flush=True)
    print(
        "algoplane: try\n"
        f'  grpcurl -plaintext -H "authorization: Bearer {token}" '
        f"{host}:{port} algoplane.v1.StrategyService/ListStrategies",
        flush=True,
    )
