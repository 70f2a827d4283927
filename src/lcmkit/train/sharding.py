"""Sharded training (FSDP2 through accelerate): what the trainer and the recipe need around it.

The sharding itself is accelerate's (`accelerate launch --use_fsdp --fsdp_version 2`, or an accelerate config with
FSDP: docs/fsdp.md): prepared models hold DTensor parameters, each process a shard. lcmkit only
- turns accelerate's FSDP2 on for CPU processes too (gloo; accelerate enables FSDP for accelerators only), so the
  same code path runs in the test suite;
- gathers full tensors (collectively, on every process) before the main process writes a checkpoint or the
  outputs, and shards them again when a checkpoint is loaded.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor


def fsdp_requested() -> bool:
    """accelerate's launcher (or config) asked for FSDP."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def enable_fsdp_on_cpu(accelerator: Any) -> None:
    """Under `accelerate launch --use_fsdp` on CPU processes (ACCELERATE_USE_CPU=1, gloo), accelerate leaves FSDP off;
    set the state it sets for accelerators, with the plugin it builds from the launcher's environment. FSDP2 itself
    runs on CPU (DTensor over gloo)."""
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = accelerator.state
    if not fsdp_requested() or state.distributed_type != DistributedType.MULTI_CPU:
        return
    plugin = FullyShardedDataParallelPlugin()
    if plugin.fsdp_version != 2:
        from lcmkit.errors import ConfigError

        raise ConfigError("FSDP on CPU processes: use FSDP2 (accelerate launch --use_fsdp --fsdp_version 2)")
    from accelerate.state import PartialState

    # AcceleratorState copies the process state's distributed_type whenever it is instantiated again (e.g. by an
    # AcceleratedOptimizer): set it on both.
    PartialState().distributed_type = DistributedType.FSDP
    state.distributed_type, state.fsdp_plugin = DistributedType.FSDP, plugin


def is_sharded(accelerator: Any) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.state.distributed_type == DistributedType.FSDP


def _is_dtensor(x: Any) -> bool:
    return type(x).__name__ == "DTensor"


def gathered(obj: Any) -> Any:
    """A state structure with every sharded tensor (DTensor) replaced by its full tensor. Collective: every process
    must call it, in the same order."""
    if _is_dtensor(obj):
        return obj.full_tensor()
    if isinstance(obj, dict):
        return {k: gathered(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(gathered(v) for v in obj)
    return obj


def sharded_like(loaded: Any, current: Any) -> Any:
    """`loaded` (full tensors) sharded as the matching DTensors of `current` are (same mesh and placements)."""
    from torch.distributed.tensor import distribute_tensor

    if _is_dtensor(current) and isinstance(loaded, Tensor) and not _is_dtensor(loaded):
        return distribute_tensor(loaded.to(current.dtype), current.device_mesh, current.placements)
    if isinstance(loaded, dict) and isinstance(current, dict):
        return {k: sharded_like(v, current[k]) if k in current else v for k, v in loaded.items()}
    if isinstance(loaded, (list, tuple)) and isinstance(current, (list, tuple)) and len(loaded) == len(current):
        return type(loaded)(sharded_like(a, b) for a, b in zip(loaded, current))
    return loaded


def sharded_optimizer_state(loaded: dict[str, Any], optimizer: Any) -> dict[str, Any]:
    """A full optimizer state (from a checkpoint) sharded like the parameters it belongs to: moments of a DTensor
    parameter become DTensors with its placements (scalars such as Adam's step stay as they are)."""
    from torch.distributed.tensor import distribute_tensor

    params = [p for group in optimizer.param_groups for p in group["params"]]
    ids = [i for group in loaded["param_groups"] for i in group["params"]]
    state = {}
    for i, values in loaded["state"].items():
        p = params[ids.index(i)]
        state[i] = {
            k: distribute_tensor(v, p.device_mesh, p.placements)
            if _is_dtensor(p) and isinstance(v, Tensor) and v.shape == p.shape else v
            for k, v in values.items()
        }  # fmt: skip
    return {**loaded, "state": state}


class ShardedState:
    """Wraps a checkpointed object of a sharded run: state_dict() gathers (collectively), load_state_dict() shards."""

    def __init__(self, obj: Any):
        self.obj = obj

    def state_dict(self) -> Any:
        return gathered(self.obj.state_dict())

    def load_state_dict(self, state: Any) -> None:
        if isinstance(state, dict) and "param_groups" in state:
            self.obj.load_state_dict(sharded_optimizer_state(state, self.obj))
        else:
            self.obj.load_state_dict(sharded_like(state, self.obj.state_dict()))


def reshard(*nets: Any) -> None:
    """Put sharded models back into their shards. FSDP2 keeps a root module's parameters gathered after a forward
    that has no backward (the EMA target's), and elementwise updates across models need both sharded alike."""
    from torch.distributed.fsdp import FSDPModule

    for net in nets:
        for module in net.modules():
            if isinstance(module, FSDPModule):
                module.reshard()


def unsharded(net: Any, accelerator: Any) -> Any:
    """A plain copy of a sharded diffusers model with its full weights, on the main process (None elsewhere).
    Collective: every process gathers."""
    if net is None:
        return None
    state = gathered(net.state_dict())
    if not accelerator.is_main_process:
        return None
    cls = next(c for c in type(net).__mro__[1:] if hasattr(c, "from_config") and "FSDP" not in c.__name__)
    copy = cls.from_config(net.config)
    copy.load_state_dict(state)
    return copy.to(next(iter(state.values())).dtype)


def full_norm(norm: Any) -> torch.Tensor:
    """A gradient norm as a plain tensor (FSDP2 reports a DTensor)."""
    return norm.full_tensor() if _is_dtensor(norm) else torch.as_tensor(norm)
