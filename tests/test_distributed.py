"""Two gloo processes train as one process where the maths says they must (issue 16).

One launch (`torch.distributed.run`, two CPU processes, accelerate's multi-CPU mode) runs the
tiny reward-model, SFT, DPO and PPO runs in turn, so the processes start once; each test then
runs the one-process counterpart here and compares.

- Reward model (with LoRA: frozen weights beside trained ones): the Bradley-Terry loss is a
  mean over the batch's pairs, in equal halves, so the weights are the one-process run's.
- SFT and DPO: each process takes half of every batch and data parallelism averages the
  gradients; the loss is a mean over the whole batch (SFT: over its assistant tokens, however
  they fall across the processes; DPO: over its pairs, in equal halves), so the weights are the
  one-process run's, up to the order of float sums.
- PPO: each process samples its own replies with its own generator, whitens its own advantages
  and draws its own minibatches, so no one-process run takes the same steps. What must hold:
  the two processes' prompts of each update are the one-process run's batch of twice the size,
  dealt out (none used twice, none dropped), and the processes sample with different generators.
  One PPO minibatch step on a fixed batch of rollouts (`ppo.minibatch_step`), each process
  taking half of it, gives the one-process step's weights: the losses are token means over the
  whole minibatch, though the halves hold different numbers of reply tokens.

Run by hand: `python -m torch.distributed.run --standalone --nproc_per_node 2 -m
tests.test_distributed SPEC.json` runs the trainers listed in SPEC.json.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_model

from tests import launched
from tests.test_dpo import marker_rows, write_rows
from tests.test_ppo import SMALL, even_token_share, tiny_runs  # noqa: F401 (a fixture)
from tests.test_reward_model import synthetic_file  # noqa: F401 (a fixture)
from tests.test_sft import tiny_args, write_pairs
from training import dpo, models, ppo, reward_model, run, scale, sft
from training.common import load_pairs
from training.reward_model import RewardModel
from training.rollout import PolicyAndValue
from training.text import encode_example

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py

TRAINERS = {"reward_model": reward_model, "sft": sft, "dpo": dpo, "ppo": ppo}


def record_rollouts(module, calls: list) -> None:
    """Wrap `module.rollout` (PPO's sampler, still run in full) so each call appends the
    queries it answered and its generator's state before sampling."""
    sample = module.rollout

    def recorded(policy, queries, args, pad_id, stop_id, generator, device, **options):
        state = generator.get_state().tolist()
        batch = sample(policy, queries, args, pad_id, stop_id, generator, device, **options)
        calls.append({"queries": queries, "generator": state})
        return batch

    module.rollout = recorded


def run_trainer(trainer: str, settings: dict) -> None:
    """One trainer's main() with `settings` (PPO with the known-answer reward of test_ppo), or
    PPO's one minibatch step (`ppo_minibatch`)."""
    if trainer == "ppo_minibatch":
        ppo_minibatch_step(settings)
        return
    module = TRAINERS[trainer]
    args = module.Args(**settings)
    if trainer == "ppo":
        module.main(args, score_fn=even_token_share)
    else:
        module.main(args)


def run_spec(spec_path: str) -> None:
    """The body of each launched process: every run of the spec in turn; PPO's rollouts are
    written per process beside its output."""
    # set by torch.distributed.run; a bare PartialState() here would make a one-process state
    # before the trainers' Accelerator reads ACCELERATE_USE_CPU
    rank = int(os.environ["RANK"])
    for trainer, settings in json.loads(Path(spec_path).read_text()):
        calls = []
        if trainer == "ppo":
            record_rollouts(ppo, calls)
        run_trainer(trainer, settings)
        if calls:
            out = Path(settings["output_dir"]) / f"rollouts-rank{rank}.json"
            out.write_text(json.dumps(calls))


# ---- the runs: each as the launch runs it with two processes, and its one-process twin --------


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_runs, synthetic_file):  # noqa: F811
    """Data and starting models of the tiny runs."""
    root = tmp_path_factory.mktemp("distributed-inputs")
    rows = load_pairs(None)[0]["test"]
    tokenizer = models.train_tiny_tokenizer([r["chosen_text"] for r in rows[:400]], vocab_size=512)
    write_rows(root / "marker.parquet", marker_rows(60, seed=5))
    return {
        "root": root,
        "sft_rows": rows[:40],
        "sft_data": write_pairs(root / "sft.parquet", rows[:40], ["train"]),
        "tokenizer": tokenizer,
        "dpo_data": str(root / "marker.parquet"),
        "policy": str(tiny_runs / "sft"),
        # few prompts: PPO encodes every training prompt up front
        "ppo_data": write_pairs(root / "ppo.parquet", rows[:60], ["train"]),
        "reward_data": str(synthetic_file),
    }


