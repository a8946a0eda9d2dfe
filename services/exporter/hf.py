"""The Hugging Face format: a directory `transformers` loads with AutoModelForCausalLM and
AutoTokenizer (LlamaForCausalLM + LlamaTokenizer over the sentencepiece model).

Built the safe way: LlamaForCausalLM from `hf_config`, `load_state_dict(strict=True)`,
`save_pretrained`; the weights file is then rewritten with the provenance in its safetensors
metadata (same tensors), and the provenance also goes into config.json under "helox".
The tokenizer keeps Helox's sentencepiece options: no dummy prefix (add_prefix_space=False),
no BOS/EOS added on encode; parity checks that it encodes exactly as sentencepiece does.
The sentencepiece model's user-defined pieces (RAG's `<ctx>`, `</ctx>`, `<doc>`) are declared
extra special tokens: never split, one id each, the sentencepiece id.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import sentencepiece as spm
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from shared.checkpoint import write_safetensors
from shared.model import Llama, ModelConfig, generate, hf_config, hf_name

from .native import special_ids

WEIGHTS_FILE = "model.safetensors"
PARITY_TEXTS = (
    "First Citizen:\nBefore we proceed any further, hear me speak.",
    "def add(x, y=3):\n    return  x + y * 12\n",
    "  leading spaces, tabs\tand unicode: héllo wörld 日本",
)


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def build_hf_model(model: Llama, ids: dict[str, int], provenance: dict[str, str] | None = None):
    """An in-memory LlamaForCausalLM holding `model`'s weights (strict name/shape match)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    _quiet_transformers()
    config = model.config
    hc = LlamaConfig(
        **hf_config(config), bos_token_id=ids["bos"], eos_token_id=ids["eos"],
        pad_token_id=ids["pad"] if ids["pad"] >= 0 else None, helox=dict(provenance or {}),
    )
    hm = LlamaForCausalLM(hc)
    # Every tensor under its transformers name, lm_head included even when tied: strict=True
    # then proves the two networks have the same parameters; tie_weights() re-ties afterwards.
    hm.load_state_dict({hf_name(k): v for k, v in model.state_dict().items()}, strict=True)
    if config.tie_embeddings:
        hm.tie_weights()
    return hm.eval()


USER_DEFINED = 4
"""sentencepiece's ModelProto.SentencePiece.Type.USER_DEFINED (GGUF's token type 4 too)."""


