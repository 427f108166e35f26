"""
Many processes, one training run: the process group, the collectives we use, DDP and FSDP2, and signals.

The idea. `torchrun --nproc_per_node=N` starts N copies of the same script. Each copy (a rank) holds
the model, trains on its own slice of every global batch, and the ranks average their gradients so that
every rank takes the same optimizer step: the result equals one process training on the whole batch
(tests/test_train.py checks DDP and FSDP against each other). Two ways to hold the model:
    DDP   every rank keeps all weights, gradients and optimizer state; gradients are all-reduced
          (summed, then divided by N) in buckets while the backward pass runs.
    FSDP2 every rank keeps 1/N of each weight, gradient and optimizer moment (a DTensor shard); a unit
          (a conv level, a transformer block) all-gathers its weights just before it runs and frees
          them after, and gradients are reduce-scattered: each rank receives the average of its shard.
          Memory per GPU for the state falls by N; each unit's weights cross the network three times
          per step instead of the gradients once.
Everything else a rank must agree on -- which checkpoint to resume, whether a step was non-finite,
whether someone pressed Ctrl-C -- is decided by a small collective, so ranks never diverge or hang;
the per-step ones are read one step late (LaggedFlags), so the GPU never waits for the host.

Symbols: N -> world size, r -> rank.  Choices: NCCL on GPUs and gloo on CPUs (the tests run FSDP with
gloo on CPU); a 30-minute timeout, because rank 0 alone writes checkpoints while others wait; bf16
weights with fp32 gradient reduction under FSDP on CUDA.

Run: nothing to run; `pytest tests/test_train.py -k "torchrun or fsdp"` runs it in two processes.
"""
import contextlib
import os
import signal
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP


def setup_distributed(device: str = "", timeout_minutes: float = 30) -> tuple[int, int, torch.device]:
    """(rank, world size, device). Under torchrun (RANK set) join the process group: NCCL on GPUs,
    gloo on CPU, with an explicit timeout, long because rank 0 alone draws sample grids and writes
    checkpoints while the others wait at the next collective. Plain `python` is rank 0 of 1."""
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:
        return 0, 1, torch.device(device or ("cuda" if cuda else "cpu"))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(device or (f"cuda:{local_rank}" if cuda else "cpu"))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            timeout=timedelta(minutes=timeout_minutes),
                            device_id=device if device.type == "cuda" else None)
    return dist.get_rank(), dist.get_world_size(), device


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def broadcast_object(obj):
    """Rank 0's obj on every rank (the identity in a single process)."""
    box = [obj]
    if is_dist():
        dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    out = [obj] * (dist.get_world_size() if is_dist() else 1)
    if is_dist():
        dist.all_gather_object(out, obj)
    return out


def all_reduce(t: torch.Tensor, op=None) -> torch.Tensor:
    if is_dist():
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


def gradient_sync(train_model, last: bool):
    """DDP: skip the all-reduce (no_sync) on all but the last micro-batch; FSDP: the same switch, set on
    the module; one process: nothing to do."""
    if isinstance(train_model, DDP):
        return contextlib.nullcontext() if last else train_model.no_sync()
    module = getattr(train_model, "_orig_mod", train_model)      # under torch.compile's wrapper
    if isinstance(module, FSDPModule):
        module.set_requires_gradient_sync(last)
    return contextlib.nullcontext()


def local(tensors) -> list[torch.Tensor]:
    """This rank's part of each tensor: the local shard of an FSDP DTensor, else the tensor itself."""
    return [t.to_local() if isinstance(t, DTensor) else t for t in tensors]


def shard_model(model: torch.nn.Module, bf16: bool) -> None:
    """FSDP2 in place: each conv level, U-Net middle block and transformer block is one unit whose
    weights are gathered just before it runs and freed after; the root holds the rest (stem, embeddings,
    head). On CUDA the gathered weights are bf16, gradients are reduced in fp32."""
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
        else MixedPrecisionPolicy()
    for unit in [*model.levels, *getattr(model, "middle", ()), *getattr(model, "blocks", ())]:
        fully_shard(unit, mp_policy=policy)
    for level in model.levels:              # a level runs through encode/decode, not forward
        register_fsdp_forward_method(level, "encode")
        register_fsdp_forward_method(level, "decode")
    fully_shard(model, mp_policy=policy)


def wrap_model(model, use_compile: bool, device: torch.device):
    """The callable that trains: torch.compile's wrapper of the raw module (if asked), inside DDP when
    there are several ranks (an FSDP-sharded module needs no wrapper). The raw module stays what is saved
    and averaged, so keys carry no prefixes."""
    net = torch.compile(model) if use_compile else model
    if not is_dist() or isinstance(model, FSDPModule):
        return net
    return DDP(net, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True)


def step_flags(loss: torch.Tensor, grad_norm: torch.Tensor, stop: "StopFlag") -> torch.Tensor:
    """[non-finite, signalled] of this step as a (2,) float tensor on the device, agreed by one tiny
    all-reduce (MAX): 1 if any rank saw a non-finite loss or gradient / was signalled. Nothing here waits
    for the device: the flag of the signal is a fill, not a copy from the host."""
    signalled = torch.full((), float(stop.requested), device=loss.device)
    flags = torch.stack([(~(loss.isfinite() & grad_norm.isfinite())).float(), signalled])
    return all_reduce(flags, dist.ReduceOp.MAX if is_dist() else None)


class LaggedFlags:
    """Step flags read one step late, so the host never waits for the GPU inside the loop: the device copies
    step n's flags into (pinned) host memory behind step n's work, and the host reads them after it has
    queued step n + 1, when they have long arrived. On a CPU the same code reads them at once."""

    def __init__(self, device: torch.device):
        cuda = device.type == "cuda"
        self.host = torch.zeros(2, pin_memory=cuda)
        self.event = torch.cuda.Event() if cuda else None
        self.step = None                              # the step whose flags are in flight

    def push(self, flags: torch.Tensor, step: int) -> None:
        self.host.copy_(flags, non_blocking=True)
        if self.event is not None:
            self.event.record()
        self.step = step

    def pop(self) -> tuple[int | None, bool, bool]:
        """(step, non-finite, signalled) of the step pushed last, or (None, False, False) if none is."""
        if self.step is None:
            return None, False, False
        if self.event is not None:
            self.event.synchronize()                  # step n's copy, queued before step n + 1's work
        bad, signalled = self.host.tolist()
        step, self.step = self.step, None
        return step, bool(bad), bool(signalled)


class StopFlag:
    """SIGTERM / SIGINT set a flag; the loop agrees on it across ranks, saves at the step boundary and
    exits 0. A second Ctrl-C aborts at once (KeyboardInterrupt), without saving."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n{signal.Signals(signum).name}: saving a checkpoint after the next step, then exiting "
              f"(Ctrl-C again aborts without saving)", file=sys.stderr, flush=True)


def ignore_sigint(_worker_id=None) -> None:
    """DataLoader workers ignore Ctrl-C: it is the main process's business (it saves, then exits)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def clip_gradients(model: torch.nn.Module, max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm to max_norm (0: measure only); returns the norm before clipping as a
    plain tensor (under FSDP the norm over all shards, which clip_grad_norm_ returns as a DTensor)."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm or float("inf"))
    return norm.full_tensor() if isinstance(norm, DTensor) else norm
