"""The Node.js Cyrex consumer (cyrex_example/node) against a real Redis and a real export.

ModelReady is produced the way the exporter service produces it (services/exporter/app.py:
export_checkpoint -> Lineage -> model_ready_payload -> Bus.publish), then `node consumer.js`
runs as a subprocess in its own consumer group and must verify it, or name the check a
tampered event fails; every entry ends acked (XPENDING 0)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import shutil
import subprocess
from typing import Any

import redis
from faststream.redis.parser.binary import BinaryMessageFormatV1

from contracts import Lineage, ModelReady, Producer, topic_for
from contracts.codec import encode, envelope
from services.exporter.export import model_ready_payload
from services.exporter.provenance import sign
from shared.bus import Bus
from shared.bus.wire import DATA_FIELD, encode_entry, entry, frame
from shared.config import HeloxSettings
from shared.version import code_version

from .conftest import CONFIG_HASH, CONSUMER, DATASET_VERSION, RUN_ID, SIGNING_KEY, STEP, Export

GROUP = "cyrex-node"


def model_ready(export: Export, result: Any | None = None) -> ModelReady:
    """The event ExporterService._export builds for a finished export."""
    result = result or export.result
    lineage = Lineage(run_id=RUN_ID, dataset_version=DATASET_VERSION, checkpoint_step=STEP,
                      checkpoint_digest=export.checkpoint_digest, config_hash=CONFIG_HASH,
                      code_version=code_version())
    return model_ready_payload(result, export.store, {"val_loss": 6.9}, lineage)


def publish(settings: HeloxSettings, *payloads: ModelReady) -> None:
    """Publish through the project's Bus as the exporter service does."""

    async def go() -> None:
        bus = Bus(settings, "exporter", instance="exporter-test")
        await bus.connect()
        try:
            for payload in payloads:
                await bus.publish(payload, run_id=RUN_ID)
        finally:
            await bus.broker.stop()

    asyncio.run(go())


def run_consumer(node: str, settings: HeloxSettings, export: Export, max_events: int) -> list[dict[str, Any]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HELOX_")}
    env["HELOX_SIGNING_KEY"] = SIGNING_KEY
    proc = subprocess.run(
        [node, str(CONSUMER), "--redis-url", settings.redis_url or "", "--prefix", settings.topic_prefix,
         "--group", GROUP, "--consumer", "pytest-1", "--from-start", "--max-events", str(max_events),
         "--timeout-s", "60", "--allowed-root", str(export.store.root)],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    assert len(records) == max_events, proc.stdout + proc.stderr
    for rec in records:
        if not rec["verified"]:  # every rejection is also logged, naming the check
            assert f"failed check {rec['check']}" in proc.stderr
    return records


def pending(settings: HeloxSettings) -> int:
    client = redis.Redis.from_url(settings.redis_url or "")
    stream = topic_for(ModelReady).stream(settings.topic_prefix)
    assert GROUP.encode() in [g["name"] for g in client.xinfo_groups(stream)]
    return int(client.xpending(stream, GROUP)["pending"])


def test_verifies_a_real_model_ready_in_its_own_group_and_acks(node, settings, export):
    publish(settings, model_ready(export))
    [rec] = run_consumer(node, settings, export, 1)
    assert rec["verified"] is True
    assert rec["model_id"] == export.result.model_id
    assert rec["fingerprint"] == export.result.fingerprint
    assert rec["files_checked"] == len(export.result.files)
    assert pending(settings) == 0


def test_a_tampered_signature_fails_the_signature_check(node, settings, export):
    forged = sign(export.result.manifest, "not-the-signing-key")
    publish(settings, model_ready(export).model_copy(update={"signature": forged}))
    [rec] = run_consumer(node, settings, export, 1)
    assert rec["verified"] is False and rec["check"] == "signature"
    assert rec["model_id"] == export.result.model_id
    assert pending(settings) == 0


def test_a_file_whose_bytes_changed_fails_the_file_digest_check(node, settings, export):
    copy = export.store.path("exports", f"tampered-{os.getpid()}")
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(export.result.path, copy)
    weights = next(rel for rel in sorted(export.result.files) if rel.endswith(".safetensors"))
    data = bytearray((copy / weights).read_bytes())
    data[-1] ^= 0xFF  # same size, different bytes
    (copy / weights).write_bytes(bytes(data))
    result = dataclasses.replace(export.result, path=copy, manifest_path=copy / export.result.manifest_path.name,
                                 model_card_path=copy / export.result.model_card_path.name)
    publish(settings, model_ready(export, result))
    [rec] = run_consumer(node, settings, export, 1)
    assert rec["verified"] is False and rec["check"] == "file-digest"
    assert weights in rec["reason"]
    assert pending(settings) == 0


def test_malformed_entries_name_their_check_and_the_next_good_event_still_verifies(node, settings, export):
    payload = model_ready(export)
    env = envelope(payload, producer=Producer(service="exporter", instance="t"), run_id=RUN_ID)
    body = json.loads(encode(env))
    fields = encode_entry(env)

    def variant(**changes: Any) -> bytes:
        return json.dumps({**body, **changes}).encode()

    no_signature = {k: v for k, v in body["payload"].items() if k != "signature"}
    # The headers schema requires only content-type (what `helox dlq replay` may write); a
    # helox-type that names another event type than the envelope's is still a bad frame.
    headers = {"correlation_id": str(env.event_id), "content-type": "application/json",
               "message_id": str(env.event_id), "helox-type": "TrainingMetrics"}
    bad = [
        ({DATA_FIELD: encode(env)}, "frame"),  # bare JSON, not a FastStream frame
        (entry(variant(payload=no_signature), str(env.event_id), str(env.event_id), env.type), "schema"),
        (entry(variant(schema_version="2.0"), str(env.event_id), str(env.event_id), env.type), "schema-version"),
        ({DATA_FIELD: frame(encode(env), headers)}, "headers"),
    ]
    client = redis.Redis.from_url(settings.redis_url or "")
    stream = topic_for(ModelReady).stream(settings.topic_prefix)
    for f, _check in bad:
        client.xadd(stream, f)
    client.xadd(stream, fields)
    records = run_consumer(node, settings, export, len(bad) + 1)
    assert [r.get("check") for r in records[:-1]] == [check for _f, check in bad]
    assert records[-1]["verified"] is True and records[-1]["model_id"] == payload.model_id
    assert pending(settings) == 0



def test_a_frame_written_by_faststreams_own_encoder_verifies(node, settings, export):
    """The hand-written decoder reads FastStream's BinaryMessageFormatV1 itself, not only the
    frames Helox's shared.bus.wire writes."""
    env = envelope(model_ready(export), producer=Producer(service="exporter", instance="t"), run_id=RUN_ID)
    raw = asyncio.run(BinaryMessageFormatV1.encode(
        message=encode(env), reply_to=None, correlation_id=str(env.event_id),
        headers={"content-type": "application/json", "message_id": str(env.event_id), "helox-type": env.type},
    ))
    client = redis.Redis.from_url(settings.redis_url or "")
    client.xadd(topic_for(ModelReady).stream(settings.topic_prefix), {DATA_FIELD: raw})
    [rec] = run_consumer(node, settings, export, 1)
    assert rec["verified"] is True and rec["event_id"] == str(env.event_id)
    assert pending(settings) == 0