def user_defined_pieces(tokenizer_path: str | Path) -> dict[str, int]:
    """piece -> id of every user-defined piece of a sentencepiece model, in id order (from the proto:
    sentencepiece's Python API has no is_user_defined)."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(tokenizer_path).read_bytes())
    return {p.piece: i for i, p in enumerate(proto.pieces) if p.type == USER_DEFINED}


def _tokenizer_config(ids: dict[str, int], max_len: int, extra: list[str] | None = None) -> dict[str, Any]:
    extra_tokens = {"extra_special_tokens": list(extra)} if extra else {}
    return {
        **extra_tokens,
        "tokenizer_class": "LlamaTokenizer",
        "add_prefix_space": False,  # sentencepiece trained with add_dummy_prefix=False
        "legacy": False,
        "add_bos_token": False,
        "add_eos_token": False,
        "model_max_length": max_len,
        "clean_up_tokenization_spaces": False,
        "pad_token": "<pad>" if ids["pad"] >= 0 else None,
        "unk_token": "<unk>",
        "bos_token": "<s>",
        "eos_token": "</s>",
    }


def write_hf(
    out: Path, model: Llama, tokenizer_path: str | Path, provenance: dict[str, str]
) -> dict[str, Any]:
    """Write the transformers directory into `out`; returns its format entry for the manifest."""
    from transformers import AutoTokenizer

    out.mkdir(parents=True, exist_ok=True)
    ids = special_ids(tokenizer_path)
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
    names = {"pad": "<pad>", "unk": "<unk>", "bos": "<s>", "eos": "</s>"}
    for role, piece in names.items():
        if ids[role] >= 0 and sp.id_to_piece(ids[role]) != piece:
            raise ValueError(f"tokenizer {tokenizer_path}: {role} id {ids[role]} is {sp.id_to_piece(ids[role])!r}, "
                             f"expected {piece!r} (Helox tokenizers reserve pad/unk/bos/eos as 0-3)")
    hm = build_hf_model(model, ids, provenance)
    hm.save_pretrained(out, safe_serialization=True)
    # Same tensors, provenance added to the safetensors header ("format": "pt" is what transformers expects).
    # load_file maps the file: copy the tensors and write a new file beside it, never over the mapping.
    tensors = {k: v.clone() for k, v in load_file(str(out / WEIGHTS_FILE)).items()}
    tmp = out / f".{WEIGHTS_FILE}.tmp"
    write_safetensors(tmp, dict(sorted(tensors.items())), {"format": "pt", **provenance})
    os.replace(tmp, out / WEIGHTS_FILE)

    with tempfile.TemporaryDirectory() as tmp:
        shutil.copyfile(tokenizer_path, Path(tmp) / "tokenizer.model")
        (Path(tmp) / "tokenizer_config.json").write_text(json.dumps(
            _tokenizer_config(ids, model.config.max_seq_len, list(user_defined_pieces(tokenizer_path)))))
        tok = AutoTokenizer.from_pretrained(tmp)  # converts the sentencepiece model (tokenizer.json)
        tok.save_pretrained(out)
    shutil.copyfile(tokenizer_path, out / "tokenizer.model")
    # Keep only what a consumer needs to reproduce loading anywhere.
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    for transient in ("is_local", "local_files_only"):
        cfg.pop(transient, None)
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))
    return {"path": out.name, "main": f"{out.name}/{WEIGHTS_FILE}",
            "note": "transformers AutoModelForCausalLM / AutoTokenizer (LlamaForCausalLM, LlamaTokenizer)"}


def hf_tensors_to_canonical(tensors: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """transformers names -> the model's own (tied lm_head dropped): the fingerprint's view."""
    out = {}
    for k, v in tensors.items():
        name = k[len("model."):] if k.startswith("model.") else k
        if config.tie_embeddings and name == "lm_head.weight":
            continue
        out[name] = v
    return out


def read_hf_metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path / WEIGHTS_FILE), framework="pt") as f:
        return dict(f.metadata() or {})


def _until_eos(rows: torch.Tensor, start: int, eos: int) -> list[list[int]]:
    out = []
    for row in rows.tolist():
        new = row[start:]
        out.append(new[: new.index(eos) + 1] if eos in new else new)
    return out


@torch.no_grad()
def greedy_matches(hm, model: Llama, prompt: torch.Tensor, max_new_tokens: int, *, eos: int) -> bool:
    """transformers' greedy `generate` and Helox's produce the same tokens (each row up to its EOS)."""
    ours = generate(model, prompt, max_new_tokens, eos_token_id=eos)
    theirs = hm.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=max_new_tokens,
                         do_sample=False, eos_token_id=eos, pad_token_id=0)
    start = prompt.size(1)
    return _until_eos(ours, start, eos) == _until_eos(theirs, start, eos)


@torch.no_grad()
def check_hf(path: Path, model: Llama, input_ids: torch.Tensor, tokenizer_path: str | Path, *,
             atol: float = 1e-4, max_new_tokens: int = 12) -> dict[str, Any]:
    """Load the directory with the Auto classes; compare tokenization, logits and greedy generations."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    hm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
    tokens_match = all(tok.encode(t, add_special_tokens=False) == sp.encode(t) for t in PARITY_TEXTS)
    decode_match = all(tok.decode(sp.encode(t)) == sp.decode(sp.encode(t)) for t in PARITY_TEXTS)
    # User-defined pieces (RAG boundary tokens): one id each, sentencepiece's, and back to the piece.
    pieces = user_defined_pieces(tokenizer_path)
    pieces_match = all(tok.encode(p, add_special_tokens=False) == [i] and tok.decode([i]) == p
                       for p, i in pieces.items())

    ref = model(input_ids)
    got = hm(input_ids).logits
    diff = float((ref - got).abs().max())
    argmax = float((ref.argmax(-1) == got.argmax(-1)).float().mean())

    prompt = input_ids[:, : max(1, min(8, input_ids.size(1)))]
    same_generation = greedy_matches(hm, model, prompt, max_new_tokens, eos=tok.eos_token_id)
    return {
        "passed": diff <= atol and argmax == 1.0 and same_generation and tokens_match and decode_match
        and pieces_match,
        "max_abs_diff": diff, "atol": atol, "argmax_agreement": argmax, "greedy_identical": same_generation,
        "tokenizer_identical": tokens_match and decode_match, "user_defined_tokens": len(pieces),
        "user_defined_identical": pieces_match, "runtime": f"transformers {transformers.__version__}",
    }
