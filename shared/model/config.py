"""Model configuration: one pydantic model and a few named presets.

Sizes (parameters, tied embeddings counted once):

| preset | layers | d_model | heads (kv) | ffn  | vocab  | tied | params |
| ------ | ------ | ------- | ---------- | ---- | ------ | ---- | ------ |
| tiny   | 4      | 128     | 4 (2)      | 384  | 1024   | yes  | 0.92M  |
| 10m    | 8      | 256     | 8 (4)      | 768  | 8192   | no   | 10.5M  |
| 125m   | 12     | 768     | 12 (4)     | 2816 | 32000  | yes  | 121M   |
| 350m   | 24     | 1024    | 16 (8)     | 2816 | 32000  | no   | 349M   |
| 1b     | 16     | 2048    | 32 (8)     | 8192 | 32000  | yes  | 1.04B  |
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from shared.config import FrozenStrictModel


class UnknownPresetError(KeyError):
    """A model preset name that does not exist."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


class ModelConfig(FrozenStrictModel):
    """Hyper-parameters of the Llama-style decoder in `shared.model.llama`."""

    vocab_size: int = Field(gt=0, description="Tokenizer vocabulary size.")
    n_layer: int = Field(gt=0, description="Transformer blocks.")
    n_head: int = Field(gt=0, description="Query heads.")
    n_kv_head: int = Field(gt=0, description="Key/value heads (grouped-query attention); n_head % n_kv_head == 0.")
    d_model: int = Field(gt=0, description="Residual stream width; d_model % n_head == 0.")
    ffn_hidden: int = Field(gt=0, description="SwiGLU intermediate width.")
    max_seq_len: int = Field(default=2048, gt=0, description="Longest sequence RoPE tables are built for.")
    rope_theta: float = Field(default=10000.0, gt=0, description="RoPE base frequency.")
    norm_eps: float = Field(default=1e-5, gt=0, description="RMSNorm epsilon.")
    tie_embeddings: bool = Field(default=True, description="Share the input embedding with the output head.")
    init_std: float = Field(
        default=0.02, gt=0, description="Std of the normal init; residual projections get init_std/sqrt(2*n_layer)."
    )

    @model_validator(mode="after")
    def _check_shapes(self) -> ModelConfig:
        if self.d_model % self.n_head:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head ({self.n_head}) must be divisible by n_kv_head ({self.n_kv_head})")
        if (self.d_model // self.n_head) % 2:
            raise ValueError(f"head_dim ({self.d_model // self.n_head}) must be even for RoPE")
        return self

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    def num_params(self, *, exclude_embedding: bool = False) -> int:
        """Parameter count computed from the config (matches `Llama.num_params`)."""
        d, hd = self.d_model, self.head_dim
        attn = d * self.n_head * hd * 2 + d * self.n_kv_head * hd * 2
        mlp = 3 * d * self.ffn_hidden
        per_layer = attn + mlp + 2 * d
        emb = self.vocab_size * d
        head = 0 if self.tie_embeddings else self.vocab_size * d
        total = self.n_layer * per_layer + d + emb + head
        if exclude_embedding:
            # The input lookup costs no FLOPs; a tied matrix still does work as the head.
            total -= emb if not self.tie_embeddings else 0
        return total

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6N + 12*L*H*Q*T (PaLM appendix B; nanoGPT, torchtitan).

        N counts the matmul parameters (the output head included, the input lookup not).
        """
        n = self.num_params(exclude_embedding=True)
        return 6.0 * n + 12.0 * self.n_layer * self.n_head * self.head_dim * seq_len


PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(vocab_size=1024, n_layer=4, n_head=4, n_kv_head=2, d_model=128, ffn_hidden=384, max_seq_len=512),
    "10m": dict(
        vocab_size=8192, n_layer=8, n_head=8, n_kv_head=4, d_model=256, ffn_hidden=768, max_seq_len=1024,
        tie_embeddings=False,
    ),
    "125m": dict(vocab_size=32000, n_layer=12, n_head=12, n_kv_head=4, d_model=768, ffn_hidden=2816, max_seq_len=2048),
    "350m": dict(
        vocab_size=32000, n_layer=24, n_head=16, n_kv_head=8, d_model=1024, ffn_hidden=2816, max_seq_len=2048,
        tie_embeddings=False,
    ),
    "1b": dict(
        vocab_size=32000, n_layer=16, n_head=32, n_kv_head=8, d_model=2048, ffn_hidden=8192, max_seq_len=2048,
        rope_theta=500000.0,
    ),
}


def model_preset(name: str, **overrides: Any) -> ModelConfig:
    """The named preset with optional overrides, e.g. `model_preset("tiny", vocab_size=4096)`."""
    try:
        base = PRESETS[name]
    except KeyError:
        raise UnknownPresetError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}") from None
    return ModelConfig(**{**base, **overrides})
