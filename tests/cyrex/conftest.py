"""Fixtures of the Node.js Cyrex consumer tests: `node` with its npm dependencies installed
from the lock file, and one real, signed export (native format) of a tiny model, made with
the exporter's own functions inside an artifact store."""

from __future__ import annotations

import fcntl
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from services.data_prep.tokenizer import train_tokenizer
from services.exporter.config import ExportConfig
from services.exporter.export import ExportResult, export_checkpoint
from shared.artifacts import ArtifactStore
from shared.checkpoint import save_checkpoint
from shared.data.config import TokenizerConfig
from shared.model import Llama, model_preset
from tests.data_prep.conftest import code_doc, shakespeare_paragraphs

REPO = Path(__file__).resolve().parents[2]
NODE_DIR = REPO / "cyrex_example" / "node"
CONSUMER = NODE_DIR / "consumer.js"
SIGNING_KEY = "test-signing-key"
RUN_ID = "run-cyrex-node"
DATASET_VERSION = "ds-cyrex-node-1"
CONFIG_HASH = "d" * 64
STEP = 1


@dataclass
class Export:
    store: ArtifactStore
    result: ExportResult
    checkpoint_digest: str


def _installed() -> bool:
    """node_modules is complete (npm writes its hidden lock file last) and not older than the lock."""
    done = NODE_DIR / "node_modules" / ".package-lock.json"
    return done.is_file() and done.stat().st_mtime >= (NODE_DIR / "package-lock.json").stat().st_mtime


@pytest.fixture(scope="session")
def node() -> str:
    """The `node` binary, with cyrex_example/node/node_modules installed by `npm ci` (once)."""
    binary = shutil.which("node")
    if binary is None:
        pytest.skip("node is not on PATH: the Node.js Cyrex consumer tests need Node.js 20+")
    if not _installed():
        npm = shutil.which("npm")
        if npm is None:
            pytest.skip("npm is not on PATH: cannot install cyrex_example/node's dependencies")
        # One `npm ci` at a time: two test sessions may start together.
        with open(Path(tempfile.gettempdir()) / "helox-cyrex-node-npm-ci.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not _installed():
                proc = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR, capture_output=True,
                                      text=True, timeout=600)
                assert proc.returncode == 0, f"npm ci failed in {NODE_DIR}:\n{proc.stdout}\n{proc.stderr}"
    return binary


@pytest.fixture(scope="session")
def export(tmp_path_factory) -> Export:
    """A tiny untrained model saved as a trainer checkpoint and exported (native only: the
    cheapest real, signed, watermarked export) into an artifact store."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        store = ArtifactStore(tmp_path_factory.mktemp("artifacts"))
        docs = shakespeare_paragraphs(200) + [code_doc(i) for i in range(60)]
        tokenizer = store.path("datasets", DATASET_VERSION, "tokenizer.model")
        tokenizer.parent.mkdir(parents=True)
        tokenizer.write_bytes(train_tokenizer(docs, TokenizerConfig(vocab_size=1024)))
        config = model_preset("tiny")
        torch.manual_seed(0)
        state = {k: v.detach().clone() for k, v in Llama(config).state_dict().items()}
        info = save_checkpoint(
            store.path("checkpoints", RUN_ID), STEP, state,
            {"step": STEP, "model_config": config.model_dump(mode="json"), "dataset_version": DATASET_VERSION},
            meta={"reason": "final", "dataset_version": DATASET_VERSION, "run_id": RUN_ID},
        )
        result = export_checkpoint(
            info.path, tokenizer, None, store.path("exports"), run_id=RUN_ID, dataset_version=DATASET_VERSION,
            config_hash=CONFIG_HASH, signing_key=SIGNING_KEY, config=ExportConfig(formats=["native"]),
            metrics={"val_loss": 6.9},
        )
    finally:
        torch.set_num_threads(before)
    return Export(store, result, result.lineage["checkpoint_digest"])
