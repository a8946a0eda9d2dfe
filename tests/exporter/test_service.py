"""The exporter as a real process on a real Redis: its policy and the lineage's config hash come
from the run config the event references; an event without one is not exported."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import redis

from contracts import ModelReady, Producer, TrainingCompleted
from contracts.codec import envelope
from shared.artifacts import ArtifactStore
from shared.data.manifest import load_manifest
from shared.runs import write_run_config
from tests.bus.helpers import publish, read_all, stop, wait_for, wait_for_group
from tests.evaluator.helpers import build_dataset, save, tiny_model

TRAINER = Producer(service="trainer", instance="trainer-test")


def _exporter(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    out = open(log, "ab")  # noqa: SIM115
    return subprocess.Popen([sys.executable, "-m", "services.exporter"],
                            env={**env, "HELOX_INSTANCE": "exporter-1", "HELOX_SIGNING_KEY": "test-signing-key",
                                 "OMP_NUM_THREADS": "1"}, stdout=out, stderr=subprocess.STDOUT)


def _completed(store: ArtifactStore, run_id: str, version: str, manifest: Path) -> TrainingCompleted:
    path = save(tiny_model(manifest, n_layer=2, d_model=64, ffn_hidden=192), store.path("runs", run_id, "checkpoints"),
                20, dataset_version=version, reason="final")
    ref = store.ref(path / "manifest.json")
    return TrainingCompleted(final_step=20, tokens_seen=0, final_loss=3.0, final_checkpoint=ref,
                             final_checkpoint_digest=ref.sha256, wall_time_s=1.0)


def test_the_runs_export_section_and_config_hash_come_from_its_config_file(
    redis_url: str, subprocess_env: dict[str, str], tmp_path: Path
) -> None:
    store = ArtifactStore(subprocess_env["HELOX_ARTIFACTS"])
    built = build_dataset(tmp_path / "corpus-root", n_prose=40, n_code=30)
    version = load_manifest(built).version
    target = store.path("datasets", version)
    target.parent.mkdir(parents=True, exist_ok=True)
    built.parent.rename(target)
    manifest = target / "manifest.json"
    configured = _completed(store, "configured", version, manifest)
    configured.run_config = write_run_config(store, "configured", {
        "name": "configured", "stages": ["data", "train", "export"],
        "export": {"on": "training_completed", "formats": ["native"]}})
    unconfigured = _completed(store, "unconfigured", version, manifest)  # no run_config: not exported
    client = redis.Redis.from_url(redis_url)
    proc = _exporter(subprocess_env, tmp_path / "exporter.log")
    try:
        wait_for_group(client, "helox.train.completed", "exporter")
        publish(client, envelope(unconfigured, producer=TRAINER, run_id="unconfigured"))
        last = publish(client, envelope(configured, producer=TRAINER, run_id="configured"))
        (ready,) = wait_for(lambda: read_all(client, ModelReady), timeout=180, what="ModelReady")
        assert ready.run_id == "configured" and set(ready.payload.formats) == {"native"}
        assert ready.payload.lineage.config_hash == configured.run_config.sha256

        def both_handled() -> bool:
            (group,) = client.xinfo_groups("helox.train.completed")
            return group["last-delivered-id"].decode() == last and group["pending"] == 0

        wait_for(both_handled, what="both events handled")
        assert len(read_all(client, ModelReady)) == 1
    finally:
        assert stop(proc) == 0
