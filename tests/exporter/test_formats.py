"""Each export format loads in its own runtime and reproduces the PyTorch model."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch

from services.exporter import gguf_export, native, onnx_export
from services.exporter.export import parity_inputs
from services.exporter.hf import greedy_matches

from .conftest import trained_model

needs_llama_cpp = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                     reason="llama-cpp-python is not installed")


def test_every_requested_format_passed_parity_and_tensorrt_is_skipped_with_a_reason(export_result):
    assert set(export_result.formats) == {"native", "hf", "onnx", "gguf", "tensorrt"}
    for fmt, res in export_result.parity.items():
        assert res["passed"], (fmt, res)
    if importlib.util.find_spec("tensorrt") is None:
        assert export_result.formats["tensorrt"]["status"] == "skipped"
        assert "tensorrt is not installed" in export_result.skipped["tensorrt"]


def test_native_reloads_bit_identically(export_result, trained):
    model, config, prov = native.load_native(export_result.path / "native")
    ref = trained_model(trained)
    x = parity_inputs(trained.tokenizer, config.vocab_size, 2, 16)
    # The export carries the watermark: function-preserving, so equal up to float rounding.
    assert torch.allclose(model(x), ref(x), atol=1e-4)
    assert prov["helox.fingerprint"] == export_result.fingerprint
    assert json.loads((export_result.path / "native" / "config.json").read_text())["tokenizer"]["eos"] == 3


def test_hf_export_loads_with_auto_classes_and_matches_logits_and_greedy_generation(export_result, trained):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    path = export_result.path / "hf"
    hm = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    assert isinstance(hm, LlamaForCausalLM)
    assert (tok.pad_token_id, tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2, 3)
    model, _, _ = native.load_native(export_result.path / "native")
    text = "First Citizen:\nWe are accounted poor citizens"
    ids = tok.encode(text, add_special_tokens=False)
    import sentencepiece as spm

    assert ids == spm.SentencePieceProcessor(model_file=str(trained.tokenizer)).encode(text)
    x = torch.tensor([ids])
    with torch.no_grad():
        assert torch.allclose(hm(x).logits, model(x), atol=1e-4)
    assert greedy_matches(hm, model, x, 16, eos=3)
    assert greedy_matches(hm, model, parity_inputs(trained.tokenizer, model.config.vocab_size, 3, 6), 16, eos=3)
    assert json.loads((path / "config.json").read_text())["helox"]["helox.fingerprint"] == export_result.fingerprint


def test_onnx_graphs_take_any_batch_and_sequence_and_the_kv_graph_continues_a_prompt(export_result):
    model, config, _ = native.load_native(export_result.path / "native")
    sess = onnx_export._session(export_result.path / "onnx" / onnx_export.MODEL_FILE)
    kv = onnx_export._session(export_result.path / "onnx" / onnx_export.KV_MODEL_FILE)
    g = torch.Generator().manual_seed(1)
    for batch, seq in ((1, 1), (3, 7), (2, 33)):
        x = torch.randint(4, config.vocab_size, (batch, seq), generator=g)
        with torch.no_grad():
            ref = model(x).numpy()
        got = sess.run(["logits"], {"input_ids": x.numpy()})[0]
        np.testing.assert_allclose(got, ref, atol=1e-4)
        assert (got.argmax(-1) == ref.argmax(-1)).all()
    # prompt of 5, then 3 single tokens through the KV graph == one full forward
    x = torch.randint(4, config.vocab_size, (2, 8), generator=g)
    shape = (config.n_layer, 2, config.n_kv_head, 0, config.head_dim)
    logits, k, v = kv.run(None, {"input_ids": x[:, :5].numpy(), "past_keys": np.zeros(shape, np.float32),
                                 "past_values": np.zeros(shape, np.float32)})
    steps = [logits]
    for t in range(5, 8):
        logits, k, v = kv.run(None, {"input_ids": x[:, t:t + 1].numpy(), "past_keys": k, "past_values": v})
        steps.append(logits)
    assert k.shape == (config.n_layer, 2, config.n_kv_head, 8, config.head_dim)
    with torch.no_grad():
        np.testing.assert_allclose(np.concatenate(steps, axis=1), model(x).numpy(), atol=1e-4)
    meta = onnx_export.read_onnx_metadata(export_result.path / "onnx" / onnx_export.MODEL_FILE)
    assert meta["helox.fingerprint"] == export_result.fingerprint
    assert export_result.formats["onnx"]["exporter"][onnx_export.MODEL_FILE] in ("dynamo", "torchscript")


def test_gguf_round_trips_through_the_gguf_reader(export_result, trained):
    model, config, _ = native.load_native(export_result.path / "native")
    state = {k: v.numpy() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    for quant, atol in (("f32", 0.0), ("f16", 1e-3), ("q8_0", 2e-2)):
        tensors, fields = gguf_export.read_gguf(export_result.path / "gguf" / gguf_export.gguf_file(quant))
        assert set(tensors) == set(state)
        for name, arr in tensors.items():
            np.testing.assert_allclose(arr, state[name], atol=atol, rtol=0, err_msg=f"{quant} {name}")
        assert fields["general.architecture"] == "llama"
        assert fields["llama.block_count"] == config.n_layer
        assert fields["llama.attention.head_count_kv"] == config.n_kv_head
        assert fields["llama.rope.dimension_count"] == config.head_dim
        assert fields["tokenizer.ggml.model"] == "llama"
        assert len(fields["tokenizer.ggml.tokens"]) == config.vocab_size
        assert fields["tokenizer.ggml.eos_token_id"] == 3 and fields["tokenizer.ggml.bos_token_id"] == 2
        types = fields["tokenizer.ggml.token_type"]
        assert types[0] == 3 and types[1] == 2 and types[4] == 6  # <pad> CONTROL, <unk> UNKNOWN, <0x00> BYTE
        assert fields["general.helox.fingerprint"] == export_result.fingerprint


def test_gguf_permute_is_llama_cpp_layout_and_inverts():
    w = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)  # 2 heads of dim 4: rows (0,1,2,3) -> (0,2,1,3)
    p = gguf_export.permute(w, 2)
    np.testing.assert_array_equal(p[:4, 0], w[[0, 2, 1, 3], 0])
    np.testing.assert_array_equal(gguf_export.unpermute(p, 2), w)


@needs_llama_cpp
def test_llama_cpp_next_token_predictions_agree_with_pytorch(export_result):
    res = export_result.parity["gguf"]
    assert res["f32"]["top1_agreement"] == 1.0 and res["f32"]["max_abs_diff"] < 1e-4
    assert res["f16"]["top1_agreement"] == 1.0
    assert res["q8_0"]["top1_agreement"] >= 0.9
    assert all(res[q]["tokenizer_identical"] for q in ("f32", "f16", "q8_0"))


def test_the_watermark_survives_into_the_hf_and_every_gguf_file(export_result, trained):
    from safetensors.torch import load_file

    from services.exporter.hf import hf_tensors_to_canonical
    from services.exporter.watermark import derive_watermark_key, detect_watermark

    key = derive_watermark_key("test-signing-key")
    hf_state = hf_tensors_to_canonical(load_file(str(export_result.path / "hf" / "model.safetensors")), trained.config)
    assert detect_watermark(hf_state, trained.config, key).detected
    for quant in ("f32", "f16", "q8_0"):
        tensors, _ = gguf_export.read_gguf(export_result.path / "gguf" / gguf_export.gguf_file(quant))
        res = detect_watermark({k: torch.from_numpy(v) for k, v in tensors.items()}, trained.config, key)
        assert res.detected and res.z > 20, (quant, res)


@needs_llama_cpp
def test_llama_cpp_parity_catches_a_missing_rope_permutation(trained, tmp_path, monkeypatch):
    model = trained_model(trained)
    monkeypatch.setattr(gguf_export, "permute", lambda w, n_head: w)  # HF layout written as is: wrong RoPE pairs
    gguf_export.write_gguf(tmp_path, trained.state, trained.config, trained.tokenizer, {}, quants=("f32",))
    res = gguf_export.check_gguf(tmp_path, model, trained.tokenizer)
    assert not res["passed"] and res["f32"]["max_abs_diff"] > 1e-2


def test_onnx_parity_catches_a_different_model_and_dynamo_failure_falls_back_to_torchscript(trained, tmp_path,
                                                                                             monkeypatch):
    import torch.onnx

    model = trained_model(trained)
    real_export = torch.onnx.export

    def no_dynamo(*args, dynamo=True, **kw):
        if dynamo:
            raise RuntimeError("simulated dynamo failure")
        return real_export(*args, dynamo=False, **kw)

    monkeypatch.setattr(torch.onnx, "export", no_dynamo)
    entry = onnx_export.write_onnx(tmp_path / "onnx", model, {"helox.fingerprint": "x"}, kv_cache=False)
    assert entry["exporter"] == {onnx_export.MODEL_FILE: "torchscript"}
    x = parity_inputs(trained.tokenizer, trained.config.vocab_size, 2, 8)
    assert onnx_export.check_onnx(tmp_path / "onnx", model, x)["passed"]
    other = trained_model(trained)
    with torch.no_grad():
        other.layers[0].mlp.down_proj.weight.mul_(1.5)
    assert not onnx_export.check_onnx(tmp_path / "onnx", other, x)["passed"]
