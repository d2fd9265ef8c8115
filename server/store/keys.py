"""Every Redis key, built here and nowhere else (the seed's names).

Braces are Redis Cluster hash tags: the keys of one strategy (`strategy:{id}`, `runtime:{id}`,
`lock_state:{id}`) share a slot, so one Lua script may touch them together. Scripts only ever
touch keys of one hash tag.
"""

from __future__ import annotations

from typing import Literal

StreamKind = Literal["runtime", "orders"]

# The seed's queue of order events: a Redis Stream read by the engine's consumer group.
# Scheduled BUY/SELL go here.
ORDER_QUEUE = "queue:orders"
# Exits (STOPLOSS, a user's Stop) go to a second stream the engine always reads first. Its hash
# tag `{queue:orders}` hashes exactly like the name `queue:orders`, so both streams and the
# fired markers share one Cluster slot and one Lua script may touch them together.
EXIT_QUEUE = "{queue:orders}:exits"
ENGINE_GROUP = "engine"

# The paper broker's book, as a broker outside our processes would keep it.
PAPER_ORDERS = "{paper}:orders"
PAPER_LOG = "{paper}:log"


# Set when Redis has been rebuilt from the DB; its absence means Redis lost its data
# (a new instance, FLUSHALL, a crash without AOF) and must be rebuilt again.
STATE_EPOCH = "algoplane:state-epoch"


def fired(strategy_id: str, run: int, intent: str) -> str:
    """String: set once when an order intent of a run is enqueued (dedupes timer firings)."""
    return f"{{queue:orders}}:fired:{strategy_id}:{run}:{intent}"


def strategy(strategy_id: str) -> str:
    """Hash: the strategy's static config (tenant, symbol, quantity, times, stop-loss)."""
    return f"strategy:{{{strategy_id}}}"


def runtime(strategy_id: str) -> str:
    """Hash: the strategy's live state (status, position, prices, order ids, version)."""
    return f"runtime:{{{strategy_id}}}"


def lock_state(strategy_id: str) -> str:
    """String: the per-strategy execution lock, a random token with a TTL."""
    return f"lock_state:{{{strategy_id}}}"


def symbol_strategies(symbol: str) -> str:
    """Set: ids of the live (started, not ended) strategies on a symbol."""
    return f"symbol:{{{symbol}}}:strategies"


def stoploss_armed(symbol: str) -> str:
    """Sorted set: strategies holding a position on the symbol, scored by stop-loss price.
    Members are `<stop-loss as 19 fixed digits>:<id>` so Lua compares prices exactly."""
    return f"symbol:{{{symbol}}}:stoploss"


def stoploss_runs(symbol: str) -> str:
    """Hash: strategy id -> `<run> <tenant>` of each armed position, so a trigger can queue
    its STOPLOSS event without first reading the strategy's runtime (another slot)."""
    return f"symbol:{{{symbol}}}:stoploss:runs"


def stoploss_fired(symbol: str) -> str:
    """Hash: strategy id -> the price that breached its stop-loss, kept until the STOPLOSS
    event is enqueued, so a trigger survives a crash between the two."""
    return f"symbol:{{{symbol}}}:stoploss:fired"


def price(symbol: str) -> str:
    """String: the last price the market listener saw for a symbol."""
    return f"price:{{{symbol}}}"


def event_stream(kind: StreamKind, tenant: str) -> str:
    """Stream: one tenant's runtime or order events, the source of StreamRuntime/StreamOrders.

    One stream per tenant keeps tenants apart and lets a client resume by event id across
    all of its strategies.
    """
    return f"stream:{kind}:{{{tenant}}}"
