"""Fixtures of the RAG tests: a small two-domain corpus with planted duplicates, packing configs,
and the test-only retriever process (tests/rag/responder.py) against a real Redis."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from contracts import Producer
from services.data_prep.pipeline import PrepareResult, prepare_dataset
from shared.artifacts import ArtifactStore
from shared.data.config import RagConfig
from shared.retrieval import SynapseLink
from tests.data_prep.conftest import make_config, shakespeare_paragraphs, write_corpus

REPO = Path(__file__).resolve().parents[2]
PREFIX = "helox."


@pytest.fixture
def corpus_root(tmp_path: Path) -> Path:
    """write_corpus's layout plus an exact and a near copy of prose paragraph 3 (dedup removes both)."""
    write_corpus(tmp_path)
    para = shakespeare_paragraphs(4)[3]
    (tmp_path / "corpus" / "prose" / "z_exact_copy.txt").write_text(para + "\n", "utf-8")
    words = para.split(" ")
    words[-1] = "EDITED"  # one shingle of many differs: Jaccard well above minhash.threshold
    (tmp_path / "corpus" / "prose" / "z_near_copy.txt").write_text(" ".join(words) + "\n", "utf-8")
    return tmp_path


def rag_config(**rag: object):
    base = {"retriever": "local", "seq_len": 96, "k": 3, "chunk_tokens": 24, "discovery_timeout_s": 1.0,
            "request_timeout_s": 2.0, "batch_queries": 16}
    return make_config(rag=RagConfig(**{**base, **rag}))


def prepare(root: Path, config, link: SynapseLink | None = None) -> PrepareResult:
    return prepare_dataset(config, ArtifactStore(root / "store"), base_dir=root, synapse=link)


def report(result: PrepareResult) -> list[dict]:
    path = result.manifest_path.parent / result.manifest.rag.report.path
    return [json.loads(line) for line in path.read_text("utf-8").splitlines()]


@pytest.fixture
def link(redis_url: str) -> SynapseLink:
    return SynapseLink(redis_url, PREFIX, Producer(service="data-prep", instance="data-prep-test"), run_id="run-rag")


@pytest.fixture
def client(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url)


@pytest.fixture
def responder(redis_url: str, tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Start `python -m tests.rag.responder` processes; all are killed at the end."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(mode: str, instance: str = "cyrex-test", *extra: str) -> subprocess.Popen[bytes]:
        log = open(tmp_path / f"responder-{instance}.log", "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen([sys.executable, "-m", "tests.rag.responder", redis_url, instance, mode, *extra],
                                cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        procs.append(proc)
        return proc

    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(10)
