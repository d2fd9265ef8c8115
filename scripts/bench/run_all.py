"""Runs every benchmark and writes docs/benchmarks.md: the machine, the date, the command, and
per benchmark a table of figures with their targets and pass/miss.

    scripts/bench/run_all                 # full sizes -> docs/benchmarks.md
    scripts/bench/run_all --quick         # small sizes, a smoke run -> a file in the temp dir
    scripts/bench/run_all --only control_rpcs,footprint --output /tmp/b.md

Each benchmark runs in its own child process (`--child NAME`), so one benchmark's leftovers
(memory, threads, gRPC's process-wide state) never weigh on the next, and a crash costs only
its own section. A benchmark listed in BENCHMARKS whose module does not exist yet is skipped
with a note. A missed target does not fail the run: figures are reported, not asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.util
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

from scripts.bench import harness, hops
from scripts.bench.harness import Report

# The numbering; add a benchmark by adding its module here.
BENCHMARKS: list[tuple[str, str]] = [
    ("1", "stoploss_path"),
    ("2", "scheduled_burst"),
    ("3", "control_rpcs"),
    ("4", "stream_fanout"),
    ("5", "footprint"),
]
DOC = harness.ROOT / "docs" / "benchmarks.md"
_HOP_SAMPLES = (2000, 200)  # back to back, after idling
_HOP_SAMPLES_QUICK = (200, 20)


@dataclass
class Outcome:
    number: str
    name: str
    status: str  # "ran", "skipped" or "failed"
    seconds: float = 0.0
    report: Report | None = None
    detail: str = ""
    # The 1-minute load average when it ended: shows whether the machine was quiet.
    load_after: float | None = None
    # CPU the hypervisor gave to other guests while it ran, in cores (steal time): on a
    # shared 2-core VM it went from 0 to half a core between two runs of the same code.
    stolen: float | None = None

    @property
    def result(self) -> str:
        if self.report is None:
            return self.status
        misses = [f.name for f in self.report.figures if f.passed is False]
        return f"MISS ({', '.join(misses)})" if misses else "pass"


def _exists(name: str) -> bool:
    return importlib.util.find_spec(f"scripts.bench.{name}") is not None


def run_child(name: str, quick: bool, json_path: Path) -> int:
    """In the child: one benchmark's `run`, its report printed and written as JSON."""
    module = importlib.import_module(f"scripts.bench.{name}")
    report: Report = asyncio.run(module.run(quick=quick))
    harness.print_report(report)
    json_path.write_text(report.to_json())
    return 0


def run_one(number: str, name: str, quick: bool) -> Outcome:
    if not _exists(name):
        print(f"\n-- benchmark {number} ({name}): skipped, scripts/bench/{name}.py does not exist")
        return Outcome(number, name, "skipped", detail=f"scripts/bench/{name}.py not written yet")
    print(f"\n-- benchmark {number} ({name})", flush=True)
    with tempfile.TemporaryDirectory(prefix="algoplane-bench-") as tmp:
        json_path = Path(tmp) / "report.json"
        command = [sys.executable, "-m", "scripts.bench.run_all", "--child", name]
        command += ["--json", str(json_path)] + (["--quick"] if quick else [])
        began, steal = time.perf_counter(), _steal_seconds()
        code = subprocess.run(command, cwd=harness.ROOT, check=False).returncode
        seconds = time.perf_counter() - began
        stolen = (_steal_seconds() - steal) / seconds if seconds > 0 else None
        if code != 0 or not json_path.exists():
            print(f"-- benchmark {number} ({name}) failed with exit code {code}", flush=True)
            detail = f"exit code {code}"
            return Outcome(number, name, "failed", seconds, detail=detail, stolen=stolen)
        report = Report.from_json(json_path.read_text())
    load = os.getloadavg()[0]
    return Outcome(number, name, "ran", seconds, report, load_after=load, stolen=stolen)


def _steal_seconds() -> float:
    """CPU seconds the hypervisor has stolen from this machine since boot (0 on bare metal)."""
    return float(getattr(psutil.cpu_times(), "steal", 0.0))


def render(
    outcomes: Sequence[Outcome],
    machine: harness.Machine,
    machine_hops: hops.Hops,
    command: str,
    quick: bool,
) -> str:
    lines = [
        "# Benchmarks",
        "",
        "Written by `scripts/bench/run_all`; rerun it rather than editing this file. Each "
        "benchmark starts the real server (real Redis, SQLite, the paper broker with zero "
        "latency) and drives it from outside; a figure measured over several runs is the "
        "median of the per-run values, with their min .. max as the spread. Ratios are taken "
        "within one run. Targets are from issue 7; the reference machine has 2 cores.",
        "",
    ]
    if quick:
        lines += ["**Quick (smoke) sizes: these are not the reference figures.**", ""]
    lines += [f"Command: `{command}`", ""]
    lines += [f"- {line}" for line in [*machine.lines(), machine_hops.line()]]
    lines += ["", "## Summary", ""]
    lines.append("| # | benchmark | result | took | load after | CPU stolen (cores) |")
    lines.append("|---|---|---|---|---|---|")
    for o in outcomes:
        took = f"{o.seconds:.0f} s" if o.seconds else ""
        load = f"{o.load_after:.2f}" if o.load_after is not None else ""
        stolen = f"{o.stolen:.2f}" if o.stolen is not None else ""
        lines.append(f"| {o.number} | `{o.name}` | {o.result} | {took} | {load} | {stolen} |")
    lines += [
        "",
        "CPU stolen: the machine's steal time over the benchmark's wall time, the CPU its "
        "hypervisor gave to other guests; on a 2-core machine 0.5 is a quarter of it.",
    ]
    for o in outcomes:
        lines.append("")
        if o.report is not None:
            heading = f"{o.number}. {o.report.title}"
            lines.append(o.report.markdown(heading).rstrip("\n"))
        else:
            lines += [f"## {o.number}. `{o.name}`", "", f"Not measured: {o.status}, {o.detail}."]
    return "\n".join(lines) + "\n"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--only", default="", help="comma-separated benchmark names")
    parser.add_argument("--output", type=Path, help="default: docs/benchmarks.md (full runs)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, help=argparse.SUPPRESS)
    return parser


def _output(args: argparse.Namespace) -> Path:
    if args.output is not None:
        return Path(args.output)
    if args.quick:  # never overwrite the reference figures with a smoke run
        return Path(tempfile.gettempdir()) / "algoplane-benchmarks-quick.md"
    return DOC


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.child:
        return run_child(args.child, args.quick, args.json)
    only = {name.strip() for name in args.only.split(",") if name.strip()}
    unknown = only - {name for _, name in BENCHMARKS}
    if unknown:
        print(f"run_all: unknown benchmark(s): {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    machine = harness.machine()
    print("\n".join(machine.lines()), flush=True)
    # Before the benchmarks, on a quiet machine: what its wake-ups cost (see hops.py).
    machine_hops = hops.measure_here(*(_HOP_SAMPLES_QUICK if args.quick else _HOP_SAMPLES))
    print(machine_hops.line(), flush=True)
    chosen = [(n, name) for n, name in BENCHMARKS if not only or name in only]
    outcomes = [run_one(number, name, args.quick) for number, name in chosen]
    command = shlex.join(["scripts/bench/run_all", *(argv if argv is not None else sys.argv[1:])])
    output = _output(args)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(render(outcomes, machine, machine_hops, command, args.quick))
    print(f"\nwrote {output}")
    return 1 if any(o.status == "failed" for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
