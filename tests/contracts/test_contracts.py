"""The contracts package: topics, envelope round trip, versioning rules, and its promise to
depend on pydantic alone."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from contracts import (
    DEFAULT_PREFIX,
    EVENT_TYPES,
    SERVICE_NAMES,
    TOPICS,
    Producer,
    SchemaVersionError,
    TrainingMetrics,
    decode,
    encode,
    topic,
    topic_for,
)
from contracts.codec import DecodeError, envelope
from contracts.events import AlertEvidence, HealthAlert
from contracts.services import CLIENTS, SERVICES
from shared.bus import Bus
from shared.config import HeloxSettings

REPO = Path(__file__).resolve().parents[2]

# The processes table of the architecture (design/ARCHITECTURE.md), plus the data-prep
# progress telemetry and the dead-letter stream of "Delivery semantics".
ARCHITECTURE_TOPICS = {
    "runs.requested",
    "runs.failed",
    "runs.cancelled",
    "data.progress",
    "data.dataset-ready",
    "train.started",
    "train.metrics",
    "train.checkpoint-saved",
    "train.actions",
    "train.completed",
    "train.commands",
    "health.alerts",
    "eval.completed",
    "export.model-ready",
    "services.heartbeat",
    "dlq",
    # RAG-aware training: Cyrex announces itself and answers retrieval requests.
    "retrieval.heartbeat",
    "retrieval.requested",
    "retrieval.completed",
    "retrieval.fallback",
}
ARCHITECTURE_SERVICES = {
    # service: (consumes, publishes besides heartbeats and dead letters)
    "data-prep": ({"runs.requested", "runs.cancelled"}, {"data.progress", "data.dataset-ready", "runs.failed", "retrieval.requested",
                                       "retrieval.fallback"}),
    "trainer": (
        {"data.dataset-ready", "health.alerts", "train.commands", "runs.cancelled"},
        {"train.started", "train.metrics", "train.checkpoint-saved", "train.actions", "train.completed", "runs.failed"},
    ),
    "health-monitor": ({"train.metrics", "train.started", "train.completed", "runs.failed", "train.actions"}, {"health.alerts"}),
    "evaluator": ({"train.checkpoint-saved", "runs.cancelled"}, {"eval.completed", "runs.failed", "retrieval.requested",
                                                "retrieval.fallback"}),
    "exporter": ({"eval.completed", "train.completed", "runs.cancelled"}, {"export.model-ready", "runs.failed"}),
}
TRIMMED = {"train.metrics", "services.heartbeat", "data.progress", "retrieval.heartbeat", "retrieval.requested",
           "retrieval.completed"}

PRODUCER = Producer(service="trainer", instance="trainer-test-1")


def metrics(**overrides: object) -> TrainingMetrics:
    fields: dict[str, object] = dict(step=3, tokens_seen=96, loss=2.5, lr=1e-3, grad_norm=0.7, seq_len=16, batch_size=2)
    fields.update(overrides)
    return TrainingMetrics(**fields)  # type: ignore[arg-type]


# --- topics -----------------------------------------------------------------------------


def test_every_architecture_topic_is_registered_with_the_default_prefix() -> None:
    assert set(TOPICS) == ARCHITECTURE_TOPICS
    assert DEFAULT_PREFIX == "helox."
    for key, t in TOPICS.items():
        assert t.key == key and topic(key) is t
        assert t.stream() == f"helox.{key}"
        assert topic_for(t.payload) is t
        assert EVENT_TYPES[t.payload.EVENT_TYPE] is t.payload
        assert t.retention.kind == ("trimmed" if key in TRIMMED else "kept")
        assert (t.retention.maxlen is not None) == (key in TRIMMED)
    assert len(EVENT_TYPES) == len(TOPICS)  # one payload type per topic
    with pytest.raises(KeyError, match="unknown topic"):
        topic("train.metric")


def test_the_prefix_is_configurable(monkeypatch: pytest.MonkeyPatch) -> None:
    for t in TOPICS.values():
        assert t.stream("acme.") == f"acme.{t.key}"
    monkeypatch.setenv("HELOX_TOPIC_PREFIX", "staging.helox.")
    settings = HeloxSettings(redis_url="redis://127.0.0.1:1/0")
    assert settings.topic_prefix == "staging.helox."
    bus = Bus(settings, "trainer", instance="t")  # builds the broker; connects nothing
    assert bus.stream(TrainingMetrics) == "staging.helox.train.metrics"
    assert bus.stream(metrics()) == "staging.helox.train.metrics"


def test_who_publishes_and_consumes_what_follows_the_architecture() -> None:
    assert tuple(SERVICES) == SERVICE_NAMES
    for name, (consumes, publishes) in ARCHITECTURE_SERVICES.items():
        s = SERVICES[name]
        assert set(s.consumes) == consumes, name
        assert set(s.publishes) == publishes | {"services.heartbeat", "dlq"}, name
        assert s.module == f"services.{name.replace('-', '_')}"
        assert s.key_patterns == (f"helox:idem:{name}:*", f"helox:outbox:{name}:*")
    cli, cyrex = CLIENTS["cli"], CLIENTS["cyrex"]
    assert set(cli.publishes) == {"runs.requested", "train.commands", "runs.cancelled"}
    assert set(cli.reads) == set(TOPICS) and cli.consumes == () and cli.deletes == ("dlq",)
    # A dead letter goes back to where it came from: a stream some service consumes.
    assert set(cli.replays) == {k for s in SERVICES.values() for k in s.consumes}
    assert set(cyrex.reads) == set(TOPICS)
    assert set(cyrex.publishes) == {"retrieval.heartbeat", "retrieval.completed"}
    assert set(cyrex.consumes) == {"export.model-ready", "retrieval.requested"}
    # Every topic a service consumes has a producer (no dangling subscription).
    produced = {k for p in (*SERVICES.values(), *CLIENTS.values()) for k in p.publishes}
    for s in SERVICES.values():
        assert set(s.consumes) <= produced, s.name


# --- envelope and codec -----------------------------------------------------------------


def test_envelope_round_trip_with_non_finite_floats() -> None:
    cause = uuid.uuid4()
    env = envelope(
        metrics(loss=float("nan"), grad_norm=float("inf"), lr=float("-inf"), grad_norm_per_layer={"layers.0": float("nan")}),
        producer=PRODUCER,
        run_id="r1",
        causation_id=cause,
    )
    raw = encode(env)
    # Still strict JSON: non-finite floats travel as strings.
    strict = json.loads(raw, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c} on the wire"))
    assert strict["payload"]["loss"] == "NaN" and strict["payload"]["grad_norm"] == "Infinity"
    assert strict["payload"]["lr"] == "-Infinity"

    back = decode(raw, TrainingMetrics)
    assert back.event_id == env.event_id and back.type == "TrainingMetrics"
    assert back.schema_version == TrainingMetrics.SCHEMA_VERSION
    assert back.run_id == "r1" and back.causation_id == cause and back.correlation_id == env.event_id
    assert back.producer == PRODUCER
    assert back.occurred_at == env.occurred_at and back.occurred_at.utcoffset() is not None
    p = back.payload
    assert math.isnan(p.loss) and p.grad_norm == math.inf and p.lr == -math.inf
    assert math.isnan(p.grad_norm_per_layer["layers.0"])
    assert (p.step, p.tokens_seen, p.seq_len, p.batch_size) == (3, 96, 16, 2)
    # Decoding without the expected type routes by the envelope's type.
    assert isinstance(decode(raw).payload, TrainingMetrics)


def test_nested_models_round_trip() -> None:
    alert = HealthAlert(
        incident_id="inc-1", kind="loss_spike", severity="warning", step_start=10, step_end=12,
        evidence=AlertEvidence(statistic="robust_z(loss)", value=float("inf"), threshold=6.0, values=[1.0, float("nan")]),
        recommended_action="rollback", message="loss spike",
    )
    back = decode(encode(envelope(alert, producer=PRODUCER)), HealthAlert).payload
    assert back.evidence.value == math.inf and math.isnan(back.evidence.values[1])
    assert back.model_dump(exclude={"evidence"}) == alert.model_dump(exclude={"evidence"})


def _wire(env_dict_edit: dict[str, object] | None = None, payload_edit: dict[str, object] | None = None) -> bytes:
    data = json.loads(encode(envelope(metrics(), producer=PRODUCER, run_id="r1")))
    data.update(env_dict_edit or {})
    data["payload"].update(payload_edit or {})
    return json.dumps(data).encode()


def test_a_newer_minor_version_with_extra_fields_is_accepted() -> None:
    raw = _wire({"schema_version": "1.9", "new_envelope_field": {"x": 1}}, {"new_metric": 42.0, "step": 5})
    env = decode(raw, TrainingMetrics)
    assert env.schema_version == "1.9" and env.payload.step == 5
    assert not hasattr(env.payload, "new_metric")  # ignored, not kept
    assert "new_metric" not in env.payload.model_dump()


def test_an_unknown_major_version_raises_schema_version_error() -> None:
    with pytest.raises(SchemaVersionError, match="major 2"):
        decode(_wire({"schema_version": "2.0"}), TrainingMetrics)
    with pytest.raises(SchemaVersionError, match="major 0"):
        decode(_wire({"schema_version": "0.9"}))


def test_an_unknown_or_unexpected_event_type_raises_schema_version_error() -> None:
    with pytest.raises(SchemaVersionError, match="unknown event type"):
        decode(_wire({"type": "TrainingMetricz"}))
    with pytest.raises(SchemaVersionError, match="carries 'HealthAlert'"):
        decode(_wire(), HealthAlert)


@pytest.mark.parametrize(
    "raw",
    [b"", b"{not json", b"[]", b"null", b'"text"', b'{"type": "TrainingMetrics"}', b"\xff\xfe\x00", "{\"event_id\": 1}"],
    ids=["empty", "broken", "list", "null", "string", "header-missing", "not-utf8", "bad-types"],
)
def test_malformed_input_raises_decode_error(raw: bytes | str) -> None:
    with pytest.raises(DecodeError):
        decode(raw)


def test_an_invalid_payload_raises_validation_error() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        decode(_wire(payload_edit={"step": -1}), TrainingMetrics)
    with pytest.raises(ValidationError):
        decode(_wire(payload_edit={"loss": "lots"}), TrainingMetrics)


# --- dependencies -----------------------------------------------------------------------

ALLOWED_DEPENDENCIES = ("pydantic", "pydantic_core", "typing_extensions", "annotated_types", "typing_inspection")

_GUARD = r"""
import importlib, importlib.machinery, json, pathlib, sys

