"""Text from a trained model: `helox generate` and the sample `helox run` shows at the end.

A model comes from an export directory (verified first: signature, digests, fingerprint —
`verify_export`; refused when a check fails) in one of its formats, or from a trainer
checkpoint directory (native PyTorch; the tokenizer is its dataset's). Each format is a
`Decoder`: `prefill(ids)` and `step(token)` give the next token's logits, with a KV cache
where the format has one:

native  the project's `Llama` (PyTorch), `KVCache`
onnx    onnxruntime: the KV graph's past_key_values.N.key|value -> present.N.key|value when the
        export has it (input names from `session.get_inputs()`), else the logits graph over the
        whole sequence at every step
gguf    llama-cpp-python, in process, loaded the plain way (`Llama(model_path=...)`); f32 / f16
        first (`logits_all=True`: the exporter's parity load). q8_0 crashes llama.cpp 0.3.36 on AMX CPUs (weight repacking): loaded with
        n_batch=1, the workaround, and said so on stderr

Every format samples with the same `sample_next` (repetition penalty, temperature, top-k, top-p;
temperature 0 is greedy) from one seeded generator, so one seed gives one text in any format at
temperature 0.

`--rag` (`rag_prompt_ids`): the prompt gets retrieved context laid out as training packed it,
<ctx>chunk</ctx>... <doc>prompt, from a local BM25 index (the dataset's rag_index/), with the
markers, k and context budget of the export's rag_template.json.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import sentencepiece as spm
import torch

from helox.common import RUN_SAMPLING
from services.exporter.native import load_native
from services.exporter.verify import verify_export
from shared.model import KVCache, Llama, ModelConfig, sample_next

FORMATS = ("native", "onnx", "gguf")
GGUF_PREFERENCE = ("f32", "f16", "bf16", "q8_0")


class SampleError(RuntimeError):
    """The model cannot be sampled from (failed verification, missing format or tokenizer)."""


class Decoder(Protocol):
    max_seq_len: int

    def prefill(self, ids: list[int]) -> np.ndarray: ...  # logits [V] after the prompt

    def step(self, token: int) -> np.ndarray: ...  # logits [V] after one more token


# --- the formats -------------------------------------------------------------------------------


class NativeDecoder:
    def __init__(self, model: Llama) -> None:
        self.model = model.eval()
        self.max_seq_len = model.config.max_seq_len
        self.cache: KVCache | None = None

    @torch.no_grad()
    def prefill(self, ids: list[int]) -> np.ndarray:
        param = next(self.model.parameters())
        self.cache = KVCache(self.model.config, 1, self.max_seq_len, device=param.device, dtype=param.dtype)
        return self.model(torch.tensor([ids]), kv_cache=self.cache)[0, -1].float().numpy()

    @torch.no_grad()
    def step(self, token: int) -> np.ndarray:
        return self.model(torch.tensor([[token]]), kv_cache=self.cache)[0, -1].float().numpy()


class OnnxDecoder:
    def __init__(self, path: Path, max_seq_len: int) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.inputs = {v.name: v for v in self.session.get_inputs()}
        self.outputs = [v.name for v in self.session.get_outputs()]
        self.past_names = [n for n in self.inputs if n.startswith("past_key_values.")]
        self.max_seq_len = max_seq_len
        self.ids: list[int] = []
        self.past: dict[str, np.ndarray] = {}

    def _run(self, new: list[int]) -> np.ndarray:
        start = len(self.ids) - len(new)  # positions of the new tokens
        feeds: dict[str, np.ndarray] = {"input_ids": np.array([new], dtype=np.int64),
                                        "attention_mask": np.ones((1, len(self.ids)), dtype=np.int64),
                                        "position_ids": np.arange(start, len(self.ids), dtype=np.int64)[None]}
        feeds.update(self.past)
        out = dict(zip(self.outputs, self.session.run(self.outputs, {k: v for k, v in feeds.items()
                                                                      if k in self.inputs}), strict=True))
        self.past = {name: out[name.replace("past_key_values.", "present.", 1)] for name in self.past_names}
        return out["logits"][0, -1]

    def prefill(self, ids: list[int]) -> np.ndarray:
        self.ids = list(ids)
        self.past = {}
        for name in self.past_names:  # an empty past: [1, kv_heads, 0, head_dim]
            _, kv_heads, _, head_dim = self.inputs[name].shape
            self.past[name] = np.zeros((1, kv_heads, 0, head_dim), dtype=np.float32)
        return self._run(self.ids)

    def step(self, token: int) -> np.ndarray:
        self.ids.append(token)
        if not self.past_names:  # the logits graph: the whole sequence again
            self.past = {}
            return self._run(self.ids)
        return self._run([token])


class GgufDecoder:
    def __init__(self, path: Path, max_seq_len: int, *, n_batch: int | None = None) -> None:
        import llama_cpp

        kw = {} if n_batch is None else {"n_batch": n_batch}
        # logits_all: llama-cpp-python fills `scores` only then (else it samples internally).
        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=max_seq_len, logits_all=True, verbose=False, **kw)
        self.max_seq_len = max_seq_len

    def _logits(self) -> np.ndarray:
        return np.array(self.llm.scores[self.llm.n_tokens - 1], dtype=np.float32)

    def prefill(self, ids: list[int]) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(ids)
        return self._logits()

    def step(self, token: int) -> np.ndarray:
        self.llm.eval([token])
        return self._logits()


# --- opening a model ---------------------------------------------------------------------------


@dataclass
class Opened:
    decoder: Decoder
    tokenizer: spm.SentencePieceProcessor
    source: str  # what was loaded, for the user
    export_dir: Path | None = None


def is_export(path: Path) -> bool:
    manifest = path / "manifest.json"
    return manifest.is_file() and "formats" in json.loads(manifest.read_text())


def _export_tokenizer(export_dir: Path, formats: dict[str, Any]) -> Path:
    for name in ("native", "hf"):
        if name in formats and (p := export_dir / formats[name]["path"] / "tokenizer.model").is_file():
            return p
    found = sorted(export_dir.rglob("tokenizer.model"))
    if not found:
        raise SampleError(f"{export_dir} holds no tokenizer.model")
    return found[0]


def _native_from_export(export_dir: Path, manifest: dict) -> Llama:
    formats = manifest.get("formats", {})
    if "native" in formats:
        return load_native(export_dir / formats["native"]["path"])[0]
    if "hf" in formats:
        from safetensors.torch import load_file

        from services.exporter.hf import hf_tensors_to_canonical

        config = ModelConfig(**manifest["model_config"])
        tensors = hf_tensors_to_canonical(load_file(str(export_dir / formats["hf"]["main"])), config)
        if config.tie_embeddings:
            tensors["lm_head.weight"] = tensors["embed_tokens.weight"]
        model = Llama(config)
        model.load_state_dict(tensors, strict=True)
        return model.eval()
    raise SampleError(f"{export_dir} has neither a native nor an hf export ({', '.join(formats) or 'no formats'})")


def open_export(export_dir: str | Path, signing_key: str | bytes | None, fmt: str = "native",
                warn: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr)) -> Opened:
    """Verify EXPORT_DIR (signature, digests, fingerprint), then open its `fmt` files."""
    export_dir = Path(export_dir)
    report = verify_export(export_dir, signing_key, check_watermark=False, check_loads=False)
    if not report.ok:
        failed = {c.name: c.detail for c in report.checks if c.status == "fail"}
        detail = "; ".join(f"{name}: {d}" for name, d in failed.items())
        raise SampleError(f"{export_dir} failed verification ({', '.join(failed)}): {detail}")
    manifest = json.loads((export_dir / "manifest.json").read_text())
    formats = manifest.get("formats", {})
    config = ModelConfig(**manifest["model_config"])
    sp = spm.SentencePieceProcessor(model_file=str(_export_tokenizer(export_dir, formats)))
    if fmt == "native":
        return Opened(NativeDecoder(_native_from_export(export_dir, manifest)), sp, "native", export_dir)
    if fmt not in formats:
        raise SampleError(f"{export_dir} has no {fmt} export (it has {', '.join(formats)})")
    entry = formats[fmt]
    if fmt == "onnx":
        rel = entry.get("kv_cache") or entry["main"]
        return Opened(OnnxDecoder(export_dir / rel, config.max_seq_len), sp, f"onnx {rel}", export_dir)
    files: dict[str, str] = entry.get("files") or {"f32": entry["main"]}
    kind = next((k for k in GGUF_PREFERENCE if k in files), next(iter(files)))
    n_batch = None
    if kind == "q8_0":
        n_batch = 1
        warn("gguf: only q8_0 is exported; llama.cpp 0.3.36 crashes on q8_0 with AMX CPUs at default settings, "
             "so it is loaded with n_batch=1 (slower prompt processing)")
    return Opened(GgufDecoder(export_dir / files[kind], config.max_seq_len, n_batch=n_batch), sp,
                  f"gguf {files[kind]}", export_dir)


def open_checkpoint(checkpoint_dir: str | Path, settings: Any, tokenizer: Path | None = None) -> Opened:
    """A trainer checkpoint (verified against its digests), native; the tokenizer of its dataset
    (found in the artifact store `settings` names, s3:// included)."""
    from services.evaluator.heldout import dataset_tokenizer
    from shared.checkpoint import CheckpointError, load_model

    from .common import checkpoint_dataset_manifest
    from .errors import CliError

    try:
        model, _cfg = load_model(checkpoint_dir)
    except CheckpointError as exc:
        raise SampleError(f"{checkpoint_dir} failed verification: {exc}") from exc
    if tokenizer is not None:
        sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    else:
        try:
            sp = dataset_tokenizer(checkpoint_dataset_manifest(settings, checkpoint_dir))
        except (OSError, ValueError, KeyError, CliError) as exc:
            raise SampleError(f"no tokenizer for {checkpoint_dir}: {exc}; pass --tokenizer") from exc
    return Opened(NativeDecoder(model), sp, "native checkpoint")


# --- decoding ----------------------------------------------------------------------------------


def stream_text(opened: Opened, prompt: str, *, max_new_tokens: int = 64, temperature: float = 0.8,
                top_k: int | None = 40, top_p: float | None = None, seed: int = 0, repetition_penalty: float = 1.0,
                token_ids: list[int] | None = None, prompt_ids: list[int] | None = None) -> Iterator[str]:
    """The continuation of PROMPT, piece by piece as each token comes (text decoded so far minus
    what was already yielded, so byte-fallback pieces come out once they form characters).
    `token_ids`, when given, collects the generated ids; `prompt_ids` replaces the encoded
    prompt (a RAG prompt: `rag_prompt_ids`)."""
    sp = opened.tokenizer
    ids = sp.encode(prompt) if prompt_ids is None else list(prompt_ids)  # no BOS: Helox trains without
    dec = opened.decoder
    room = dec.max_seq_len - len(ids)
    if room <= 0:
        raise SampleError(f"prompt of {len(ids)} tokens does not fit the model's {dec.max_seq_len}")
    gen = torch.Generator().manual_seed(seed)
    logits = dec.prefill(ids)
    new: list[int] = []
    shown = ""
    for i in range(min(max_new_tokens, room)):
        seen = torch.tensor([ids + new]) if repetition_penalty != 1.0 else None
        tok = int(sample_next(torch.from_numpy(np.asarray(logits))[None], temperature=temperature, top_k=top_k,
                              top_p=top_p, generator=gen, repetition_penalty=repetition_penalty, seen=seen)[0])
        if tok == sp.eos_id():
            break
        new.append(tok)
        if token_ids is not None:
            token_ids.append(tok)
        text = sp.decode(new)
        if not text.endswith("\ufffd") and text.startswith(shown):  # an incomplete UTF-8 byte sequence waits
            yield text[len(shown):]
            shown = text
        if i + 1 < min(max_new_tokens, room):
            logits = dec.step(tok)
    text = sp.decode(new)
    if text.startswith(shown) and text != shown:
        yield text[len(shown):]


def rag_template(export_dir: Path | None) -> dict[str, Any]:
    """The export's rag_template.json (a model trained on RAG-packed data); SampleError without one."""
    path = export_dir / "rag_template.json" if export_dir is not None else None
    if path is None or not path.is_file():
        raise SampleError("--rag needs an export with rag_template.json (a model trained on RAG-packed data)")
    return json.loads(path.read_text())


def rag_prompt_ids(sp: spm.SentencePieceProcessor, template: dict[str, Any], index_dir: str | Path, prompt: str,
                   max_seq_len: int) -> tuple[list[int], int]:
    """PROMPT with retrieved context laid out as training packed it (`packing.pack_record`):
    <ctx>chunk</ctx>... <doc>prompt, the chunks of the local BM25 index at INDEX_DIR that the prompt
    retrieves (rank order, k of the template), within the template's context budget. Returns
    (ids, chunks used)."""
    from contracts import RetrievalQuery
    from shared.data.manifest import MASK_PAD
    from shared.retrieval import LocalIndex, LocalIndexError
    from shared.retrieval.packing import Layout, pack_record

    markers = [template["chunk_open"], template["chunk_close"], template["doc_marker"]]
    ids = [sp.piece_to_id(m) for m in markers]
    if any(i == sp.unk_id() for i in ids):
        raise SampleError(f"the tokenizer lacks the RAG markers {markers}: not the tokenizer of a RAG-packed dataset")
    try:
        index = LocalIndex.load(index_dir)
    except (OSError, LocalIndexError) as exc:
        raise SampleError(f"cannot load the retrieval index {index_dir}: {exc}") from exc
    hits = index.search([RetrievalQuery(query_id="prompt", text=prompt, k=int(template["k"]))])[0]
    w = int(template.get("seq_len") or max_seq_len) + 1
    layout = Layout(w, int(float(template["context_budget"]) * w), *ids, pad=max(sp.pad_id(), 0))
    base = sp.encode(prompt)
    if len(base) > layout.base_tokens:
        raise SampleError(f"prompt of {len(base)} tokens exceeds the {layout.base_tokens} the RAG layout leaves")
    tokens, kinds, used = pack_record(layout, np.array(base, dtype=np.int64), [sp.encode(c.text) for c, _ in hits])
    return [int(t) for t, k in zip(tokens, kinds, strict=True) if k != MASK_PAD], used


def max_ngram_repeats(ids: list[int], n: int = 4) -> int:
    """How often the most frequent n-gram of `ids` occurs (1: no n-gram repeats; 0: shorter than n)."""
    counts = Counter(tuple(ids[i:i + n]) for i in range(len(ids) - n + 1))
    return max(counts.values(), default=0)


@dataclass
class Sample:
    text: str
    token_ids: list[int]

    @property
    def max_4gram_repeats(self) -> int:
        return max_ngram_repeats(self.token_ids, 4)




def sample_from_export(export_dir: str | Path, signing_key: str | bytes, prompt: str, max_new_tokens: int = 64,
                       **sampling: Any) -> Sample:
    """A seeded sampled continuation of PROMPT by the model exported in EXPORT_DIR, once it verified,
    with its token ids (`RUN_SAMPLING` unless `sampling` overrides it)."""
    opened = open_export(export_dir, signing_key, "native")
    ids: list[int] = []
    text = "".join(stream_text(opened, prompt, max_new_tokens=max_new_tokens, token_ids=ids,
                               **{**RUN_SAMPLING, **sampling}))
    return Sample(text, ids)


def sample_export(export_dir: str | Path, signing_key: str | bytes, prompt: str, max_new_tokens: int = 64,
                  **sampling: Any) -> str:
    """The text of `sample_from_export`."""
    return sample_from_export(export_dir, signing_key, prompt, max_new_tokens, **sampling).text
