"""
train.py's processes: one, or several under torchrun (DDP over nccl on GPUs, gloo on CPUs). env() reads torchrun's
environment, setup() starts the process group, finish() ends a process, fail() ends it with one error line, on_master()
runs an action on rank 0 and stops every rank on its error, gather() collects one object from every rank.
"""
import atexit
import os
import sys

import torch
import torch.distributed as dist


def env():
    """(ddp, rank, local_rank, world): torchrun's (it sets RANK), else one process."""
    if int(os.environ.get("RANK", -1)) == -1:
        return False, 0, 0, 1
    return True, int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])


def setup(device, device_type, backend, local_rank, world):
    """Start the process group; returns this process's device: its own GPU, or on CPU the node's cores shared between
    its processes."""
    if device_type == "cuda":
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    dist.init_process_group(backend=backend or ("nccl" if device_type == "cuda" else "gloo"))
    return device


def finish(code=0, wait=True):
    """End the process with exit code `code`. Under DDP: wait for every rank (wait=False where all ranks stop at the
    same error), destroy the group, run the exit handlers (the run folder's lock, wandb), flush, and leave without
    finalizing the interpreter. gloo's worker threads outlive destroy_process_group, because the DDP wrapper keeps
    the group alive even once it is freed, so the interpreter would be finalized with them running, and a thread
    torn down in that window aborts the process (reported: "terminate called without an active exception" from
    rank 1 after done:, in 1 of 8 two-process CPU runs)."""
    if dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def fail(msg):
    """Stop with one `error:` line and exit code 1. Every process meets a settings, data or checkpoint error at the
    same point, and the processes of a node share its terminal, so each node's first process alone prints it."""
    if int(os.environ.get("LOCAL_RANK", 0)) == 0:
        print(f"error: {msg}", file=sys.stderr, flush=True)
    finish(1, wait=False)


def on_master(action):
    """Run action() on rank 0 alone (it prepares data, or claims the run folder) and stop every rank when it
    returns an error message: the other ranks must neither go on nor wait for rank 0 forever."""
    error = action() if not dist.is_initialized() or dist.get_rank() == 0 else None
    if dist.is_initialized():
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        fail(error)


def gather(obj):
    """obj from every rank, in rank order ([obj] in one process)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
