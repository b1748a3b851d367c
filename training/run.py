"""Run bookkeeping shared by every trainer, so that `main` shows only the algorithm.

- ``start_or_resume``: a fresh run directory, or the latest checkpoint of the same settings;
- ``save_checkpoint`` / ``latest_checkpoint`` / ``load_checkpoint``: weights, optimizer
  moments, each process's RNG state and the run's scalars, written atomically;
- ``sharded`` / ``skeleton`` / ``whole_model``: the final model with whole weights, also from
  an FSDP or DeepSpeed launch;
- ``settings_record`` / ``input_runs`` / ``write_json``: the settings, provenance and library
  versions a run records (the resume check compares their ``args``);
- ``tensorboard`` / ``add_scalars``: TensorBoard on the main process only;
- ``write_card`` / ``plot``: model cards from the templates in ``hhdata/cards`` (package
  data, found with importlib.resources so it works installed) and matplotlib figures;
- ``disable_dropout``.

A checkpoint is ``<run dir>/checkpoints/step-NNNNNNN/``: one ``<name>.safetensors`` per
module, ``optimizer.safetensors`` (moments), ``rng-rankNNN.safetensors`` (one per process),
``state.json`` (the run's scalars, the optimizer's param_groups, the number of processes) and,
when the state holds a ``log``, ``train_log.jsonl``. No pickle in it.

Under a sharded launch (FSDP, DeepSpeed ZeRO-2/3), no process holds whole weights or moments:
the weights and the optimizer go through accelerate's own engine instead
(``accelerator.save_state`` / ``load_state``: FSDP's distributed checkpoint or DeepSpeed's
``save_checkpoint``, one shard file per process, and accelerate's own RNG pickles), beside the
same ``rng-rankNNN``, ``state.json`` (which names the engine) and ``train_log.jsonl``.
``load_checkpoint`` therefore runs after ``accelerator.prepare``. The final model is gathered
whole with ``whole_model`` (every process calls it) into the meta-device ``skeleton`` made
before ``prepare``, so the saved models stay plain transformers models.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import shutil
import sys
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import torch
from accelerate.utils import DistributedType
from safetensors.torch import load_file, load_model, save_file, save_model

import hhdata
from training.common import (
    UsageError,
    load_rng_state,
    optimizer_tensors,
    refuse_changed_settings,
    restore_optimizer,
    save_rng_state,
)

CHECKPOINTS = "checkpoints"
# launches whose processes hold only a shard of the weights and optimizer moments
SHARDED = (DistributedType.FSDP, DistributedType.DEEPSPEED)
ENGINE = "accelerate"  # state.json's "weights" when save_state wrote weights and optimizer
NOT_COMPARED = ("resume", "stop_after")  # how far to run, not what the run is


# ---- settings, provenance, the resume check -----------------------------------------------


def comparable_args(args) -> dict:
    """The settings a resumed run must share with the run it continues (all but how far to go)."""
    return {k: v for k, v in dataclasses.asdict(args).items() if k not in NOT_COMPARED}


def versions() -> dict[str, str]:
    """Library versions a run records beside its settings."""
    import transformers

    return {
        "hhdata": hhdata.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def command(module: str, main_name: str = "__main__") -> str:
    """The command line that started the run, or how `main` was called from Python."""
    if main_name == "__main__":
        return " ".join([f"python -m {module}", *sys.argv[1:]])
    return f"{module}.main(Args(...))"


def settings_record(args, **extra) -> dict:
    """The settings file of a run: comparable args, then `extra` (provenance, sizes, ...),
    then library versions."""
    return {"args": comparable_args(args), **extra, "versions": versions()}


def input_runs(**settings_files: Path | None) -> dict:
    """`<name>_run`: the settings file each input run wrote (None or a missing file: left out),
    so a run built on others (PPO on an SFT and a reward-model run) records their provenance."""
    return {
        f"{name}_run": json.loads(Path(path).read_text())
        for name, path in settings_files.items()
        if path and Path(path).is_file()
    }


def write_json(path: Path, value) -> None:
    """`value` as indented JSON at `path`, folders made as needed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2))


def start_or_resume(run_dir: Path, args, settings_file: str, flag: str) -> Path | None:
    """The checkpoint to continue from (--resume), or None for a fresh run.

    Refuses what would mix two runs: a fresh run in a folder that holds one, a resume with
    no checkpoint or with settings that differ from those in `settings_file`. `flag` names
    the run-directory option in the messages (--run-dir, --output-dir).
    """
    if not args.resume:
        if (run_dir / CHECKPOINTS).exists():
            raise UsageError(
                f"{run_dir} already holds a run; pass --resume to continue it or pick another "
                f"{flag}"
            )
        return None
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        raise UsageError(f"{run_dir}: no complete checkpoint to resume from; run without --resume")
    refuse_changed_settings(run_dir, settings_file, comparable_args(args))
    return checkpoint