root, *site_dirs = sys.argv[1:]
STDLIB_PATH = list(sys.path)  # -I -S: the standard library only
sys.path[:0] = [root, *site_dirs]
ALLOWED = {"__main__", "contracts", *%(allowed)r}
CONTRACTS_DIR = str(pathlib.Path(root, "contracts"))
violations, refused = [], []

def is_stdlib(top):
    return (
        top in sys.stdlib_module_names
        or top in sys.builtin_module_names
        or importlib.machinery.PathFinder.find_spec(top, STDLIB_PATH) is not None
    )

def _importer():
    f = sys._getframe(2)
    while f is not None:
        name = f.f_code.co_filename
        if not (name.startswith("<frozen") or name.endswith(("importlib/__init__.py", "importlib/util.py"))):
            return name
        f = f.f_back
    return "?"

class Guard:
    # Refuses every top-level module that is neither stdlib nor an allowed dependency.
    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        if top in ALLOWED or is_stdlib(top):
            return None
        who = _importer()
        refused.append([name, who])
        if who.startswith(CONTRACTS_DIR):
            violations.append([name, who])
        raise ModuleNotFoundError(f"{name} is not available to contracts", name=name)

sys.meta_path.insert(0, Guard())

import contracts
assert contracts.__file__.startswith(root), contracts.__file__
for path in sorted(pathlib.Path(CONTRACTS_DIR).glob("*.py")):
    if path.stem != "__init__":
        importlib.import_module(f"contracts.{path.stem}")

