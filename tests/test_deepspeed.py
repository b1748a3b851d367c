"""DeepSpeed ZeRO-2 and ZeRO-3 through accelerate: two gloo processes train as one (issue 16).

One launch (`torch.distributed.run`, two CPU processes) runs, in turn, the tiny reward model
(with LoRA), SFT and DPO (with LoRA: its reference is the policy with the adapters off) under
the environment accelerate's launcher makes of training/configs/deepspeed-zero2.yaml, then of
deepspeed-zero3.yaml, and a ZeRO-3 reward model stopped after step 2 and resumed to step 4;
then PPO (LoRA) under ZeRO-2 stopped after update 1 and resumed, under ZeRO-3 two updates, and
one PPO minibatch step under each stage.
Each test compares a run with its one-process twin, run here without DeepSpeed: DeepSpeed's
engine clips and steps the optimizer inside the last backward pass, at the learning rate the
trainer set, so the final weights must be the one-process run's (within 1e-5, the float
noise of summing in another order, as for DDP in tests/test_distributed.py).

DeepSpeed runs on the CPU here (its CPU accelerator, gloo); accelerate then counts one process,
which tests/launched.py's ``deepspeed_on_cpu`` corrects. No GPU run has been made.

Run by hand: `python -m torch.distributed.run --standalone --nproc_per_node 2 -m
tests.test_deepspeed SPEC.json`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.test_distributed import ppo_minibatch_step, ppo_settings, record_rollouts
from tests.test_dpo import marker_rows, write_rows
from tests.test_ppo import even_token_share, tiny_runs  # noqa: F401 (a fixture)
from tests.test_reward_model import synthetic_file  # noqa: F401 (a fixture)
from tests.test_sft import tiny_args, write_pairs
from tests.test_sharded import FLAGS
from training import dpo, models, ppo, reward_model, run, scale, sft
from training.common import UsageError, load_pairs

pytest.importorskip("deepspeed", reason="deepspeed is not installed (the dev extra has it)")
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py

TRAINERS = {"reward_model": reward_model, "sft": sft, "dpo": dpo}
STAGES = (2, 3)


def run_spec(spec_path: str) -> None:
    """The body of each launched process: every (trainer, environment, settings) of the spec
    in turn, each under the DeepSpeed environment it names."""
    from tests.launched import deepspeed_on_cpu

    calls = []  # PPO's rollouts in this process, written beside each PPO run's output
    record_rollouts(ppo, calls)
    for trainer, environment, settings in json.loads(Path(spec_path).read_text()):
        deepspeed_on_cpu(environment)
        if trainer == "micro_batches":
            micro_batch_step(Path(settings["output"]))
            continue
        if trainer == "ppo_minibatch":
            ppo_minibatch_step(settings)
            continue
        if trainer == "ppo":
            if not settings.get("resume"):
                calls.clear()
            ppo.main(ppo.Args(**settings), score_fn=even_token_share)
            rank = int(os.environ["RANK"])
            (Path(settings["output_dir"]) / f"rollouts-rank{rank}.json").write_text(
                json.dumps(calls)
            )
            continue
        module = TRAINERS[trainer]
        module.main(module.Args(**settings))


# ---- scale.backward: micro-batches and the step the engine takes at the last ------------------

ROWS = 8


def micro_batch_step(output: Path | None = None) -> dict[str, torch.Tensor]:
    """One SGD step (lr 1, so the step is the gradient) of a small seeded network on ROWS fixed
    rows: each process takes its share of them in micro-batches of two, each weighted by its
    share of the process's rows, through scale.backward (the last marked); returns the
    updated weights (saved to `output` on the main process).

    Under DeepSpeed the engine must not step before the last micro-batch and must average the
    processes' accumulated gradients: then the weights are one process's one-pass step.
    """
    accelerator = scale.make_accelerator("fp32", deepspeed=scale.DeepSpeedStep(0.0, ROWS))
    if accelerator.state.deepspeed_plugin is not None:  # ZeRO takes SGD when told it may
        accelerator.state.deepspeed_plugin.deepspeed_config["zero_allow_untested_optimizer"] = True
    rank, world = accelerator.process_index, accelerator.num_processes
    generator = torch.Generator().manual_seed(3)
    inputs, targets = (
        torch.randn(ROWS, 4, generator=generator),
        torch.randn(ROWS, generator=generator),
    )
    torch.manual_seed(4)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    mine = list(range(rank, ROWS, world))
    parts = [mine[start : start + 2] for start in range(0, len(mine), 2)]
    for number, part in enumerate(parts):
        error = model(inputs[part]).squeeze(-1) - targets[part]  # shape: [2]
        # this micro-batch's share of the process's mean; data parallelism averages processes
        scale.backward(accelerator, error.pow(2).sum() / len(mine), last=number == len(parts) - 1)
    optimizer.step()
    optimizer.zero_grad()
    gathered = accelerator.get_state_dict(model)  # ZeRO-3: on the main process only
    weights = {name: tensor.clone() for name, tensor in (gathered or {}).items()}
    if output is not None and accelerator.is_main_process:
        from safetensors.torch import save_file

        output.parent.mkdir(parents=True, exist_ok=True)
        save_file(weights, output)
    return weights


@pytest.mark.parametrize("stage", STAGES)
def test_micro_batches_step_once_at_the_last_as_one_process(stage, two_processes):
    """Two micro-batches per process, the engine stepping at the last: one process's step."""
    one = micro_batch_step()
    two = load_file(two_processes / f"micro-{stage}.safetensors")
    assert one.keys() == two.keys()
    for name, tensor in one.items():
        assert torch.allclose(two[name], tensor, rtol=0, atol=1e-6), name


