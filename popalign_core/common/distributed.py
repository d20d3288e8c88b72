"""Multi-process facts and mixed precision for the trainers and the population sampler (`Distributed`).

One process or many (``torchrun`` / ``accelerate launch``, on GPUs or CPU with gloo): rank, world size, device, and
the few collective operations the core needs (a sum over processes, a barrier).
"""

from __future__ import annotations

import contextlib

import torch


class Distributed:
    """Process-group facts from accelerate (torchrun / accelerate launch), plus mixed precision.

    Autocast and the fp16 gradient scaler are handled here with torch's own API rather than through accelerate's
    process-wide `AcceleratorState`, whose precision cannot change within one process: ComfyUI (and tests) run several
    trainings with different settings in one process.
    """

    def __init__(self, mixed_precision: str):
        from accelerate import Accelerator

        cuda = torch.cuda.is_available()
        # cpu=True is what makes accelerate see a torchrun / multi-process launch on a machine without CUDA
        self.acc = Accelerator(cpu=not cuda)
        self.rank = self.acc.process_index
        self.world = self.acc.num_processes
        self.device = self.acc.device
        self.main = self.acc.is_main_process
        mp = mixed_precision
        if self.device.type == "cpu" and mp == "fp16":
            mp = "bf16"  # CPU autocast runs in bfloat16; fp16 is a GPU format
        self.mixed_precision = mp
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mp)
        self.scaler = torch.amp.GradScaler("cuda") if (mp == "fp16" and self.device.type == "cuda") else None

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def unscale(self, opt) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(opt)

    def step(self, opt) -> None:
        if self.scaler is not None:
            self.scaler.step(opt)
            self.scaler.update()
        else:
            opt.step()

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world == 1:
            return t
        import torch.distributed as dist

        t = t.clone().to(self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.cpu() if t.device.type != "cpu" else t

    def barrier(self):
        if self.world > 1:
            self.acc.wait_for_everyone()
