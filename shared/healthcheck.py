"""Container healthcheck: `python -m shared.healthcheck <service>` exits 0 when this host's
instance of the service sent a heartbeat within three heartbeat intervals."""

from __future__ import annotations

import socket
import sys
from datetime import UTC, datetime

import redis

from contracts import ServiceHeartbeat, topic_for
from contracts.codec import decode
from shared.bus.wire import body_of
from shared.config import load_settings


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m shared.healthcheck <service>", file=sys.stderr)
        return 2
    service = argv[0]
    settings = load_settings()
    if not settings.redis_url:
        print("HELOX_REDIS_URL is not set", file=sys.stderr)
        return 1
    host = socket.gethostname()
    client = redis.Redis.from_url(settings.redis_url, socket_timeout=3)
    stream = topic_for(ServiceHeartbeat).stream(settings.topic_prefix)
    now = datetime.now(UTC)
    for _id, fields in client.xrevrange(stream, count=500):
        try:
            env = decode(body_of(fields), ServiceHeartbeat)
        except ValueError:
            continue
        hb = env.payload
        if hb.service == service and hb.host == host:
            age = (now - env.occurred_at).total_seconds()
            ok = age <= 3 * hb.interval_s and hb.status != "stopping"
            print(f"{hb.instance}: {hb.status}, last heartbeat {age:.1f}s ago")
            return 0 if ok else 1
    print(f"no heartbeat from {service} on {host}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
