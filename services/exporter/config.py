"""The exporter's configuration: which formats, GGUF types, policy and watermark."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from shared.config import FrozenStrictModel

Format = Literal["native", "hf", "onnx", "gguf", "tensorrt"]
FORMATS: tuple[Format, ...] = ("native", "hf", "onnx", "gguf", "tensorrt")
GGUFType = Literal["f32", "f16", "bf16", "q8_0"]
GGUF_TYPES: tuple[GGUFType, ...] = ("f32", "f16", "bf16", "q8_0")


class WatermarkConfig(FrozenStrictModel):
    """The keyed, function-preserving weight watermark (services.exporter.watermark).

    Its key is an argument of `export_checkpoint`; by default derived from the signing key
    (HELOX_SIGNING_KEY, `HeloxSettings.signing_key`), so one secret serves both.
    """

    enabled: bool = Field(default=True, description="Mark the exported weights.")
    strength: float = Field(default=0.1, gt=0.0, lt=1.0,
                            description="Log-scale of each unit's rescaling: c = exp(+-strength).")
    max_false_positive: float = Field(default=1e-6, gt=0.0, lt=1.0,
                                      description="Detected when the false-positive bound is at most this.")


class ParityConfig(FrozenStrictModel):
    """How each format is checked against the PyTorch model."""

    atol: float = Field(default=1e-4, gt=0.0,
                        description="Logit tolerance (fp32) for HF and ONNX (full, left-padded and KV-cache runs).")
    gguf_f32_atol: float = Field(default=1e-4, gt=0.0,
                                 description="Logit tolerance of llama.cpp on the f32 file with an f32 KV cache "
                                 "(the weights' own error; the stock load's f16 KV cache adds ~3e-4).")
    gguf_min_top1_quantized: float = Field(default=0.8, ge=0.0, le=1.0,
                                           description="Top-1 agreement required of the bf16 and q8_0 GGUF files "
                                           "at the positions PyTorch decided (see gguf_decided_margin).")
    gguf_decided_margin: float = Field(default=0.25, ge=0.0,
                                       description="For bf16 and q8_0: top-1 is compared where PyTorch's top-1 leads "
                                       "its runner-up by at least this many nats (near-ties flip under any rounding "
                                       "at no cost in probability); 0: every position.")
    gguf_tie_margin: float = Field(default=0.01, ge=0.0,
                                   description="For f32 and f16, which must agree on every top-1: positions whose "
                                   "top two are within this many nats (ties the stock f16 KV cache can flip) are "
                                   "left out; 0: every position.")
    batch: int = Field(default=2, ge=1, description="Rows of the parity batch.")
    seq_len: int = Field(default=16, ge=2, description="Tokens per row of the parity batch.")
    max_new_tokens: int = Field(default=12, ge=1, description="Greedy tokens compared for the HF export.")
    fail_on_mismatch: bool = Field(default=True, description="Refuse the export when a format fails parity.")


class ExportConfig(FrozenStrictModel):
    """What the exporter produces and when."""

    formats: list[Format] = Field(default_factory=lambda: ["native", "hf", "onnx", "gguf", "tensorrt"],
                                  description="Formats to write; tensorrt is skipped (with a reason) without TensorRT.")
    gguf_types: list[GGUFType] = Field(default_factory=lambda: ["f32", "f16", "q8_0"],
                                       description="GGUF files to write, one per tensor type (norms stay f32 in each).")
    onnx_kv_cache: bool = Field(default=True, description="Also export the KV-cache ONNX graph.")
    onnx_exporter: Literal["auto", "dynamo", "torchscript"] = Field(
        default="auto", description="auto: dynamo, falling back to TorchScript if dynamo fails.")
    on: Literal["eval_passed", "training_completed"] = Field(
        default="eval_passed",
        description="eval_passed: export a checkpoint whose evaluation passed every gate (final only, or "
        "best: see `checkpoint`); training_completed: export when training completes, without waiting for eval.")
    checkpoint: Literal["final", "best"] = Field(default="final", description="Which checkpoint of a run to export.")
    out_dir: str = Field(default="exports", description="Directory in the artifact store holding exports.")
    watermark: WatermarkConfig = Field(default_factory=WatermarkConfig)
    parity: ParityConfig = Field(default_factory=ParityConfig)
    verify_after_export: bool = Field(default=True, description="Run verify_export on the result before publishing.")

    @field_validator("formats", "gguf_types")
    @classmethod
    def _unique_non_empty(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("must name at least one entry")
        return list(dict.fromkeys(value))
