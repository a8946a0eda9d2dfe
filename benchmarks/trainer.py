"""Trainer overhead and checkpoint stall (CPU), or throughput and MFU (GPU).

CPU (default), three loops on the same batches, interleaved in blocks (the order rotating
every block) so that load from other processes hits all alike:

- bare GPT: a minimal GPT-2-style model written here (nanoGPT's: LayerNorm, fused c_attn,
  GELU MLP, SDPA causal, learned positions, tied embeddings, no biases) with the preset's
  layers, width, heads, vocabulary and sequence length, and the same FLOPs per token: the
  Helox presets give GQA with K = H/2 and SwiGLU with F = 3C, i.e. 3C^2 + 9C^2 = 12C^2 per
  layer, GPT-2's 4C^2 + 8C^2 (printed: 6N + 12*L*H*Q*T for both);
- bare Helox: forward, cross-entropy, backward, AdamW of the Helox model, nothing else (on fp32,
  the head and the loss in one blocked pass, as the Trainer runs them: shared.model.loss);
- full: the `Trainer` with its default monitoring (probes at their cadence, an emitter doing
  some JSON work per log, per-layer grad norms, clipping, checkpoints mid-run).

Targets: bare Helox / bare GPT (the model's own cost) and full / bare GPT >= 1.0; full / bare
Helox >= 0.95; checkpoint step <= 1.5x the median step. The load average is printed with the
figures: on a loaded machine every OpenMP barrier waits for a descheduled thread, which taxes
many small kernels more than few large ones (`--threads 1` takes the barriers out).

    python benchmarks/trainer.py                       # 10m preset, seq 256, batch 8, 100 steps each
    python benchmarks/trainer.py --steps 30 --threads 1   # quicker; no thread barriers
    python benchmarks/trainer.py --emitter pkg.mod:make_emitter   # plug another emitter (e.g. the bus outbox)
    python benchmarks/trainer.py --preset 125m --compile --bf16   # GPU: tokens/s and MFU

Prints its setup, the figures and the ratios.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.trainer.config import TrainConfig
from services.trainer.data import InMemoryBatchSource, synthetic_tokens
from services.trainer.hooks import Callback
from services.trainer.loop import Trainer
from services.trainer.optim import build_optimizer
from shared.model import Llama, ModelConfig
from shared.model.loss import linear_cross_entropy


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


class GPT(nn.Module):
    """nanoGPT's model at `bias=False, dropout=0` (its train.py defaults), for the baseline."""

    class Block(nn.Module):
        def __init__(self, C: int, H: int) -> None:
            super().__init__()
            self.H = H
            self.ln_1 = nn.LayerNorm(C, bias=False)
            self.c_attn = nn.Linear(C, 3 * C, bias=False)
            self.attn_proj = nn.Linear(C, C, bias=False)
            self.ln_2 = nn.LayerNorm(C, bias=False)
            self.c_fc = nn.Linear(C, 4 * C, bias=False)
            self.mlp_proj = nn.Linear(4 * C, C, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            B, T, C = x.shape
            q, k, v = (t.view(B, T, self.H, C // self.H).transpose(1, 2)
                       for t in self.c_attn(self.ln_1(x)).split(C, dim=2))  # [B, H, T, D]
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.attn_proj(y.transpose(1, 2).contiguous().view(B, T, C))
            return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))

    def __init__(self, vocab_size: int, n_layer: int, n_head: int, d_model: int, block_size: int) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab_size, d_model)
        self.wpe = nn.Embedding(block_size, d_model)
        self.h = nn.ModuleList(GPT.Block(d_model, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d_model, bias=False)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        self.wte.weight = self.lm_head.weight  # tied
        self.n_layer, self.n_head, self.d_model = n_layer, n_head, d_model
        for name, p in self.named_parameters():
            if p.dim() == 2:  # nanoGPT's init: N(0, 0.02), residual projections / sqrt(2L)
                std = 0.02 / math.sqrt(2 * n_layer) if name.endswith("proj.weight") else 0.02
                nn.init.normal_(p, 0.0, std)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.size(1), device=idx.device))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))  # [B, T, V]

    def flops_per_token(self, seq_len: int) -> float:
        """6N + 12*L*H*Q*T, N without the position table (nanoGPT's non-embedding count; the tied wte is the head)."""
        n = sum(p.numel() for p in self.parameters()) - self.wpe.weight.numel()
        return 6.0 * n + 12.0 * self.n_layer * self.d_model * seq_len  # H * Q = d_model


