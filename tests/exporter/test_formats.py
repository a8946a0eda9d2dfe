"""Each export format loads in its own runtime and reproduces the PyTorch model."""

from __future__ import annotations

import importlib.util
import json
import sys

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


def test_onnx_graphs_take_any_batch_and_sequence_with_optimum_names(export_result):
    model, config, _ = native.load_native(export_result.path / "native")
    sess = onnx_export._session(export_result.path / "onnx" / onnx_export.MODEL_FILE)
    kv = onnx_export._session(export_result.path / "onnx" / onnx_export.KV_MODEL_FILE)
    assert [i.name for i in sess.get_inputs()] == ["input_ids", "attention_mask", "position_ids"]
    past = [f"past_key_values.{i}.{k}" for i in range(config.n_layer) for k in ("key", "value")]
    assert [i.name for i in kv.get_inputs()] == ["input_ids", "attention_mask", "position_ids", *past]
    assert [o.name for o in kv.get_outputs()] == ["logits"] + [n.replace("past_key_values", "present") for n in past]
    assert kv.get_inputs()[3].shape == ["batch_size", config.n_kv_head, "past_sequence_length", config.head_dim]
    assert kv.get_inputs()[1].shape == ["batch_size", "total_sequence_length"]
    g = torch.Generator().manual_seed(1)
    for batch, seq in ((1, 1), (3, 7), (2, 33)):
        x = torch.randint(4, config.vocab_size, (batch, seq), generator=g)
        with torch.no_grad():
            ref = model(x).numpy()
        got = onnx_export.run_graph(export_result.path / "onnx" / onnx_export.MODEL_FILE, x.numpy(), session=sess)
        np.testing.assert_allclose(got, ref, atol=1e-4)
        assert (got.argmax(-1) == ref.argmax(-1)).all()
    meta = onnx_export.read_onnx_metadata(export_result.path / "onnx" / onnx_export.MODEL_FILE)
    assert meta["helox.fingerprint"] == export_result.fingerprint
    assert export_result.formats["onnx"]["exporter"][onnx_export.MODEL_FILE] in ("dynamo", "torchscript")


def _prompts(config, lengths, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, config.vocab_size, (n,), generator=g).tolist() for n in lengths]


def test_onnx_left_padded_batch_matches_each_prompt_alone(export_result):
    model, config, _ = native.load_native(export_result.path / "native")
    prompts = _prompts(config, (11, 4), seed=2)
    ids, mask, pos = onnx_export.left_pad(prompts)
    assert mask[1].tolist() == [0] * 7 + [1] * 4 and pos[1].tolist() == [0] * 8 + [1, 2, 3]
    for graph in (onnx_export.MODEL_FILE, onnx_export.KV_MODEL_FILE):
        got = onnx_export.run_graph(export_result.path / "onnx" / graph, ids, mask)
        for i, p in enumerate(prompts):
            with torch.no_grad():
                alone = model(torch.tensor([p]))[0].numpy()
            np.testing.assert_allclose(got[i, -1], alone[-1], atol=1e-4, err_msg=f"{graph} row {i} last token")
            np.testing.assert_allclose(got[i, ids.shape[1] - len(p):], alone, atol=1e-4, err_msg=graph)


def test_onnx_kv_graph_decodes_a_padded_batch_step_by_step_like_the_full_sequence(export_result):
    model, config, _ = native.load_native(export_result.path / "native")
    kv = onnx_export._session(export_result.path / "onnx" / onnx_export.KV_MODEL_FILE)
    prompts = _prompts(config, (9, 5), seed=3)
    steps = 4
    ids, mask, pos = onnx_export.left_pad([p[:-steps] for p in prompts])
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": pos,
             **onnx_export.empty_past(config.n_layer, 2, config.n_kv_head, config.head_dim)}
    logits, *present = kv.run(None, feeds)
    last = [[logits[i, -1]] for i in range(2)]
    names = onnx_export.past_names(config.n_layer)
    for t in range(steps):
        mask = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
        pos = pos[:, -1:] + 1
        nxt = np.array([[p[len(p) - steps + t]] for p in prompts])
        logits, *present = kv.run(None, {"input_ids": nxt, "attention_mask": mask, "position_ids": pos,
                                         **dict(zip(names, present, strict=True))})
        for i in range(2):
            last[i].append(logits[i, -1])
    assert present[0].shape == (2, config.n_kv_head, mask.shape[1], config.head_dim)
    for i, p in enumerate(prompts):
        with torch.no_grad():
            full = model(torch.tensor([p]))[0].numpy()
        np.testing.assert_allclose(np.stack(last[i]), full[-steps - 1:], atol=1e-4)


def test_onnx_parity_reports_padding_and_kv_numbers(export_result):
    res = export_result.parity["onnx"]
    assert res["passed"] and res["padded_lengths"][0] > res["padded_lengths"][1]
    assert res["padded_last_token_max_abs_diff"] <= 1e-4 and res["kv_max_abs_diff"] <= 1e-4
    assert res["padded_argmax_identical"] and res["kv_argmax_identical"]


