"""The GGUF format (llama.cpp): arch `llama`, the sentencepiece vocabulary, f32/f16/q8_0 files.

    gguf/model-<quant>.gguf    one file per quantisation (f32, f16, q8_0)

Q and K rows are permuted from the HF rotate_half RoPE layout (dim i paired with i + D/2) to
llama.cpp's (consecutive pairs) with llama.cpp's own converter `permute` (K with n_kv_head).
The vocabulary comes from the sentencepiece model proto: pieces, scores and piece types (the
proto's types are GGUF's token types); no dummy prefix, no BOS added, as Helox tokenizes.
Norm gains stay f32 in every file; q8_0 quantises the matrices with gguf's numpy quantizer.
Provenance goes into `general.helox.*` keys.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

if TYPE_CHECKING:
    import torch

    from shared.model import Llama, ModelConfig

Quant = Literal["f32", "f16", "q8_0"]
QUANTS: tuple[Quant, ...] = ("f32", "f16", "q8_0")
PARITY_TEXTS = (
    "First Citizen:\nBefore we proceed any further, hear me speak.",
    "def add(x, y=3):\n    return  x + y * 12\n",
    "All:\nSpeak, speak.",
    "    if x > 10:\n        return [v for v in range(x)]",
    "  unicode: héllo wörld",
)


class GGUFExportError(ValueError):
    """The model or tokenizer cannot be written as GGUF (e.g. a vocabulary larger than the model's)."""


def gguf_file(quant: str) -> str:
    return f"model-{quant}.gguf"


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate_half rows -> llama.cpp interleaved rows (llama.cpp's convert_hf_to_gguf.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of `permute`."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_TOP = {"embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}


def gguf_name(name: str) -> str:
    """The model's tensor name -> llama.cpp's (`layers.3.mlp.up_proj.weight` -> `blk.3.ffn_up.weight`)."""
    if name in _TOP:
        return _TOP[name]
    _, i, rest = name.split(".", 2)
    return f"blk.{i}.{_NAMES[rest]}"


def model_name(gname: str) -> str:
    """Inverse of `gguf_name`."""
    for ours, theirs in _TOP.items():
        if gname == theirs:
            return ours
    _, i, rest = gname.split(".", 2)
    inverse = {v: k for k, v in _NAMES.items()}
    return f"layers.{i}.{inverse[rest]}"


def sentencepiece_vocab(tokenizer_path: str | Path, vocab_size: int) -> tuple[list[bytes], list[float], list[int]]:
    """(tokens, scores, token types) padded with UNUSED `[PADi]` entries up to the model's vocab_size."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(tokenizer_path).read_bytes())
    if len(proto.pieces) > vocab_size:
        raise GGUFExportError(f"tokenizer {tokenizer_path} has {len(proto.pieces)} pieces, more than the model's "
                              f"vocab_size {vocab_size}: export with the tokenizer the model was trained with")
    tokens = [p.piece.encode("utf-8") for p in proto.pieces]
    scores = [float(p.score) for p in proto.pieces]
    types = [int(p.type) for p in proto.pieces]  # NORMAL 1 .. BYTE 6: the same numbering as GGUF
    for i in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(5)  # UNUSED
    return tokens, scores, types


def _tensor(name: str, t: torch.Tensor, config: ModelConfig) -> np.ndarray:
    import torch

    arr = t.detach().to("cpu", torch.float32).numpy()
    if name.endswith("self_attn.q_proj.weight"):
        arr = permute(arr, config.n_head)
    elif name.endswith("self_attn.k_proj.weight"):
        arr = permute(arr, config.n_kv_head)
    return np.ascontiguousarray(arr)


def write_gguf(
    out: Path, state: dict[str, torch.Tensor], config: ModelConfig, tokenizer_path: str | Path,
    provenance: dict[str, str], *, quants: tuple[str, ...] = ("f16", "q8_0"), model_id: str = "helox",
) -> dict[str, Any]:
    """Write one GGUF file per quantisation into `out`; returns the manifest entry."""
    import gguf

    from .native import special_ids

    out.mkdir(parents=True, exist_ok=True)
    unknown = set(quants) - set(QUANTS)
    if unknown:
        raise GGUFExportError(f"unknown GGUF quantisation(s) {sorted(unknown)}; choose from {list(QUANTS)}")
    tokens, scores, types = sentencepiece_vocab(tokenizer_path, config.vocab_size)
    ids = special_ids(tokenizer_path)
    file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                  "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    arrays = {n: _tensor(n, t, config) for n, t in sorted(state.items())
              if not (config.tie_embeddings and n == "lm_head.weight")}
    files = {}
    for quant in quants:
        path = out / gguf_file(quant)
        w = gguf.GGUFWriter(str(path), arch="llama")
        w.add_name(model_id)
        w.add_context_length(config.max_seq_len)
        w.add_embedding_length(config.d_model)
        w.add_block_count(config.n_layer)
        w.add_feed_forward_length(config.ffn_hidden)
        w.add_head_count(config.n_head)
        w.add_head_count_kv(config.n_kv_head)
        w.add_key_length(config.head_dim)
        w.add_value_length(config.head_dim)
        w.add_layer_norm_rms_eps(config.norm_eps)
        w.add_rope_dimension_count(config.head_dim)
        w.add_rope_freq_base(config.rope_theta)
        w.add_vocab_size(config.vocab_size)
        w.add_file_type(file_types[quant])
        if quant == "q8_0":
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        for role, setter in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("unk", w.add_unk_token_id),
                             ("pad", w.add_pad_token_id)):
            if ids[role] >= 0:
                setter(ids[role])
        w.add_add_bos_token(False)  # Helox trains without BOS at document starts
        w.add_add_eos_token(False)
        w.add_add_space_prefix(False)  # sentencepiece add_dummy_prefix=False
        for k, v in sorted(provenance.items()):
            w.add_string("general." + k, v)
        for name, arr in arrays.items():
            gname = gguf_name(name)
            if arr.ndim == 1 or quant == "f32":
                w.add_tensor(gname, arr.astype(np.float32))
            elif quant == "f16":
                w.add_tensor(gname, arr.astype(np.float16))
            else:
                q = gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q8_0)
                w.add_tensor(gname, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        files[quant] = f"{out.name}/{gguf_file(quant)}"
    return {"path": out.name, "main": files[quants[0]], "files": files,
            "note": "llama.cpp: " + ", ".join(quants) + " (norms f32)"}


def read_gguf(path: str | Path, config: ModelConfig | None = None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Round-trip reader (GGUFReader): tensors under the model's own names, dequantised to f32 and
    Q/K rows un-permuted (HF layout again), and the key/value fields as Python values."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    fields: dict[str, Any] = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        try:
            fields[name] = field.contents()
        except Exception:
            continue
    n_head = int(fields["llama.attention.head_count"])
    n_kv = int(fields["llama.attention.head_count_kv"])
    tensors: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))  # ggml ne order -> row-major
        arr = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float32)
        name = model_name(t.name)
        if name.endswith("q_proj.weight"):
            arr = unpermute(arr, n_head)
        elif name.endswith("k_proj.weight"):
            arr = unpermute(arr, n_kv)
        tensors[name] = arr
    return tensors, fields


def llama_cpp_logits(gguf_path: Path, prompts: list[list[int]], texts: list[str], *, n_ctx: int = 128,
                     timeout_s: float = 300.0) -> tuple[list[np.ndarray], list[list[int]], str]:
    """Logits of llama.cpp at every position of each prompt, and its tokenization of `texts`.

    Runs in a child process (`python -m services.exporter.gguf_export`): llama.cpp and torch each
    bring an OpenMP runtime, and the two in one process crash in llama_decode (seen with
    llama-cpp-python 0.3.36 + torch 2.13); a child also keeps a llama.cpp crash out of the service.
    """
    with tempfile.TemporaryDirectory() as tmp:
        req, out = Path(tmp) / "request.json", Path(tmp) / "logits.npz"
        req.write_text(json.dumps({"prompts": prompts, "texts": texts, "n_ctx": n_ctx}))
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run([sys.executable, "-m", "services.exporter.gguf_export", str(gguf_path), str(req), str(out)],
                              capture_output=True, text=True, timeout=timeout_s, env=env,
                              cwd=Path(__file__).resolve().parents[2])
        if proc.returncode != 0:
            raise RuntimeError(f"llama.cpp failed on {gguf_path.name} (exit {proc.returncode}): {proc.stderr[-2000:]}")
        with np.load(out) as data:
            logits = [data[f"logits_{i}"] for i in range(len(prompts))]
        info = json.loads(proc.stdout.strip().splitlines()[-1])
    return logits, info["tokens"], info["version"]


def _llama_cpp_child(gguf_path: str, request: str, out: str) -> None:
    """The child side of `llama_cpp_logits` (no torch in this process)."""
    import llama_cpp
    import llama_cpp.llama_cpp as lib

    # No CPU "extra buffer types" (weight repacking / AMX): with them, llama.cpp 0.3.36 built from
    # source segfaults in batched Q8_0 matmuls on AMX-capable CPUs (llama.cpp's --no-repack).
    default_params = lib.llama_model_default_params

    def params():
        p = default_params()
        p.use_extra_bufts = False
        return p

    lib.llama_model_default_params = params
    req = json.loads(Path(request).read_text())
    n_ctx = int(req["n_ctx"])
    f32 = 0  # GGML_TYPE_F32: an f32 KV cache (llama.cpp defaults to f16) so f32 parity measures the weights
    llm = llama_cpp.Llama(model_path=gguf_path, n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, verbose=False,
                          n_threads=1, n_threads_batch=1, type_k=f32, type_v=f32)
    arrays = {}
    for i, prompt in enumerate(req["prompts"]):
        llm.reset()
        llm.eval(prompt)
        arrays[f"logits_{i}"] = np.array(llm.scores[: len(prompt)], dtype=np.float32)  # a copy: scores is reused
    tokens = [llm.tokenize(t.encode(), add_bos=False, special=False) for t in req["texts"]]
    np.savez(out, **arrays)
    print(json.dumps({"tokens": tokens, "version": llama_cpp.__version__}))


def check_gguf(path: Path, model: Llama, tokenizer_path: str | Path, *, f32_atol: float = 1e-4,
               min_top1_quantized: float = 0.8, n_ctx: int = 128) -> dict[str, Any]:
    """llama.cpp (llama-cpp-python) vs PyTorch on several prompts, per file: tokenization, next-token
    top-1 at every position, and logits within f32_atol for the f32 file."""
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None:
        return {"status": "skipped", "passed": True,
                "reason": "llama-cpp-python is not installed: pip install 'llama-cpp-python>=0.3.36,<0.4'"}
    import sentencepiece as spm
    import torch

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
    prompts = [sp.encode(t)[: n_ctx - 1] for t in PARITY_TEXTS]
    with torch.no_grad():
        refs = [model(torch.tensor([p]))[0].numpy() for p in prompts]
    results: dict[str, Any] = {}
    passed = True
    for file in sorted(path.glob("model-*.gguf")):
        quant = file.stem.removeprefix("model-")
        got_all, tokens, version = llama_cpp_logits(file, prompts, list(PARITY_TEXTS), n_ctx=n_ctx)
        results["runtime"] = f"llama-cpp-python {version}"
        tok_same = all(t == sp.encode(text) for t, text in zip(tokens, PARITY_TEXTS, strict=True))
        top1 = total = last_top1 = 0
        diff = 0.0
        for got, ref in zip(got_all, refs, strict=True):
            top1 += int((got.argmax(-1) == ref.argmax(-1)).sum())
            last_top1 += int(got[-1].argmax() == ref[-1].argmax())
            total += len(ref)
            diff = max(diff, float(np.abs(got - ref).max()))
        agreement = top1 / total
        ok = tok_same and (agreement >= min_top1_quantized if quant == "q8_0" else agreement == 1.0)
        if quant == "f32":
            ok = ok and diff <= f32_atol
        results[quant] = {"passed": ok, "top1_agreement": agreement, "last_token_top1": f"{last_top1}/{len(prompts)}",
                          "max_abs_diff": diff, "tokenizer_identical": tok_same, "positions": total}
        passed = passed and ok
    results["passed"] = passed
    return results


if __name__ == "__main__":
    _llama_cpp_child(*sys.argv[1:4])
