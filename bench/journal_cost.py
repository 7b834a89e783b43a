"""Cost per request of the MQTT request journal (edged.transports.journal) on this disk.

    python -m bench.journal_cost [--requests 2000] [--dir DIR]

For synchronous=FULL and NORMAL (WAL mode both), times `begin()` of a ~300-byte
request and `finish()` with a ~1 KB final frame, request after request, past the
point where answered rows are evicted (the steady state of a long-running daemon),
and prints the median, p90, p99 and mean per request in microseconds, the median of
`begin()` alone (it sits between a message's arrival and its acknowledgement),
and the latency of a plain 4 KiB write + fdatasync on the same directory for scale.
DIR defaults to .cache/bench in the checkout; put it on the disk under test.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from bench import cache_dir
from edged.transports.journal import Journal

PAYLOAD = json.dumps({
    "prompt": "Summarise the last hour of readings from the greenhouse: temperature 21.4-24.9 C, "
              "humidity 61-74 %, soil moisture falling in bed 3, rain forecast 2 mm. Should the irrigation run tonight?",
    "stream": False, "options": {"num_predict": 96, "temperature": 0.2}, "id": "req-000000", "priority": 10,
}).encode()
FINAL = json.dumps({
    "id": "req-000000", "done": True, "done_reason": "stop",
    "response": "Bed 3 is drying faster than the others; run the irrigation tonight for bed 3 only. " * 11,
    "prompt_eval_count": 74, "eval_count": 96, "total_duration": 2_812_000_000,
}).encode()


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def measure(directory: Path, synchronous: str, requests: int) -> dict:
    with tempfile.TemporaryDirectory(dir=directory) as d:
        j = Journal(Path(d) / "journal.db", synchronous=synchronous)
        props = {"response_topic": "devices/gh-1/reply", "correlation_data": None, "expiry_at": None}
        for i in range(200):  # warm-up: file grown, caches primed
            key, _, _ = j.begin("devices/gh-1/reply", f"w{i}", "edged/pi/request", PAYLOAD, props)
            j.finish(key, FINAL)
        per_request, begins = [], []
        for i in range(requests):
            t0 = time.perf_counter()
            key, state, _ = j.begin("devices/gh-1/reply", f"r{i}", "edged/pi/request", PAYLOAD, props)
            t1 = time.perf_counter()
            j.finish(key, FINAL)
            t2 = time.perf_counter()
            assert state == "new"
            begins.append((t1 - t0) * 1e6)
            per_request.append((t2 - t0) * 1e6)
        j.close()
    return {
        "synchronous": synchronous, "requests": requests,
        "median_us": statistics.median(per_request), "p90_us": _pct(per_request, 0.90),
        "p99_us": _pct(per_request, 0.99), "mean_us": statistics.fmean(per_request),
        "begin_median_us": statistics.median(begins),
    }


def fdatasync_us(directory: Path, n: int = 200) -> float:
    """Median latency of overwriting 4 KiB and fdatasync-ing it (what one WAL commit waits for)."""
    fd, name = tempfile.mkstemp(dir=directory)
    try:
        block = os.urandom(4096)
        times = []
        for i in range(n):
            os.pwrite(fd, block, (i % 16) * 4096)
            t0 = time.perf_counter()
            os.fdatasync(fd)
            times.append((time.perf_counter() - t0) * 1e6)
        return statistics.median(times)
    finally:
        os.close(fd)
        os.unlink(name)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--dir", type=Path, default=None, help="directory on the disk under test (default: .cache/bench)")
    args = ap.parse_args(argv)
    directory = args.dir or cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    print(f"journal cost per request (begin + finish, {len(PAYLOAD)} B request, {len(FINAL)} B final), "
          f"{args.requests} requests, WAL, in {directory}")
    print(f"fdatasync of 4 KiB here: median {fdatasync_us(directory):.0f} us")
    for sync in ("FULL", "NORMAL"):
        r = measure(directory, sync, args.requests)
        print(f"  synchronous={sync:<6}  median {r['median_us']:7.0f} us  p90 {r['p90_us']:7.0f}  "
              f"p99 {r['p99_us']:7.0f}  mean {r['mean_us']:7.0f}  (begin alone: median {r['begin_median_us']:.0f} us)")


if __name__ == "__main__":
    main()
