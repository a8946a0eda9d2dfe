"""The ONNX format: two graphs, both with dynamic batch and sequence, checked in onnxruntime.

    onnx/model.onnx      input_ids [batch, seq] (int64) -> logits [batch, seq, vocab]
    onnx/model_kv.onnx   input_ids [batch, seq], past_keys / past_values [layers, batch, kv_heads,
                         past, head_dim] -> logits, present_keys / present_values
                         [layers, batch, kv_heads, past + seq, head_dim]; positions continue from
                         `past` (pass past = 0 for the prompt, then one token at a time)

`torch.onnx.export(dynamo=True)` is tried first; if it fails, the TorchScript exporter
(dynamo=False) is used, and the manifest says which one produced each file. The provenance
goes into the model's metadata_props.
"""

from __future__ import annotations

import contextlib
import io
import logging
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

Exporter = Literal["auto", "dynamo", "torchscript"]


class OnnxExportError(RuntimeError):
    """Neither ONNX exporter could export the model."""


def decode(model: Llama, input_ids: torch.Tensor, past_keys: torch.Tensor | None = None,
           past_values: torch.Tensor | None = None):
    """`Llama.forward` with the KV cache as explicit tensors in and out, in export-friendly ops.

    input_ids [B, T]; past_keys/past_values [L, B, K, P, D] (None: no past) -> logits [B, T, V],
    present_keys/present_values [L, B, K, P+T, D]. The causal mask is explicit (Llama's own
    forward picks SDPA's is_causal from the shapes, which torch.export cannot trace); no
    padding mask: the rows of a batch share one length.
    """
    m = model
    B, T = input_ids.shape
    P = past_keys.shape[3] if past_keys is not None else 0
    rep = m.config.n_head // m.config.n_kv_head
    cos = m.rope_cos[P:P + T][None, None]  # [1, 1, T, D]
    sin = m.rope_sin[P:P + T][None, None]
    q_pos = torch.arange(T, device=input_ids.device) + P
    k_pos = torch.arange(P + T, device=input_ids.device)
    mask = k_pos[None, :] <= q_pos[:, None]  # [T, S] causal over cached + new keys

    x = m.embed_tokens(input_ids)  # [B, T, C]
    keys, values = [], []
    for i, block in enumerate(m.layers):
        attn = block.self_attn
        q, k, v = attn._qkv(block.input_layernorm(x), cos, sin)  # [B, H, T, D], [B, K, T, D] x2
        if past_keys is not None and past_values is not None:
            k = torch.cat([past_keys[i], k], dim=2)  # [B, K, S, D]
            v = torch.cat([past_values[i], v], dim=2)
        keys.append(k)
        values.append(v)
        kk = k.repeat_interleave(rep, dim=1)  # [B, H, S, D] (explicit: no enable_gqa in the graph)
        vv = v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask)  # [B, H, T, D]
        x = x + attn.o_proj(y.transpose(1, 2).reshape(B, T, -1))
        x = x + block.mlp(block.post_attention_layernorm(x))
    return m.lm_head(m.norm(x)), torch.stack(keys), torch.stack(values)


class KVDecoder(nn.Module):
    """The KV graph: (input_ids, past_keys, past_values) -> (logits, present_keys, present_values)."""

    def __init__(self, model: Llama) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, past_keys: torch.Tensor, past_values: torch.Tensor):
        return decode(self.model, input_ids, past_keys, past_values)


class LogitsGraph(nn.Module):
    """The plain graph: input_ids -> logits."""

    def __init__(self, model: Llama) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return decode(self.model, input_ids)[0]


def _empty_past(model: Llama, batch: int, past: int) -> tuple[torch.Tensor, torch.Tensor]:
    c = model.config
    shape = (c.n_layer, batch, c.n_kv_head, past, c.head_dim)
    return torch.zeros(shape), torch.zeros(shape)


def _export(module: nn.Module, args: tuple, path: Path, *, input_names: list[str], output_names: list[str],
            dynamic: dict[str, dict[int, str]], max_seq: int, exporter: Exporter) -> str:
    """Export with dynamo (default) or TorchScript; returns the exporter that succeeded."""
    errors = []
    order = ["dynamo", "torchscript"] if exporter == "auto" else [exporter]
    for kind in order:
        try:
            with warnings.catch_warnings(), _quiet():
                warnings.simplefilter("ignore")
                if kind == "dynamo":
                    dims = {"batch": torch.export.Dim("batch", min=1, max=1024),
                            "seq": torch.export.Dim("seq", min=1, max=max_seq),
                            "past": torch.export.Dim("past", min=0, max=max_seq)}
                    shapes = {name: {ax: dims[label] for ax, label in dynamic.get(name, {}).items()}
                              for name in input_names}
                    torch.onnx.export(module, args, str(path), dynamo=True, opset_version=OPSET,
                                      input_names=input_names, output_names=output_names,
                                      dynamic_shapes=shapes, optimize=True, verbose=False, external_data=False)
                else:
                    torch.onnx.export(module, args, str(path), dynamo=False, opset_version=OPSET,
                                      input_names=input_names, output_names=output_names,
                                      dynamic_axes={k: dict(v) for k, v in dynamic.items()})
            return kind
        except Exception as exc:
            errors.append(f"{kind}: {type(exc).__name__}: {str(exc)[:500]}")
            path.unlink(missing_ok=True)
    raise OnnxExportError(f"ONNX export of {path.name} failed with every exporter: " + " | ".join(errors))


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


