"""Run a trainer's command lines one after another in the processes of one launch, optionally
under accelerate's FSDP on CPU processes (gloo); for tests/test_sharded.py. ``deepspeed_on_cpu``
does the same for DeepSpeed (tests/test_deepspeed.py).

    python -m torch.distributed.run --nproc_per_node 2 tests/launched.py [--fsdp] \\
        training.reward_model ARGS... --then ARGS...

Each ``--then`` starts the next run of the module in the same processes (a run stopped with
--stop-after, then its --resume), so the processes start, import and join once. tests/test_ppo.py
launches training.ppo so too; `two_processes` below is the launch command for every test.

``--fsdp`` needs the FSDP_* variables accelerate's launcher makes of training/configs/fsdp.yaml.
accelerate takes its FSDP branch only for GPU-like devices (AcceleratorState: MULTI_GPU, XPU,
NPU..., never MULTI_CPU: the plugin is silently dropped and the processes run plain DDP).
This sets the distributed type to FSDP in accelerate's shared state before the trainer
starts; everything after that (fully_shard, torch.distributed.checkpoint, save_state,
load_state, get_state_dict) is accelerate's and torch's own FSDP2 path, on gloo.
"""

from __future__ import annotations

import importlib
import json
import os
import sys


def fsdp_on_cpu() -> None:
    """Make accelerate's shared state (process group included) and set it to FSDP."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    # the process group and accelerate's shared state (MULTI_CPU), at the precision of
    # ACCELERATE_MIXED_PRECISION, which must match the trainer's --precision
    state = Accelerator().state
    plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* variables
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)  # as AcceleratorState does on GPUs
    state.fsdp_plugin = plugin
    for state in (PartialState, AcceleratorState):
        state._shared_state["distributed_type"] = DistributedType.FSDP


def deepspeed_on_cpu(environment: dict[str, str]) -> None:
    """Put the ACCELERATE_* variables accelerate's launcher makes of a DeepSpeed config
    (`environment`) into this process and make accelerate's state from them afresh, with the
    process group's size.

    accelerate takes its DeepSpeed branch on CPU processes too (DeepSpeed picks its CPU
    accelerator and gloo), but its PartialState then counts one process (the CPU branch that
    reads the world size is not taken): every process would train on the whole batch. The
    world size and rank are set from the process group here, in the test's launcher only; a
    GPU launch counts its processes itself.
    """
    import torch.distributed as dist
    from accelerate.state import AcceleratorState, PartialState

    os.environ.pop("ACCELERATE_USE_CPU", None)  # accelerate skips DeepSpeed when told CPU
    os.environ.update(environment)
    AcceleratorState._reset_state()  # the next Accelerator reads the new stage
    PartialState()  # the process group (DeepSpeed's comm, gloo)
    PartialState._shared_state["num_processes"] = dist.get_world_size()
    PartialState._shared_state["process_index"] = dist.get_rank()


def main(argv: list[str]) -> None:
    """Run the trainer module argv names with each --then-separated group of arguments."""
    if argv[:1] == ["--fsdp"]:
        fsdp_on_cpu()
        argv = argv[1:]
    from hhdata.errors import HhDataError
    from training.common import parse_args

    trainer = importlib.import_module(argv[0])
    runs: list[list[str]] = [[]]
    for word in argv[1:]:
        if word == "--then":
            runs.append([])
        else:
            runs[-1].append(word)
    for number, args in enumerate(runs):
        try:
            result = trainer.main(parse_args(trainer.Args, args))
        except HhDataError as error:  # as the trainer's own command line says it
            print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
            raise SystemExit(2) from None
        if int(os.environ.get("RANK", "0")) == 0:  # what each run returned, for the test
            print(f"run {number}: {json.dumps(result if 'stopped_after' in result else 'done')}")


def two_processes(*command: str, env: dict[str, str] | None = None, timeout: float = 600):
    """Run `command` (this script and its arguments, or ``-m MODULE ARGS...``) in two CPU
    processes over gloo with torch.distributed.run, one thread each, from the repository, with
    `env` added to the environment; the finished process, its output captured."""
    import subprocess
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[1])
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    launcher += ["--nproc_per_node", "2"]
    environment = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": root,
        "ACCELERATE_USE_CPU": "true",
        **(env or {}),
    }
    return subprocess.run(
        [*launcher, *command],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=environment,
        cwd=root,
    )


if __name__ == "__main__":
    sys.path[0] = os.getcwd()  # the repository, not tests/, as `python -m` would have it
    main(sys.argv[1:])
