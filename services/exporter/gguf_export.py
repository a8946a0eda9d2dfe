"""The GGUF format (llama.cpp): arch `llama`, the sentencepiece vocabulary, one file per tensor type.

    gguf/model-<type>.gguf    one file per type: f32, f16, bf16, q8_0

Q and K rows are permuted from the HF rotate_half RoPE layout (dim i paired with i + D/2) to
llama.cpp's (consecutive pairs) with llama.cpp's own converter `permute` (K with n_kv_head).
The vocabulary comes from the sentencepiece model proto: pieces, scores and piece types (the
proto's types are GGUF's token types: user-defined pieces, RAG's `<ctx>` `</ctx>` `<doc>`, are
USER_DEFINED, type 4, which llama.cpp never splits); no dummy prefix, no BOS added, as Helox tokenizes.
Norm gains stay f32 in every file; bf16 and q8_0 go through gguf's numpy quantizer.
Provenance goes into `general.helox.*` keys.

Parity and `verify_export` load each file the way a user does, `Llama(model_path=...,
logits_all=True)` with llama-cpp-python's defaults, in a child process: a llama.cpp crash is a
failed check that names the file, not a crashed exporter. Known crash: on CPUs with AMX
(Intel Xeon 4th generation and later) llama.cpp moves Q8_0 matrices into its AMX buffer and
segfaults in `ggml_backend_amx_mul_mat` on the first multi-token batch (llama.cpp issue
20824; no fix up to llama-cpp-python 0.3.36). Every Q8_0 matrix of a Llama qualifies (both
dimensions are multiples of 32), so no tensor layout avoids it; `CRASH_HINT` says what does.
On such a CPU, when the stock load of a Q8_0 file dies of that signal, the check loads it again with
`n_batch=1` (one token per batch, which never reaches that kernel path) and judges the file on those
logits; its entry records the settings and the stock crash, and the export's README says how to load it.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from shared.model.agreement import decided_agreement

if TYPE_CHECKING:
    import torch

    from shared.model import Llama, ModelConfig

GGUFType = Literal["f32", "f16", "bf16", "q8_0"]
GGUF_TYPES: tuple[GGUFType, ...] = ("f32", "f16", "bf16", "q8_0")
REDUCED = ("bf16", "q8_0")  # types whose top-1 may differ from PyTorch's (gguf_min_top1_quantized)
PARITY_TEXTS = (
    "First Citizen:\nBefore we proceed any further, hear me speak.",
    "def add(x, y=3):\n    return  x + y * 12\n",
    "All:\nSpeak, speak.",
    "    if x > 10:\n        return [v for v in range(x)]",
    "  unicode: héllo wörld",
)
STOCK_LOAD = "Llama(model_path=..., logits_all=True)"
AMX_LOAD = "Llama(model_path=..., logits_all=True, n_batch=1)"  # what a Q8_0 file needs on a CPU with AMX
CRASH_HINT = (
    "a known llama.cpp bug on CPUs with AMX (Intel Xeon 4th generation and later): Q8_0 weights crash "
    "ggml_backend_amx_mul_mat on the first multi-token prompt (llama.cpp issue 20824); "
    "load with Llama(model_path=..., logits_all=True, n_batch=1), use the f16 or f32 file, or build "
    "llama-cpp-python without AMX (CMAKE_ARGS=\"-DGGML_NATIVE=OFF -DGGML_AVX512=ON\"); "
    "to export without it, leave q8_0 out of gguf_types"
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
    provenance: dict[str, str], *, types: tuple[str, ...] = ("f32", "f16", "q8_0"), model_id: str = "helox",
) -> dict[str, Any]:
    """Write one GGUF file per tensor type into `out`; returns the manifest entry."""
    import gguf

    from .native import special_ids

    out.mkdir(parents=True, exist_ok=True)
    unknown = sorted(set(types) - set(GGUF_TYPES))
    if unknown or not types:
        raise GGUFExportError(f"unknown GGUF type(s) {unknown or list(types)}; choose from {list(GGUF_TYPES)}")
    tokens, scores, types_of_tokens = sentencepiece_vocab(tokenizer_path, config.vocab_size)
    ids = special_ids(tokenizer_path)
    file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                  "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    quantized = {"bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}
    arrays = {n: _tensor(n, t, config) for n, t in sorted(state.items())
              if not (config.tie_embeddings and n == "lm_head.weight")}
    files = {}
    for kind in types:
        path = out / gguf_file(kind)
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
        w.add_file_type(file_types[kind])
        if kind == "q8_0":
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types_of_tokens)
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
            if arr.ndim == 1 or kind == "f32":
                w.add_tensor(gname, arr.astype(np.float32))
            elif kind == "f16":
                w.add_tensor(gname, arr.astype(np.float16))
            else:
                w.add_tensor(gname, gguf.quants.quantize(arr, quantized[kind]), raw_dtype=quantized[kind])
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        files[kind] = f"{out.name}/{gguf_file(kind)}"
    return {"path": out.name, "main": files[types[0]], "files": files,
            "note": "llama.cpp: " + ", ".join(types) + " (norms f32)"}


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


class LlamaCppCrash(RuntimeError):
    """llama.cpp ended the child process (a signal, or an error exit) on a GGUF file."""

    def __init__(self, message: str, *, known_amx_bug: bool = False) -> None:
        super().__init__(message)
        self.known_amx_bug = known_amx_bug  # a Q8_0 file, a memory-fault signal, a CPU with AMX: issue 20824


def _child_command(gguf_path: Path, request: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "services.exporter.gguf_export", str(gguf_path), str(request), str(out)]


def llama_cpp_logits(gguf_path: Path, prompts: list[list[int]], texts: list[str], *, exact_kv: bool = False,
                     n_batch: int | None = None, timeout_s: float = 300.0
                     ) -> tuple[list[np.ndarray], list[list[int]], str]:
    """Logits of llama.cpp at every position of each prompt, and its tokenization of `texts`.

    The file is loaded as a user loads it, `Llama(model_path=..., logits_all=True)` with every
    other setting at llama-cpp-python's default; `exact_kv` only changes the KV cache to f32
    (default f16), to measure the weights' own error, and `n_batch` the tokens per batch. Runs in a child process (`python -m
    services.exporter.gguf_export`): llama.cpp and torch each bring an OpenMP runtime and crash
    together in llama_decode (llama-cpp-python 0.3.36 + torch 2.13), and a llama.cpp crash
    stays out of the caller. Raises LlamaCppCrash naming the file when the child dies.
    """
    with tempfile.TemporaryDirectory() as tmp:
        req, out = Path(tmp) / "request.json", Path(tmp) / "logits.npz"
        req.write_text(json.dumps({"prompts": prompts, "texts": texts, "exact_kv": exact_kv, "n_batch": n_batch}))
        proc = subprocess.run(_child_command(gguf_path, req, out), capture_output=True, text=True, timeout=timeout_s,
                              cwd=Path(__file__).resolve().parents[2])
        if proc.returncode != 0:
            load = AMX_LOAD if n_batch == 1 else STOCK_LOAD
            raise LlamaCppCrash(_crash_message(gguf_path, proc.returncode, proc.stderr, load),
                                known_amx_bug=_known_amx_crash(gguf_path, proc.returncode))
        with np.load(out) as data:
            logits = [data[f"logits_{i}"] for i in range(len(prompts))]
        info = json.loads(proc.stdout.strip().splitlines()[-1])
    return logits, info["tokens"], info["version"]


def logits_as_users_load(gguf_path: Path, prompts: list[list[int]], texts: list[str]
                         ) -> tuple[list[np.ndarray], list[list[int]], str, str, str | None]:
    """`llama_cpp_logits` with the stock settings, or, when that load hits llama.cpp's AMX bug on a
    Q8_0 file, with `n_batch=1`: (logits, tokens, version, the settings used, the stock crash or None).
    Any other crash, or one with n_batch=1 too, raises LlamaCppCrash."""
    try:
        return (*llama_cpp_logits(gguf_path, prompts, texts), STOCK_LOAD, None)
    except LlamaCppCrash as stock:
        if not stock.known_amx_bug:
            raise
        try:
            logits, tokens, version = llama_cpp_logits(gguf_path, prompts, texts, n_batch=1)
        except LlamaCppCrash as again:
            raise LlamaCppCrash(f"{stock}; loaded as {AMX_LOAD} it failed too: {again}") from again
        return logits, tokens, version, AMX_LOAD, str(stock)


def _q8_memory_fault(gguf_path: Path, returncode: int) -> bool:
    """A Q8_0 file that killed llama.cpp with a memory-fault signal: what issue 20824 looks like."""
    return "q8_0" in gguf_path.name and -returncode in (signal.SIGSEGV, signal.SIGBUS, signal.SIGABRT)


def _known_amx_crash(gguf_path: Path, returncode: int) -> bool:
    return _q8_memory_fault(gguf_path, returncode) and _cpu_has_amx()


def _crash_message(gguf_path: Path, returncode: int, stderr: str, load: str = STOCK_LOAD) -> str:
    if returncode < 0:
        try:
            how = f"crashed ({signal.Signals(-returncode).name})"
        except ValueError:
            how = f"was killed by signal {-returncode}"
        hint = ""
        if _q8_memory_fault(gguf_path, returncode):
            amx = " (this CPU has AMX)" if _cpu_has_amx() else ""
            hint = f": {CRASH_HINT}{amx}"
        return f"llama.cpp {how} on {gguf_path.name} loaded with {load}{hint if load == STOCK_LOAD else ''}"
    tail = stderr.strip().splitlines()[-3:]
    return f"llama.cpp failed on {gguf_path.name} loaded with {load} (exit {returncode}): {' | '.join(tail)}"


def _cpu_has_amx() -> bool:
    try:
        return "amx_int8" in Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False


def _llama_cpp_child(gguf_path: str, request: str, out: str) -> None:
    """The child side of `llama_cpp_logits` (no torch in this process)."""
    import llama_cpp

    req = json.loads(Path(request).read_text())
    kw: dict[str, Any] = {}
    if req.get("exact_kv"):
        kw = {"type_k": 0, "type_v": 0}  # GGML_TYPE_F32
    if req.get("n_batch"):
        kw["n_batch"] = int(req["n_batch"])
    llm = llama_cpp.Llama(model_path=gguf_path, logits_all=True, verbose=False, **kw)
    arrays = {}
    for i, prompt in enumerate(req["prompts"]):
        llm.reset()
        llm.eval(prompt)
        arrays[f"logits_{i}"] = np.array(llm.scores[: len(prompt)], dtype=np.float32)  # a copy: scores is reused
    tokens = [llm.tokenize(t.encode(), add_bos=False, special=False) for t in req["texts"]]
    np.savez(out, **arrays)
    print(json.dumps({"tokens": tokens, "version": llama_cpp.__version__}))


def llama_cpp_missing() -> str | None:
    """None when llama-cpp-python is importable, else why a llama.cpp check is skipped."""
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None:
        return "llama-cpp-python is not installed: pip install 'llama-cpp-python>=0.3.36,<0.4'"
    return None


def load_check(path: Path, vocab_size: int) -> str:
    """Load one GGUF file as a user does and evaluate a multi-token prompt; returns a detail line.

    Raises LlamaCppCrash (the file, the signal, the workaround) or ValueError (non-finite logits).
    """
    prompt = [4 + (7 * i) % max(1, vocab_size - 4) for i in range(8)]
    logits, _, version, settings, stock_crash = logits_as_users_load(path, [prompt], [])
    if not np.isfinite(logits[0]).all():
        raise ValueError(f"llama.cpp gave non-finite logits for {path.name}")
    if stock_crash:
        return (f"llama-cpp-python {version}, loaded as {settings}: the stock load crashes on this CPU "
                "(AMX, llama.cpp issue 20824)")
    return f"llama-cpp-python {version}"


def check_gguf(path: Path, model: Llama, tokenizer_path: str | Path, *, f32_atol: float = 1e-4,
               min_top1_quantized: float = 0.8, decided_margin: float = 0.25,
               tie_margin: float = 0.01) -> dict[str, Any]:
    """llama.cpp (llama-cpp-python, stock settings) vs PyTorch on several prompts, per file:
    tokenization, next-token top-1 agreement and the largest logit difference; the f32 file is
    also run with an f32 KV cache, whose logits must be within f32_atol.

    Top-1 is counted where PyTorch decided (shared/model/agreement.py): f32 and f16 must agree at
    every position whose top-1 leads by at least `tie_margin` nats (only exact ties are left out:
    the stock f16 KV cache alone moves logits by ~3e-4); bf16 and q8_0 on at least
    `min_top1_quantized` of the positions led by `decided_margin`, since their rounding flips
    near-ties that cost no probability. `top1_agreement_all` keeps the all-positions figure. A
    file that crashes llama.cpp fails with the reason (and the workaround) in its entry, except a
    Q8_0 file on a CPU with AMX, which is judged loaded with n_batch=1 (`logits_as_users_load`).
    """
    missing = llama_cpp_missing()
    if missing:
        return {"status": "skipped", "passed": True, "reason": missing}
    import sentencepiece as spm
    import torch

    from .hf import user_defined_pieces

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
    prompts = [sp.encode(t)[: model.config.max_seq_len] for t in PARITY_TEXTS]
    # Tokenization is also compared on each user-defined piece alone and on all of them in a text.
    pieces = list(user_defined_pieces(tokenizer_path))
    texts = list(PARITY_TEXTS) + pieces + (["".join(f"{p}x = 1\n" for p in pieces) + PARITY_TEXTS[0]] if pieces else [])
    with torch.no_grad():
        refs = [model(torch.tensor([p]))[0].numpy() for p in prompts]
    results: dict[str, Any] = {"settings": STOCK_LOAD}
    passed = True
    for file in sorted(path.glob("model-*.gguf")):
        kind = file.stem.removeprefix("model-")
        try:
            got_all, tokens, version, settings, stock_crash = logits_as_users_load(file, prompts, texts)
            exact = llama_cpp_logits(file, prompts, [], exact_kv=True)[0] if kind == "f32" else None
        except LlamaCppCrash as exc:
            results[kind] = {"passed": False, "error": str(exc)}
            passed = False
            continue
        results["runtime"] = f"llama-cpp-python {version}"
        tok_same = all(t == sp.encode(text) for t, text in zip(tokens, texts, strict=True))
        if len(got_all) != len(refs) or any(g.shape != r.shape for g, r in zip(got_all, refs, strict=False)):
            results[kind] = {"passed": False, "error": f"{file.name}: llama.cpp returned logits of other shapes "
                             f"{[g.shape for g in got_all]} than PyTorch's {[r.shape for r in refs]}"}
            passed = False
            continue
        last_top1 = sum(int(g[-1].argmax() == r[-1].argmax()) for g, r in zip(got_all, refs, strict=True))
        diff = max(float(np.abs(g - r).max()) for g, r in zip(got_all, refs, strict=True))
        reduced = kind in REDUCED
        agreement = decided_agreement(np.concatenate(refs), np.concatenate(got_all),
                                      decided_margin if reduced else tie_margin)
        agree = agreement["top1_agreement"]
        ok = tok_same and (agree is None or (agree >= min_top1_quantized if reduced else agree == 1.0))
        entry = {"top1_agreement": agree, "min_top1_agreement": min_top1_quantized if reduced else 1.0,
                 **{k: v for k, v in agreement.items() if k != "top1_agreement"},
                 "last_token_top1": f"{last_top1}/{len(prompts)}",
                 "max_abs_diff": diff, "tokenizer_identical": tok_same, "positions": sum(len(r) for r in refs)}
        if stock_crash:  # judged on the logits of the load that works here; the stock one's crash kept
            entry |= {"settings": settings, "stock_load": stock_crash}
        if exact is not None:
            entry["f32_kv_max_abs_diff"] = max(float(np.abs(g - r).max()) for g, r in zip(exact, refs, strict=True))
            entry["f32_kv_atol"] = f32_atol
            ok = ok and entry["f32_kv_max_abs_diff"] <= f32_atol
        results[kind] = {"passed": ok, **entry}
        passed = passed and ok
    results["passed"] = passed
    return results


if __name__ == "__main__":
    _llama_cpp_child(*sys.argv[1:4])