def _add_metadata(path: Path, metadata: dict[str, str]) -> None:
    import onnx

    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    for k, v in sorted(metadata.items()):
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    onnx.save(proto, str(path))


def write_onnx(out: Path, model: Llama, provenance: dict[str, str], *, kv_cache: bool = True,
               exporter: Exporter = "auto") -> dict[str, Any]:
    """Export the logits graph (and the KV-cache graph) into `out`; returns the manifest entry."""
    out.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    max_seq = model.config.max_seq_len
    ids = torch.randint(0, model.config.vocab_size, (2, 5))  # >= 2 in each dynamic dim
    used: dict[str, str] = {}
    with torch.no_grad():
        used[MODEL_FILE] = _export(
            LogitsGraph(model), (ids,), out / MODEL_FILE, input_names=["input_ids"], output_names=["logits"],
            dynamic={"input_ids": {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "seq"}}, max_seq=max_seq,
            exporter=exporter)
        _add_metadata(out / MODEL_FILE, {**provenance, "helox.graph": "logits"})
        if kv_cache:
            pk, pv = _empty_past(model, 2, 3)
            kv_dyn = {1: "batch", 3: "past"}
            used[KV_MODEL_FILE] = _export(
                KVDecoder(model), (ids, pk, pv), out / KV_MODEL_FILE,
                input_names=["input_ids", "past_keys", "past_values"],
                output_names=["logits", "present_keys", "present_values"],
                dynamic={"input_ids": {0: "batch", 1: "seq"}, "past_keys": kv_dyn, "past_values": kv_dyn,
                         "logits": {0: "batch", 1: "seq"}, "present_keys": {1: "batch", 3: "total"},
                         "present_values": {1: "batch", 3: "total"}},
                max_seq=max_seq, exporter=exporter)
            _add_metadata(out / KV_MODEL_FILE, {**provenance, "helox.graph": "kv-cache"})
    entry: dict[str, Any] = {"path": out.name, "main": f"{out.name}/{MODEL_FILE}", "exporter": used,
                             "opset": OPSET, "note": "exporter: " + ", ".join(f"{k} {v}" for k, v in used.items())}
    if kv_cache:
        entry["kv_cache"] = f"{out.name}/{KV_MODEL_FILE}"
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


@torch.no_grad()
def check_onnx(path: Path, model: Llama, input_ids: torch.Tensor, *, atol: float = 1e-4,
               decode_steps: int = 4) -> dict[str, Any]:
    """onnxruntime vs PyTorch: full logits (atol) and argmax; the KV graph over a prompt + decode steps."""
    import onnxruntime as ort

    ref = model(input_ids).numpy()
    sess = _session(path / MODEL_FILE)
    got = sess.run(["logits"], {"input_ids": input_ids.numpy().astype(np.int64)})[0]
    diff = float(np.abs(ref - got).max())
    argmax = float((ref.argmax(-1) == got.argmax(-1)).mean())
    result: dict[str, Any] = {"max_abs_diff": diff, "atol": atol, "argmax_agreement": argmax,
                              "runtime": f"onnxruntime {ort.__version__}"}
    passed = diff <= atol and argmax == 1.0
    kv_path = path / KV_MODEL_FILE
    if kv_path.is_file():
        kv = _session(kv_path)
        B, T = input_ids.shape
        split = max(1, T - decode_steps)
        pk, pv = _empty_past(model, B, 0)
        feeds = {"input_ids": input_ids[:, :split].numpy().astype(np.int64), "past_keys": pk.numpy(),
                 "past_values": pv.numpy()}
        logits, keys, values = kv.run(None, feeds)
        outs = [logits]
        for t in range(split, T):
            logits, keys, values = kv.run(None, {"input_ids": input_ids[:, t:t + 1].numpy().astype(np.int64),
                                                 "past_keys": keys, "past_values": values})
            outs.append(logits)
        stepped = np.concatenate(outs, axis=1)
        kv_diff = float(np.abs(ref - stepped).max())
        kv_argmax = float((ref.argmax(-1) == stepped.argmax(-1)).mean())
        result.update(kv_max_abs_diff=kv_diff, kv_argmax_agreement=kv_argmax)
        passed = passed and kv_diff <= atol and kv_argmax == 1.0
    result["passed"] = passed
    return result