def reward_model_settings(inputs, run_dir: Path) -> dict:
    return dict(
        data=inputs["reward_data"],
        run_dir=str(run_dir),
        max_length=48,
        batch_size=8,
        max_steps=3,
        max_train_pairs=32,
        max_eval_pairs=16,
        learning_rate=3e-3,
        lora_rank=4,
    )


def sft_settings(inputs, output_dir: Path) -> dict:
    """A whole epoch: 4 steps of 8 rows. (Adam's step is about the learning rate wherever the
    gradient is tiny, so float noise in tiny gradients moves weights by a share of it: 1e-3
    keeps that under the 1e-5 compared.)"""
    args = tiny_args(
        inputs["root"],
        inputs["tokenizer"],
        data=inputs["sft_data"],
        output_dir=str(output_dir),
        batch_size=8,
        max_steps=0,
        eval_rows=8,
        learning_rate=1e-3,
    )
    return dataclasses.asdict(args)


def dpo_settings(inputs, output_dir: Path) -> dict:
    return dict(
        policy="tiny",
        data=inputs["dpo_data"],
        output_dir=str(output_dir),
        batch_size=8,
        max_steps=3,
        max_length=48,
        max_eval_pairs=8,
        learning_rate=1e-3,
        warmup_fraction=0.0,
        beta=0.5,
    )


def ppo_settings(inputs, output_dir: Path, batch_size: int) -> dict:
    """Two updates of `batch_size` replies per process."""
    return dict(
        SMALL,
        policy=inputs["policy"],
        data=inputs["ppo_data"],
        output_dir=str(output_dir),
        batch_size=batch_size,
        total_episodes=2 * batch_size,
        num_ppo_epochs=1,
        eval_prompts=4,
        num_samples_shown=0,
    )


# PPO's minibatch step: rows of the fixed batch, and their replies' lengths (reply tokens)
ROWS, QUERY, REPLY = 8, 6, 5
REPLY_LENGTHS = [5, 5, 5, 5, 1, 2, 1, 2]  # halves of 20 and 6 reply tokens


def fixed_experience(model: PolicyAndValue) -> ppo.Experience:
    """A batch of ROWS rollouts, the same on every process (seeded): random queries and
    replies of REPLY_LENGTHS tokens; old log-probabilities and values are the model's own (the
    probability ratio starts at 1), advantages and returns seeded noise."""
    generator = torch.Generator().manual_seed(11)
    vocab = model.policy.config.vocab_size
    ids = torch.randint(3, vocab, (ROWS, QUERY + REPLY), generator=generator)
    # shape: [rows, reply]
    response_mask = (torch.arange(REPLY) < torch.tensor(REPLY_LENGTHS)[:, None]).float()
    at = (QUERY - 1 + torch.arange(REPLY)).repeat(ROWS, 1)  # the column predicting each token
    responses = ids[:, QUERY:]
    mask = torch.ones_like(ids)
    with torch.no_grad():
        logprobs, _, values = model(ids, mask, at, responses, 1.0)
    advantages = torch.randn(ROWS, REPLY, generator=generator) * response_mask
    returns = (values + torch.randn(ROWS, REPLY, generator=generator)) * response_mask
    return ppo.Experience(
        ids, mask, at, responses, response_mask, logprobs, values, advantages, returns
    )