# ---- the runs ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, synthetic_file, tiny_runs):  # noqa: F811
    root = tmp_path_factory.mktemp("deepspeed-inputs")
    rows = load_pairs(None)[0]["test"]
    tokenizer = models.train_tiny_tokenizer([r["chosen_text"] for r in rows[:400]], vocab_size=512)
    write_rows(root / "marker.parquet", marker_rows(60, seed=5))
    return {
        "root": root,
        "reward_data": str(synthetic_file),
        "sft_data": write_pairs(root / "sft.parquet", rows[:40], ["train"]),
        "tokenizer": tokenizer,
        "dpo_data": str(root / "marker.parquet"),
        "policy": str(tiny_runs / "sft"),
        # few prompts: PPO encodes every training prompt up front
        "ppo_data": write_pairs(root / "ppo.parquet", rows[:60], ["train"]),
    }


def ppo_run(inputs, folder: Path, batch_size: int = 8, **extra) -> dict:
    """Two PPO updates of `batch_size` replies per process, with LoRA (the reference is the
    policy with its adapters off, called through the engine)."""
    return dict(ppo_settings(inputs, folder, batch_size), lora_rank=4, **extra)


def settings(trainer: str, inputs, folder: Path, **extra) -> dict:
    """A tiny run of `trainer` writing to `folder`; one padded batch per process per step
    (--micro-batch-cost -1), which ZeRO needs: each backward pass reduces across processes."""
    if trainer == "reward_model":
        # tests/test_sharded.py's tiny reward model run (LoRA, --micro-batch-cost -1)
        return dict(FLAGS, data=inputs["reward_data"], run_dir=str(folder), **extra)
    if trainer == "sft":  # 3 steps of 8 rows; lr 1e-3 keeps Adam's float noise under 1e-5
        args = tiny_args(
            inputs["root"],
            inputs["tokenizer"],
            data=inputs["sft_data"],
            output_dir=str(folder),
            batch_size=8,
            max_steps=3,
            eval_rows=8,
            learning_rate=1e-3,
        )
        return dataclasses.asdict(args)
    return dict(
        policy="tiny",
        data=inputs["dpo_data"],
        output_dir=str(folder),
        batch_size=8,
        max_steps=3,
        max_length=48,
        max_eval_pairs=8,
        learning_rate=1e-3,
        warmup_fraction=0.0,
        beta=0.5,
        lora_rank=4,
        micro_batch_cost=-1,
    )


def deepspeed_environment(stage: int) -> dict[str, str]:
    """The ACCELERATE_* variables accelerate's launcher gives each process for the config."""
    from tests.test_scale import launch_environment

    environment = launch_environment(f"deepspeed-zero{stage}")[1]
    return {k: v for k, v in environment.items() if k.startswith("ACCELERATE_")}


