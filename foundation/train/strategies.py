"""Distributed strategies from conf/strategy/: single device, DDP, DeepSpeed ZeRO 1/2/3.

Lightning's `DeepSpeedStrategy` refuses anything but CUDA. DeepSpeed itself runs on CPUs
with its CPU accelerator and a gloo process group, so `CPUDeepSpeedStrategy` changes only
what Lightning checks:

1. ``setup_environment`` skips the CUDA-only assertion;
2. the parallel devices become ``cpu:0 … cpu:n-1`` so that ``root_device.index`` is the
   local rank, which Lightning's device-index validation and ``deepspeed.initialize``
   (``args.device_rank``) expect (tensors on ``cpu:k`` are ordinary CPU tensors);
3. ``DS_ACCELERATOR=cpu`` before DeepSpeed picks its accelerator, and the process group is
   gloo (DeepSpeed's CPU accelerator would otherwise want oneCCL);
4. DeepSpeed's shared-memory all-reduce extension (only used by DeepSpeed inference) is not
   JIT-compiled, which would cost ~1 min of g++ on a fresh machine.

Everything else — ``deepspeed.initialize``, ZeRO partitioning, engine backward/step,
checkpointing — is the stock code path, so CPU tests exercise what a GPU cluster runs. On
a GPU the stock strategy is used (`AtomicDeepSpeedStrategy`, which only makes the
checkpoint directory write atomic).
"""

from __future__ import annotations

import os
import shutil
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    Strategy,
)

STRATEGIES = ("single", "ddp", "deepspeed")


class AtomicDeepSpeedStrategy(DeepSpeedStrategy):
    """Stock DeepSpeed strategy whose checkpoint directory appears atomically.

    DeepSpeed writes a checkpoint as a directory of files (one per rank and shard); it is
    written under ``<path>.tmp`` and renamed into place by rank 0 once every rank is done,
    so an interrupted save never leaves a half-written ``last.ckpt``.
    """

    def save_checkpoint(self, checkpoint: dict, filepath: Any, storage_options: Any = None) -> None:
        filepath = self.broadcast(str(filepath))
        if "://" in filepath:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        final, tmp, old = Path(filepath), Path(filepath + ".tmp"), Path(filepath + ".old")
        if self.is_global_zero and tmp.exists():
            shutil.rmtree(tmp)
        self.barrier("deepspeed_checkpoint_tmp")
        super().save_checkpoint(checkpoint, str(tmp), storage_options)
        self.barrier("deepspeed_checkpoint_written")
        if self.is_global_zero:
            if final.exists():
                os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        self.barrier("deepspeed_checkpoint_renamed")


class CPUDeepSpeedStrategy(AtomicDeepSpeedStrategy):
    """DeepSpeed ZeRO on CPU processes (DeepSpeed CPU accelerator + gloo); see module doc."""

    def __init__(self, *args: Any, build_shm_comm: bool = False, **kwargs: Any):
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        kwargs.setdefault("process_group_backend", "gloo")
        super().__init__(*args, **kwargs)
        self.build_shm_comm = build_shm_comm

    @property
    def parallel_devices(self) -> list[torch.device] | None:
        return self._parallel_devices

    @parallel_devices.setter
    def parallel_devices(self, devices: list[torch.device] | None) -> None:
        self._parallel_devices = (
            None if devices is None else [torch.device("cpu", i) for i in range(len(devices))]
        )

    def setup_environment(self) -> None:
        # DeepSpeedStrategy.setup_environment only adds the CUDA assertion.
        DDPStrategy.setup_environment(self)

    def _init_deepspeed_distributed(self) -> None:
        from deepspeed.accelerator import get_accelerator

        if get_accelerator().device_name() != "cpu":
            raise RuntimeError(
                "CPUDeepSpeedStrategy needs DeepSpeed's CPU accelerator, but DeepSpeed already "
                f"chose {get_accelerator().device_name()!r}; set DS_ACCELERATOR=cpu before importing it."
            )
        if not self.build_shm_comm:
            import deepspeed.ops
            from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

            deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False
        super()._init_deepspeed_distributed()


