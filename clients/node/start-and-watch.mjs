#!/usr/bin/env node
// Starts a strategy and prints its runtime as JSON lines until it ends: algoplane's protos used
// from Node.js with @grpc/grpc-js and @grpc/proto-loader, nothing generated.
//
//   node start-and-watch.mjs --token "$TOKEN" --symbol SBIN --quantity 5 \
//     --buy-in 5s --hold 30s --stop-loss 99.5
//
// Each stdout line is a RuntimeEvent in proto3 JSON (the shape grpcurl and `algoplane watch`
// print). The first line is StartStrategy's reply, which has no eventId; the rest come from
// StreamRuntimeBatches (StreamRuntime's events, those waiting together in one message; each is
// printed on its own line). Exit codes: 0 the strategy reached COMPLETED, STOPPED or FAILED; 1 an RPC
// failed (the status code and message go to stderr); 2 bad arguments; 3 --max-events or
// --timeout was reached first.

import { randomUUID } from "node:crypto";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";

import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";

const PROG = "start-and-watch";
const USAGE = `usage: node ${PROG}.mjs [--addr host:port] [--token JWT]
    --symbol SYMBOL [--quantity N] (--buy-in 5s --hold 30s | --buy-time RFC3339 --sell-time RFC3339)
    --stop-loss PRICE [--request-id ID] [--max-events N] [--timeout 10m]
--addr defaults to $ALGOPLANE_ADDR, then 127.0.0.1:50051; --token to $ALGOPLANE_TOKEN.`;
const TERMINAL = new Set([
  "STRATEGY_STATUS_COMPLETED",
  "STRATEGY_STATUS_STOPPED",
  "STRATEGY_STATUS_FAILED",
]);
const UNITS = { ms: 1, s: 1000, m: 60_000, h: 3_600_000, d: 86_400_000 };
const CALL_TIMEOUT_MS = 10_000;

class UsageError extends Error {}

// The proto imports are relative to the repository root (scripts/gen-protos compiles with
// -I.), so the root is the include path and the file is named from it.
const REPO_ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "..", "..");
const PROTO_FILE = join("protos", "algoplane", "v1", "strategy.proto");

function loadService() {
  const definition = protoLoader.loadSync(PROTO_FILE, {
    includeDirs: [REPO_ROOT],
    // Field names in lowerCamelCase, int64 as decimal strings: proto3 JSON, both ways.
    longs: String,
    enums: String,
    defaults: false,
    oneofs: true,
  });
  return grpc.loadPackageDefinition(definition).algoplane.v1.StrategyService;
}

function parseDuration(flag, text) {
  const match = /^(\d+(?:\.\d+)?)(ms|s|m|h|d)$/.exec(text ?? "");
  if (!match) throw new UsageError(`--${flag} ${text}: use e.g. 500ms, 5s, 2m, 1h`);
  return Number(match[1]) * UNITS[match[2]];
}

function parseInstant(flag, text) {
  const ms = Date.parse(text);
  if (!/^\d{4}-\d\d-\d\dT.*(Z|[+-]\d\d:\d\d)$/.test(text) || Number.isNaN(ms)) {
    throw new UsageError(`--${flag} ${text}: use RFC 3339 with a zone, e.g. 2030-01-02T09:15:00Z`);
  }
  return ms;
}

function timestamp(ms) {
  const whole = Math.floor(ms);
  return { seconds: String(Math.floor(whole / 1000)), nanos: (whole % 1000) * 1_000_000 };
}

function parseCli(argv, env) {
  const { values } = parseArgs({
    args: argv,
    options: {
      addr: { type: "string", default: env.ALGOPLANE_ADDR || "127.0.0.1:50051" },
      token: { type: "string", default: env.ALGOPLANE_TOKEN || "" },
      symbol: { type: "string" },
      quantity: { type: "string", default: "1" },
      "buy-in": { type: "string" },
      hold: { type: "string" },
      "buy-time": { type: "string" },
      "sell-time": { type: "string" },
      "stop-loss": { type: "string" },
      "request-id": { type: "string", default: randomUUID() },
      "max-events": { type: "string", default: "1000" },
      timeout: { type: "string", default: "10m" },
      help: { type: "boolean", short: "h", default: false },
    },
  });
  if (values.help) return { help: true };
  if (!values.token) throw new UsageError("give --token or set ALGOPLANE_TOKEN");
  if (!values.symbol) throw new UsageError("--symbol is required");
  if (!values["stop-loss"]) throw new UsageError("--stop-loss is required");
  const quantity = values.quantity;
  const maxEvents = Number(values["max-events"]);
  if (!/^\d+$/.test(quantity)) throw new UsageError(`--quantity ${quantity}: a whole number`);
  if (!Number.isInteger(maxEvents) || maxEvents < 1) {
    throw new UsageError(`--max-events ${values["max-events"]}: a whole number >= 1`);
  }
  return {
    addr: values.addr,
    token: values.token,
    requestId: values["request-id"],
    maxEvents,
    timeoutMs: parseDuration("timeout", values.timeout),
    spec: {
      symbol: values.symbol,
      quantity,
      ...times(values),
      stopLoss: values["stop-loss"],
    },
  };
}

