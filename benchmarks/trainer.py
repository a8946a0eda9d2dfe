"""Trainer overhead and checkpoint stall (CPU), or throughput and MFU (GPU).

CPU (default): the full loop (probes at their default cadence, an emitter doing some JSON
work per log, per-layer grad norms, clipping, one checkpoint mid-run) against a bare loop
(forward, cross-entropy, backward, AdamW) of the same model on the same batches. The two
run interleaved in blocks so that load from other processes hits both alike.
Targets: full/bare tokens/s >= 0.95; checkpoint step <= 1.5x the median step.

    python benchmarks/trainer.py                       # 10m preset, seq 256, batch 8, 100 steps each
    python benchmarks/trainer.py --emitter pkg.mod:make_emitter   # plug another emitter (e.g. the bus outbox)
    python benchmarks/trainer.py --preset 125m --compile --bf16   # GPU: tokens/s and MFU

Prints its setup, the figures and the ratios.
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.trainer.config import TrainConfig
from services.trainer.data import InMemoryBatchSource, synthetic_tokens
from services.trainer.hooks import Callback
from services.trainer.loop import Trainer
from services.trainer.optim import build_optimizer
from shared.model import Llama


class JsonWorkEmitter(Callback):
    """Stands in for the bus outbox: serialise the metrics and keep the line."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def on_log(self, trainer, metrics) -> None:
        self.lines.append(json.dumps(metrics, default=float))


class Watch(Callback):
    def __init__(self) -> None:
        self.metrics: list[dict] = []

    def on_log(self, trainer, metrics) -> None:
        self.metrics.append(metrics)


def make_emitter(spec: str) -> list[Callback]:
    if spec == "none":
        return []
    if spec == "json":
        return [JsonWorkEmitter()]
    module, _, attr = spec.partition(":")
    return [getattr(importlib.import_module(module), attr)()]


def source(cfg: TrainConfig, seed: int = 0) -> InMemoryBatchSource:
    V = cfg.model_config_resolved().vocab_size
    tokens = {"a": synthetic_tokens(200_000, V, seed=1), "b": synthetic_tokens(200_000, V, seed=2, structure=11)}
    return InMemoryBatchSource(tokens, seq_len=cfg.batch.seq_len, batch_size=cfg.batch.micro_batch_size, seed=seed)


