"""Retrievers for RAG-aware training: the local BM25 index and Cyrex over Synapse.

Services import this; Cyrex (outside) does not (it speaks the contracts only).
"""

from shared.retrieval.local import Chunk, LocalIndex, LocalIndexError, chunk_documents, index_digest
from shared.retrieval.synapse import (
    BatchAnswer,
    RetrieverUnavailableError,
    SynapseLink,
    SynapseRetriever,
    discover,
    live_retrievers,
)

__all__ = [
    "BatchAnswer",
    "Chunk",
    "LocalIndex",
    "LocalIndexError",
    "RetrieverUnavailableError",
    "SynapseLink",
    "SynapseRetriever",
    "chunk_documents",
    "discover",
    "index_digest",
    "live_retrievers",
]