def gpt_like(m: ModelConfig, seq_len: int) -> GPT:
    return GPT(m.vocab_size, m.n_layer, m.n_head, m.d_model, seq_len)


class BareLoop:
    """Forward, mean cross-entropy, backward, AdamW: nothing else (the Helox model, or the GPT baseline)."""

    def __init__(self, cfg: TrainConfig, device: torch.device, compile: bool, autocast_dtype, *,
                 gpt: bool = False) -> None:
        torch.manual_seed(cfg.seed)
        mcfg = cfg.model_config_resolved()
        self.model = (gpt_like(mcfg, cfg.batch.seq_len) if gpt else Llama(mcfg)).to(device)
        if compile and not gpt:
            for block in self.model.layers:
                block.compile()
        self.opt = build_optimizer(self.model, cfg.optim, device)
        self.data, self.device, self.dtype = source(cfg), device, autocast_dtype
        self.fused = not gpt and autocast_dtype is None and cfg.fused_loss

    def step(self) -> int:
        b = next(self.data)
        ids, labels = b["input_ids"].to(self.device), b["labels"].to(self.device)
        if self.fused:  # the Trainer's fp32 path: head and loss in one blocked pass
            n = labels.numel()
            hidden = self.model.hidden_states(ids).flatten(0, 1)
            weights = torch.full((n,), 1.0 / n, device=self.device)
            linear_cross_entropy(hidden, self.model.lm_head.weight, labels.flatten(), weights)[0].backward()
        else:
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
    gpt = BareLoop(cfg, device, compile=False, autocast_dtype=None, gpt=True)
    mcfg = cfg.model_config_resolved()
    print(f"setup: preset={args.preset} ({mcfg.num_params() / 1e6:.1f}M params) seq={args.seq_len} batch={args.batch} "
          f"steps={args.steps} each (+{warmup} warm-up) in blocks of {args.block}; probes every {args.probe_every}, "
          f"log every {args.log_every} -> emitter={args.emitter}, checkpoints at steps {ckpt_steps}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    helox_fpt, gpt_fpt = mcfg.flops_per_token(args.seq_len), gpt.model.flops_per_token(args.seq_len)
    print(f"FLOPs/token (6N + 12*L*H*Q*T): Helox {helox_fpt / 1e6:.2f}M (GQA {mcfg.n_head}/{mcfg.n_kv_head} heads, "
          f"SwiGLU {mcfg.ffn_hidden}), GPT {gpt_fpt / 1e6:.2f}M (MHA {mcfg.n_head} heads, GELU {4 * mcfg.d_model}); "
          f"ratio {helox_fpt / gpt_fpt:.3f}")

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
        gpt.step()
    tokens = args.batch * args.seq_len
    bare_t: list[float] = []
    gpt_t: list[float] = []
    full_t: dict[int, float] = {}
    # CPU time of this thread per step: with one torch thread the kernels run here, so it counts
    # the work and not the waits that other processes' load adds (checkpoint writes run elsewhere).
    cpu_t: dict[str, list[float]] = {"gpt": [], "bare": [], "full": []}

    def clocked(kind: str, fn) -> float:
        c = time.thread_time()
        wall = timed(fn, device)
        cpu_t[kind].append(time.thread_time() - c)
        return wall

    def run_gpt(n: int) -> None:
        gpt_t.extend(clocked("gpt", gpt.step) for _ in range(n))

    def run_bare(n: int) -> None:
        bare_t.extend(clocked("bare", bare.step) for _ in range(n))

    def run_full(n: int) -> None:
        for _ in range(n):
            step = trainer.state.step + 1
            if step in ckpt_steps:
                trainer.request_checkpoint("benchmark", kind="command")  # applied before this step runs
            full_t[step] = clocked("full", trainer.step)

    runners = [run_gpt, run_bare, run_full]
    loads = [os.getloadavg()[0]]
    done = block = 0
    while done < args.steps:
        n = min(args.block, args.steps - done)
        for run in runners[block % 3:] + runners[:block % 3]:  # rotate the order: no loop always runs first
            run(n)
        loads.append(os.getloadavg()[0])
        done += n
        block += 1
    t_end = time.perf_counter()
    trainer.checkpointer.wait()
    write_tail = time.perf_counter() - t_end
    result = trainer.finish()
    trainer.close()

    gpt_tps = tokens * len(gpt_t) / sum(gpt_t)
    bare_tps = tokens * len(bare_t) / sum(bare_t)
    full_tps = tokens * len(full_t) / sum(full_t.values())
    plain = [t for s, t in full_t.items() if s not in ckpt_steps and s % args.probe_every]
    median_full = statistics.median(plain)
    median_bare = statistics.median(bare_t)
    median_gpt = statistics.median(gpt_t)
    probe_steps = [t for s, t in full_t.items() if s % args.probe_every == 0]

    def spread(ts: list[float]) -> str:
        q = statistics.quantiles(ts, n=10)
        return f"median {statistics.median(ts) * 1e3:.0f} ms, p90 {q[-1] * 1e3:.0f} ms, max {max(ts) * 1e3:.0f} ms"

    print(f"load:       1-min load average {min(loads):.1f}-{max(loads):.1f} over the run "
          f"(at the block boundaries: {', '.join(f'{x:.1f}' for x in loads)}) on {os.cpu_count()} CPUs")
    print(f"bare GPT:   {gpt_tps:8.0f} tokens/s  (step {spread(gpt_t)})")
    print(f"bare Helox: {bare_tps:8.0f} tokens/s  (step {spread(bare_t)})")
    print(f"full loop:  {full_tps:8.0f} tokens/s  (step {spread(list(full_t.values()))})")
    print("ratios (tokens/s; in brackets the median-step ratio, which a burst of load moves less):")
    print(f"  model:    bare Helox / bare GPT = {bare_tps / gpt_tps:.3f} [{median_gpt / median_bare:.3f}]  (target >= 1.0)")
    print(f"  vs GPT:   full / bare GPT       = {full_tps / gpt_tps:.3f} [{median_gpt / median_full:.3f}]  (target >= 1.0)")
    print(f"  overhead: full / bare Helox     = {full_tps / bare_tps:.3f} [{median_bare / median_full:.3f}]  "
          f"(target >= 0.95)")
    cpu = {k: sum(v) for k, v in cpu_t.items()}
    note = ("one torch thread: the load-robust figures" if torch.get_num_threads() == 1
            else f"{torch.get_num_threads()} torch threads: the other threads' work is not counted; use --threads 1")
    print(f"CPU time of the loop's thread per token ({note}): bare Helox / bare GPT = {cpu['gpt'] / cpu['bare']:.3f}, "
          f"full / bare GPT = {cpu['gpt'] / cpu['full']:.3f}, full / bare Helox = {cpu['bare'] / cpu['full']:.3f} "
          f"(step medians: GPT {statistics.median(cpu_t['gpt']) * 1e3:.0f} ms, Helox "
          f"{statistics.median(cpu_t['bare']) * 1e3:.0f} ms, full {statistics.median(cpu_t['full']) * 1e3:.0f} ms)")
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
    head_and_loss(mcfg, args.batch * args.seq_len)
    return 0


def head_and_loss(mcfg: ModelConfig, n: int, repeats: int = 15) -> None:
    """Forward + backward of the output head and a weighted token loss alone, three ways, alternating."""
    from torch.nn import LinearCrossEntropyOptions

    g = torch.Generator().manual_seed(0)
    hidden0 = torch.randn(n, mcfg.d_model, generator=g)
    weight0 = torch.randn(mcfg.vocab_size, mcfg.d_model, generator=g).mul_(0.02)
    labels = torch.randint(0, mcfg.vocab_size, (n,), generator=g)
    w = torch.full((n,), 1.0 / n)

    def plain(h, W):
        (F.cross_entropy(h @ W.T, labels, reduction="none") * w).sum().backward()

    def torch_chunked(h, W):
        (F.linear_cross_entropy(h, W, labels, reduction="none", options=LinearCrossEntropyOptions()) * w).sum().backward()

    def helox(h, W):
        linear_cross_entropy(h, W, labels, w)[0].backward()

    ways = {"logits + F.cross_entropy": plain, "F.linear_cross_entropy (chunked)": torch_chunked,
            "shared.model.loss.linear_cross_entropy": helox}
    times: dict[str, list[float]] = {k: [] for k in ways}
    for i in range(repeats + 2):
        for name, fn in ways.items():
            h, W = hidden0.clone().requires_grad_(), weight0.clone().requires_grad_()
            t = time.perf_counter()
            fn(h, W)
            if i >= 2:
                times[name].append(time.perf_counter() - t)
    base = statistics.median(times["logits + F.cross_entropy"])
    print(f"head + loss alone ({n} tokens x {mcfg.d_model} -> {mcfg.vocab_size}, forward + backward, medians of {repeats}):")
    for name, ts in times.items():
        print(f"  {name:<40} {statistics.median(ts) * 1e3:7.1f} ms  ({base / statistics.median(ts):.2f}x the plain one's speed)")


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