def init_elastic_process_group(strategy: Strategy) -> bool:
    """Under ``torchrun`` (elastic), start the process group on a store prefixed with the
    restart attempt, before Lightning or DeepSpeed would (both skip an initialised group).

    Measured (torch 2.13, ``torchrun --standalone --max-restarts``): after a rank dies, the
    restarted ranks reuse the agent's store, can read the dead attempt's gloo addresses
    and fail with "connectFullMesh … Connection refused". A per-attempt key prefix
    (``TORCHELASTIC_RESTART_COUNT``) keeps the attempts apart. Returns whether it did.
    """
    import torch.distributed as dist

    env = os.environ
    if (
        "TORCHELASTIC_RESTART_COUNT" not in env
        or not isinstance(strategy, DDPStrategy)
        or not dist.is_available()
        or dist.is_initialized()
    ):
        return False
    rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
    timeout = getattr(strategy, "_timeout", None) or timedelta(minutes=30)
    agent_store = env.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(
        env["MASTER_ADDR"],
        int(env["MASTER_PORT"]),
        world,
        is_master=not agent_store and rank == 0,
        timeout=timeout,
        multi_tenant=not agent_store,
    )
    attempt = env["TORCHELASTIC_RESTART_COUNT"]
    dist.init_process_group(
        strategy._get_process_group_backend(),
        store=dist.PrefixStore(f"foundation/attempt_{attempt}", store),
        rank=rank,
        world_size=world,
        timeout=timeout,
    )
    return True


def build_strategy(
    name: str = "single",
    *,
    accelerator: str = "cpu",
    gradient_clip_norm: float | None = None,
    stage: int = 2,
    offload_optimizer: bool = False,
    offload_parameters: bool = False,
    allgather_bucket_size: float = 2e8,
    reduce_bucket_size: float = 2e8,
    contiguous_gradients: bool = True,
    overlap_comm: bool = False,
    find_unused_parameters: bool = False,
    process_group_backend: str | None = None,
    timeout_min: float = 30.0,
) -> Strategy | str:
    """The Lightning strategy for conf/strategy/<name>.yaml.

    ``name``: ``single`` (one device: "auto"), ``ddp`` or ``deepspeed`` (ZeRO ``stage`` 1/2/3,
    optional CPU offload of optimizer state / parameters, bucket sizes in elements).
    ``accelerator`` is the trainer's (``cpu`` selects `CPUDeepSpeedStrategy`);
    ``gradient_clip_norm`` goes into the DeepSpeed config (the module clips itself elsewhere).
    """
    timeout = timedelta(minutes=timeout_min)
    if name == "single":
        return "auto"
    if name == "ddp":
        return DDPStrategy(
            find_unused_parameters=find_unused_parameters,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )
    if name == "deepspeed":
        if stage not in (1, 2, 3):
            raise ValueError(f"DeepSpeed ZeRO stage must be 1, 2 or 3, got {stage}.")
        if offload_parameters and stage != 3:
            raise ValueError("strategy.offload_parameters needs ZeRO stage 3.")
        on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
        cls = CPUDeepSpeedStrategy if on_cpu else AtomicDeepSpeedStrategy
        config = {
            "zero_allow_untested_optimizer": True,
            # offload with the module's torch AdamW (no JIT-built DeepSpeedCPUAdam needed)
            "zero_force_ds_cpu_optimizer": False,
            # batches are edge budgets, not fixed sizes; DeepSpeed only logs this number
            "train_micro_batch_size_per_gpu": 1,
            "gradient_clipping": float(gradient_clip_norm or 0.0),
            "zero_optimization": {
                "stage": stage,
                "contiguous_gradients": contiguous_gradients,
                "overlap_comm": overlap_comm,
                "allgather_bucket_size": int(allgather_bucket_size),
                "reduce_bucket_size": int(reduce_bucket_size),
                **(
                    {"offload_optimizer": {"device": "cpu", "pin_memory": not on_cpu}}
                    if offload_optimizer
                    else {}
                ),
                **(
                    {"offload_param": {"device": "cpu", "pin_memory": not on_cpu}}
                    if offload_parameters
                    else {}
                ),
            },
        }
        kwargs: dict[str, Any] = {"config": config, "timeout": timeout}
        if process_group_backend is not None:
            kwargs["process_group_backend"] = process_group_backend
        return cls(**kwargs)
    raise ValueError(f"Unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}.")