def ppo_minibatch_step(settings: dict) -> None:
    """One `ppo.minibatch_step` (plain SGD, so the step is the gradient itself) on the rows of
    fixed_experience: one process takes all of them in two micro-batches, each of two processes
    its half (rank 0 the first) in two micro-batches; the updated policy and value model are
    saved as `model.safetensors` in settings["output_dir"]. Under FSDP and DeepSpeed too
    (tests/test_sharded_rlhf.py, tests/test_deepspeed.py): the weights are then gathered whole
    for the save."""
    deepspeed = scale.DeepSpeedStep(max_grad_norm=1e6, batch_size=ROWS)  # the clip of args below
    accelerator = scale.make_accelerator("fp32", allow_fsdp=True, deepspeed=deepspeed)
    if accelerator.state.deepspeed_plugin is not None:  # ZeRO takes SGD when told it may
        accelerator.state.deepspeed_plugin.deepspeed_config["zero_allow_untested_optimizer"] = True
    rank, world = accelerator.process_index, accelerator.num_processes
    policy = models.load_causal_lm(settings["policy"], models.load_tokenizer(settings["policy"]))
    torch.manual_seed(5)  # the value head's initial weights
    model = PolicyAndValue(policy, RewardModel(copy.deepcopy(policy.get_decoder())))
    whole = fixed_experience(model)
    rows = ROWS // world
    mine = ppo.Experience(
        **{
            field.name: getattr(whole, field.name)[rank * rows : (rank + 1) * rows]
            for field in dataclasses.fields(whole)
        }
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    skeleton = run.skeleton(accelerator, model)
    model, optimizer = accelerator.prepare(model, optimizer)
    args = ppo.Args(temperature=1.0, max_grad_norm=1e6)
    ppo.minibatch_step(model, optimizer, accelerator, mine, torch.arange(rows), rows // 2, args)
    whole, _ = run.whole_model(accelerator, model, None, skeleton)
    if accelerator.is_main_process:
        output_dir = Path(settings["output_dir"])
        output_dir.mkdir(parents=True, exist_ok=True)
        save_model(whole, output_dir / "model.safetensors")


@pytest.fixture(scope="module")
def two_processes(inputs):
    """The launch: the reward model, SFT, DPO and PPO, each with two gloo processes; returns
    its folder."""
    root = inputs["root"] / "two"
    spec = [
        ("reward_model", reward_model_settings(inputs, root / "rm")),
        ("sft", sft_settings(inputs, root / "sft")),
        ("dpo", dpo_settings(inputs, root / "dpo")),
        ("ppo", ppo_settings(inputs, root / "ppo", batch_size=8)),
        ("ppo_minibatch", {"policy": inputs["policy"], "output_dir": str(root / "ppo-step")}),
    ]
    (inputs["root"] / "spec.json").write_text(json.dumps(spec))
    done = launched.two_processes("-m", "tests.test_distributed", str(inputs["root"] / "spec.json"))
    # the processes' own errors, not the launcher's summary after them
    errors = [line for line in done.stderr.splitlines() if line.startswith("[rank")]
    assert done.returncode == 0, "\n".join(errors)[-3000:] or done.stderr[-3000:]
    return root


def assert_same_weights(one: Path, two: Path) -> None:
    a, b = load_file(one), load_file(two)
    assert a.keys() == b.keys()
    for name, tensor in a.items():
        assert torch.allclose(b[name], tensor, rtol=0, atol=1e-5), name


def read_log(folder: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (folder / name).read_text().splitlines()]


# ---- the reward model --------------------------------------------------------------------------


def test_two_processes_train_the_reward_model_as_one(inputs, two_processes, tmp_path):
    """The Bradley-Terry loss is a mean over the batch's pairs; each of two processes takes half
    of every batch and data parallelism averages their gradients, so the step is the one
    process's step (up to the order of float sums), with LoRA's frozen weights too."""
    one = reward_model.main(reward_model.Args(**reward_model_settings(inputs, tmp_path / "one")))
    two = two_processes / "rm"
    metrics = json.loads((two / "metrics.json").read_text())
    assert json.loads((two / "settings.json").read_text())["processes"] == 2
    assert_same_weights(
        tmp_path / "one" / "model" / "model.safetensors", two / "model" / "model.safetensors"
    )
    assert metrics["train"]["final_loss"] == pytest.approx(one["train"]["final_loss"], rel=1e-4)
    assert metrics["overall"]["accuracy"] == one["overall"]["accuracy"]


# ---- SFT ------------------------------------------------------------------------------------


def test_two_processes_train_sft_as_one_on_disjoint_halves(inputs, two_processes, tmp_path):
    """The weights of the one-process run, though the halves hold different numbers of
    assistant tokens (a mean of each process's own token mean would weight them otherwise);
    every step the halves are disjoint, and over the epoch they are every training row once."""
    one = sft.main(sft.Args(**sft_settings(inputs, tmp_path / "one")))
    two = two_processes / "sft"
    metrics = json.loads((two / "metrics.json").read_text())
    assert metrics["processes"] == 2 and metrics["steps"] == one["steps"] == 4
    assert_same_weights(tmp_path / "one" / "model.safetensors", two / "model.safetensors")
    assert metrics["train_loss"] == pytest.approx(one["train_loss"], rel=1e-5)

    log = read_log(two, "train_log.jsonl")
    train_rows, _ = sft.held_out_split(
        [{**row, "split": "train"} for row in inputs["sft_rows"]], 8, seed=1
    )
    chat = json.loads((two / "args.json").read_text())["chat_template"]
    targets = {  # the loss's tokens per row, as the run encoded it
        row["id"]: sft.target_count(encode_example(inputs["tokenizer"], row, 48, chat))
        for row in train_rows
    }
    for record in log:
        first, second = record["rows"]
        assert len(first) == len(second) == 4 and not set(first) & set(second)
    # the halves' token counts differ, so a per-process token mean would have weighted otherwise
    assert any(
        sum(targets[i] for i in first) != sum(targets[i] for i in second)
        for first, second in (record["rows"] for record in log)
    )
    assert sorted(i for record in log for half in record["rows"] for i in half) == sorted(targets)


# ---- DPO ------------------------------------------------------------------------------------


def test_two_processes_train_dpo_as_one(inputs, two_processes, tmp_path):
    one = dpo.main(dpo.Args(**dpo_settings(inputs, tmp_path / "one")))
    two = two_processes / "dpo"
    assert json.loads((two / "settings.json").read_text())["processes"] == 2
    assert_same_weights(
        tmp_path / "one" / "policy" / "model.safetensors", two / "policy" / "model.safetensors"
    )
    metrics = json.loads((two / "metrics.json").read_text())
    assert metrics["train"]["loss"] == pytest.approx(one["train"]["loss"], rel=1e-5)
    assert metrics["overall"]["accuracy"] == one["overall"]["accuracy"]
    assert metrics["train"]["loss"][0] != metrics["train"]["loss"][-1]  # it did learn


# ---- PPO ------------------------------------------------------------------------------------


def test_two_ppo_processes_deal_out_the_prompts_and_sample_apart(
    inputs, two_processes, tmp_path, monkeypatch
):
    """Per update, the two processes' prompts together are the batch a one-process run of twice
    the batch size answers (none used by both, none dropped), and they sample with generators
    seeded apart (rank 0's as the one-process run's), not one shared random stream."""
    calls = []
    with monkeypatch.context() as patch:
        patch.setattr(ppo, "rollout", ppo.rollout)  # restored after the run
        record_rollouts(ppo, calls)
        ppo.main(ppo.Args(**ppo_settings(inputs, tmp_path / "one", 16)), even_token_share)
    ranks = [
        json.loads((two_processes / "ppo" / f"rollouts-rank{rank}.json").read_text())
        for rank in (0, 1)
    ]
    assert len(calls) == len(ranks[0]) == len(ranks[1]) == 2
    for update, whole in enumerate(calls):
        halves = [ranks[rank][update]["queries"] for rank in (0, 1)]
        assert len(halves[0]) == len(halves[1]) == 8
        assert sorted(halves[0] + halves[1]) == sorted(whole["queries"])
        assert halves[0] == whole["queries"][0::2] and halves[1] == whole["queries"][1::2]
    assert ranks[0][0]["generator"] == calls[0]["generator"]  # rank 0 seeds as one process does
    assert ranks[0][0]["generator"] != ranks[1][0]["generator"]
    settings = json.loads((two_processes / "ppo" / "settings.json").read_text())
    assert settings["processes"] == 2
    assert (two_processes / "ppo" / "policy" / "model.safetensors").is_file()


def test_a_ppo_minibatch_step_on_two_processes_is_the_one_process_step(
    inputs, two_processes, tmp_path
):
    """Each process takes half of a fixed batch of rollouts whose halves hold 20 and 6 reply
    tokens; the step's policy and value losses are token means over the whole minibatch (not
    the mean of each process's own token mean, which would weight the shorter half's tokens
    more than three times as much), so the weights are the one-process step's."""
    assert sum(REPLY_LENGTHS[: ROWS // 2]) != sum(REPLY_LENGTHS[ROWS // 2 :])
    ppo_minibatch_step({"policy": inputs["policy"], "output_dir": str(tmp_path)})
    assert_same_weights(
        tmp_path / "model.safetensors", two_processes / "ppo-step" / "model.safetensors"
    )
    start = models.load_causal_lm(inputs["policy"], models.load_tokenizer(inputs["policy"]))
    moved = load_file(tmp_path / "model.safetensors")
    assert any(  # the step did move the weights
        not torch.equal(moved[f"policy.{name}"], tensor)
        for name, tensor in start.state_dict().items()
        if f"policy.{name}" in moved
    )


if __name__ == "__main__":
    run_spec(sys.argv[1])