# ---- checkpoints ----------------------------------------------------------------------------


def checkpoint_folder(run_dir: Path, step: int) -> Path:
    """Where the checkpoint of `step` goes."""
    return Path(run_dir) / CHECKPOINTS / f"step-{step:07d}"


def sharded(accelerator) -> bool:
    """Whether this launch splits weights or optimizer moments across processes (FSDP,
    DeepSpeed)."""
    return accelerator.distributed_type in SHARDED


def save_checkpoint(
    run_dir: Path,
    step: int,
    modules: dict[str, torch.nn.Module],
    optimizer,
    accelerator,
    state: dict,
    generator: torch.Generator | None = None,
) -> Path:
    """Save a resumable checkpoint of `step`; every process calls it.

    Written to ``step-N.partial`` and renamed into place once complete (a rename is atomic),
    then older checkpoints are deleted: a kill at any moment leaves a complete one, which
    latest_checkpoint finds. `modules` are saved unwrapped (save_model handles tied
    weights); each process saves its own RNG state (and `generator`'s). Under a sharded
    launch accelerate's engine saves the prepared model and optimizer instead, every process
    writing its shard.
    """
    folder = checkpoint_folder(run_dir, step)
    partial = folder.with_name(folder.name + ".partial")
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)  # a half-written one from a killed run
        partial.mkdir(parents=True)
    accelerator.wait_for_everyone()
    save_rng_state(partial, accelerator.process_index, generator)
    if sharded(accelerator):
        accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        scalars = {k: v for k, v in state.items() if k != "log"}
        if sharded(accelerator):
            scalars.update(weights=ENGINE, engine=accelerator.distributed_type.value)
        else:
            for name, module in modules.items():
                save_model(accelerator.unwrap_model(module), str(partial / f"{name}.safetensors"))
            tensors, param_groups = optimizer_tensors(optimizer)
            save_file(tensors, partial / "optimizer.safetensors")
            scalars.update(param_groups=param_groups)
        if "log" in state:
            lines = "".join(json.dumps(record) + "\n" for record in state["log"])
            (partial / "train_log.jsonl").write_text(lines)
        scalars.update(processes=accelerator.num_processes)
        (partial / "state.json").write_text(json.dumps(scalars))
        partial.rename(folder)
        for old in (Path(run_dir) / CHECKPOINTS).glob("step-*"):
            if old != folder:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return folder


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint (a ``.partial`` folder was cut short), or None."""
    complete = sorted(
        c
        for c in (Path(run_dir) / CHECKPOINTS).glob("step-*")
        if c.suffix != ".partial" and (c / "state.json").is_file()
    )
    return complete[-1] if complete else None


def load_checkpoint(
    folder: Path,
    modules: dict[str, torch.nn.Module],
    optimizer,
    accelerator,
    generator: torch.Generator | None = None,
) -> dict:
    """Restore what save_checkpoint wrote (this process's RNG state); returns the run's state.

    Under a sharded launch call it after ``accelerator.prepare``: the checkpoint loads into
    the prepared model and optimizer. Unsharded, before or after works alike (the weights
    load into the unwrapped modules, which the wrappers share). A checkpoint of one kind of
    launch does not resume under the other.
    """
    state = json.loads((folder / "state.json").read_text())
    saved_by = state.pop("processes", None)
    if saved_by != accelerator.num_processes:
        raise UsageError(
            f"{folder} was written by {saved_by} processes; resume with the same number "
            f"(this run has {accelerator.num_processes})"
        )
    engine = state.pop("weights", None) == ENGINE
    if engine != sharded(accelerator):
        written, now = ("a sharded", "an unsharded") if engine else ("an unsharded", "a sharded")
        raise UsageError(
            f"{folder} was written by {written} launch (FSDP, DeepSpeed or not); resume it with "
            f"the same accelerate config (this is {now} one)"
        )
    saved_engine, engine_now = state.pop("engine", None), accelerator.distributed_type.value
    if engine and saved_engine not in (None, engine_now):
        raise UsageError(
            f"{folder} was written under {saved_engine}; resume it with the same accelerate "
            f"config (this launch is {engine_now})"
        )
    if engine:
        accelerator.load_state(str(folder))
    else:
        for name, module in modules.items():
            load_model(accelerator.unwrap_model(module), str(folder / f"{name}.safetensors"))
        tensors = load_file(folder / "optimizer.safetensors")
        restore_optimizer(optimizer, tensors, state.pop("param_groups"))
    load_rng_state(folder, accelerator.process_index, generator)
    log = folder / "train_log.jsonl"
    if log.is_file():
        state["log"] = [json.loads(line) for line in log.read_text().splitlines()]
    return state


# ---- the final model: whole weights, also from a sharded launch ------------------------------


def skeleton(accelerator, model: torch.nn.Module, lora=None) -> tuple | None:
    """Under a sharded launch, a copy of `model` and its LoRA handle (add_lora's, or None)
    whose parameters live on the meta device: the structure without the memory, for
    whole_model to load the gathered weights into. None when the launch is not sharded.

    Make it before ``accelerator.prepare``, which shards the parameters in place. Buffers
    are copied whole (rotary frequencies are not in a state dict; they are small). Copied
    together, the handle keeps pointing into the copied model, so it merges there.
    """
    if not sharded(accelerator):
        return None
    memo = {
        id(parameter): torch.nn.Parameter(
            parameter.detach().to("meta"), requires_grad=parameter.requires_grad
        )
        for parameter in model.parameters()
    }
    return copy.deepcopy((model, lora), memo)


def whole_model(accelerator, prepared: torch.nn.Module, lora, skeleton: tuple | None) -> tuple:
    """(model, lora) with whole trained weights, for the final save; every process calls it.

    Unsharded (`skeleton` None): the unwrapped model and `lora` themselves. Sharded: the
    weights gathered whole by accelerate (``get_state_dict``, a collective) and loaded into
    `skeleton` on the main process; (None, None) on the others.
    """
    if skeleton is None:
        return accelerator.unwrap_model(prepared), lora
    weights = accelerator.get_state_dict(prepared)
    if not accelerator.is_main_process:
        return None, None
    model, copied_lora = skeleton
    # a weight gathered from shards of a padded dimension (a head of one row on two processes)
    # is a view into a larger buffer, which safetensors refuses to save: copied alone
    weights = {
        name: tensor if tensor.untyped_storage().nbytes() == tensor.nbytes else tensor.clone()
        for name, tensor in weights.items()
    }
    model.load_state_dict(weights, assign=True)
    from transformers import PreTrainedModel

    for module in model.modules():  # the model, or the transformers model a wrapper holds (DPO)
        if isinstance(module, PreTrainedModel):
            module.tie_weights()  # assign=True gave tied weights (embeddings, LM head) two tensors
    return model, copied_lora


# ---- logging, plots, cards ------------------------------------------------------------------


def tensorboard(run_dir: Path, purge_step: int, accelerator):
    """A TensorBoard SummaryWriter in `run_dir`/tensorboard on the main process, else None.

    `purge_step` drops events a killed run logged past its last checkpoint.
    """
    if not accelerator.is_main_process:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(Path(run_dir) / "tensorboard", purge_step=purge_step)


def add_scalars(writer, prefix: str, values: dict, step: int) -> None:
    """Log each of `values` as `prefix/name` at `step` (nothing on processes without a writer)."""
    if writer is not None:
        for name, value in values.items():
            writer.add_scalar(f"{prefix}/{name}", value, step)


def write_card(path: Path, template: str, **fields) -> None:
    """Fill the card template `template` of hhdata/cards with `fields` and write it to `path`."""
    text = resources.files("hhdata").joinpath("cards", template).read_text("utf-8")
    Path(path).write_text(text.format(**fields))


@contextlib.contextmanager
def plot(path: Path, rows: int = 1, columns: int = 1, size: tuple = (6, 3.5)) -> Iterator:
    """A matplotlib figure (no display needed) yielding its axes, saved to `path` and closed.

    >>> with plot(Path("loss.png")) as axis:  # doctest: +SKIP
    ...     axis.plot([1, 2], [0.7, 0.5])
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(rows, columns, figsize=size)
    try:
        yield axes
        figure.savefig(path, dpi=100, bbox_inches="tight")
    finally:
        plt.close(figure)


def disable_dropout(model) -> None:
    """Zero every dropout probability, in modules and in the config that functional dropout
    reads: log-probabilities and rewards must not depend on the pass (Ziegler et al. 2019;
    Huang et al. 2023 "N+"; TRL's disable_dropout)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    config = getattr(model, "config", None) or getattr(
        getattr(model, "backbone", None), "config", None
    )
    for name in list(vars(config)) if config is not None else []:
        if "dropout" in name and isinstance(getattr(config, name), float):
            setattr(config, name, 0.0)
