"""`python -m cyrex_example serve` on a ModelReady: a real ONNX export (the exporter's own
functions, the KV graph of optimum's names) whose signed manifest lists a rag_template.json;
Cyrex must answer the prompt with context from its own index, laid out as the template says,
and the answer must be what PyTorch generates from that same prompt."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import redis
import torch

from contracts import Lineage, ModelReady, Producer, topic_for
from contracts.codec import envelope
from services.data_prep.tokenizer import train_tokenizer
from services.exporter.config import ExportConfig
from services.exporter.export import export_checkpoint, model_ready_payload
from services.exporter.provenance import sign
from shared.artifacts import ArtifactStore
from shared.bus.wire import encode_entry
from shared.checkpoint import save_checkpoint
from shared.data.config import RAG_BOUNDARY_TOKENS, TokenizerConfig
from shared.model import Llama, generate, model_preset
from tests.bus.helpers import wait_for
from tests.data_prep.conftest import code_doc, shakespeare_paragraphs

REPO = Path(__file__).resolve().parents[2]
KEY = "test-signing-key"
RUN_ID = "run-cyrex-rag"
DATASET = "ds-cyrex-rag-1"
PROMPT = "First Citizen:"
TEMPLATE = {"chunk_open": "<ctx>", "chunk_close": "</ctx>", "doc_marker": "<doc>", "k": 2, "context_budget": 0.5,
            "seq_len": 96}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def rag_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[ArtifactStore, ModelReady, Llama, Path]:
    """A tiny untrained model exported to ONNX, with rag_template.json added to its manifest and
    the manifest signed again (what the exporter will do)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        store = ArtifactStore(tmp_path_factory.mktemp("artifacts"))
        tokenizer = store.path("datasets", DATASET, "tokenizer.model")
        tokenizer.parent.mkdir(parents=True)
        docs = shakespeare_paragraphs(200) + [code_doc(i) for i in range(60)]
        tokenizer.write_bytes(train_tokenizer(docs, TokenizerConfig(vocab_size=1024), RAG_BOUNDARY_TOKENS))
        config = model_preset("tiny")
        torch.manual_seed(0)
        model = Llama(config).eval()
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        info = save_checkpoint(
            store.path("checkpoints", RUN_ID), 1, state,
            {"step": 1, "model_config": config.model_dump(mode="json"), "dataset_version": DATASET},
            meta={"reason": "final", "dataset_version": DATASET, "run_id": RUN_ID})
        result = export_checkpoint(info.path, tokenizer, ["native", "onnx"], store.path("exports"), run_id=RUN_ID,
                                   dataset_version=DATASET, config_hash="d" * 64, signing_key=KEY,
                                   config=ExportConfig(formats=["native", "onnx"], onnx_exporter="torchscript"),
                                   metrics={"val_loss": 6.9})
    finally:
        torch.set_num_threads(before)
    root = result.path
    template = json.dumps(TEMPLATE).encode()
    (root / "rag_template.json").write_bytes(template)
    manifest = json.loads(result.manifest_path.read_text())
    manifest["files"]["rag_template.json"] = {"bytes": len(template), "sha256": _sha(template)}
    result.manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    signature = sign(manifest, KEY)
    (root / "signature.json").write_text(json.dumps({"signature": signature}))
    lineage = Lineage(run_id=RUN_ID, dataset_version=DATASET, checkpoint_step=1,
                      checkpoint_digest=result.lineage["checkpoint_digest"], config_hash="d" * 64,
                      code_version="test")
    event = model_ready_payload(result, store, lineage=lineage).model_copy(
        update={"signature": signature, "manifest": store.ref(result.manifest_path)})
    return store, event, model, root


def test_serve_answers_a_published_model_with_context_laid_out_by_its_template(
        rag_export: tuple[ArtifactStore, ModelReady, Llama, Path], redis_url: str, tmp_path: Path) -> None:
    import sentencepiece as spm

    store, event, model, root = rag_export
    collection = tmp_path / "collection"
    collection.mkdir()
    (collection / "citizens.txt").write_text("First Citizen: we are accounted poor citizens, the patricians good.")
    (collection / "other.md").write_text("Nothing about Rome here: a recipe for bread and yeast.")
    client = redis.Redis.from_url(redis_url)
    client.xadd(topic_for(ModelReady).stream("helox."),
                encode_entry(envelope(event, producer=Producer(service="exporter", instance="t"), run_id=RUN_ID)))
    out = tmp_path / "stdout.jsonl"
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", "HELOX_SIGNING_KEY": KEY}
    with open(out, "wb") as stdout, open(tmp_path / "stderr.log", "wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cyrex_example", "serve", "--collection", str(collection), "--redis-url", redis_url,
             "--instance", "cyrex-rag", "--from-start", "--allowed-root", str(store.root), "--prompt", PROMPT,
             "--max-new-tokens", "6", "--heartbeat-s", "0.5"], env=env, stdout=stdout, stderr=stderr)
    try:
        line = wait_for(lambda: out.read_text().strip(), 180, "Cyrex's answer line")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, (tmp_path / "stderr.log").read_text()
    record: dict[str, Any] = json.loads(line.splitlines()[0])
    assert record["status"] == "ok", record
    assert record["model_id"] == event.model_id
    ctx = record["context"]
    assert ctx["with_context"] and ctx["chunks"] == ["citizens.txt#0"], ctx
    manifest = json.loads((root / "manifest.json").read_text())
    sp = spm.SentencePieceProcessor(model_file=str(root / manifest["tokenizer"]))
    chunk = (collection / "citizens.txt").read_text()
    assert record["model_prompt"] == f"<ctx>{chunk}</ctx><doc>{PROMPT}"
    assert ctx["budget_tokens"] == 48 and ctx["context_tokens"] <= 48 and not ctx["cut"]
    ids = sp.encode(record["model_prompt"])
    assert [sp.id_to_piece(i) for i in ids].count("<ctx>") == 1, "the markers are single tokens"
    with torch.no_grad():
        expected = generate(model, torch.tensor([ids]), 6, eos_token_id=sp.eos_id())[0, len(ids):].tolist()
    expected = expected[: expected.index(sp.eos_id())] if sp.eos_id() in expected else expected
    assert record["answer"] == sp.decode(expected)
    assert client.xpending(topic_for(ModelReady).stream("helox."), "cyrex")["pending"] == 0

    # The graph Cyrex decoded with is the KV graph with optimum's names.
    import onnxruntime as ort

    kv = ort.InferenceSession(str(root / manifest["formats"]["onnx"]["kv_cache"]), providers=["CPUExecutionProvider"])
    assert {"attention_mask", "past_key_values.0.key"} <= {i.name for i in kv.get_inputs()}
