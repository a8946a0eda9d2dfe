"""The reference Cyrex consumer: verifies an export, loads it and answers a prompt."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import fakeredis
import pytest
import torch

from contracts import encode
from contracts.codec import envelope
from contracts.envelope import Producer
from cyrex_example import ExportVerificationError, load_export, load_from_event
from cyrex_example.__main__ import GROUP, handle_entry, run
from services.exporter.export import model_ready_payload
from services.exporter.native import load_native
from shared.artifacts import ArtifactStore
from shared.bus.wire import entry
from shared.model import generate

from .conftest import SIGNING_KEY

PROMPT = "First Citizen:\n"
REPO = Path(__file__).resolve().parents[2]


def expected_answer(export_result, n: int) -> str:
    import sentencepiece as spm

    model, _, _ = load_native(export_result.path / "native")
    sp = spm.SentencePieceProcessor(model_file=str(export_result.path / "native" / "tokenizer.model"))
    ids = torch.tensor([sp.encode(PROMPT)])
    out = generate(model, ids, n, eos_token_id=sp.eos_id())[0, ids.size(1):].tolist()
    return sp.decode([i for i in (out[: out.index(3)] if 3 in out else out)])


@pytest.mark.parametrize("runtime", ["onnx", "hf"])
def test_loads_a_verified_export_and_answers_like_pytorch(export_result, runtime):
    model = load_export(export_result.path, SIGNING_KEY, runtime=runtime)
    answer = model.answer(PROMPT, max_new_tokens=12)
    assert answer == expected_answer(export_result, 12)
    assert answer.strip()


def test_refuses_a_wrong_key_or_a_tampered_file(export_result, tmp_path):
    with pytest.raises(ExportVerificationError, match="signature"):
        load_export(export_result.path, "wrong-key")
    copy = tmp_path / "e"
    shutil.copytree(export_result.path, copy)
    (copy / "onnx" / "model_kv.onnx").write_bytes(b"not a model")
    with pytest.raises(ExportVerificationError, match=r"onnx/model_kv\.onnx"):
        load_export(copy, SIGNING_KEY)


def _entry(export_result) -> dict[bytes, bytes]:
    store = ArtifactStore(export_result.path.parent.parent)
    payload = model_ready_payload(export_result, store)
    env = envelope(payload, producer=Producer(service="exporter", instance="t"), run_id="r")
    return entry(encode(env), str(env.event_id), str(env.event_id), env.type)


def test_handle_entry_verifies_against_the_event_and_answers(export_result):
    fields = _entry(export_result)
    rec = handle_entry(fields, SIGNING_KEY.encode(), prompt=PROMPT, max_new_tokens=8)
    assert rec["status"] == "ok" and rec["answer"] == expected_answer(export_result, 8)
    rec = handle_entry(fields, b"wrong", prompt=PROMPT)
    assert rec["status"] == "rejected" and "signature" in rec["reason"]
    assert handle_entry({b"__data__": b"{}"}, SIGNING_KEY.encode(), prompt=PROMPT)["status"] == "rejected"


def test_event_signature_must_match_the_manifest(export_result):
    store = ArtifactStore(export_result.path.parent.parent)
    payload = model_ready_payload(export_result, store).model_copy(update={"signature": "0" * 64})
    with pytest.raises(ExportVerificationError, match="signature"):
        load_from_event(payload, SIGNING_KEY)


def test_consumer_loop_reads_in_its_own_group_and_acks(export_result):
    client = fakeredis.FakeRedis()
    stream = "helox.export.model-ready"
    client.xadd(stream, _entry(export_result))
    records = []
    n = run(client, stream, SIGNING_KEY.encode(), prompt=PROMPT, consumer="c1", start_id="0", max_new_tokens=6,
            max_messages=1, block_ms=10, emit=records.append)
    assert n == 1 and records[0]["status"] == "ok" and records[0]["model_id"] == export_result.model_id
    assert client.xpending(stream, GROUP)["pending"] == 0
    assert [g["name"] for g in client.xinfo_groups(stream)] == [GROUP.encode()]


def test_imports_nothing_of_helox_internals():
    code = ("import sys, cyrex_example, cyrex_example.__main__, cyrex_example.loader; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('shared', 'services', 'helox')); "
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads(proc.stdout.strip().replace("'", '"')) == []
