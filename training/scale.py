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
(training/configs/ddp.yaml, fsdp.yaml; docs/scaling.md), not from flags. Under FSDP the
checkpoints go through accelerate's engine and the final save gathers the weights
(training/run.py); ``make_accelerator`` accepts FSDP only for the trainers that call their model
through the one prepared module (all four: PPO and DPO route generation and the reference
through it), and refuses DeepSpeed (``refuse_sharding`` says why).

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


def make_accelerator(precision: str, allow_fsdp: bool = False) -> Accelerator:
    """The run's Accelerator with `precision` (fp32, bf16, fp16) as its mixed precision.

    `allow_fsdp`: the trainer runs correctly under an FSDP launch (refuse_sharding says which do).
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
    refuse_sharding(accelerator.distributed_type, allow_fsdp)
    if precision == "fp16" and accelerator.device.type == "cpu":
        raise UsageError(
            "--precision fp16 needs a GPU (accelerate's fp16 loss scaling does not run on the "
            "CPU); use --precision bf16 or fp32 here"
        )
    return accelerator


def refuse_sharding(distributed_type: DistributedType, allow_fsdp: bool = False) -> None:
    """Refuse the sharded launches a trainer cannot run correctly.

    - DeepSpeed (training/configs/deepspeed-zero*.yaml), in every trainer: under accelerate
      DeepSpeed's engine steps the optimizer inside every ``accelerator.backward``, while the
      trainers take one step after several backward passes (micro-batches, PPO's gradient
      accumulation) and clip and set the learning rate themselves.
    - FSDP (training/configs/fsdp.yaml) unless `allow_fsdp`: code that calls its model outside
      the prepared module (generation, a reference as the policy with its adapters off), where
      FSDP's parameters are shards. PPO and DPO make those calls through it
      (rollout.PreparedPolicy, dpo.reference_logprobs), so every trainer allows it.
    """
    if distributed_type == DistributedType.DEEPSPEED:
        raise UsageError(
            "launched with DeepSpeed (training/configs/deepspeed-zero*.yaml): its engine steps "
            "the optimizer at every backward pass, the trainers once per batch after several, "
            "so the steps would be wrong; shard with training/configs/fsdp.yaml or launch with "
            "training/configs/ddp.yaml (docs/scaling.md)"
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
