"""Process group, device and model wrapping for single-process, DDP and FSDP2 runs.

Launch with ``torchrun --nproc_per_node N train.py ...``: torchrun sets RANK / LOCAL_RANK / WORLD_SIZE and
the rendezvous variables, which is all this module reads. NCCL on GPUs, gloo on CPU.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os

import torch
import torch.distributed as dist
from torch import nn

@dataclasses.dataclass(frozen=True)
class DistContext:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    strategy: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.strategy == "fsdp"


def resolve_device(spec: str, local_rank: int = 0) -> torch.device:
    """``auto``: the GPU when triformer compiles its kernels for it, else the CPU (interpreter)."""
    import triformer

    if spec == "auto":
        spec = "cpu" if triformer.INTERPRET or not torch.cuda.is_available() else "cuda"
    if spec == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("trainer.device=cuda but no CUDA device is available")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init(device_spec: str, strategy: str) -> DistContext:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); a no-op for one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_spec, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
    return DistContext(rank, local_rank, world, device, strategy)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, ctx: DistContext) -> nn.Module:
    """DDP or FSDP2 around ``model`` (already on ``ctx.device``). FSDP2 also runs with one process."""
    if ctx.strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        # Shard each repeated block on its own (gathered just in time, freed after its forward/backward),
        # then the root, which picks up the remaining parameters (embeddings, final norm, head).
        for module in list(model.modules()):
            if isinstance(module, nn.ModuleList):
                for block in module:
                    fully_shard(block)
        fully_shard(model)
        return model
    if ctx.world_size == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)


@contextlib.contextmanager
def gradient_sync(model: nn.Module, ctx: DistContext, enabled: bool):
    """Skip the gradient all-reduce on accumulation micro-steps; only the last one communicates."""
    if enabled or ctx.world_size == 1:
        yield
    elif ctx.sharded:
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        with model.no_sync():
            yield


def total(value: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum over ranks (every rank gets it)."""
    if ctx.world_size > 1:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def mean(value: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Mean over ranks (every rank gets it)."""
    return total(value, ctx) / ctx.world_size


def gather_objects(obj, ctx: DistContext) -> list:
    """``obj`` of every rank, in rank order (small Python objects such as RNG states)."""
    if ctx.world_size == 1:
        return [obj]
    out = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(ctx: DistContext) -> None:
    if ctx.world_size > 1:
        dist.barrier()


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer, ctx: DistContext) -> tuple[dict, dict]:
    """Unsharded model and optimizer state dicts (a collective under FSDP: every rank must call it)."""
    if ctx.sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return unwrap(model).state_dict(), optimizer.state_dict()


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer | None, model_state: dict,
                    optimizer_state: dict | None, ctx: DistContext) -> None:
    if ctx.sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, model_state, options=options)
        if optimizer is not None:
            set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)
        return
    unwrap(model).load_state_dict(model_state)
    if optimizer is not None:
        optimizer.load_state_dict(optimizer_state)


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside DDP / torch.compile wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model
