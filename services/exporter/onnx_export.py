"""The ONNX format: two graphs for batched serving, dynamic batch and lengths, checked in onnxruntime.

    onnx/model.onnx      input_ids, attention_mask, position_ids [batch, sequence] (int64)
                         -> logits [batch, sequence, vocab]
    onnx/model_kv.onnx   the same inputs plus past_key_values.N.key / .value
                         [batch, kv_heads, past_sequence, head_dim] for every layer N
                         -> logits, present.N.key / .value [batch, kv_heads, past + sequence, head_dim];
                         attention_mask covers past + new tokens

Input and output names are optimum's and onnxruntime-genai's, so their runners feed the graphs
as they feed a Hugging Face Llama export. attention_mask is 1 on real tokens and 0 on padding;
a left-padded batch passes position_ids = max(cumsum(attention_mask) - 1, 0), so each row's
positions start at its first real token (what `shared.model.generate` does). For the prompt,
the KV graph takes past tensors with past_sequence = 0.

`torch.onnx.export(dynamo=True)` is tried first; if it fails, the TorchScript exporter
(dynamo=False) is used, and the manifest says which one produced each file. The provenance
goes into the model's metadata_props.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import warnings
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from shared.model import Llama

MODEL_FILE = "model.onnx"
KV_MODEL_FILE = "model_kv.onnx"
OPSET = 18
INPUTS = ["input_ids", "attention_mask", "position_ids"]

Exporter = Literal["auto", "dynamo", "torchscript"]


class OnnxExportError(RuntimeError):
    """Neither ONNX exporter could export the model."""


def past_names(n_layer: int) -> list[str]:
    """past_key_values.0.key, past_key_values.0.value, past_key_values.1.key, ..."""
    return [f"past_key_values.{i}.{kind}" for i in range(n_layer) for kind in ("key", "value")]


def present_names(n_layer: int) -> list[str]:
    return [f"present.{i}.{kind}" for i in range(n_layer) for kind in ("key", "value")]


def decode(model: Llama, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
           past: tuple[torch.Tensor, ...] | None = None) -> tuple[torch.Tensor, ...]:
    """`Llama.forward` with the padding mask, the positions and the KV cache as explicit tensors.

    input_ids, position_ids [B, T]; attention_mask [B, S] over past + new keys (S = P + T);
    past: (key_0, value_0, key_1, ...) each [B, K, P, D], or None -> (logits [B, T, V],
    key_0, value_0, ... each [B, K, S, D]). The mask is built as `Llama._mask` builds it (causal
    and padding; a padding query sees itself, so no row is all -inf); explicit ops throughout,
    since SDPA's is_causal and enable_gqa do not trace to ONNX.
    """
    m = model
    B, T = input_ids.shape
    S = attention_mask.shape[1]
    rep = m.config.n_head // m.config.n_kv_head
    cos = m.rope_cos[position_ids].unsqueeze(1)  # [B, 1, T, D]
    sin = m.rope_sin[position_ids].unsqueeze(1)
    q_idx = torch.arange(T, device=input_ids.device)[:, None] + (S - T)  # [T, 1]
    k_idx = torch.arange(S, device=input_ids.device)[None, :]  # [1, S]
    allowed = (k_idx <= q_idx)[None, None] & attention_mask.bool()[:, None, None, :]  # [B, 1, T, S]
    allowed = allowed | (k_idx == q_idx)[None, None]

    x = m.embed_tokens(input_ids)  # [B, T, C]
    presents: list[torch.Tensor] = []
    for i, block in enumerate(m.layers):
        attn = block.self_attn
        q, k, v = attn._qkv(block.input_layernorm(x), cos, sin)  # [B, H, T, D], [B, K, T, D] x2
        if past is not None:
            k = torch.cat([past[2 * i], k], dim=2)  # [B, K, S, D]
            v = torch.cat([past[2 * i + 1], v], dim=2)
        presents += [k, v]
        kk = k.repeat_interleave(rep, dim=1)  # [B, H, S, D]
        vv = v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, kk, vv, attn_mask=allowed)  # [B, H, T, D]
        x = x + attn.o_proj(y.transpose(1, 2).reshape(B, T, -1))
        x = x + block.mlp(block.post_attention_layernorm(x))
    return (m.lm_head(m.norm(x)), *presents)


class KVDecoder(nn.Module):
    """The KV graph: (input_ids, attention_mask, position_ids, past...) -> (logits, present...)."""

    def __init__(self, model: Llama) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                past: tuple[torch.Tensor, ...]):
        return decode(self.model, input_ids, attention_mask, position_ids, past)


class LogitsGraph(nn.Module):
    """The plain graph: (input_ids, attention_mask, position_ids) -> logits."""

    def __init__(self, model: Llama) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor):
        return decode(self.model, input_ids, attention_mask, position_ids)[0]


def left_pad(prompts: list[list[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """input_ids, attention_mask, position_ids [B, max len] (int64) of left-padded prompts."""
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(prompts), width), dtype=np.int64)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = p
        mask[i, width - len(p):] = 1
    return ids, mask, positions(mask)


def positions(attention_mask: np.ndarray) -> np.ndarray:
    """position_ids of a left-padded batch: each row counts from its first real token."""
    return np.maximum(attention_mask.cumsum(-1) - 1, 0).astype(np.int64)


def empty_past(n_layer: int, batch: int, n_kv_head: int, head_dim: int) -> dict[str, np.ndarray]:
    """KV-graph feeds for a prompt: every past tensor with 0 positions."""
    empty = np.zeros((batch, n_kv_head, 0, head_dim), dtype=np.float32)
    return dict.fromkeys(past_names(n_layer), empty)


# Names of the graphs' symbolic dimensions, as optimum writes them.
_DIMS = {"batch": "batch_size", "seq": "sequence_length", "past": "past_sequence_length",
         "total": "total_sequence_length"}


def _dynamic(n_layer: int, kv: bool) -> dict[str, dict[int, str]]:
    d = {name: {0: "batch", 1: "seq"} for name in INPUTS}
    d["attention_mask"] = {0: "batch", 1: "total"}
    d["logits"] = {0: "batch", 1: "seq"}
    if kv:
        d.update({name: {0: "batch", 2: "past"} for name in past_names(n_layer)})
        d.update({name: {0: "batch", 2: "total"} for name in present_names(n_layer)})
    return d


def _export(module: nn.Module, args: tuple, path: Path, *, input_names: list[str], output_names: list[str],
            dynamic: dict[str, dict[int, str]], exporter: Exporter) -> str:
    """Export with dynamo (default) or TorchScript; returns the exporter that succeeded.

    dynamo gets Dim.DYNAMIC everywhere: total = past + sequence is a relation between dims that
    named Dims cannot state, and torch.export derives it from the graph. The symbols it picks
    are renamed to `_DIMS` afterwards (`_name_dims`).
    """
    errors = []
    order = ["dynamo", "torchscript"] if exporter == "auto" else [exporter]
    for kind in order:
        try:
            with warnings.catch_warnings(), _quiet():
                warnings.simplefilter("ignore")
                if kind == "dynamo":
                    dyn = torch.export.Dim.DYNAMIC
                    names = iter(input_names)
                    shapes: dict[str, Any] = {}
                    for arg_name, arg in zip(("input_ids", "attention_mask", "position_ids", "past"), args,
                                             strict=False):
                        if isinstance(arg, tuple):
                            shapes[arg_name] = tuple({ax: dyn for ax in dynamic[next(names)]} for _ in arg)
                        else:
                            shapes[arg_name] = {ax: dyn for ax in dynamic[next(names)]}
                    torch.onnx.export(module, args, str(path), dynamo=True, opset_version=OPSET,
                                      input_names=input_names, output_names=output_names,
                                      dynamic_shapes=shapes, optimize=True, verbose=False, external_data=False)
                else:
                    flat = tuple(a for arg in args for a in (arg if isinstance(arg, tuple) else (arg,)))
                    torch.onnx.export(_Flat(module) if len(flat) != len(args) else module, flat, str(path),
                                      dynamo=False, opset_version=OPSET, input_names=input_names,
                                      output_names=output_names,
                                      dynamic_axes={k: {ax: _DIMS[n] for ax, n in v.items()}
                                                    for k, v in dynamic.items()})
            return kind
        except Exception as exc:
            errors.append(f"{kind}: {type(exc).__name__}: {str(exc)[:500]}")
            path.unlink(missing_ok=True)
    raise OnnxExportError(f"ONNX export of {path.name} failed with every exporter: " + " | ".join(errors))


class _Flat(nn.Module):
    """KVDecoder with the past as separate positional inputs (the TorchScript exporter's view)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask, position_ids, *past):
        return self.inner(input_ids, attention_mask, position_ids, tuple(past))


@contextlib.contextmanager
def _quiet():
    """The dynamo exporter prints progress and logs on stdout/stderr: keep service logs clean."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch._dynamo", "torch.export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for lg, lv in zip(loggers, levels, strict=True):
            lg.setLevel(lv)


def _name_dims(proto: Any, dynamic: dict[str, dict[int, str]]) -> None:
    """Rename the exporter's dimension symbols (s0, s17, ...) to `_DIMS` everywhere in the graph,
    from what each graph input's axes are; `s3 + s5` becomes `past_sequence_length + sequence_length`."""
    mapping: dict[str, str] = {}
    for value in proto.graph.input:
        for ax, label in dynamic.get(value.name, {}).items():
            dim = value.type.tensor_type.shape.dim[ax]
            if dim.dim_param and re.fullmatch(r"s\d+", dim.dim_param):
                mapping.setdefault(dim.dim_param, _DIMS[label])
    if not mapping:
        return
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, mapping)) + r")\b")
    for value in [*proto.graph.input, *proto.graph.output, *proto.graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param:
                dim.dim_param = pattern.sub(lambda m: mapping[m.group(1)], dim.dim_param)


def _finish(path: Path, metadata: dict[str, str], dynamic: dict[str, dict[int, str]]) -> None:
    import onnx

    proto = onnx.load(str(path))
    _name_dims(proto, dynamic)
    del proto.metadata_props[:]
    for k, v in sorted(metadata.items()):
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    onnx.save(proto, str(path))


def _example(model: Llama, batch: int, seq: int, past: int) -> tuple[torch.Tensor, ...]:
    """Example inputs: >= 2 in every dynamic dim (torch.export specialises sizes 0 and 1)."""
    ids = torch.randint(0, model.config.vocab_size, (batch, seq))
    mask = torch.ones(batch, past + seq, dtype=torch.long)
    pos = torch.arange(past, past + seq)[None].expand(batch, seq).contiguous()
    return ids, mask, pos


def write_onnx(out: Path, model: Llama, provenance: dict[str, str], *, kv_cache: bool = True,
               exporter: Exporter = "auto") -> dict[str, Any]:
    """Export the logits graph (and the KV-cache graph) into `out`; returns the manifest entry."""
    out.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    c = model.config
    used: dict[str, str] = {}
    with torch.no_grad():
        dyn = _dynamic(c.n_layer, kv=False)
        used[MODEL_FILE] = _export(LogitsGraph(model), _example(model, 2, 5, 0), out / MODEL_FILE,
                                   input_names=INPUTS, output_names=["logits"], dynamic=dyn, exporter=exporter)
        _finish(out / MODEL_FILE, {**provenance, "helox.graph": "logits"}, dyn)
        if kv_cache:
            past = tuple(torch.zeros(2, c.n_kv_head, 3, c.head_dim) for _ in range(2 * c.n_layer))
            dyn = _dynamic(c.n_layer, kv=True)
            used[KV_MODEL_FILE] = _export(
                KVDecoder(model), (*_example(model, 2, 5, 3), past), out / KV_MODEL_FILE,
                input_names=INPUTS + past_names(c.n_layer), output_names=["logits"] + present_names(c.n_layer),
                dynamic=dyn, exporter=exporter)
            _finish(out / KV_MODEL_FILE, {**provenance, "helox.graph": "kv-cache"}, dyn)
    entry: dict[str, Any] = {"path": out.name, "main": f"{out.name}/{MODEL_FILE}", "exporter": used,
                             "opset": OPSET, "inputs": INPUTS,
                             "note": "inputs input_ids, attention_mask, position_ids; exporter: "
                             + ", ".join(f"{k} {v}" for k, v in used.items())}
    if kv_cache:
        entry["kv_cache"] = f"{out.name}/{KV_MODEL_FILE}"
        entry["note"] += "; KV cache past_key_values.N.key/value -> present.N.key/value"
    return entry


def read_onnx_metadata(path: Path) -> dict[str, str]:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in proto.metadata_props}


