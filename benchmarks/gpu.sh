#!/usr/bin/env bash
# GPU figures through the real training loop (services/trainer/loop.py `Trainer`), one case at a time,
# each under its own time limit (150 s) so that the whole script stays within 10 minutes of device time:
#
#   125m   preset, bf16 autocast, torch.compile: tokens/s and MFU   (target >= 40% on H100/H200-class)
#   1b     preset, same                                            (target >= 45%)
#   fp16   125m, fp16 autocast + GradScaler: steps applied / skipped (overflow), the final loss scale
#   auto   125m, micro_batch_size: auto: the largest micro-batch that ran without OOM, and its tokens/s
#
# MFU = tokens/s x (6N + 12 L H Q T) / peak (FACTS.md), with the trainer's peak table for the device
# (override: PEAK_FLOPS=...). Data: synthetic token ids (throughput does not depend on them).
#
#   benchmarks/gpu.sh             # on a CUDA machine
#   benchmarks/gpu.sh --dry-run   # CPU: the tiny preset, fp32, a few steps, every case's code path
#                                 # (fp16 is refused on CPU by design: the case says so)
#   STEPS=30 CASE_TIMEOUT=150 benchmarks/gpu.sh   # shorter / longer cases
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
STEPS="${STEPS:-40}"
CASE_TIMEOUT="${CASE_TIMEOUT:-150}"
if [ "$DRY" = 1 ]; then STEPS="${STEPS_DRY:-6}"; CASE_TIMEOUT="${CASE_TIMEOUT_DRY:-240}"; fi
SCRIPT="$(mktemp -t helox-gpu-XXXXXX.py)"
trap 'rm -f "$SCRIPT"' EXIT

cat >"$SCRIPT" <<'PY'
import json, os, statistics, sys, tempfile, time
sys.path.insert(0, os.getcwd())
import torch
from services.trainer.config import TrainConfig
from services.trainer.data import InMemoryBatchSource, synthetic_tokens
from services.trainer.loop import Trainer
from services.trainer.metrics import FunctionEmitter
from shared.model import model_preset

case, steps, dry = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
device = "cpu" if dry else "cuda"
if not dry and not torch.cuda.is_available():
    print(json.dumps({"case": case, "error": "no CUDA device: run with --dry-run on CPU"}))
    sys.exit(3)
preset = {"125m": "125m", "1b": "1b", "fp16": "125m", "auto": "125m"}[case]
seq, batch = 2048, 16
if dry:
    preset, seq, batch = "tiny", 128, 8
    torch.set_num_threads(1)  # a shared CPU: two threads spin-wait on each other's barriers
precision = "fp32" if dry else ("fp16" if case == "fp16" else "bf16")
if dry and case == "fp16":
    print(json.dumps({"case": case, "skipped": "fp16 autocast is refused on CPU (precision.py); "
                      "the GPU run takes this path"}))
    sys.exit(0)
warm = 2 if dry else 10
log_every = 1 if dry else 5
vocab = model_preset(preset).vocab_size
cfg = TrainConfig(
    model=preset, max_steps=warm + steps, seed=0, device=device, precision=precision, compile=not dry,
    peak_flops=float(os.environ["PEAK_FLOPS"]) if os.environ.get("PEAK_FLOPS") else None,
    optim={"lr": 3e-4, "warmup_steps": 5},
    batch={"global_batch_size": batch, "micro_batch_size": "auto" if case == "auto" else (batch if dry else 8),
           "seq_len": seq},
    probes={"enabled": False}, checkpoint={"every": None},
    log={"every": log_every, "structlog": False, "wandb": {"mode": "disabled"}},
)
data = InMemoryBatchSource({"code": synthetic_tokens(2_000_000 if not dry else 50_000, vocab, seed=1)},
                           seq_len=seq, batch_size=batch, seed=0)
logged = []
t0 = time.perf_counter()
with tempfile.TemporaryDirectory() as out:
    trainer = Trainer(cfg, data, out, callbacks=[FunctionEmitter(logged.append)])
    result = trainer.fit()
wall = time.perf_counter() - t0
timed = [m for m in logged if m.get("step", 0) > warm]
tps = statistics.median(m["tokens_per_s"] for m in timed) if timed else None
mfus = [m["mfu"] for m in timed if m.get("mfu") is not None]
row = {
    "case": case, "device": torch.cuda.get_device_name() if not dry else "cpu (dry run)", "preset": preset,
    "params_M": round(model_preset(preset).num_params() / 1e6, 1), "precision": precision, "compile": not dry,
    "seq_len": seq, "global_batch": batch, "micro_batch": trainer.curriculum.max_micro,
    "steps": result.final_step, "tokens_per_s": round(tps) if tps else None,
    "mfu": round(statistics.median(mfus), 4) if mfus else None, "wall_s": round(wall, 1),
    "skipped_steps": result.skipped_steps, "final_loss": round(result.losses[max(result.losses)], 4),
}
if case == "fp16":
    row["loss_scale"] = trainer.precision.loss_scale
    row["applied_steps"] = result.final_step - result.skipped_steps
if not dry:
    row["max_memory_GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
print(json.dumps(row))
PY

echo "helox GPU figures ($(date -u +%FT%TZ)); dry run: $DRY; steps per case: $STEPS; limit per case: ${CASE_TIMEOUT}s"
if [ "$DRY" = 0 ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "nvidia-smi: not found"
fi
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"
status=0
for case in 125m 1b fp16 auto; do
  echo "--- $case"
  timeout --signal=KILL "$CASE_TIMEOUT" "$PY" "$SCRIPT" "$case" "$STEPS" "$DRY" 2>&1 | grep -E '^\{|Error|error' | tail -5
  rc=${PIPESTATUS[0]}
  if [ "$rc" -ne 0 ]; then echo "{\"case\": \"$case\", \"rc\": $rc, \"note\": \"failed or ran past ${CASE_TIMEOUT}s\"}"; status=1; fi
done
echo "targets: 125m mfu >= 0.40, 1b mfu >= 0.45 (H100/H200-class bf16); fp16 skipped_steps counted; auto micro_batch reported"
exit $status