@pytest.fixture(scope="module")
def two_processes(inputs):
    """The launch: every trainer under ZeRO-2 and ZeRO-3, then the interrupted ZeRO-3 reward
    model and its resume; returns its folder."""
    root = inputs["root"] / "two"
    spec = [
        (
            trainer,
            deepspeed_environment(stage),
            settings(trainer, inputs, root / f"{trainer}-{stage}"),
        )
        for trainer in TRAINERS
        for stage in STAGES
    ]
    spec += [
        (
            "micro_batches",
            deepspeed_environment(stage),
            {"output": str(root / f"micro-{stage}.safetensors")},
        )
        for stage in STAGES
    ]
    resumed = root / "resumed"
    zero3 = deepspeed_environment(3)
    spec += [
        ("reward_model", zero3, settings("reward_model", inputs, resumed, stop_after=2)),
        ("reward_model", zero3, settings("reward_model", inputs, resumed, resume=True)),
        ("ppo", deepspeed_environment(2), ppo_run(inputs, root / "ppo-2", stop_after=1)),
        ("ppo", deepspeed_environment(2), ppo_run(inputs, root / "ppo-2", resume=True)),
        ("ppo", zero3, ppo_run(inputs, root / "ppo-3")),
    ]
    spec += [
        (
            "ppo_minibatch",
            deepspeed_environment(stage),
            {"policy": inputs["policy"], "output_dir": str(root / f"ppo-step-{stage}")},
        )
        for stage in STAGES
    ]
    (inputs["root"] / "spec.json").write_text(json.dumps(spec))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node", "2", "-m", "tests.test_deepspeed"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    env.pop("ACCELERATE_USE_CPU", None)
    done = subprocess.run(
        command + [str(inputs["root"] / "spec.json")],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    # each process's exception line, then the end of the processes' tracebacks
    errors = [line for line in done.stderr.splitlines() if line.startswith("[rank")]
    raised = [line for line in errors if "Error: " in line]
    assert done.returncode == 0, "\n".join(raised + errors[-30:]) or done.stderr[-3000:]
    return root


@pytest.fixture(scope="module")
def one_process(inputs):
    """Each trainer's one-process run, without DeepSpeed."""
    root = inputs["root"] / "one"
    for trainer, module in TRAINERS.items():
        module.main(module.Args(**settings(trainer, inputs, root / trainer)))
    return root


def weights_file(trainer: str, folder: Path) -> Path:
    return (
        folder
        / {"reward_model": "model", "sft": "", "dpo": "policy"}[trainer]
        / ("model.safetensors")
    )


def assert_same_weights(one: Path, two: Path) -> None:
    a, b = load_file(one), load_file(two)
    assert a.keys() == b.keys() and not any("lora" in name for name in b)
    for name, tensor in a.items():
        assert torch.allclose(b[name], tensor, rtol=0, atol=1e-5), name


def losses(trainer: str, folder: Path) -> list[float]:
    """The logged training loss of every step."""
    if trainer == "sft":
        return json.loads((folder / "metrics.json").read_text())["train_loss"]
    checkpoint = run.latest_checkpoint(folder)
    log = (checkpoint / "train_log.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in log]


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("trainer", list(TRAINERS))
def test_zero_trains_as_one_process(trainer, stage, one_process, two_processes):
    """The final weights and every step's loss are the one-process run's; the checkpoint is
    DeepSpeed's own (a ZeRO shard of the optimizer per process) and the saved model is a plain
    transformers model with LoRA merged."""
    one, two = one_process / trainer, two_processes / f"{trainer}-{stage}"
    assert_same_weights(weights_file(trainer, one), weights_file(trainer, two))
    assert losses(trainer, two) == pytest.approx(losses(trainer, one), rel=1e-5)
    assert losses(trainer, two)[0] != losses(trainer, two)[-1]  # it did learn
    checkpoint = run.latest_checkpoint(two)
    state = json.loads((checkpoint / "state.json").read_text())
    assert state["weights"] == run.ENGINE and state["engine"] == "DEEPSPEED"
    assert len(list((checkpoint / "pytorch_model").rglob("*optim_states.pt"))) == 2
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if trainer == "reward_model":
        assert AutoModelForSequenceClassification.from_pretrained(two / "model").num_labels == 1
    else:
        folder = two if trainer == "sft" else two / "policy"
        assert type(AutoModelForCausalLM.from_pretrained(folder)).__name__ == "LlamaForCausalLM"


def test_zero3_run_interrupted_and_resumed_trains_as_one_process(one_process, two_processes):
    """Stopped after step 2 and resumed from DeepSpeed's checkpoint, the run ends with the
    unbroken one-process run's weights and losses."""
    resumed = two_processes / "resumed"
    assert_same_weights(
        weights_file("reward_model", one_process / "reward_model"),
        weights_file("reward_model", resumed),
    )
    assert losses("reward_model", resumed) == pytest.approx(
        losses("reward_model", one_process / "reward_model"), rel=1e-5
    )


# ---- PPO ------------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", STAGES)
def test_a_ppo_minibatch_step_under_zero_is_the_one_process_step(
    stage, inputs, two_processes, tmp_path
):
    """Each process takes half of a fixed batch of rollouts (20 and 6 reply tokens) in two
    micro-batches; the engine steps once, at the last, so the weights are the one-process
    step's (tests/test_distributed.py checks the same step under DDP)."""
    ppo_minibatch_step({"policy": inputs["policy"], "output_dir": str(tmp_path)})
    one = load_file(tmp_path / "model.safetensors")
    two = load_file(two_processes / f"ppo-step-{stage}" / "model.safetensors")
    assert one.keys() == two.keys()
    for name, tensor in one.items():
        assert torch.allclose(two[name], tensor, rtol=0, atol=1e-5), name


@pytest.mark.parametrize("stage", STAGES)
def test_ppo_under_zero_deals_out_the_prompts_resumes_and_saves(
    stage, inputs, two_processes, tmp_path, monkeypatch
):
    """Under ZeRO-2 stopped after update 1 and resumed, under ZeRO-3 unbroken: per update the
    two processes answer the one-process batch of twice the size dealt out, with generators
    seeded apart; scoring through the engine reproduces the sampling distribution; the
    checkpoint is DeepSpeed's and policy/ a plain causal LM, LoRA merged."""
    from transformers import AutoModelForCausalLM

    folder = two_processes / f"ppo-{stage}"
    calls = []
    with monkeypatch.context() as patch:
        patch.setattr(ppo, "rollout", ppo.rollout)  # restored after the run
        record_rollouts(ppo, calls)
        ppo.main(ppo.Args(**ppo_run(inputs, tmp_path / "one", 16)), even_token_share)
    ranks = [json.loads((folder / f"rollouts-rank{rank}.json").read_text()) for rank in (0, 1)]
    assert len(calls) == len(ranks[0]) == len(ranks[1]) == 2
    for update, whole in enumerate(calls):
        halves = [ranks[rank][update]["queries"] for rank in (0, 1)]
        assert halves[0] == whole["queries"][0::2] and halves[1] == whole["queries"][1::2]
    assert ranks[0][0]["generator"] == calls[0]["generator"] != ranks[1][0]["generator"]
    metrics = json.loads((folder / "metrics.json").read_text())
    assert [record["update"] for record in metrics["history"]] == [1, 2]
    assert all(record["sampling_logprob_error"] < 1e-4 for record in metrics["history"])
    state = json.loads((run.latest_checkpoint(folder) / "state.json").read_text())
    assert state["engine"] == "DEEPSPEED" and state["update"] == 2
    saved = load_file(folder / "policy" / "model.safetensors")
    assert not any("lora" in key for key in saved)
    start = AutoModelForCausalLM.from_pretrained(inputs["policy"]).state_dict()
    assert any(not torch.equal(saved[k], v) for k, v in start.items() if k in saved)  # it moved
    AutoModelForCausalLM.from_pretrained(folder / "policy")


# ---- what stays refused -------------------------------------------------------------------------


def plugin(stage: int, monkeypatch, **changes):
    """accelerate's DeepSpeedPlugin as a process of the config's launch reads it."""
    from accelerate.utils import DeepSpeedPlugin

    for name, value in {**deepspeed_environment(stage), **changes}.items():
        monkeypatch.setenv(name, value)
    return DeepSpeedPlugin()


def test_the_config_gets_the_trainers_clip_and_refuses_what_they_cannot_honour(monkeypatch):
    step = scale.DeepSpeedStep(max_grad_norm=0.5, batch_size=8)
    zero3 = plugin(3, monkeypatch)
    scale.configure_deepspeed(zero3, 2, step)
    assert zero3.deepspeed_config["gradient_clipping"] == 0.5
    assert zero3.deepspeed_config["train_micro_batch_size_per_gpu"] == 4
    refused = {
        "zero3_init_flag: true": dict(ACCELERATE_DEEPSPEED_ZERO3_INIT="true"),
        "zero3_save_16bit_model: true": dict(ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL="false"),
        "clips gradients at 1.0": dict(ACCELERATE_GRADIENT_CLIPPING="1.0"),
        "gradient_accumulation_steps 4": dict(ACCELERATE_GRADIENT_ACCUMULATION_STEPS="4"),
    }
    for message, change in refused.items():
        with monkeypatch.context() as patch, pytest.raises(UsageError, match=message):
            scale.configure_deepspeed(plugin(3, patch, **change), 2, step)


def test_a_trainer_without_a_deepspeed_step_refuses_deepspeed():
    from accelerate.utils import DistributedType

    with pytest.raises(UsageError, match="does not yet step through it"):
        scale.refuse_sharding(DistributedType.DEEPSPEED, allow_fsdp=True)
    scale.refuse_sharding(DistributedType.DEEPSPEED, allow_deepspeed=True)


if __name__ == "__main__":
    run_spec(sys.argv[1])
