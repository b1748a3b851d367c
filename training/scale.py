"""Training bigger models on the existing engines: mixed precision through accelerate, gradient
checkpointing through transformers, LoRA through peft.

Every trainer takes the same flags (``ScaleArgs``, which its ``Args`` extends):

- ``--precision fp32|bf16|fp16``: accelerate's mixed precision (autocast; fp16 adds its
  GradScaler, so the loss is scaled before backward and the gradients unscaled before the
  clip). ``make_accelerator`` refuses fp16 without a GPU, where accelerate would silently
  train in fp32.
- ``--gradient-checkpointing``: activations are recomputed in the backward pass instead of
  kept (transformers' non-reentrant checkpointing of each decoder layer).
- ``--lora-rank N`` (and ``--lora-alpha``, ``--lora-target-modules``): the base weights are
  frozen and low-rank adapters train (Hu et al. 2021); ``merge_lora`` folds them back in
  before saving, so every saved model is a plain transformers model.
- ``AdapterDisabled``: the frozen reference of PPO (and DPO) as the policy with its adapters
  switched off, so one copy of the weights serves both.

Data parallelism comes from the accelerate config a run is launched with
(training/configs/ddp.yaml, fsdp.yaml, deepspeed-zero2.yaml, deepspeed-zero3.yaml;
docs/scaling.md), not from flags. Under FSDP and DeepSpeed the checkpoints go through
accelerate's engine and the final save gathers the weights (training/run.py).
``make_accelerator`` accepts FSDP only for the trainers that call their model through the one
prepared module (all four: PPO and DPO route generation and the reference through it), and
DeepSpeed only for the trainers that pass it a ``DeepSpeedStep`` (all four): DeepSpeed's
engine clips and steps the optimizer itself, inside the backward pass that ends a step
(``backward``), and is told the trainer's clip there (``refuse_sharding`` says what each
refuses).

>>> lora_targets("llama")
['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj']
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Literal

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from training.common import UsageError

# Linear layers that LoRA adapts, per transformers model_type: every projection of attention
# and MLP (QLoRA, Dettmers et al. 2023, found all layers better than attention alone).
LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_TARGETS = {
    **dict.fromkeys(["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2"], LLAMA_LINEAR),
    # BERT (MiniLM): attention q/k/v, the attention and MLP output dense layers, the MLP input;
    # "output.dense" matches both outputs by suffix but not the pooler's dense
    **dict.fromkeys(
        ["bert", "roberta", "xlm-roberta"],
        ["query", "key", "value", "output.dense", "intermediate.dense"],
    ),
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}
PRECISIONS = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}  # ours -> accelerate's


@dataclass(frozen=True)
class ScaleArgs:
    """The flags every trainer shares for bigger models (a base of each trainer's Args)."""

    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """mixed precision for training and generation, through accelerate (fp16 scales the loss
    with a GradScaler and needs a GPU; bf16 runs on CPU too)"""
    gradient_checkpointing: bool = False
    """recompute activations in the backward pass instead of keeping them: less memory, about a
    third more compute"""
    lora_rank: int = 0
    """train LoRA adapters of this rank on frozen base weights (0: train every weight); merged
    into the weights on save"""
    lora_alpha: float = 16.0
    """LoRA scaling numerator: the update is (alpha / rank) * B @ A"""
    lora_target_modules: str | None = None
    """comma-separated names of the linear layers LoRA adapts; default: every attention and MLP
    projection of the architecture (llama: q,k,v,o,gate,up,down; bert: query,key,value,dense)"""


@dataclass(frozen=True)
class DeepSpeedStep:
    """What DeepSpeed's engine needs of a trainer that runs under it: the engine, not the
    trainer, clips the gradients and steps the optimizer (in the backward pass that ends a
    step), so it takes the trainer's clip, and it wants a per-process batch size in its config.
    """

    max_grad_norm: float
    """the trainer's --max-grad-norm (0: no clipping), DeepSpeed's gradient_clipping"""
    batch_size: int
    """the trainer's batch over all processes; the config's train_micro_batch_size_per_gpu is
    its share per process (DeepSpeed uses it only to report throughput)"""


def make_accelerator(
    precision: str, allow_fsdp: bool = False, deepspeed: DeepSpeedStep | None = None
) -> Accelerator:
    """The run's Accelerator with `precision` (fp32, bf16, fp16) as its mixed precision.

    `allow_fsdp`: the trainer runs correctly under an FSDP launch; `deepspeed`: the trainer
    runs correctly under a DeepSpeed launch, stepping with ``backward`` (refuse_sharding says
    which do); its clip and batch go into DeepSpeed's config (``configure_deepspeed``).
    accelerate trains in plain fp32 when fp16 is asked for on a CPU (no GradScaler there);
    that is refused here rather than run at another precision than the one recorded.
    accelerate keeps one state per process and refuses a second precision in it; a process
    that runs several trainers in turn (tests, a notebook, an online loop) drops the old
    state first, as transformers' Trainer does, keeping the process group.
    """
    from accelerate.state import AcceleratorState

    wanted = PRECISIONS[precision]
    if AcceleratorState._shared_state.get("_mixed_precision", wanted) != wanted:
        AcceleratorState._reset_state()
    accelerator = Accelerator(mixed_precision=wanted)
    refuse_sharding(accelerator.distributed_type, allow_fsdp, deepspeed is not None)
    if precision == "fp16" and accelerator.device.type == "cpu":
        raise UsageError(
            "--precision fp16 needs a GPU (accelerate's fp16 loss scaling does not run on the "
            "CPU); use --precision bf16 or fp32 here"
        )
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        configure_deepspeed(
            accelerator.state.deepspeed_plugin, accelerator.num_processes, deepspeed
        )
    return accelerator


def configure_deepspeed(plugin, processes: int, step: DeepSpeedStep) -> None:
    """Put the trainer's clip and per-process batch into the DeepSpeed config of this launch
    (accelerate's DeepSpeedPlugin, before ``accelerator.prepare`` reads it), refusing the
    settings the trainers cannot honour.

    - gradient_clipping: the engine clips inside its step, so it must be the trainer's
      --max-grad-norm; a config that sets another value is refused rather than overridden.
    - gradient_accumulation_steps must be 1: the trainers accumulate micro-batches themselves
      (each weighted by its share of the batch) and tell the engine which backward pass ends
      the step (``backward``); DeepSpeed's own count would also divide the loss by it.
    - ZeRO-3 must gather whole weights on save (zero3_save_16bit_model), which the final
      model needs, and must not build models partitioned (zero3_init_flag): the trainers build
      helper copies outside the engine (the final save's skeleton, DPO's reference, the saved
      classifier), which transformers would then partition too.
    """
    config = plugin.deepspeed_config
    config_file = "training/configs/deepspeed-zero*.yaml"
    clip = config.get("gradient_clipping", "auto")
    if clip != "auto" and float(clip) != step.max_grad_norm:
        raise UsageError(
            f"the DeepSpeed config clips gradients at {clip}, the trainer at --max-grad-norm "
            f"{step.max_grad_norm}; drop gradient_clipping from the config ({config_file}) and "
            "set --max-grad-norm"
        )
    accumulation = config.get("gradient_accumulation_steps", "auto")
    if accumulation not in ("auto", 1):
        raise UsageError(
            f"the DeepSpeed config sets gradient_accumulation_steps {accumulation}: the trainers "
            f"accumulate micro-batches themselves; set it to 1 ({config_file})"
        )
    if plugin.zero_stage == 3 and plugin.zero3_init_flag:
        raise UsageError(
            "the DeepSpeed config sets zero3_init_flag: true, which partitions every model "
            "transformers builds, also the trainers' copies outside the engine; set it to "
            f"false ({config_file})"
        )
    gather = "stage3_gather_16bit_weights_on_model_save"
    if plugin.zero_stage == 3 and config["zero_optimization"].get(gather) is not True:
        raise UsageError(
            "the DeepSpeed config does not gather whole weights on save, which the final model "
            f"needs under ZeRO-3; set zero3_save_16bit_model: true ({config_file})"
        )
    # accelerate points transformers at the ZeRO-3 config whatever zero3_init_flag says, and
    # transformers then partitions every model it builds from then on (from_config,
    # from_pretrained): the trainers' copies outside the engine too. The engine partitions the
    # prepared model itself, so transformers is told of no DeepSpeed config.
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    config["gradient_clipping"] = step.max_grad_norm
    config["gradient_accumulation_steps"] = 1
    if config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        config["train_micro_batch_size_per_gpu"] = max(1, step.batch_size // processes)
    config["train_batch_size"] = config["train_micro_batch_size_per_gpu"] * processes


def backward(accelerator: Accelerator, loss: torch.Tensor, last: bool = True) -> None:
    """One micro-batch's backward pass; `last`: the batch's final one, which ends the step.

    Under DeepSpeed the engine reduces the gradients in every pass (ZeRO-2/3 shard them, so
    every process must run as many passes as the others), and in the last one also clips them
    (gradient_clipping, the trainer's clip), steps the optimizer with the learning rates its
    param_groups hold and zeroes the gradients; the trainer's own ``optimizer.step()`` and
    ``zero_grad()`` after it do nothing there (accelerate's wrappers). The learning rate is
    therefore set on the param_groups before the last pass, as the trainers do at the top of
    each step: no scheduler object, so the schedule is the trainer's own function of the step
    in every launch and resumes from the step number alone. Elsewhere it is
    ``accelerator.backward``.
    """
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        # accelerate's wrapper: the accumulation boundary is `last`, and at it the engine steps
        accelerator.deepspeed_engine_wrapped.backward(loss, sync_gradients=last)
    else:
        accelerator.backward(loss)


def refuse_sharding(
    distributed_type: DistributedType, allow_fsdp: bool = False, allow_deepspeed: bool = False
) -> None:
    """Refuse the sharded launches a trainer cannot run correctly.

    - DeepSpeed (training/configs/deepspeed-zero*.yaml) unless `allow_deepspeed`: under
      accelerate DeepSpeed's engine steps the optimizer inside the backward pass, so a trainer
      must end each step with ``backward`` and hand its clip to the engine (make_accelerator's
      ``deepspeed``); every trainer does.
    - FSDP (training/configs/fsdp.yaml) unless `allow_fsdp`: code that calls its model outside
      the prepared module (generation, a reference as the policy with its adapters off), where
      FSDP's parameters are shards. PPO and DPO make those calls through it
      (rollout.PreparedPolicy, dpo.reference_logprobs), so every trainer allows it.
    """
    if distributed_type == DistributedType.DEEPSPEED and not allow_deepspeed:
        raise UsageError(
            "launched with DeepSpeed (training/configs/deepspeed-zero*.yaml): its engine steps "
            "the optimizer inside the backward pass, and this trainer does not yet step through "
            "it; launch it with training/configs/ddp.yaml (docs/scaling.md)"
        )
    if distributed_type == DistributedType.FSDP and not allow_fsdp:
        raise UsageError(
            "launched with FSDP (training/configs/fsdp.yaml): this trainer calls its policy "
            "outside the prepared module (generation, the frozen reference), where FSDP holds "
            "only shards; launch it with training/configs/ddp.yaml, with --lora-rank and "
            "--gradient-checkpointing to fit (docs/scaling.md)"
        )


def enable_gradient_checkpointing(model) -> None:
    """Recompute each layer's activations in the backward pass (transformers' checkpointing,
    non-reentrant, so frozen inputs and LoRA need no special casing).

    It acts while the model is in training mode only.
    """
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise UsageError(
            f"--gradient-checkpointing: {type(model).__name__} does not support it; run without it"
        )
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


def lora_targets(model_type: str, names: str | None = None) -> list[str]:
    """The module names LoRA adapts: `names` (comma-separated) when given, else the default of
    the architecture."""
    if names:
        return [name.strip() for name in names.split(",") if name.strip()]
    if model_type not in LORA_TARGETS:
        raise UsageError(
            f"--lora-rank: no default LoRA target modules for model type {model_type!r} (known: "
            f"{sorted(LORA_TARGETS)}); name its linear layers with --lora-target-modules"
        )
    return list(LORA_TARGETS[model_type])


def add_lora(model, rank: int, alpha: float, target_modules: str | None = None):
    """Put LoRA adapters of `rank` into `model`'s target modules, in place, and freeze every
    base weight; returns the peft handle (a PeftModel) that merges or switches them off.

    `model` keeps its class, its forward and its attributes: the trainers go on calling it
    as before. The adapters start as a zero update (B = 0), so it computes exactly what the
    base model did until the first step.
    """
    from peft import LoraConfig, get_peft_model

    if rank < 1:
        raise UsageError(f"--lora-rank {rank}: pass a positive rank (0 turns LoRA off)")
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=0.0,  # dropout stays off in RLHF (log-probabilities must not depend on it)
        target_modules=lora_targets(model.config.model_type, target_modules),
    )
    try:
        return get_peft_model(model, config)
    except ValueError as error:  # peft: "Target modules ... not found in the base model"
        raise UsageError(f"--lora-target-modules: {' '.join(str(error).split())}") from None


def maybe_add_lora(model, args: ScaleArgs):
    """add_lora with the run's flags; None (and `model` unchanged) when --lora-rank is 0."""
    if not args.lora_rank:
        return None
    return add_lora(model, args.lora_rank, args.lora_alpha, args.lora_target_modules)


def merge_lora(lora) -> None:
    """Fold the adapters of `lora` (add_lora's handle, or None) into the weights of its model,
    in place (W + alpha / rank * B @ A): the model is a plain transformers model again."""
    if lora is not None:
        lora.merge_and_unload()


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters the optimizer updates: all of them, or with LoRA the adapters (and any
    head outside the adapted backbone)."""
    return [parameter for parameter in model.parameters() if parameter.requires_grad]


class AdapterDisabled:
    """A frozen reference that is the base of a LoRA-adapted model: every call runs with the
    adapters switched off, so policy and reference share one copy of the weights.

    It answers what the trainers ask of a reference: calling it, ``get_decoder()`` and
    ``get_output_embeddings()`` (each a callable that also runs without adapters), and the
    model's other attributes (``config``, ``device``...).
    """

    def __init__(self, model, lora):
        self.model, self.lora = model, lora

    def __call__(self, *args, **kwargs):
        return self.without_adapters(self.model, *args, **kwargs)

    def without_adapters(self, function, *args, **kwargs):
        """`function(*args, **kwargs)` with the adapters off and no gradient."""
        with torch.no_grad(), self.lora.disable_adapter():
            return function(*args, **kwargs)

    def get_decoder(self):
        """The decoder stack, called with the adapters off."""
        return functools.partial(self.without_adapters, self.model.get_decoder())

    def get_output_embeddings(self):
        """The output layer, called with the adapters off."""
        return functools.partial(self.without_adapters, self.model.get_output_embeddings())

    def __getattr__(self, name: str):
        return getattr(self.model, name)


def training_mode(model: torch.nn.Module, checkpointing: bool):
    """A context in which `model` is in training mode when gradient checkpointing is on
    (transformers checkpoints only in training mode; dropout is off in the trainers, so
    nothing else changes), and in evaluation mode again after."""
    if not checkpointing:
        return contextlib.nullcontext()
    return _training(model)


@contextlib.contextmanager
def _training(model):
    model.train()
    try:
        yield
    finally:
        model.eval()
