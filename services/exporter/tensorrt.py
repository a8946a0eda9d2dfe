"""TensorRT: an engine built from the ONNX logits graph, where `tensorrt` is importable (GPU hosts).

Elsewhere the format is skipped with a clear reason in the result; that is not an error.

    tensorrt/model.plan   serialized engine, fp32, one optimisation profile over
                          batch 1..8 and sequence 1..max_seq_len; inputs input_ids,
                          attention_mask and position_ids, as in the ONNX graph
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

ENGINE_FILE = "model.plan"


def tensorrt_available() -> str | None:
    """None when TensorRT and a CUDA device are usable, else why not (in words)."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "tensorrt is not installed (GPU hosts only: pip install tensorrt)"
    try:
        import torch

        if not torch.cuda.is_available():
            return "tensorrt is installed but no CUDA device is visible"
    except ImportError:  # pragma: no cover - torch is a dependency
        return "torch is not importable"
    return None


def write_tensorrt(out: Path, onnx_file: Path, *, max_seq_len: int, max_batch: int = 8,
                   workspace_bytes: int = 1 << 30) -> dict[str, Any]:
    """Build the engine into `out` (or return a skipped entry saying why it was not built)."""
    reason = tensorrt_available()
    if reason is not None:
        return {"status": "skipped", "reason": reason}
    if not onnx_file.is_file():
        return {"status": "skipped", "reason": f"needs the ONNX export ({onnx_file} missing): add 'onnx' to formats"}
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"):  # implicit in TensorRT >= 10
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_file)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_file}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    profile = builder.create_optimization_profile()
    opt_seq = min(128, max_seq_len)
    for name in ("input_ids", "attention_mask", "position_ids"):  # all [batch, sequence]
        profile.set_shape(name, (1, 1), (1, opt_seq), (max_batch, max_seq_len))
    config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise RuntimeError("TensorRT failed to build the engine (see the TensorRT log above)")
    out.mkdir(parents=True, exist_ok=True)
    (out / ENGINE_FILE).write_bytes(bytes(engine))
    return {"path": out.name, "main": f"{out.name}/{ENGINE_FILE}", "tensorrt": trt.__version__,
            "note": f"fp32 engine, batch 1..{max_batch}, seq 1..{max_seq_len}"}


def check_tensorrt(path: Path, model, input_ids, *, atol: float = 1e-3) -> dict[str, Any]:
    """Run the engine on the GPU and compare logits with the PyTorch model."""
    reason = tensorrt_available()
    if reason is not None:
        return {"status": "skipped", "passed": True, "reason": reason}
    import tensorrt as trt
    import torch

    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine((path / ENGINE_FILE).read_bytes())
    ctx = engine.create_execution_context()
    ids = input_ids.to("cuda", torch.int64).contiguous()
    feeds = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
             "position_ids": torch.arange(ids.size(1), device="cuda").expand_as(ids).contiguous()}
    for name, tensor in feeds.items():
        ctx.set_input_shape(name, tuple(tensor.shape))
        ctx.set_tensor_address(name, tensor.data_ptr())
    out = torch.empty((*ids.shape, model.config.vocab_size), device="cuda", dtype=torch.float32)
    ctx.set_tensor_address("logits", out.data_ptr())
    stream = torch.cuda.current_stream()
    if not ctx.execute_async_v3(stream.cuda_stream):
        raise RuntimeError("TensorRT execution failed")
    stream.synchronize()
    with torch.no_grad():
        ref = model(input_ids)
    got = out.cpu()
    diff = float((ref - got).abs().max())
    argmax = float((ref.argmax(-1) == got.argmax(-1)).float().mean())
    return {"passed": diff <= atol and argmax == 1.0, "max_abs_diff": diff, "atol": atol, "argmax_agreement": argmax,
            "runtime": f"tensorrt {trt.__version__}"}
