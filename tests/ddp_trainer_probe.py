"""The generic Trainer on a small regression problem, run by test_multiprocess.py both under
`accelerate launch` (2 processes, each its own data) and in one process that emulates them (gradient
accumulation over the two processes' batches, interleaved): DDP averages gradients exactly as accumulation does.

Usage: python ddp_trainer_probe.py OUT (under accelerate launch)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

STEPS = 4


def rank_batches(rank: int) -> Iterator[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(100 + rank)
    while True:
        x = torch.randn(4, 8, generator=g)
        yield {"x": x, "y": torch.sin(x.sum(1, keepdim=True))}


def interleaved(world: int) -> Iterator[dict[str, torch.Tensor]]:
    streams = [rank_batches(r) for r in range(world)]
    while True:
        for stream in streams:
            yield next(stream)


class Batches:
    def __init__(self, make: Any):
        self.make = make

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self.make()


def train(out: Path, accumulation: int, batches: Batches) -> dict[str, torch.Tensor]:
    from lcmkit.train.loop import LoopSettings, Trainer, Update
    from lcmkit.train.session import accelerator_session

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    with accelerator_session(cpu=True) as acc:
        wrapped, optimizer = acc.prepare(model, optimizer)

        def loss_fn(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
            return torch.nn.functional.mse_loss(wrapped(batch["x"]), batch["y"]), {}

        settings = LoopSettings(max_steps=STEPS, batch_size=4, gradient_accumulation_steps=accumulation,
                                checkpoint_every=2, log_every=1, progress=False)  # fmt: skip
        update = Update("model", wrapped, optimizer, scheduler, loss_fn)
        Trainer(acc, settings, out, [update], batches, state={"model": model}).run()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


if __name__ == "__main__":
    import os

    from safetensors.torch import save_file

    out = Path(sys.argv[1])
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])  # set by accelerate launch (torchrun)
    assert world == 2, f"expected 2 processes, got {world}"
    weights = train(out, 1, Batches(lambda: rank_batches(rank)))
    if rank == 0:
        save_file(weights, str(out / "weights.safetensors"))
    (out / f"rank{rank}-done").write_text("ok")