# Exercise the code paths too (pydantic builds schemas and serializers lazily).
from contracts import Producer, TrainingMetrics, decode, encode
from contracts.codec import envelope
from contracts.asyncapi import render
env = envelope(
    TrainingMetrics(step=1, tokens_seen=1, loss=float("nan"), lr=0.1, grad_norm=1.0, seq_len=8, batch_size=1),
    producer=Producer(service="cyrex", instance="c1"),
)
assert decode(encode(env), TrainingMetrics).event_id == env.event_id
assert render().startswith("{")

loaded = sorted(
    m for m, mod in list(sys.modules.items())
    if m.partition(".")[0] not in ALLOWED and not is_stdlib(m.partition(".")[0])
)
print(json.dumps({"violations": violations, "refused": refused, "loaded": loaded}))
"""


def test_contracts_depends_on_pydantic_alone(tmp_path: Path) -> None:
    """Import a copy of `contracts` in an isolated interpreter (-I -S) whose path holds the
    copy, the standard library and pydantic's site-packages, with an import hook that
    refuses any other top-level module: contracts must import, encode, decode and render
    the AsyncAPI document without importing anything else."""
    import annotated_types
    import pydantic
    import pydantic_core
    import typing_extensions
    import typing_inspection

    shutil.copytree(REPO / "contracts", tmp_path / "contracts", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    site_dirs = sorted(
        {
            str(Path(m.__file__).resolve().parent.parent if Path(m.__file__).name == "__init__.py" else Path(m.__file__).resolve().parent)
            for m in (pydantic, pydantic_core, typing_extensions, annotated_types, typing_inspection)
            if m.__file__
        }
    )
    proc = subprocess.run(
        [sys.executable, "-I", "-S", "-c", _GUARD % {"allowed": ALLOWED_DEPENDENCIES}, str(tmp_path), *site_dirs],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )
    assert proc.returncode == 0, f"contracts failed to import in isolation:\n{proc.stderr[-4000:]}"
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["violations"] == [], f"contracts imports modules besides pydantic: {report['violations']}"
    assert report["loaded"] == [], f"modules outside stdlib+pydantic got loaded: {report['loaded']}"