function times(values) {
  const relative = values["buy-in"] !== undefined || values.hold !== undefined;
  const absolute = values["buy-time"] !== undefined || values["sell-time"] !== undefined;
  if (relative === absolute) {
    throw new UsageError("give either --buy-in and --hold, or --buy-time and --sell-time");
  }
  if (relative) {
    const buy = Date.now() + parseDuration("buy-in", values["buy-in"]);
    const sell = buy + parseDuration("hold", values.hold);
    return { buyTime: timestamp(buy), sellTime: timestamp(sell) };
  }
  return {
    buyTime: timestamp(parseInstant("buy-time", values["buy-time"])),
    sellTime: timestamp(parseInstant("sell-time", values["sell-time"])),
  };
}

// proto3 JSON of a Timestamp: RFC 3339 in UTC with 0, 3, 6 or 9 fractional digits.
function rfc3339({ seconds, nanos = 0 }) {
  const base = new Date(Number(seconds) * 1000).toISOString().slice(0, 19);
  if (!nanos) return `${base}Z`;
  const digits = String(nanos).padStart(9, "0");
  const kept = digits.endsWith("000000") ? 3 : digits.endsWith("000") ? 6 : 9;
  return `${base}.${digits.slice(0, kept)}Z`;
}

function toJson(runtime) {
  const out = { ...runtime };
  for (const field of ["updatedAt", "terminatedAt"]) {
    if (out[field]) out[field] = rfc3339(out[field]);
  }
  return out;
}

function describe(method, error) {
  const code = grpc.status[error.code] ?? `code ${error.code}`;
  return `${PROG}: ${method} failed: ${code}: ${error.details || error.message}`;
}

function deadline() {
  return new Date(Date.now() + CALL_TIMEOUT_MS);
}

// Resolves with the exit code. The stream is opened before StartStrategy: an empty
// after_event_id means "from now", and asking first makes it very likely that the server has
// fixed its position before the new strategy's first event; events are matched to the
// strategy once its id is known, and a runtime version already printed is never printed again.
function run(options) {
  const StrategyService = loadService();
  const client = new StrategyService(options.addr, grpc.credentials.createInsecure());
  const metadata = new grpc.Metadata();
  metadata.set("authorization", `Bearer ${options.token}`);

  return new Promise((resolveRun) => {
    let strategyId = null;
    let lastVersion = -1;
    let printed = 0;
    let finished = false;
    const early = [];
    const stream = client.StreamRuntimeBatches({}, metadata);
    const timer = setTimeout(
      () => finish(3, `${PROG}: no terminal state within ${options.timeoutMs} ms`),
      options.timeoutMs,
    );

    function finish(code, message) {
      if (finished) return;
      finished = true;
      clearTimeout(timer);
      if (message) console.error(message);
      stream.cancel();
      client.close();
      resolveRun(code);
    }

    function emit(eventId, runtime) {
      if (finished) return;
      if (runtime.strategyId !== strategyId) return;
      // A notice (a stale feed) is news at the same version; any other repeat is a duplicate.
      const version = Number(runtime.version);
      if (version < lastVersion || (version === lastVersion && !runtime.notice)) return;
      lastVersion = version;
      const event = eventId ? { eventId, runtime: toJson(runtime) } : { runtime: toJson(runtime) };
      process.stdout.write(`${JSON.stringify(event)}\n`);
      printed += 1;
      if (TERMINAL.has(runtime.status)) finish(0);
      else if (printed >= options.maxEvents) {
        finish(3, `${PROG}: stopped after ${printed} events, before a terminal state`);
      }
    }

    stream.on("data", (batch) => {
      for (const event of batch.events) {
        if (strategyId === null) early.push(event);
        else emit(event.eventId, event.runtime);
      }
    });
    // Until StartStrategy answers, a stream failure waits: the same cause (a bad token, no
    // server) fails StartStrategy too, and that is the call the user asked for.
    let streamFailure = null;
    function streamFailed(message) {
      if (strategyId === null) streamFailure ??= message;
      else finish(1, message);
    }
    stream.on("error", (error) => streamFailed(describe("StreamRuntimeBatches", error)));
    stream.on("end", () =>
      streamFailed(`${PROG}: StreamRuntimeBatches ended before a terminal state`),
    );

    const request = { spec: options.spec, requestId: options.requestId };
    client.StartStrategy(request, metadata, { deadline: deadline() }, (error, runtime) => {
      if (finished) return;
      if (error) return finish(1, describe("StartStrategy", error));
      strategyId = runtime.strategyId;
      emit("", runtime);
      for (const event of early.splice(0)) emit(event.eventId, event.runtime);
      if (streamFailure) finish(1, streamFailure);
    });
  });
}

async function main() {
  let options;
  try {
    options = parseCli(process.argv.slice(2), process.env);
  } catch (error) {
    if (!(error instanceof UsageError || error.code?.startsWith("ERR_PARSE_ARGS"))) throw error;
    console.error(`${PROG}: ${error.message}\n${USAGE}`);
    return 2;
  }
  if (options.help) {
    console.log(USAGE);
    return 0;
  }
  return run(options);
}

process.exitCode = await main();
