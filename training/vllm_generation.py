"""Generation through vLLM (``--generator vllm``): PPO's rollouts, best-of-N's replies and the
online loop's pairs sampled by a vLLM engine on the GPU, the trainer's weights pushed into it
before each use; transformers generation (training.fast.sample) stays the default and the CPU
path.

The engine is colocated with the trainer, as TRL's GRPO trainer runs it in "colocate" mode: one
engine per process, in the process (vLLM's ``external_launcher`` executor, no worker process of
its own), built from the policy's saved folder and holding a share of the GPU's memory
(``--vllm-gpu-memory-utilization``). Its weights are the trainer's after each
``sync_weights(model)``: every tensor under the name it has in the transformers checkpoint, LoRA
adapters merged on the fly (W + alpha / r * B @ A) without touching the trainer's model, loaded
through the vLLM model's own ``load_weights``.

``VllmGenerator.sample`` has the signature and the output of ``training.fast.sample`` (reply
tokens and their log-probabilities, shape [batch * copies, response_length], filled with the
stop token after it), so a trainer swaps one for the other. The log-probabilities are vLLM's
after temperature (``logprobs_mode="processed_logprobs"``), which PPO only compares with its own
scoring (``sampling_logprob_error``): its loss recomputes them with the trainer's model.

vLLM pins its own torch, so it is an extra installed on the GPU machine only:
``pip install 'hhdata[vllm]'``. It has never run in this project's CI (no GPU; docs/scaling.md).

>>> pad_replies([[5, 2], [7, 7, 7]], [[-0.5, -0.1], [-1.0, -1.0, -1.0]], 3, stop_id=2)[0].tolist()
[[5, 2, 2], [7, 7, 7]]
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from training.common import UsageError

INSTALL = "pip install 'hhdata[vllm]'"
# config.json keys that say nothing about the weights' shapes or the architecture
CONFIG_NOISE = ("_name_or_path", "name_or_path", "transformers_version", "torch_dtype", "dtype")


@dataclass(frozen=True)
class GeneratorArgs:
    """The flags of the trainers that sample (PPO, best-of-N, the online loop)."""

    generator: Literal["transformers", "vllm"] = "transformers"
    """what samples the replies: transformers (any device, the default) or vLLM (a CUDA GPU and
    pip install 'hhdata[vllm]'; the trainer's weights are pushed into it before each use)"""
    vllm_gpu_memory_utilization: float = 0.3
    """--generator vllm: share of the GPU's memory the engine takes for its weights and
    key-value cache (the trainer's models use the rest)"""
    vllm_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """--generator vllm: the engine's weight precision (auto: vLLM's choice for the checkpoint)"""


def missing_for_vllm() -> list[str]:
    """What this machine lacks for --generator vllm (empty when it has everything)."""
    missing = []
    if importlib.util.find_spec("vllm") is None:
        missing.append(f"the vllm package ({INSTALL})")
    if not torch.cuda.is_available():
        missing.append("a CUDA GPU (torch sees none)")
    return missing


def require(generator: str) -> None:
    """Refuse --generator vllm, in one line naming the fix, where it cannot run."""
    missing = missing_for_vllm() if generator == "vllm" else []
    if missing:
        raise UsageError(
            f"--generator vllm needs {' and '.join(missing)}: {INSTALL} on a machine with a "
            "CUDA GPU, or run with --generator transformers (the default)"
        )


# ---- the weights the engine gets: the transformers checkpoint's names, LoRA merged -----------


def lora_merged_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The effective weight of each LoRA-adapted layer of `model`, by the layer's name: the
    frozen base weight plus peft's update of each active adapter (alpha / r * B @ A), computed
    apart, so the model keeps its adapters and its base weights."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # no peft, no adapters
        return {}
    merged = {}
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        weight = module.get_base_layer().weight.detach()
        if not module.merged and not module.disable_adapters:  # merged: already in the weight
            for adapter in module.active_adapters:
                if adapter in module.lora_A:
                    weight = weight + module.get_delta_weight(adapter).detach()
        merged[name] = weight
    return merged


def checkpoint_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every weight `model` would save with ``save_pretrained``, under the
    same names, LoRA adapters merged into their layers; `model` is left as it was.

    Tied weights appear once, under the first name (the input embeddings, as transformers saves
    them); a DDP wrapper is looked through.
    """
    model = getattr(model, "module", model)
    merged = lora_merged_weights(model)
    seen = set()
    with torch.no_grad():
        for key, tensor in model.state_dict().items():
            parts = key.split(".")
            if any(part.startswith("lora_") for part in parts):  # the adapters themselves
                continue
            if "base_layer" in parts:  # peft's wrapper of an adapted layer
                at = parts.index("base_layer")
                layer, parts = ".".join(parts[:at]), parts[:at] + parts[at + 1 :]
                if parts[-1] == "weight" and layer in merged:
                    tensor = merged[layer]
            storage = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
            if storage in seen:  # a tied copy, which the checkpoint leaves out
                continue
            seen.add(storage)
            yield ".".join(parts), tensor


# ---- vLLM's replies in training.fast.sample's shape --------------------------------------------


def pad_replies(
    replies: list[list[int]],
    logprobs: list[list[float]],
    response_length: int,
    stop_id: int,
    stopped: list[bool] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reply tokens and their log-probabilities as fast.sample returns them, shape [replies,
    response_length]: each reply cut to `response_length`, then filled with `stop_id` (log-prob
    0). A reply that `stopped` at the stop token without it in its tokens gets it appended."""
    tokens = torch.full((len(replies), response_length), stop_id, dtype=torch.long)
    values = torch.zeros((len(replies), response_length))
    for row, (reply, reply_logprobs) in enumerate(zip(replies, logprobs)):
        reply = list(reply[:response_length])
        if stopped is not None and stopped[row] and stop_id not in reply:
            reply = reply[: response_length - 1] + [stop_id]  # its log-prob stays 0: not given
        known = list(reply_logprobs[: len(reply)])
        tokens[row, : len(reply)] = torch.tensor(reply, dtype=torch.long)
        values[row, : len(known)] = torch.tensor(known, dtype=values.dtype)
    return tokens, values


def unpadded(ids: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
    """The queries of a left-padded batch, without their padding.

    >>> unpadded(torch.tensor([[0, 4, 5], [6, 7, 8]]), torch.tensor([[0, 1, 1], [1, 1, 1]]))
    [[4, 5], [6, 7, 8]]
    """
    return [row[keep.bool()].tolist() for row, keep in zip(ids.cpu(), mask.cpu())]


# ---- the engine ---------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port free on this machine now (for the engine's one-process rendezvous)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def architecture(folder: str) -> dict:
    """The model's config.json without the keys that do not change the weights' layout."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise UsageError(
            f"--generator vllm: {folder} is not a saved transformers model (no config.json); "
            "vLLM builds its engine from the policy's folder: pass an SFT run directory"
        )
    config = json.loads(path.read_text())
    return {key: value for key, value in config.items() if key not in CONFIG_NOISE}


class VllmGenerator:
    """A vLLM engine in this process that samples like training.fast.sample from the weights
    last pushed by ``sync_weights``."""

    def __init__(self, folder: str, args: GeneratorArgs, max_model_len: int, seed: int):
        from vllm import LLM

        self.architecture = architecture(folder)
        rank, local_rank, world = process_place()
        # vLLM's external launcher reads the process's place from the torchrun variables, which
        # a launch has set already; a single process sets them for a world of one
        place = dict(RANK=rank, LOCAL_RANK=local_rank, WORLD_SIZE=world, MASTER_PORT=free_port())
        for name, value in {**place, "MASTER_ADDR": "127.0.0.1"}.items():
            os.environ.setdefault(name, str(value))
        # the engine in this process, so its model is reachable for load_weights
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        self.folder, self.args, self.max_model_len = folder, args, max_model_len
        self.llm = LLM(
            # token ids in, token ids out: the trainer's tokenizer does the text
            skip_tokenizer_init=True,
            model=folder,
            dtype=args.vllm_dtype,
            gpu_memory_utilization=args.vllm_gpu_memory_utilization,
            max_model_len=max_model_len,
            distributed_executor_backend="external_launcher",
            seed=seed + rank,
            # log-probabilities after temperature: those of the distribution that sampled
            logprobs_mode="processed_logprobs",
        )

    def engine_model(self):
        """The vLLM model inside the engine (its weights are the ones sampled from)."""
        return self.llm.llm_engine.model_executor.driver_worker.model_runner.model

    @torch.no_grad()
    def sync_weights(self, model: torch.nn.Module) -> None:
        """Push `model`'s current weights (LoRA merged, checkpoint names) into the engine, one
        tensor at a time (no second copy of the model), and forget cached prompt states."""
        engine_model = self.engine_model()
        for name, tensor in checkpoint_weights(model):
            engine_model.load_weights([(name, tensor)])
        self.llm.reset_prefix_cache()

    def generate(
        self,
        queries: list[list[int]],
        n: int,
        max_new_tokens: int,
        temperature: float,
        stop_id: int,
        seed: int,
        top_p: float = 1.0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`n` replies to each query (token ids): tokens and log-probabilities, shape
        [len(queries) * n, max_new_tokens]; row i * n + k is query i's k-th reply.

        Sampling stops at `stop_id` only (the model's own end token is not a stop, as in
        fast.sample); each query gets its own seed, so equal queries get different replies.
        """
        from vllm import SamplingParams

        params = [
            SamplingParams(
                n=n,
                temperature=temperature,
                top_p=top_p,
                max_tokens=max_new_tokens,
                seed=seed + index,
                stop_token_ids=[stop_id],
                ignore_eos=True,
                logprobs=0,  # the sampled token's own
                detokenize=False,
            )
            for index in range(len(queries))
        ]
        outputs = self.llm.generate(
            [{"prompt_token_ids": query} for query in queries], params, use_tqdm=False
        )
        replies, logprobs, stopped = [], [], []
        for output in outputs:
            for completion in sorted(output.outputs, key=lambda c: c.index):
                replies.append(list(completion.token_ids))
                logprobs.append(sampled_logprobs(completion))
                stopped.append(completion.finish_reason == "stop")
        return pad_replies(replies, logprobs, max_new_tokens, stop_id, stopped)

    def sample(
        self,
        model,
        ids: torch.Tensor,
        mask: torch.Tensor,
        response_length: int,
        temperature: float,
        stop_id: int,
        generator: torch.Generator,
        copies: int = 1,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """training.fast.sample through the engine: `model` is the one last synced (its weights
        are already in the engine); the seed comes from `generator`, so runs repeat."""
        seed = int(torch.randint(2**31 - 1, (1,), generator=generator, device=generator.device))
        tokens, logprobs = self.generate(
            unpadded(ids, mask), copies, response_length, temperature, stop_id, seed
        )
        return tokens.to(ids.device), logprobs.to(ids.device)


def sampled_logprobs(completion) -> list[float]:
    """The log-probability of each sampled token of a vLLM completion (NaN where it gave none)."""
    if completion.logprobs is None:
        return [math.nan] * len(completion.token_ids)
    return [
        step[token].logprob if token in step else math.nan
        for token, step in zip(completion.token_ids, completion.logprobs)
    ]


def process_place() -> tuple[int, int, int]:
    """This process's rank, local rank and process count under accelerate (0, 0, 1 alone)."""
    from accelerate.state import PartialState

    state = PartialState()
    return state.process_index, state.local_process_index, state.num_processes


ENGINE: list[VllmGenerator] = []  # at most one per process: vLLM keeps process-wide state


def engine(folder: str, args: GeneratorArgs, max_model_len: int, seed: int) -> VllmGenerator:
    """The process's vLLM engine, built from the model in `folder` on first use.

    A later caller (the online loop's PPO after its sampling step) gets the same engine when its
    model has the same architecture and fits its length (the engine keeps the first caller's
    dtype and memory share); it must push its weights with ``sync_weights`` before sampling,
    as every caller does.
    """
    require("vllm")
    if not ENGINE:
        ENGINE.append(VllmGenerator(folder, args, max_model_len, seed))
        return ENGINE[0]
    current = ENGINE[0]
    if architecture(folder) != current.architecture:
        raise UsageError(
            f"--generator vllm: {folder} is another architecture than {current.folder}, whose "
            "engine this process holds (vLLM runs one engine per process); run them apart"
        )
    if max_model_len > current.max_model_len:
        raise UsageError(
            f"--generator vllm: queries + replies of {max_model_len} tokens exceed the "
            f"{current.max_model_len} the engine was built for; use the same --query-length and "
            "--response-length in one process"
        )
    return current
