"""Synapse (bus) benchmark, all against one embedded redis-server started here.

1. Publish throughput: the runtime's pipelined `publish_many` (envelope + encoding
   included) vs raw redis-py XADD of pre-encoded entries of the same size, pipelined
   the same way. Target: runtime >= 0.5 x raw.
2. Producer -> consumer latency at 1,000 events/s: a consumer in another process (a
   real Bus subscriber in a consumer group, acking) records receive time - occurred_at.
   Target: p99 < 10 ms on loopback.
3. Outbox `publish()` cost per call (what the trainer's loop pays). Target: p99 < 50 us.

Run: python benchmarks/bus.py [--events 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import redis

from contracts import DataPrepProgress, Producer, TrainingMetrics
from contracts.codec import envelope
from shared.bus import Bus, Outbox
from shared.bus.wire import encode_entry
from shared.config import HeloxSettings
from shared.logging import configure_logging
from shared.redis_server import RedisServer

PRODUCER = Producer(service="bench", instance="bench-1")
BATCH = 500


def metric(i: int) -> TrainingMetrics:
    return TrainingMetrics(
        step=i, tokens_seen=i * 4096, loss=2.5, lr=3e-4, grad_norm=0.8, seq_len=256, batch_size=16,
        tokens_per_s=2100.0, grad_norm_per_layer={f"layers.{k}": 0.1 for k in range(4)},
    )


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def bench_throughput(url: str, n: int) -> tuple[float, float]:
    settings = HeloxSettings(redis_url=url)
    sample = encode_entry(envelope(metric(0), producer=PRODUCER))
    client = redis.Redis.from_url(url)
    client.delete("bench.raw")
    t0 = time.perf_counter()
    for start in range(0, n, BATCH):
        pipe = client.pipeline(transaction=False)
        for _ in range(min(BATCH, n - start)):
            pipe.xadd("bench.raw", sample)
        pipe.execute()
    raw_s = time.perf_counter() - t0
    client.delete("bench.raw")

    bus = Bus(settings, "bench", instance="bench-1")
    await bus.connect()
    payloads = [metric(i) for i in range(n)]
    t0 = time.perf_counter()
    for start in range(0, n, BATCH):
        await bus.publish_many(payloads[start : start + BATCH], run_id="bench")
    rt_s = time.perf_counter() - t0
    await bus.broker.stop()
    return n / raw_s, n / rt_s


def _consumer(url: str, n: int, ready: mp.Event, out: mp.Queue) -> None:  # type: ignore[type-arg]
    configure_logging("bench-consumer", "c1", fmt="json", level="error")
    settings = HeloxSettings(redis_url=url, polling_interval_ms=100)

    async def main() -> None:
        bus = Bus(settings, "bench-consumer", instance="c1")
        lat: list[float] = []
        done = asyncio.Event()

        async def on(env, _d) -> None:  # type: ignore[no-untyped-def]
            lat.append((datetime.now(UTC) - env.occurred_at).total_seconds() * 1e3)
            if len(lat) >= n:
                done.set()

        bus.subscribe(DataPrepProgress, on, max_records=100)  # a telemetry consumer reads in batches
        await bus.start()
        ready.set()
        await asyncio.wait_for(done.wait(), timeout=60 + n / 500)
        await bus.stop()
        out.put(lat)

    asyncio.run(main())


async def bench_latency(url: str, n: int, rate: float) -> list[float]:
    ready = mp.Event()
    out: mp.Queue = mp.Queue()  # type: ignore[type-arg]
    proc = mp.Process(target=_consumer, args=(url, n, ready, out))
    proc.start()
    ready.wait(30)
    await asyncio.sleep(0.5)
    bus = Bus(HeloxSettings(redis_url=url), "bench", instance="bench-p")
    await bus.connect()
    period = 1.0 / rate
    t_next = time.perf_counter()
    for i in range(n):
        await bus.publish(DataPrepProgress(stage="bench", fraction=0.0, detail=str(i)), run_id="lat")
        t_next += period
        delay = t_next - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
    lat = out.get(timeout=120)
    proc.join(10)
    await bus.broker.stop()
    return lat


def bench_outbox(url: str, n: int, spill: Path) -> list[float]:
    outbox = Outbox(url, producer=PRODUCER, spill_dir=spill)
    payloads = [metric(i) for i in range(n)]
    costs = []
    for p in payloads:
        t0 = time.perf_counter_ns()
        outbox.publish(p, run_id="bench")
        costs.append((time.perf_counter_ns() - t0) / 1e3)
        if len(costs) % 1000 == 0:
            time.sleep(0.001)  # the trainer logs every few steps, not in a tight loop
    outbox.flush(60)
    outbox.close()
    return costs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=20_000)
    ap.add_argument("--latency-events", type=int, default=3_000)
    ap.add_argument("--rate", type=float, default=1000.0)
    args = ap.parse_args()
    configure_logging("bench", "bench-1", fmt="json", level="error")
    with tempfile.TemporaryDirectory() as tmp, RedisServer(Path(tmp) / "redis") as server:
        raw, rt = asyncio.run(bench_throughput(server.url, args.events))
        print(f"publish throughput: raw pipelined XADD {raw:,.0f} ev/s | runtime publish_many {rt:,.0f} ev/s "
              f"| ratio {rt / raw:.2f} (target >= 0.5)")
        lat = asyncio.run(bench_latency(server.url, args.latency_events, args.rate))
        print(f"latency at {args.rate:.0f} ev/s over {len(lat)} events: p50 {statistics.median(lat):.2f} ms "
              f"| p99 {pct(lat, 0.99):.2f} ms | max {max(lat):.2f} ms (target p99 < 10 ms)")
        costs = bench_outbox(server.url, args.events, Path(tmp) / "spill")
        print(f"outbox publish cost: p50 {statistics.median(costs):.1f} us | p99 {pct(costs, 0.99):.1f} us "
              f"| max {max(costs):.1f} us (target p99 < 50 us)")


if __name__ == "__main__":
    main()
