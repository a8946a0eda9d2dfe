"""A test service process: consumes RunRequested with a controllable handler.

The event's `config` drives the handler: `sleep` seconds before the effect, `fail` to
raise. The effect is exactly-once: an RPUSH of the event id to `effects`, committed in one
MULTI/EXEC with the idempotency marker. Started markers go to `started:<event id>`.
Run as: python tests/bus/worker.py  (settings from HELOX_* env; HELOX_INSTANCE names it).
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from contracts import DataPrepProgress, Envelope, RunRequested
from shared.bus import Delivery
from shared.service import ServiceRuntime, run_service


def setup(rt: ServiceRuntime) -> None:
    async def on_run(env: Envelope[RunRequested], delivery: Delivery) -> None:
        key = str(env.event_id)
        redis = rt.bus.redis
        await redis.rpush(f"started:{key}", rt.instance)
        if await rt.idempotency.seen(key):
            return
        cfg = env.payload.config
        if cfg.get("sleep"):
            await asyncio.sleep(float(cfg["sleep"]))
        if cfg.get("fail"):
            raise RuntimeError(f"planned failure of {env.payload.name}")
        pipe = rt.idempotency.transaction()
        pipe.rpush("effects", key)
        await rt.idempotency.commit(key, pipe=pipe)
        await rt.bus.publish(DataPrepProgress(stage="worker", fraction=1.0, detail=env.payload.name))

    rt.bus.subscribe(RunRequested, on_run)


if __name__ == "__main__":
    sys.exit(run_service("worker", setup))
