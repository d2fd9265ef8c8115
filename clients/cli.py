"""`algoplane`: a command line over the SDK, printing JSON (for people and scripts).

    algoplane --token $TOKEN start --symbol SBIN --quantity 5 --buy-in 10s --hold 1m \\
        --stop-loss 99.5
    algoplane --token $TOKEN watch            # runtime events of all your strategies
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
from datetime import UTC, datetime, timedelta

import grpc
from google.protobuf.json_format import MessageToJson
from google.protobuf.message import Message

from clients.sdk import AlgoplaneClient
from protos.algoplane.v1 import strategy_pb2 as pb

_DURATION = re.compile(r"^(\d+)(s|m|h|d)$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def duration(text: str) -> timedelta:
    match = _DURATION.fullmatch(text)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r}: use e.g. 30s, 5m, 2h, 1d")
    return timedelta(seconds=int(match.group(1)) * _UNITS[match.group(2)])


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="algoplane", description=__doc__.split("\n")[0])
    root.add_argument("--target", default=os.environ.get("ALGOPLANE_TARGET", "127.0.0.1:50051"))
    root.add_argument("--token", default=os.environ.get("ALGOPLANE_TOKEN", ""))
    commands = root.add_subparsers(dest="command", required=True)
    for name in ("create", "start"):
        command = commands.add_parser(name, help=f"{name} a strategy from a spec")
        if name == "start":
            command.add_argument("--id", default="", help="start a stored strategy instead")
        command.add_argument("--symbol")
        command.add_argument("--quantity", type=int, default=1)
        command.add_argument("--buy-in", type=duration, default=timedelta(seconds=10))
        command.add_argument("--hold", type=duration, default=timedelta(minutes=1))
        command.add_argument("--stop-loss")
        command.add_argument("--request-id", default="")
    for name in ("get", "runtime", "orders"):
        commands.add_parser(name).add_argument("id")
    stop = commands.add_parser("stop")
    stop.add_argument("id")
    stop.add_argument("--keep-position", action="store_true")
    commands.add_parser("list")
    watch = commands.add_parser("watch", help="stream runtime events (Ctrl-C to end)")
    watch.add_argument("--id", default="")
    watch.add_argument("--after", default="", help="resume after this event_id")
    return root


def _spec(client: AlgoplaneClient, args: argparse.Namespace) -> pb.StrategySpec:
    if not args.symbol or not args.stop_loss:
        raise SystemExit("algoplane: --symbol and --stop-loss are required for a spec")
    buy = datetime.now(UTC) + args.buy_in
    return client.spec(args.symbol, args.quantity, buy, buy + args.hold, args.stop_loss)


async def _run(args: argparse.Namespace) -> None:
    async with AlgoplaneClient(args.target, args.token) as client:
        command = args.command
        if command == "watch":
            async for event in client.watch_runtime(args.id, args.after):
                _print(event)
            return
        if command == "list":
            for strategy in await client.list_all():
                _print(strategy)
            return
        if command == "orders":
            for order in await client.orders(args.id):
                _print(order)
            return
        _print(await _one(client, args))


async def _one(client: AlgoplaneClient, args: argparse.Namespace) -> Message:
    command = args.command
    if command == "create":
        return await client.create(_spec(client, args), args.request_id)
    if command == "start" and args.id:
        return await client.start(strategy_id=args.id, request_id=args.request_id)
    if command == "start":
        return await client.start(spec=_spec(client, args), request_id=args.request_id)
    if command == "stop":
        return await client.stop(args.id, keep_position=args.keep_position)
    if command == "get":
        return await client.get(args.id)
    return await client.runtime(args.id)


def _print(message: Message) -> None:
    print(MessageToJson(message, indent=None), flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if not args.token:
        print("algoplane: give --token or set ALGOPLANE_TOKEN", file=sys.stderr)
        return 2
    try:
        asyncio.run(_run(args))
    except grpc.aio.AioRpcError as exc:
        print(f"algoplane: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
