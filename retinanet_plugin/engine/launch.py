"""``launch`` that also starts several processes for a model on CPU.

detectron2 0.6's :func:`detectron2.engine.launch` asserts CUDA in every worker and joins them
with NCCL; later detectron2 picks NCCL whenever CUDA is present, whatever device the model is
configured for. :func:`launch` therefore chooses by the configured device (``MODEL.DEVICE``): a
CUDA model (or a single process) goes to detectron2's launcher; several processes of a CPU model
are started here: a GLOO process group, then the per-machine "local" group that
``detectron2.utils.comm`` expects, then ``main_func``.

detectron2's ``DefaultTrainer`` then wraps the model in ``DistributedDataParallel`` with
``device_ids=[local_rank]``, which torch refuses for a CPU module; :func:`wrap_ddp_on_cpu` lets
it wrap a CPU model without device ids.
"""

import contextlib
import importlib
import logging
import socket
from datetime import timedelta
from typing import Any, Callable, Iterator, Optional, Sequence
from unittest import mock

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import detectron2.engine.defaults as d2_defaults
from detectron2.utils import comm

__all__ = ["DEFAULT_TIMEOUT", "launch", "wrap_ddp_on_cpu"]

logger = logging.getLogger(__name__)

# The module: ``detectron2.engine.launch`` as an attribute is the function it exports.
d2_launch = importlib.import_module("detectron2.engine.launch")

DEFAULT_TIMEOUT = d2_launch.DEFAULT_TIMEOUT


def _default_device() -> str:
    # What MODEL.DEVICE means to a user who left it at detectron2's default "cuda" on a machine
    # without CUDA: such a config cannot run anywhere but on CPU.
    return "cuda" if torch.cuda.is_available() else "cpu"


def _uses_gloo_workers(world_size: int, device: str) -> bool:
    """Whether :func:`launch` starts GLOO workers itself rather than calling detectron2's."""
    if world_size == 1:
        return False  # detectron2 calls main_func in this process, no process group
    device_type = torch.device(device).type
    if device_type == "cuda":
        return False
    if device_type == "cpu":
        return True
    raise ValueError(
        f"MODEL.DEVICE = {device!r}: several processes (--num-gpus {world_size} in all) run "
        "either on CUDA (NCCL) or on CPU (GLOO)"
    )


def _free_local_url() -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"tcp://127.0.0.1:{port}"


def launch(
    main_func: Callable[..., Any],
    num_gpus_per_machine: int,
    num_machines: int = 1,
    machine_rank: int = 0,
    dist_url: Optional[str] = None,
    args: Sequence[Any] = (),
    timeout: timedelta = DEFAULT_TIMEOUT,
    device: Optional[str] = None,
) -> None:
    """Same contract as :func:`detectron2.engine.launch`; a CPU model's workers use GLOO.

    Args:
        main_func: called as ``main_func(*args)`` in each process.
        num_gpus_per_machine (int): processes per machine (``--num-gpus``), GPUs or not.
        num_machines (int): machines taking part.
        machine_rank (int): rank of this machine.
        dist_url (str): rendezvous URL, e.g. ``tcp://127.0.0.1:8686``, or "auto" for a free port
            on this machine (single machine only).
        args: arguments of ``main_func``.
        timeout (timedelta): timeout of the process group.
        device (str, optional): the configured ``MODEL.DEVICE`` ("cuda", "cuda:0", "cpu"); it
            alone decides between NCCL (detectron2's launcher) and GLOO, so a CPU model also
            gets GLOO on a machine that has a GPU. Default: "cuda" if CUDA is available, else
            "cpu".
    """
    world_size = num_machines * num_gpus_per_machine
    if device is None:
        device = _default_device()
    if not _uses_gloo_workers(world_size, device):
        d2_launch.launch(
            main_func,
            num_gpus_per_machine,
            num_machines=num_machines,
            machine_rank=machine_rank,
            dist_url=dist_url,
            args=tuple(args),
            timeout=timeout,
        )
        return
    if dist_url is None or dist_url == "auto":
        if num_machines != 1:
            raise ValueError("dist_url 'auto' only works on one machine; pass a tcp:// URL")
        dist_url = _free_local_url()
    logger.info("MODEL.DEVICE = %s: starting %d GLOO processes", device, num_gpus_per_machine)
    mp.spawn(
        _cpu_worker,
        nprocs=num_gpus_per_machine,
        args=(main_func, world_size, num_gpus_per_machine, machine_rank, dist_url, args, timeout),
        daemon=False,
    )


def _cpu_worker(
    local_rank: int,
    main_func: Callable[..., Any],
    world_size: int,
    num_procs_per_machine: int,
    machine_rank: int,
    dist_url: str,
    args: Sequence[Any],
    timeout: timedelta,
) -> None:
    global_rank = machine_rank * num_procs_per_machine + local_rank
    dist.init_process_group(
        backend="gloo",
        init_method=dist_url,
        world_size=world_size,
        rank=global_rank,
        timeout=timeout,
    )
    _create_local_process_group(num_procs_per_machine)
    comm.synchronize()
    main_func(*args)


def _create_local_process_group(num_procs_per_machine: int) -> None:
    """Sets up the group of this machine's processes, which ``comm.get_local_rank`` reads."""
    if hasattr(comm, "create_local_process_group"):  # detectron2 after 0.6
        comm.create_local_process_group(num_procs_per_machine)
        return
    # detectron2 0.6 keeps the group in a module attribute that its own launcher sets. Every
    # process must create every group (dist.new_group is collective), keeping its own.
    world_size = dist.get_world_size()
    machine_rank = dist.get_rank() // num_procs_per_machine
    for i in range(world_size // num_procs_per_machine):
        ranks = list(range(i * num_procs_per_machine, (i + 1) * num_procs_per_machine))
        group = dist.new_group(ranks)
        if i == machine_rank:
            comm._LOCAL_PROCESS_GROUP = group


@contextlib.contextmanager
def wrap_ddp_on_cpu() -> Iterator[None]:
    """While active, ``DefaultTrainer`` wraps a CPU model in DDP without ``device_ids``.

    detectron2's ``create_ddp_model`` passes ``device_ids=[local_rank]`` unless given some, and
    torch rejects any device ids for a CPU module; ``device_ids=None`` is what torch asks for.
    Models on GPU are wrapped exactly as detectron2 does.
    """
    create_ddp_model = d2_defaults.create_ddp_model

    def create_ddp_model_on_cpu(model: torch.nn.Module, **kwargs: Any) -> torch.nn.Module:
        param = next(model.parameters(), None)
        if "device_ids" not in kwargs and param is not None and param.device.type == "cpu":
            kwargs["device_ids"] = None
        return create_ddp_model(model, **kwargs)

    with mock.patch.object(d2_defaults, "create_ddp_model", create_ddp_model_on_cpu):
        yield
