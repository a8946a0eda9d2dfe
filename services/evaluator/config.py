"""Evaluator configuration: one pydantic model with a section per concern (extra keys refused)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from shared.config import StrictModel

DEFAULT_SUITES_DIR = Path(__file__).resolve().parent / "suites"
"""The suites shipped with the evaluator (Python completion, multiple choice)."""


class GenerationConfig(StrictModel):
    """How suite prompts are completed (shared.model.generate, KV cache)."""

    max_new_tokens: int = Field(default=24, ge=1, description="Tokens generated per prompt at most.")
    temperature: float = Field(default=0.0, ge=0, description="0 = greedy (the reproducible default).")
    top_k: int | None = Field(default=None, ge=1)
    top_p: float | None = Field(default=None, gt=0, le=1)
    stop: list[str] = Field(
        default_factory=lambda: ["\n"], description="Output is cut at the first of these strings (suites may override)."
    )
    batch_size: int = Field(default=16, ge=1, description="Prompts generated together (left-padded).")
    seed: int = Field(default=0, description="Sampling seed when temperature > 0.")


class GatesConfig(StrictModel):
    """Quality gates. Regression gates fail only on a significant paired difference beyond the threshold."""

    val_ppl_max_increase: float = Field(
        default=0.02, ge=0,
        description="Relative validation-perplexity increase tolerated: the gate fails only when the lower "
        "confidence bound of the paired increase exceeds it.",
    )
    suite_max_drop: float = Field(
        default=0.05, ge=0,
        description="Drop of a suite's mean score (0-1) tolerated: fails when the lower bound of the paired drop exceeds it.",
    )
    max_val_ppl: float | None = Field(default=None, gt=0, description="Absolute ceiling on validation perplexity.")
    min_suite_scores: dict[str, float] = Field(default_factory=dict, description="Absolute floor per suite name.")
    require_parity: bool = Field(default=True, description="A failed parity check fails the 'parity' gate.")


class ParityConfig(StrictModel):
    """Numerical parity checks of the model in the forms it will be served in."""

    enabled: bool = True
    sequences: int = Field(default=4, ge=2, description="Validation sequences the checks run on.")
    seq_len: int = Field(default=64, ge=4, description="Length of those sequences (shorter ones are made from them).")
    batch_tol: float = Field(default=1e-4, ge=0, description="Max |logit diff|, batch 1 vs right-padded batch.")
    kv_cache_tol: float = Field(default=1e-4, ge=0, description="Max |logit diff|, KV-cache decoding vs full forward.")
    int8: bool = Field(default=True, description="Check int8 dynamic quantisation (nn.Linear).")
    int8_min_top1_agreement: float = Field(
        default=0.9, ge=0, le=1,
        description="Argmax agreement int8 vs fp32, at the positions fp32 decided (see int8_decided_margin).")
    int8_decided_margin: float = Field(
        default=0.25, ge=0,
        description="A position counts for the agreement when fp32's top-1 leads its runner-up by at least this "
        "many nats of log-probability (0.25: 1.28x as likely); a near-tie's argmax flips under any perturbation, "
        "so counting those would judge the model's indecision, not the quantisation. 0: every position.")
    int8_max_ppl_increase: float = Field(default=0.05, ge=0, description="Relative perplexity increase int8 vs fp32.")


class RetrievalGainConfig(StrictModel):
    """Retrieval gain of runs trained with retrieved context (services.evaluator.retrieval_gain)."""

    enabled: bool = Field(default=True, description="Measure it when the dataset is RAG-packed (else skipped).")
    max_windows: int | None = Field(default=64, ge=1, description="Validation windows measured (None: all).")
    seed: int = Field(default=0, description="Seed of the random-context control.")


class EvalConfig(StrictModel):
    """Everything `evaluate_checkpoint` needs besides the checkpoint and the dataset."""

    batch_size: int = Field(default=16, ge=1, description="Validation windows per forward.")
    seq_len: int = Field(default=256, ge=2, description="Validation window length (capped at the model's max_seq_len).")
    max_val_tokens: int | None = Field(
        default=200_000, ge=1, description="Validation tokens scored per domain at most (None: all)."
    )
    domains: list[str] | None = Field(default=None, description="Domains to score (None: every validation domain).")
    suites_dir: Path | None = Field(default=DEFAULT_SUITES_DIR, description="Directory of suite files; None: no suites.")
    similarity: Literal["chrf", "embedding"] = Field(
        default="chrf", description="Default backend of 'similarity' items: chrF, or cosine of MiniLM embeddings."
    )
    embedding_model: str = Field(default="all-MiniLM-L6-v2", description="Bundled name or a local model directory.")
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    gates: GatesConfig = Field(default_factory=GatesConfig)
    parity: ParityConfig = Field(default_factory=ParityConfig)
    retrieval: RetrievalGainConfig = Field(default_factory=RetrievalGainConfig)
    bootstrap_samples: int = Field(default=2000, ge=100, description="Paired bootstrap resamples.")
    confidence: float = Field(default=0.95, gt=0.5, lt=1, description="Two-sided confidence of the intervals.")
    seed: int = Field(default=0, description="Seed of the bootstrap (and of sampling).")
    baseline_checkpoint: Path | None = Field(default=None, description="A fixed reference model compared every time.")
    cache_dir: Path | None = Field(
        default=None, description="Where reference measurements are kept by checkpoint digest (None: memory only)."
    )
    threads: int | None = Field(default=None, ge=1, description="torch intra-op threads (None: leave as is).")

    @model_validator(mode="after")
    def _check(self) -> EvalConfig:
        if self.max_val_tokens is not None and self.max_val_tokens < self.seq_len:
            raise ValueError(f"max_val_tokens ({self.max_val_tokens}) must be at least seq_len ({self.seq_len})")
        return self