def test_onnx_padded_parity_catches_a_graph_that_ignores_the_mask_and_positions(trained, tmp_path, monkeypatch):
    """The graph as it was before attention_mask and position_ids: padding attended, positions
    counted from the padding. Its left-padded rows are off by far more than the tolerance."""
    model = trained_model(trained)
    real = onnx_export.decode

    def unmasked(m, input_ids, attention_mask, position_ids, past=None):
        B, T = input_ids.shape
        S = attention_mask.shape[1]
        plain = (torch.arange(T)[None] + (S - T)).expand(B, T)
        return real(m, input_ids, torch.ones_like(attention_mask), plain, past)

    monkeypatch.setattr(onnx_export, "decode", unmasked)
    onnx_export.write_onnx(tmp_path / "onnx", model, {}, kv_cache=False, exporter="torchscript")
    x = parity_inputs(trained.tokenizer, trained.config.vocab_size, 2, 16)
    res = onnx_export.check_onnx(tmp_path / "onnx", model, x)
    assert res["max_abs_diff"] <= 1e-4  # an unpadded batch cannot tell
    assert not res["passed"] and res["padded_last_token_max_abs_diff"] > 1e-2


def test_gguf_round_trips_through_the_gguf_reader(export_result, trained):
    model, config, _ = native.load_native(export_result.path / "native")
    state = {k: v.numpy() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    for quant, atol in (("f32", 0.0), ("f16", 1e-3), ("bf16", 8e-3), ("q8_0", 2e-2)):
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
@pytest.mark.parametrize("kind", gguf_export.GGUF_TYPES)
def test_each_gguf_type_loaded_with_stock_settings_matches_pytorch(export_result, trained, kind):
    """Every type, loaded as Llama(model_path=..., logits_all=True), against PyTorch's logits; on a CPU
    with AMX, where that load of a Q8_0 file crashes (llama.cpp issue 20824), the Q8_0 file with n_batch=1."""
    import sentencepiece as spm

    model, _, _ = native.load_native(export_result.path / "native")
    sp = spm.SentencePieceProcessor(model_file=str(trained.tokenizer))
    prompts = [sp.encode(t) for t in gguf_export.PARITY_TEXTS[:3]]
    got, tokens, _, settings, stock_crash = gguf_export.logits_as_users_load(
        export_result.path / "gguf" / gguf_export.gguf_file(kind), prompts, list(gguf_export.PARITY_TEXTS[:3]))
    assert tokens == prompts
    amx_q8 = kind == "q8_0" and gguf_export._cpu_has_amx()
    assert settings == (gguf_export.AMX_LOAD if amx_q8 and stock_crash else gguf_export.STOCK_LOAD)
    assert stock_crash is None or (amx_q8 and "crashed (SIGSEGV)" in stock_crash)
    bound = {"f32": 1e-2, "f16": 2e-2, "bf16": 1e-1, "q8_0": 3e-1}[kind]  # ~3x the measured; stock KV cache is f16
    top1 = []
    for g, p in zip(got, prompts, strict=True):
        with torch.no_grad():
            ref = model(torch.tensor([p]))[0].numpy()
        assert np.abs(g - ref).max() < bound, kind
        top1.append(g.argmax(-1) == ref.argmax(-1))
    agreement = np.concatenate(top1).mean()
    assert agreement == 1.0 if kind in ("f32", "f16") else agreement >= 0.9
    res = export_result.parity["gguf"]
    assert res[kind]["passed"] and res["settings"] == gguf_export.STOCK_LOAD
    assert res[kind].get("settings", gguf_export.STOCK_LOAD) == settings  # the entry says how it was loaded
    assert res[kind]["top1_agreement"] == 1.0 if kind in ("f32", "f16") else res[kind]["top1_agreement"] >= 0.9
    if kind == "f32":
        assert res[kind]["f32_kv_max_abs_diff"] < 1e-4


def test_gguf_types_are_refused_when_unknown(trained, tmp_path):
    with pytest.raises(gguf_export.GGUFExportError, match="q4_0"):
        gguf_export.write_gguf(tmp_path, trained.state, trained.config, trained.tokenizer, {}, types=("f16", "q4_0"))


def test_a_llama_cpp_crash_fails_parity_naming_the_file_and_the_workaround(trained, tmp_path, monkeypatch):
    """What a stock load that segfaults (q8_0 on AMX CPUs) looks like: a failed entry, no exception."""
    model = trained_model(trained)
    gguf_export.write_gguf(tmp_path, trained.state, trained.config, trained.tokenizer, {}, types=("q8_0",))
    segfault = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"]
    monkeypatch.setattr(gguf_export, "_child_command", lambda *a: segfault)
    monkeypatch.setattr(gguf_export, "llama_cpp_missing", lambda: None)
    res = gguf_export.check_gguf(tmp_path, model, trained.tokenizer)
    assert not res["passed"] and not res["q8_0"]["passed"]
    err = res["q8_0"]["error"]
    assert "crashed (SIGSEGV) on model-q8_0.gguf" in err and "n_batch=1" in err and "gguf_types" in err


def test_the_watermark_survives_into_the_hf_and_every_gguf_file(export_result, trained):
    from safetensors.torch import load_file

    from services.exporter.hf import hf_tensors_to_canonical
    from services.exporter.watermark import derive_watermark_key, detect_watermark

    key = derive_watermark_key("test-signing-key")
    hf_state = hf_tensors_to_canonical(load_file(str(export_result.path / "hf" / "model.safetensors")), trained.config)
    assert detect_watermark(hf_state, trained.config, key).detected
    for quant in gguf_export.GGUF_TYPES:
        tensors, _ = gguf_export.read_gguf(export_result.path / "gguf" / gguf_export.gguf_file(quant))
        res = detect_watermark({k: torch.from_numpy(v) for k, v in tensors.items()}, trained.config, key)
        assert res.detected and res.z > 20, (quant, res)


def test_gguf_top1_is_judged_where_pytorch_decided(trained, tmp_path, monkeypatch):
    """A flipped near-tie passes every type; a flipped decided position fails f16 (which must agree
    there) and, past min_top1_quantized, q8_0. Logits stand in for llama.cpp's: PyTorch's own, edited."""
    import sentencepiece as spm

    model = trained_model(trained)
    sp = spm.SentencePieceProcessor(model_file=str(trained.tokenizer))
    prompts = [sp.encode(t)[: model.config.max_seq_len] for t in gguf_export.PARITY_TEXTS]
    with torch.no_grad():
        refs = [model(torch.tensor([p]))[0] for p in prompts]
    flat = torch.cat(refs)
    top2 = flat.log_softmax(-1).topk(2, dim=-1).values
    lead = (top2[:, 0] - top2[:, 1]).numpy()
    tie, decided = int(lead.argmin()), int(lead.argmax())
    assert lead[tie] < 0.25 <= lead[decided]
    sizes = [len(r) for r in refs]

    def llama_cpp_with_flips(positions):
        got = flat.clone()
        for pos in positions:
            first, second = got[pos].topk(2).indices
            got[pos, second] = got[pos, first] + 1e-3  # the runner-up now leads
        parts = [g.numpy() for g in got.split(sizes)]
        return lambda file, p, texts, exact_kv=False: (parts, [sp.encode(t) for t in texts], "test")

    for f in ("model-f16.gguf", "model-q8_0.gguf"):
        (tmp_path / f).write_bytes(b"")
    monkeypatch.setattr(gguf_export, "llama_cpp_missing", lambda: None)
    tie_margin = float(lead[tie]) + 1e-6  # this tie is left out of f16's count
    for flips, f16_ok in (([], True), ([tie], True), ([decided], False)):
        monkeypatch.setattr(gguf_export, "llama_cpp_logits", llama_cpp_with_flips(flips))
        res = gguf_export.check_gguf(tmp_path, model, trained.tokenizer, min_top1_quantized=0.8,
                                     decided_margin=0.25, tie_margin=tie_margin)
        assert res["f16"]["passed"] is f16_ok and res["q8_0"]["passed"] is True, (flips, res)
        assert res["f16"]["top1_agreement_all"] == pytest.approx(1 - len(flips) / len(lead))
    # q8_0 fails once flips at decided positions exceed 1 - min_top1_quantized of them.
    n_decided = int((lead >= 0.25).sum())
    many = [int(i) for i in (-lead).argsort()[: n_decided // 4 + 1]]
    monkeypatch.setattr(gguf_export, "llama_cpp_logits", llama_cpp_with_flips(many))
    res = gguf_export.check_gguf(tmp_path, model, trained.tokenizer, min_top1_quantized=0.8)
    assert res["q8_0"]["passed"] is False and res["passed"] is False
    assert res["q8_0"]["top1_agreement"] == pytest.approx(1 - len(many) / n_decided)


@needs_llama_cpp
def test_llama_cpp_parity_catches_a_missing_rope_permutation(trained, tmp_path, monkeypatch):
    model = trained_model(trained)
    monkeypatch.setattr(gguf_export, "permute", lambda w, n_head: w)  # HF layout written as is: wrong RoPE pairs
    gguf_export.write_gguf(tmp_path, trained.state, trained.config, trained.tokenizer, {}, types=("f32",))
    res = gguf_export.check_gguf(tmp_path, model, trained.tokenizer)
    assert not res["passed"] and res["f32"]["max_abs_diff"] > 1e-2 and res["f32"]["f32_kv_max_abs_diff"] > 1e-2


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
