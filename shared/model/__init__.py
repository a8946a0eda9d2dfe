"""The Llama-style decoder, its configuration/presets and KV-cache generation."""

from .config import PRESETS, ModelConfig, UnknownPresetError, model_preset
from .generate import generate, sample_next
from .llama import KVCache, Llama, SequenceTooLongError, hf_config, hf_name, hf_state_dict

__all__ = [
    "PRESETS",
    "KVCache",
    "Llama",
    "ModelConfig",
    "SequenceTooLongError",
    "UnknownPresetError",
    "generate",
    "hf_config",
    "hf_name",
    "hf_state_dict",
    "model_preset",
    "sample_next",
]
