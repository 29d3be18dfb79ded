"""Launched by tests/test_distributed.py under torchrun: lorakit starts the process group, then the script just ends.

An atexit handler registered *before* lorakit's (atexit runs last-registered first, so this one runs after it) prints
whether the group is still alive at interpreter exit. Gloo's worker threads alive at finalisation abort the process
("terminate called without an active exception", seen in CI), so lorakit must have destroyed the group by then.
"""
import atexit

import torch.distributed as dist


def report() -> None:
    print(f"group alive at exit: {dist.is_initialized()}", flush=True)


atexit.register(report)

from lorakit.train import distributed as dist_utils  # noqa: E402

info = dist_utils.setup()
assert info.enabled
dist_utils.barrier(info)
