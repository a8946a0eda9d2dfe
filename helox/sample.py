"""A sample from an exported model: what `helox run` shows once its model is ready.

The export is verified first (signature, digests, fingerprint: `verify_export`), then its
native weights (or, without them, its Hugging Face weights) are loaded into the project's own
`Llama` and decoded greedily with the export's sentencepiece tokenizer. No runtime beyond
PyTorch is needed, so a run whose export skipped ONNX still shows a sample.
"""

from __future__ import annotations

import json
from pathlib import Path

import sentencepiece as spm
import torch

from services.exporter.native import load_native
from services.exporter.verify import verify_export
from shared.model import Llama, ModelConfig, generate


class SampleError(RuntimeError):
    """The export cannot be sampled from (failed verification, no PyTorch-loadable weights)."""


def _load(export_dir: Path, manifest: dict) -> tuple[Llama, Path]:
    """The model and its tokenizer file, from the native format, else the HF one."""
    formats = manifest.get("formats", {})
    if "native" in formats:
        native = export_dir / formats["native"]["path"]
        model, _config, _prov = load_native(native)
        return model, native / "tokenizer.model"
    if "hf" in formats:
        from safetensors.torch import load_file

        from services.exporter.hf import hf_tensors_to_canonical

        config = ModelConfig(**manifest["model_config"])
        tensors = hf_tensors_to_canonical(load_file(str(export_dir / formats["hf"]["main"])), config)
        if config.tie_embeddings:
            tensors["lm_head.weight"] = tensors["embed_tokens.weight"]
        model = Llama(config)
        model.load_state_dict(tensors, strict=True)
        return model.eval(), export_dir / formats["hf"]["path"] / "tokenizer.model"
    raise SampleError(f"{export_dir} has neither a native nor an hf export ({', '.join(formats) or 'no formats'})")


def sample_export(export_dir: str | Path, signing_key: str | bytes, prompt: str, max_new_tokens: int = 48) -> str:
    """Greedy continuation of PROMPT by the model exported in EXPORT_DIR, once it verified."""
    export_dir = Path(export_dir)
    report = verify_export(export_dir, signing_key, check_watermark=False)
    if not report.ok:
        raise SampleError(f"{export_dir} failed verification: {', '.join(report.failed)}")
    manifest = json.loads((export_dir / "manifest.json").read_text())
    model, tokenizer_path = _load(export_dir, manifest)
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
    ids = sp.encode(prompt)  # Helox trains without BOS at document starts
    room = model.config.max_seq_len - len(ids)
    if room <= 0:
        raise SampleError(f"prompt of {len(ids)} tokens does not fit the model's {model.config.max_seq_len}")
    out = generate(model, torch.tensor([ids]), min(max_new_tokens, room), eos_token_id=sp.eos_id())
    new = [int(t) for t in out[0, len(ids):] if int(t) != sp.eos_id()]
    return sp.decode(new)
