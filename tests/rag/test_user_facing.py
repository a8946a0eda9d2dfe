"""What a user sees of RAG packing: the retriever and every fallback, in `helox data inspect` and
in the lines `helox run` prints."""

from __future__ import annotations

from pathlib import Path

from contracts import Producer, RetrievalFallback
from contracts.codec import envelope
from helox.events import describe
from shared.data.manifest import format_summary, inspect_dataset

from .conftest import prepare, rag_config


def test_inspect_names_the_retriever_and_every_fallback(corpus_root: Path) -> None:
    result = prepare(corpus_root, rag_config(retriever="auto"))  # no Synapse link: the local index, said so
    text = format_summary(inspect_dataset(result.manifest_path))
    assert "retriever local-bm25" in text and "queries answered: local-bm25" in text
    assert "rag FALLBACK: no retriever -> local-bm25" in text and "offline data prep" in text


def test_helox_run_prints_a_fallback_as_a_warning() -> None:
    env = envelope(RetrievalFallback(stage="data", from_retriever="cyrex:cyrex-1", to_retriever="local-bm25",
                                     reason="no answer within rag.request_timeout_s = 10.0 s", queries=640),
                   producer=Producer(service="data-prep", instance="data-prep-1"))
    line = describe(env)
    assert line.startswith("WARNING retrieval fell back from cyrex:cyrex-1 to local-bm25 for 640 queries")
    assert "rag.request_timeout_s" in line
