"""`python -m cyrex_example`: consume `helox.export.model-ready` in consumer group `cyrex`.

For every ModelReady event: verify the export (signature + digests), load it, answer the prompt,
print one JSON line, XACK. An export that fails verification is reported and acked (retrying
cannot make it valid); an error while loading a valid export leaves the entry pending, so a
restarted consumer sees it again.

    HELOX_SIGNING_KEY=... python -m cyrex_example --redis-url redis://localhost:6379/0 \\
        --prompt "First Citizen:" [--runtime onnx|hf] [--from-start] [--max-messages N]

A plain redis-py XREADGROUP loop (any FastStream RedisBroker subscriber with
`StreamSub(stream, group="cyrex", consumer=...)` reads the same entries).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

import redis
from faststream.redis.parser.binary import BinaryMessageFormatV1

from contracts import ModelReady, SchemaVersionError, decode

from .loader import ExportVerificationError, Runtime, load_from_event, signing_key_from_env

GROUP = "cyrex"
DATA_FIELD = b"__data__"  # FastStream's field: one binary frame (headers + JSON body)


def entry_body(fields: dict[bytes, bytes]) -> bytes:
    raw = fields.get(DATA_FIELD, b"")
    try:
        body, _headers = BinaryMessageFormatV1.parse(raw)
        return body
    except Exception:
        return raw


def handle_entry(fields: dict[bytes, bytes], key: bytes, *, prompt: str, runtime: Runtime = "onnx",
                 max_new_tokens: int = 32, allowed_root: str | None = None) -> dict[str, Any]:
    """One stream entry -> a result record. Raises only for errors worth a retry (I/O, runtime)."""
    try:
        env = decode(entry_body(fields), ModelReady)
    except (SchemaVersionError, ValueError) as exc:
        return {"status": "rejected", "reason": f"not a ModelReady event: {exc}"}
    event = env.payload
    try:
        model = load_from_event(event, key, runtime=runtime, allowed_root=allowed_root)
    except ExportVerificationError as exc:
        return {"status": "rejected", "model_id": event.model_id, "reason": str(exc)}
    started = time.perf_counter()
    answer = model.answer(prompt, max_new_tokens=max_new_tokens)
    return {"status": "ok", "model_id": event.model_id, "fingerprint": event.fingerprint, "runtime": runtime,
            "prompt": prompt, "answer": answer, "answer_s": round(time.perf_counter() - started, 3),
            "run_id": event.lineage.run_id, "checkpoint_step": event.lineage.checkpoint_step}


def ensure_group(client: redis.Redis, stream: str, start_id: str) -> None:
    try:
        client.xgroup_create(stream, GROUP, id=start_id, mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


def run(client: redis.Redis, stream: str, key: bytes, *, prompt: str, consumer: str, runtime: Runtime = "onnx",
        max_new_tokens: int = 32, start_id: str = "$", block_ms: int = 1000, max_messages: int | None = None,
        allowed_root: str | None = None, emit: Callable[[dict[str, Any]], None] | None = None) -> int:
    """The consume loop; returns the number of entries handled (stops after max_messages)."""
    emit = emit or (lambda rec: print(json.dumps(rec), flush=True))
    ensure_group(client, stream, start_id)
    handled = 0
    pending_first = True  # after a restart, first re-read our own unacked entries
    while max_messages is None or handled < max_messages:
        try:
            resp = client.xreadgroup(GROUP, consumer, {stream: "0" if pending_first else ">"}, count=1,
                                     block=None if pending_first else block_ms)
        except redis.ResponseError as exc:
            if "NOGROUP" in str(exc):  # Redis restarted empty: recreate and go on
                ensure_group(client, stream, "0")
                continue
            raise
        entries = resp[0][1] if resp else []
        if pending_first and not entries:
            pending_first = False
            continue
        for entry_id, fields in entries:
            if not fields:  # a pending entry trimmed away
                client.xack(stream, GROUP, entry_id)
                continue
            try:
                record = handle_entry(fields, key, prompt=prompt, runtime=runtime, max_new_tokens=max_new_tokens,
                                      allowed_root=allowed_root)
            except Exception as exc:
                emit({"status": "error", "entry": entry_id.decode() if isinstance(entry_id, bytes) else entry_id,
                      "reason": f"{type(exc).__name__}: {exc}"})
                pending_first = False
                continue
            client.xack(stream, GROUP, entry_id)
            emit(record)
            handled += 1
    return handled


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cyrex_example", description=__doc__.split("\n\n")[0])
    ap.add_argument("--redis-url", default=os.environ.get("HELOX_REDIS_URL", "redis://localhost:6379/0"))
    ap.add_argument("--prefix", default=os.environ.get("HELOX_TOPIC_PREFIX", "helox."))
    ap.add_argument("--prompt", default="First Citizen:\n")
    ap.add_argument("--runtime", choices=["onnx", "hf"], default="onnx")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--max-messages", type=int, default=None, help="Stop after this many events.")
    ap.add_argument("--from-start", action="store_true", help="A new group reads the stream from its start.")
    ap.add_argument("--allowed-root", default=None, help="Refuse exports outside this directory.")
    ap.add_argument("--consumer", default=f"cyrex-{socket.gethostname()}", help="Stable consumer name.")
    args = ap.parse_args(argv)
    try:
        key = signing_key_from_env()
    except ExportVerificationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    client = redis.Redis.from_url(args.redis_url)
    try:
        run(client, f"{args.prefix}export.model-ready", key, prompt=args.prompt, consumer=args.consumer,
            runtime=args.runtime, max_new_tokens=args.max_new_tokens, start_id="0" if args.from_start else "$",
            max_messages=args.max_messages, allowed_root=args.allowed_root)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
