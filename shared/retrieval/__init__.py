"""Retrievers for RAG-aware training: the local BM25 index and Cyrex over Synapse.

Services import this; Cyrex (outside) does not (it speaks the contracts only).
"""

from shared.retrieval.local import Chunk, LocalIndex, LocalIndexError, chunk_documents, index_digest
from shared.retrieval.synapse import (
    BatchAnswer,
    Discovery,
    RetrieverUnavailableError,
    SynapseLink,
    SynapseRetriever,
    discover,
    find_retriever,
    indexing_retrievers,
    live_retrievers,
)

__all__ = [
    "BatchAnswer",
    "Chunk",
    "Discovery",
    "LocalIndex",
    "LocalIndexError",
    "RetrieverUnavailableError",
    "SynapseLink",
    "SynapseRetriever",
    "chunk_documents",
    "discover",
    "find_retriever",
    "index_digest",
    "indexing_retrievers",
    "live_retrievers",
]
