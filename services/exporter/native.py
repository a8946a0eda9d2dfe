"""The native format: the model's own tensors in safetensors, its config as JSON, the tokenizer.

    native/model.safetensors   `shared.model.Llama` names, fp32; tied lm_head stored once
                               (as embed_tokens.weight); __metadata__ holds the provenance
    native/config.json         format, model config, provenance, tokenizer special ids
    native/tokenizer.model     the sentencepiece model
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import sentencepiece as spm
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from shared.artifacts import atomic_write_bytes
from shared.checkpoint import write_safetensors
from shared.model import Llama, ModelConfig

from .provenance import canonical_tensors

FORMAT = "helox-native/1"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.model"


class ExportFormatError(ValueError):
    """An export directory is missing a file or holds something unexpected."""


def special_ids(tokenizer_path: str | Path) -> dict[str, int]:
    """pad/unk/bos/eos ids of a sentencepiece model (-1 where undefined)."""
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
    return {"pad": sp.pad_id(), "unk": sp.unk_id(), "bos": sp.bos_id(), "eos": sp.eos_id(),
            "vocab_size": sp.vocab_size()}


def write_native(
    out: Path, state: dict[str, torch.Tensor], config: ModelConfig, tokenizer_path: str | Path,
    provenance: dict[str, str],
) -> dict[str, Any]:
    """Write the native export into `out`; returns its format entry for the manifest."""
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in canonical_tensors(state, tied=config.tie_embeddings).items()}
    meta = {"format": FORMAT, "model_config": json.dumps(config.model_dump(mode="json"), sort_keys=True),
            **provenance}
    write_safetensors(out / WEIGHTS_FILE, dict(sorted(tensors.items())), meta)
    shutil.copyfile(tokenizer_path, out / TOKENIZER_FILE)
    doc = {"format": FORMAT, "model_config": config.model_dump(mode="json"), "provenance": provenance,
           "weights": WEIGHTS_FILE, "tokenizer": {"file": TOKENIZER_FILE, **special_ids(tokenizer_path)}}
    atomic_write_bytes(out / CONFIG_FILE, json.dumps(doc, indent=1, sort_keys=True).encode())
    return {"path": out.name, "main": f"{out.name}/{WEIGHTS_FILE}", "note": "safetensors + config + tokenizer"}


def read_native_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The stored tensors (tied lm_head not repeated) and the safetensors metadata."""
    f = Path(path) / WEIGHTS_FILE if Path(path).is_dir() else Path(path)
    if not f.is_file():
        raise ExportFormatError(f"no native weights at {f}")
    with safe_open(str(f), framework="pt") as h:
        meta = dict(h.metadata() or {})
    return load_file(str(f)), meta


def load_native(path: str | Path) -> tuple[Llama, ModelConfig, dict[str, str]]:
    """Rebuild the `Llama` of a native export directory: (model in eval mode, config, provenance)."""
    path = Path(path)
    tensors, meta = read_native_tensors(path)
    if meta.get("format") != FORMAT:
        raise ExportFormatError(f"{path / WEIGHTS_FILE} has format {meta.get('format')!r}, expected {FORMAT!r}")
    config = ModelConfig(**json.loads(meta["model_config"]))
    if config.tie_embeddings:
        tensors["lm_head.weight"] = tensors["embed_tokens.weight"]
    model = Llama(config)
    model.load_state_dict(tensors, strict=True)
    return model.eval(), config, {k: v for k, v in meta.items() if k.startswith("helox.")}


@torch.no_grad()
def check_native(path: Path, model: Llama, input_ids: torch.Tensor) -> dict[str, Any]:
    """Reload the files and compare logits with the in-memory model: must be bit-identical."""
    reloaded, _, _ = load_native(path)
    ref, got = model(input_ids), reloaded(input_ids)
    diff = float((ref - got).abs().max())
    return {"passed": diff == 0.0, "max_abs_diff": diff, "runtime": f"torch {torch.__version__}"}