def _session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def run_graph(path: Path, input_ids: np.ndarray, attention_mask: np.ndarray | None = None,
              session: Any = None) -> np.ndarray:
    """Logits of either graph for a whole (left-padded) batch; the KV graph gets an empty past."""
    sess = session or _session(path)
    mask = np.ones_like(input_ids) if attention_mask is None else attention_mask
    feeds = {"input_ids": input_ids.astype(np.int64), "attention_mask": mask.astype(np.int64),
             "position_ids": positions(mask)}
    wanted = {value.name for value in sess.get_inputs()}  # a graph that drops an unused input does not take it
    feeds = {k: v for k, v in feeds.items() if k in wanted}
    for value in sess.get_inputs():
        if value.name.startswith("past_key_values."):
            _, kv_heads, _, head_dim = value.shape
            feeds[value.name] = np.zeros((input_ids.shape[0], kv_heads, 0, head_dim), dtype=np.float32)
    return sess.run(["logits"], feeds)[0]


@torch.no_grad()
def check_onnx(path: Path, model: Llama, input_ids: torch.Tensor, *, atol: float = 1e-4,
               decode_steps: int = 4) -> dict[str, Any]:
    """onnxruntime vs PyTorch, each within atol and with the same argmax:

    - full: the parity batch (no padding), every position;
    - padded: two prompts of different lengths, left-padded into one batch, vs each prompt alone
      in PyTorch (every real position, and the last token's logits, which serving samples from);
    - kv: the same padded batch through the KV graph, the prompt minus `decode_steps` tokens at
      once and then one token per step, vs PyTorch's full-sequence logits of each prompt.
    """
    import onnxruntime as ort

    ids = input_ids.numpy().astype(np.int64)
    T = ids.shape[1]
    ref = model(input_ids).numpy()
    sess = _session(path / MODEL_FILE)
    got = run_graph(path / MODEL_FILE, ids, session=sess)
    diff = float(np.abs(ref - got).max())
    argmax = float((ref.argmax(-1) == got.argmax(-1)).mean())
    result: dict[str, Any] = {"max_abs_diff": diff, "atol": atol, "argmax_agreement": argmax,
                              "runtime": f"onnxruntime {ort.__version__}"}
    passed = diff <= atol and argmax == 1.0

    short = max(2, T // 2) if T > 2 else 1  # two prompts of different lengths
    prompts = [ids[0].tolist(), ids[-1, :short].tolist()]
    alone = [model(torch.tensor([p]))[0].numpy() for p in prompts]  # [L, V] each
    pad_ids, pad_mask, _ = left_pad(prompts)
    padded = run_graph(path / MODEL_FILE, pad_ids, pad_mask, session=sess)
    width = pad_ids.shape[1]
    real = [padded[i, width - len(p):] for i, p in enumerate(prompts)]
    pad_diff = max(float(np.abs(r - a).max()) for r, a in zip(real, alone, strict=True))
    last_diff = max(float(np.abs(r[-1] - a[-1]).max()) for r, a in zip(real, alone, strict=True))
    pad_argmax = all(bool((r.argmax(-1) == a.argmax(-1)).all()) for r, a in zip(real, alone, strict=True))
    result.update(padded_lengths=[len(p) for p in prompts], padded_max_abs_diff=pad_diff,
                  padded_last_token_max_abs_diff=last_diff, padded_argmax_identical=pad_argmax)
    passed = passed and pad_diff <= atol and pad_argmax

    kv_path = path / KV_MODEL_FILE
    if kv_path.is_file():
        kv_diff, kv_argmax = _check_kv(kv_path, model, prompts, alone, decode_steps)
        result.update(kv_max_abs_diff=kv_diff, kv_argmax_identical=kv_argmax, kv_decode_steps=decode_steps)
        passed = passed and kv_diff <= atol and kv_argmax
    result["passed"] = passed
    return result


def _check_kv(path: Path, model: Llama, prompts: list[list[int]], alone: list[np.ndarray],
              steps: int) -> tuple[float, bool]:
    """Prefill each prompt minus its last `steps` tokens (left-padded together), then feed those
    tokens one per step with the growing mask; compare each produced row with PyTorch alone."""
    c = model.config
    steps = max(0, min(steps, min(len(p) for p in prompts) - 1))
    sess = _session(path)
    heads = [p[: len(p) - steps] for p in prompts]
    ids, mask, pos = left_pad(heads)
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": pos,
             **empty_past(c.n_layer, len(prompts), c.n_kv_head, c.head_dim)}
    names = past_names(c.n_layer)
    logits, *present = sess.run(None, feeds)
    width = ids.shape[1]
    rows = [[logits[i, width - len(h):]] for i, h in enumerate(heads)]
    for t in range(steps):
        nxt = np.array([[p[len(p) - steps + t]] for p in prompts], dtype=np.int64)
        mask = np.concatenate([mask, np.ones((len(prompts), 1), dtype=np.int64)], axis=1)
        pos = pos[:, -1:] + 1
        logits, *present = sess.run(None, {"input_ids": nxt, "attention_mask": mask, "position_ids": pos,
                                           **dict(zip(names, present, strict=True))})
        for i in range(len(prompts)):
            rows[i].append(logits[i])
    stepped = [np.concatenate(r, axis=0) for r in rows]
    diff = max(float(np.abs(s - a).max()) for s, a in zip(stepped, alone, strict=True))
    same = all(bool((s.argmax(-1) == a.argmax(-1)).all()) for s, a in zip(stepped, alone, strict=True))
    return diff, same