class BareLoop:
    """Forward, mean cross-entropy, backward, AdamW: nothing else."""

    def __init__(self, cfg: TrainConfig, device: torch.device, compile: bool, autocast_dtype) -> None:
        torch.manual_seed(cfg.seed)
        self.model = Llama(cfg.model_config_resolved()).to(device)
        if compile:
            for block in self.model.layers:
                block.compile()
        self.opt = build_optimizer(self.model, cfg.optim, device)
        self.data, self.device, self.dtype = source(cfg), device, autocast_dtype

    def step(self) -> int:
        b = next(self.data)
        ids, labels = b["input_ids"].to(self.device), b["labels"].to(self.device)
        ctx = torch.autocast(self.device.type, dtype=self.dtype) if self.dtype else torch.enable_grad()
        with ctx:
            logits = self.model(ids)
        F.cross_entropy(logits.float().flatten(0, 1), labels.flatten()).backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return ids.numel()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def cpu_mode(args) -> int:
    warmup = 3
    every = max(1, args.steps // (args.checkpoints + 1))
    ckpt_steps = [warmup + every * (i + 1) for i in range(args.checkpoints)]
    cfg = TrainConfig(
        model=args.preset, max_steps=warmup + args.steps, precision="fp32", device="cpu",
        batch={"global_batch_size": args.batch, "micro_batch_size": args.batch, "seq_len": args.seq_len},
        probes={"enabled": True, "every": args.probe_every},
        log={"every": args.log_every, "structlog": False, "wandb": {"mode": "disabled"}},
        checkpoint={"every": None, "keep_last": 2},
    )
    device = torch.device("cpu")
    out = Path(tempfile.mkdtemp(prefix="helox-bench-"))
    watch = Watch()
    trainer = Trainer(cfg, source(cfg), out, callbacks=[*make_emitter(args.emitter), watch])
    bare = BareLoop(cfg, device, compile=False, autocast_dtype=None)
    mcfg = cfg.model_config_resolved()
    print(f"setup: preset={args.preset} ({mcfg.num_params() / 1e6:.1f}M params) seq={args.seq_len} batch={args.batch} "
          f"steps={args.steps} each (+{warmup} warm-up) in blocks of {args.block}; probes every {args.probe_every}, "
          f"log every {args.log_every} -> emitter={args.emitter}, checkpoints at steps {ckpt_steps}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")

    # The stall the loop pays for a checkpoint: the collection + CPU snapshot inside `checkpointer.save`.
    snapshot_s: list[float] = []
    real_save = trainer.checkpointer.save

    def timed_save(*a, **k):
        t = time.perf_counter()
        try:
            return real_save(*a, **k)
        finally:
            snapshot_s.append(time.perf_counter() - t)

    trainer.checkpointer.save = timed_save
    trainer.start()
    for _ in range(warmup):
        trainer.step()
        bare.step()
    tokens = args.batch * args.seq_len
    bare_t: list[float] = []
    full_t: dict[int, float] = {}
    done = 0
    while done < args.steps:
        n = min(args.block, args.steps - done)
        for _ in range(n):
            bare_t.append(timed(bare.step, device))
        for _ in range(n):
            step = trainer.state.step + 1
            if step in ckpt_steps:
                trainer.request_checkpoint("benchmark", kind="command")  # applied before this step runs
            full_t[step] = timed(trainer.step, device)
        done += n
    t_end = time.perf_counter()
    trainer.checkpointer.wait()
    write_tail = time.perf_counter() - t_end
    result = trainer.finish()
    trainer.close()

    bare_tps = tokens * len(bare_t) / sum(bare_t)
    full_tps = tokens * len(full_t) / sum(full_t.values())
    plain = [t for s, t in full_t.items() if s not in ckpt_steps and s % args.probe_every]
    median_full = statistics.median(plain)
    median_bare = statistics.median(bare_t)
    probe_steps = [t for s, t in full_t.items() if s % args.probe_every == 0]

    def spread(ts: list[float]) -> str:
        q = statistics.quantiles(ts, n=10)
        return f"median {statistics.median(ts) * 1e3:.0f} ms, p90 {q[-1] * 1e3:.0f} ms, max {max(ts) * 1e3:.0f} ms"

    print(f"bare loop:  {bare_tps:8.0f} tokens/s  (step {spread(bare_t)})")
    print(f"full loop:  {full_tps:8.0f} tokens/s  (step {spread(list(full_t.values()))})")
    print(f"overhead:   full/bare tokens/s = {full_tps / bare_tps:.3f}  (target >= 0.95); "
          f"median-step ratio = {median_bare / median_full:.3f} (robust to load from other processes)")
    if probe_steps:
        print(f"probe step: {statistics.mean(probe_steps) * 1e3:.0f} ms ({len(probe_steps)} probe(s) in the run)")
    ratios = [full_t[s] / median_full for s in ckpt_steps]
    after = [full_t[s + 1] / median_full for s in ckpt_steps if s + 1 in full_t]
    print(f"checkpoint: steps with a checkpoint = {', '.join(f'{r:.2f}x' for r in ratios)} the median step "
          f"(median {statistics.median(ratios):.2f}x, target <= 1.5x); snapshot stall "
          f"{statistics.median(snapshot_s) * 1e3:.0f} ms; the step after: {', '.join(f'{r:.2f}x' for r in after)}; "
          f"writes run in the background (last one finished {write_tail:.1f} s after the loop)")
    last = watch.metrics[-1] if watch.metrics else {}
    mfu_value = last.get("mfu")
    print(f"trainer metrics: tokens_per_s={last.get('tokens_per_s', 0):.0f} "
          f"mfu={mfu_value if mfu_value is None else round(mfu_value, 3)} (CPU peak estimated from /proc/cpuinfo) "
          f"final_step={result.final_step}")
    return 0


def gpu_mode(args) -> int:
    if not torch.cuda.is_available():
        print("GPU mode (--compile/--bf16/--device cuda) needs a CUDA device; none is available here.")
        return 2
    device = torch.device("cuda")
    warmup = args.gpu_warmup
    cfg = TrainConfig(
        model=args.preset, max_steps=warmup + args.steps, precision="bf16" if args.bf16 else "auto", device="cuda",
        compile=args.compile,
        batch={"global_batch_size": args.batch, "micro_batch_size": args.batch, "seq_len": args.seq_len},
        probes={"enabled": True, "every": args.probe_every},
        log={"every": args.log_every, "structlog": False, "wandb": {"mode": "disabled"}},
        checkpoint={"every": None},
        peak_flops=args.peak_flops,
    )
    out = Path(tempfile.mkdtemp(prefix="helox-bench-"))
    watch = Watch()
    trainer = Trainer(cfg, source(cfg), out, callbacks=[*make_emitter(args.emitter), watch])
    mcfg = cfg.model_config_resolved()
    print(f"setup: {torch.cuda.get_device_name(device)}, preset={args.preset} ({mcfg.num_params() / 1e6:.0f}M) "
          f"seq={args.seq_len} batch={args.batch} precision={trainer.precision.mode} compile={args.compile} "
          f"peak={trainer.peak_flops or float('nan'):.3g} FLOP/s, {args.steps} timed steps after {warmup} warm-up")
    trainer.start()
    for _ in range(warmup):
        trainer.step()
    times = [timed(trainer.step, device) for _ in range(args.steps)]
    tokens = args.batch * args.seq_len
    tps = tokens * len(times) / sum(times)
    fpt = mcfg.flops_per_token(args.seq_len)
    peak = trainer.peak_flops or float("nan")  # unknown GPU: pass --peak-flops
    print(f"full loop: {tps:,.0f} tokens/s, MFU {tps * fpt / peak:.1%} "
          f"(median step {statistics.median(times) * 1e3:.1f} ms)")
    trainer.close()
    del trainer
    torch.cuda.empty_cache()

    bare = BareLoop(cfg, device, compile=args.compile, autocast_dtype=torch.bfloat16 if args.bf16 else None)
    for _ in range(warmup):
        bare.step()
    bt = [timed(bare.step, device) for _ in range(args.steps)]
    btps = tokens * len(bt) / sum(bt)
    print(f"bare loop: {btps:,.0f} tokens/s, MFU {btps * fpt / peak:.1%}; full/bare = {tps / btps:.3f}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default=None, help="model preset (default: 10m on CPU, 125m on GPU)")
    ap.add_argument("--seq-len", type=int, default=None, help="default: 256 on CPU, 2048 on GPU")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=None, help="timed steps per loop (default: 100 CPU, 50 GPU)")
    ap.add_argument("--block", type=int, default=10, help="steps per interleaved block (CPU)")
    ap.add_argument("--checkpoints", type=int, default=3, help="checkpoints during the timed full loop (CPU)")
    ap.add_argument("--probe-every", type=int, default=TrainConfig().probes.every)
    ap.add_argument("--log-every", type=int, default=TrainConfig().log.every)
    ap.add_argument("--emitter", default="json", help="json | none | module:factory returning a Callback")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--gpu-warmup", type=int, default=10)
    ap.add_argument("--peak-flops", type=float, default=None, help="device peak FLOP/s for MFU (default: a table)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    args = ap.parse_args()
    gpu = args.device == "cuda" or args.compile or args.bf16
    args.preset = args.preset or ("125m" if gpu else "10m")
    args.seq_len = args.seq_len or (2048 if gpu else 256)
    args.steps = args.steps or (50 if gpu else 100)
    if args.threads:
        torch.set_num_threads(args.threads)
    return gpu_mode(args) if gpu else cpu_mode(args)


if __name__ == "__main__":
    sys.exit(main())
