"""RAG-aware training end to end with real processes on a real (embedded) Redis:
`helox up --with-cyrex` (the reference Cyrex indexing the run's corpus) -> `helox run` of a config
with `data.rag` -> data-prep packs every window with chunks Cyrex served over Synapse -> trainer
-> evaluator (retrieval gain vs random-context control) -> exporter (rag_template.json) -> ModelReady.

`discovery_timeout_s: 0` and `indexing_wait_s: 0`: the run can only be served by Cyrex if the
stack waited for Cyrex to be ready before it reported itself up."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import redis
import yaml

from contracts import DatasetReady, EvaluationCompleted, ModelReady, RetrievalFallback
from shared.artifacts import ArtifactStore
from shared.data.manifest import load_manifest
from tests.bus.helpers import read_all, wait_for

from .test_pipeline import HELOX, pipeline_config, stack_env


def test_helox_run_with_cyrex_packs_through_cyrex_and_publishes_a_rag_model(tmp_path: Path) -> None:
    config = pipeline_config(tmp_path, "rag-e2e", steps=40)
    cfg = yaml.safe_load(config.read_text())
    cfg["data"]["rag"] = {"retriever": "auto", "k": 2, "seq_len": 64, "context_budget": 0.5, "query_chars": 200,
                          "chunk_tokens": 24, "discovery_timeout_s": 0, "indexing_wait_s": 0,
                          "request_timeout_s": 30, "batch_queries": 32}
    cfg["data"]["sharding"]["val_fraction"] = 0.25  # packed windows hold half as much base text
    cfg["export"] = {"formats": ["native", "hf"]}
    config.write_text(yaml.safe_dump(cfg))

    env = stack_env(tmp_path)
    log = open(tmp_path / "up.log", "w")  # noqa: SIM115 - closed below
    up = subprocess.Popen([*HELOX, "up", "--with-cyrex", "--cyrex-collection", str(tmp_path / "corpus")],
                          env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    state = tmp_path / "state" / "stack.json"
    try:
        wait_for(state.exists, timeout=180, what="the stack (with a ready Cyrex) to start")
        url = json.loads(state.read_text())["redis_url"]
        client = redis.Redis.from_url(url)
        out = subprocess.run([*HELOX, "run", str(config)], env=env, cwd=tmp_path, capture_output=True, text=True,
                             timeout=600)
        (tmp_path / "run.log").write_text(out.stdout + out.stderr)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        assert "WARNING" not in out.stdout + out.stderr, out.stdout[-3000:] + out.stderr[-3000:]

        assert read_all(client, RetrievalFallback) == []
        (ready,) = read_all(client, DatasetReady)
        store = ArtifactStore(env["HELOX_ARTIFACTS"])
        rag = load_manifest(store.resolve(ready.payload.manifest.uri)).rag
        assert rag is not None and rag.retriever.startswith("cyrex:"), rag
        assert rag.fallbacks == []
        assert set(rag.queries_by_retriever) == {rag.retriever}
        assert sum(rag.queries_by_retriever.values()) == sum(rag.windows.values()) > 0
        assert rag.chunks_by_retriever.get(rag.retriever, 0) > 0

        evals = read_all(client, EvaluationCompleted)
        assert evals and all(e.payload.retrieval for e in evals)
        final = evals[-1].payload.retrieval
        assert {"gain", "control_gain", "gain_bpb", "control_gain_bpb"} <= set(final), final
        assert abs(final["gain"] - (final["loss_without"] - final["loss_with"])) < 1e-9
        # What the user is told: the retriever that served and the gain against the control.
        assert f"retrieval: {rag.retriever} (queries answered: {rag.retriever} " in out.stdout
        assert "0 fallback(s)" in out.stdout
        assert f"retrieval gain (step {evals[-1].payload.step}): {final['gain']:+.4f} nats/token" in out.stdout
        assert f"vs random-context control {final['control_gain']:+.4f}" in out.stdout
        assert final["base_tokens"] > 0

        (model,) = read_all(client, ModelReady)
        export_dir = Path(store.resolve(model.payload.manifest.uri)).parent
        template = json.loads((export_dir / "rag_template.json").read_text())
        assert "<ctx>" in json.dumps(template) and "<doc>" in json.dumps(template)
    finally:
        up.send_signal(2)
        up.wait(120)
        log.close()
