"""Past one process: torchrun + DDP (optionally ZeroRedundancyOptimizer) or FSDP2 (optionally CPU offload).

Everything goes through torch.distributed; there is no home-made collective layer. State
dicts are saved "full" (unsharded, keyed by parameter name), so a checkpoint written by N
ranks resumes on M.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from .config import DistributedConfig
from .optim import optimizers_of


class DistributedConfigError(ValueError):
    """An impossible distributed setup."""


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    strategy: str = "none"  # none | ddp | fsdp
    zero: bool = False
    owns_group: bool = False  # init_distributed created the process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1 and dist.is_initialized()

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.active:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def broadcast_objects(self, objs: list[Any]) -> list[Any]:
        """Rank 0's list of Python objects, on every rank."""
        if not self.active:
            return objs
        box = [objs if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather_objects(self, obj: Any) -> list[Any]:
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def shutdown(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device(f"cuda:{local_rank}")
    return dev


def init_distributed(cfg: DistributedConfig, device: str = "auto") -> DistContext:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and join the process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    strategy = cfg.strategy
    if strategy == "auto":
        strategy = "ddp" if world > 1 else "none"
    if world == 1:
        strategy = "none"  # one process: nothing to replicate or shard
    elif strategy == "none":
        raise DistributedConfigError(
            f"launched with WORLD_SIZE={world} but distributed.strategy is 'none'; use ddp or fsdp, or run one process"
        )
    if cfg.zero and strategy == "fsdp":
        raise DistributedConfigError("distributed.zero applies to DDP; FSDP shards the optimizer state already")
    if cfg.cpu_offload and strategy != "fsdp" and world > 1:
        raise DistributedConfigError("distributed.cpu_offload needs strategy: fsdp")
    owns = False
    if world > 1 and not dist.is_initialized():
        backend = cfg.backend or ("nccl" if dev.type == "cuda" else "gloo")
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=cfg.timeout_s))
        owns = True
    return DistContext(rank, world, local_rank, dev, strategy, cfg.zero and strategy == "ddp", owns)


def wrap_model(model: nn.Module, ctx: DistContext, cfg: DistributedConfig) -> nn.Module:
    """DDP wrapper or FSDP2 sharding (per block, then the root); identity on one process."""
    if ctx.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    if ctx.strategy == "fsdp":
        from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

        kw: dict[str, Any] = {}
        if cfg.cpu_offload:
            # Pinned host memory speeds up the copies to the GPU; without a GPU there is nothing to pin for.
            kw["offload_policy"] = CPUOffloadPolicy(pin_memory=ctx.device.type == "cuda")
        for block in model.layers:
            fully_shard(block, **kw)
        fully_shard(model, **kw)
        return model
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module (FSDP2 shards in place, so only DDP and torch.compile wrap)."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def _param_names_in_group_order(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    names = {id(p): n for n, p in unwrap(model).named_parameters()}
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]


def _id_to_fqn(osd: dict[str, Any], names: list[str]) -> dict[str, Any]:
    state = {names[int(i)]: s for i, s in osd["state"].items()}
    groups = [{**g, "params": [names[int(i)] for i in g["params"]]} for g in osd["param_groups"]]
    return {"state": state, "param_groups": groups}


def _fqn_to_id(osd: dict[str, Any], names: list[str]) -> dict[str, Any]:
    index = {n: i for i, n in enumerate(names)}
    missing = [n for g in osd["param_groups"] for n in g["params"] if n not in index]
    if missing:
        raise DistributedConfigError(f"optimizer state names parameters this model lacks: {missing[:3]}")
    state = {index[n]: s for n, s in osd["state"].items()}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in osd["param_groups"]]
    return {"state": state, "param_groups": groups}


def get_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, ctx: DistContext
                   ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Unsharded model and optimizer state keyed by parameter name (complete on rank 0).

    Collective under FSDP and ZeRO: every rank must call it.
    """
    if ctx.zero:
        optimizer.consolidate_state_dict(to=0)
        osd = _id_to_fqn(optimizer.state_dict(), _param_names_in_group_order(model, optimizer)) if ctx.is_main else {}
        msd = unwrap(model).state_dict()
        return msd, osd
    offload = ctx.strategy == "fsdp"  # gather shards to rank 0's CPU; elsewhere tensors are already whole
    return get_state_dict(model, optimizers_of(optimizer),
                          options=StateDictOptions(full_state_dict=True, cpu_offload=offload))


def set_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict[str, torch.Tensor],
                   optim_state: dict[str, Any], ctx: DistContext) -> None:
    """Load full (unsharded, name-keyed) state on every rank; each rank keeps its shard."""
    if ctx.zero:
        unwrap(model).load_state_dict(model_state, strict=True)
        optimizer.load_state_dict(_fqn_to_id(optim_state, _param_names_in_group_order(model, optimizer)))
        return
    set_state_dict(model, optimizers_of(optimizer), model_state_dict=model_state, optim_state_dict=optim_state,
                   options=StateDictOptions(full_state_dict=True, strict=True))
