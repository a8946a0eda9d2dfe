"""Export time per format for the 10m and 125m presets.

Weights are random (a freshly initialised model saved as a trainer checkpoint): export cost
does not depend on what the weights learned, only on their size. The tokenizer is a
sentencepiece BPE trained on this interpreter's standard library (8192 pieces; the 125m
preset's 32000-row vocabulary is padded in GGUF with UNUSED pieces). Every format goes
through `export_checkpoint` exactly as the service runs it: watermark, write, parity against
PyTorch in the format's own runtime, manifest, signature, verification.

    python benchmarks/exporter.py                          # 10m and 125m, every format
    python benchmarks/exporter.py --presets 10m --threads 2

Figures depend on what else runs on the machine: the load average is printed with them.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from services.data_prep.tokenizer import train_tokenizer
from services.exporter.config import ExportConfig
from services.exporter.export import export_checkpoint
from services.exporter.verify import verify_export
from services.exporter.watermark import detect_watermark, embed_watermark
from shared.checkpoint import save_checkpoint
from shared.data.config import TokenizerConfig, stdlib_dir
from shared.model import Llama, model_preset

KEY = "benchmark-signing-key"


def stdlib_texts(max_mb: float = 8.0) -> list[str]:
    out, budget = [], max_mb * 1e6
    for path in sorted(Path(stdlib_dir()).rglob("*.py")):
        if "site-packages" in path.parts or "__pycache__" in path.parts:
            continue
        text = path.read_text("utf-8", errors="replace")
        out.append(text)
        budget -= len(text)
        if budget <= 0:
            break
    return out


def mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6 if path.is_dir() else path.stat().st_size / 1e6


def bench_preset(preset: str, tokenizer: Path, root: Path, formats: list[str], gguf_types: list[str]) -> None:
    config = model_preset(preset)
    torch.manual_seed(0)
    model = Llama(config)
    ckpt = save_checkpoint(root / f"ckpt-{preset}", 1, model.state_dict(),
                           {"model_config": config.model_dump(mode="json")}, meta={"run_id": f"bench-{preset}"})
    print(f"\n## {preset}: {model.num_params() / 1e6:.1f}M parameters, vocab {config.vocab_size}, "
          f"{config.n_layer} layers, d={config.d_model}")

    t = time.perf_counter()
    state = embed_watermark(model.state_dict(), config, KEY)
    t_embed = time.perf_counter() - t
    t = time.perf_counter()
    z = detect_watermark(state, config, KEY).z
    t_detect = time.perf_counter() - t
    print(f"watermark: embed {t_embed:.2f} s, detect {t_detect:.2f} s (z={z:.0f})")

    cfg = ExportConfig(formats=formats, gguf_types=gguf_types)
    t = time.perf_counter()
    res = export_checkpoint(ckpt.path, tokenizer, None, root / "exports", run_id=f"bench-{preset}",
                            dataset_version="bench", config_hash=None, signing_key=KEY, config=cfg)
    total = time.perf_counter() - t
    t = time.perf_counter()
    report = verify_export(res.path, KEY)
    t_verify = time.perf_counter() - t

    print("| format | write s | parity s | size MB | parity |")
    print("| --- | ---: | ---: | ---: | --- |")
    for fmt, entry in res.formats.items():
        if entry.get("status") == "skipped":
            print(f"| {fmt} | - | - | - | skipped: {entry['reason']} |")
            continue
        par = res.parity[fmt]
        if fmt == "gguf":
            detail = ", ".join(
                f"{q} top1 {par[q]['top1_agreement']:.3f} maxdiff {par[q]['max_abs_diff']:.2g}" if "error" not in par[q]
                else f"{q} {par[q]['error'][:80]}" for q in gguf_types if q in par) or par.get("reason", "")
        elif fmt == "onnx":
            detail = (f"maxdiff {par['max_abs_diff']:.2g}, left-padded {par['padded_max_abs_diff']:.2g}, "
                      f"kv maxdiff {par.get('kv_max_abs_diff', float('nan')):.2g}, "
                      f"exporter {'/'.join(sorted(set(entry['exporter'].values())))}")
        else:
            detail = f"maxdiff {par.get('max_abs_diff', 0):.2g}"
        print(f"| {fmt} | {res.timings_s.get(fmt + '.write', 0):.2f} | {res.timings_s.get(fmt + '.parity', 0):.2f} | "
              f"{mb(res.path / entry['path']):.1f} | {'ok' if par['passed'] else 'FAILED'} ({detail}) |")
    print(f"load + watermark {res.timings_s['load_and_watermark']:.2f} s; whole export (incl. manifest, signature, "
          f"self-verification) {total:.1f} s; verify_export again {t_verify:.1f} s ({'ok' if report.ok else report.failed})")
    t = time.perf_counter()
    again = export_checkpoint(ckpt.path, tokenizer, None, root / "exports", run_id=f"bench-{preset}",
                              dataset_version="bench", config_hash=None, signing_key=KEY, config=cfg)
    print(f"re-export of the same checkpoint (idempotent, reused={again.reused}): {time.perf_counter() - t:.1f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", nargs="+", default=["10m", "125m"])
    ap.add_argument("--formats", nargs="+", default=["native", "hf", "onnx", "gguf", "tensorrt"])
    ap.add_argument("--gguf-types", nargs="+", default=["f32", "f16", "bf16", "q8_0"])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# exporter benchmark: torch {torch.__version__}, {args.threads} threads, {platform.processor() or platform.machine()}, "
          f"load average {os.getloadavg()[0]:.1f}; random-init weights")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        tok = root / "tokenizer.model"
        tok.write_bytes(train_tokenizer(stdlib_texts(), TokenizerConfig(vocab_size=8192, input_sentence_size=200_000)))
        print(f"tokenizer: 8192 pieces trained in {time.perf_counter() - t:.1f} s")
        for preset in args.presets:
            bench_preset(preset, tok, root, args.formats, args.gguf_types)
    print(f"\nload average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
