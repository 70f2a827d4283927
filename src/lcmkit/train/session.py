"""The accelerate session of a run and the faults that stop it on every process."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any


class TrainingError(RuntimeError):
    """A fault that stops a run (non-finite steps, a failed checkpoint write, a damaged checkpoint): one line."""


class PeerFailed(TrainingError):
    """Another process of a multi-process run failed (and reported it); this one stops without a message."""


def _hook_steps(name: str, rank: int) -> set[int]:
    steps = set()
    for item in filter(None, os.environ.get(name, "").split(",")):
        step, _, only_rank = item.partition("@")
        if not only_rank or int(only_rank) == rank:
            steps.add(int(step))
    return steps


def on_main(accelerator: Any, fn: Callable[[], Any]) -> Any:
    """fn() on the main process only. An exception there is re-raised there and, as PeerFailed, on every other
    process, so that none of them waits forever at the next collective operation."""
    result, error = None, None
    if accelerator.is_main_process:
        try:
            result = fn()
        except Exception as e:
            error = e
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        message = broadcast_object_list([None if error is None else str(error)])[0]
        if message is not None and error is None:
            raise PeerFailed(message)
    if error is not None:
        raise error
    return result


@contextmanager
def accelerator_session(**kwargs: Any) -> Iterator[Any]:
    """An Accelerator whose process-wide state is reset on exit, so that a library user (or a test) can
    run several trainings with different settings in one process."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from lcmkit.train.sharding import enable_fsdp_on_cpu

    accelerator = Accelerator(**kwargs)
    try:
        enable_fsdp_on_cpu(accelerator)
        yield accelerator
        accelerator.wait_for_everyone()  # gloo can hang destroying a group whose peer already left
    finally:
        accelerator.end_training()
        AcceleratorState._reset_state(reset_partial_state=True)


def gather_counts(counts: dict[str, int], accelerator: Any) -> dict[str, int]:
    """Per-process counters summed over every process (the main process gets the total)."""
    if accelerator.num_processes == 1:
        return counts
    from accelerate.utils import gather_object

    total: dict[str, int] = {}
    for part in gather_object([counts]):
        for reason, n in part.items():
            total[reason] = total.get(reason, 0) + n
    return total
