"""DPO and PPO under FSDP2 on two CPU processes (gloo), against one process (issue 16).

One launch (``torch.distributed.run``, two processes, FSDP set in accelerate's state as
tests/launched.py does, from the environment accelerate's launcher makes of
training/configs/fsdp.yaml) runs every sharded run in turn; each test compares with its
one-process twin run here.

- DPO, with LoRA and without: the reference log-probs come from the prepared (sharded) policy
  before its first step, with the adapters off under LoRA; the weights are the one-process
  run's, and the saved policy/ is a plain causal LM.
- PPO with LoRA: sampling and the reference (the policy with its adapters off) run through the
  prepared module, every process running as many passes; stopped after update 1 and resumed,
  the two processes answer the one-process batch of twice the size dealt out, sample apart,
  and save a plain causal LM. One PPO minibatch step on a fixed batch (``ppo.minibatch_step``,
  as tests/test_distributed.py checks it for DDP) gives the one-process step's weights.

Run by hand: ``python -m torch.distributed.run --standalone --nproc_per_node 2 -m
tests.test_sharded_rlhf SPEC.json`` (with the FSDP_* environment) runs the spec's trainers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tests.test_distributed import (
    assert_same_weights,
    dpo_settings,
    inputs,  # noqa: F401 (a fixture)
    ppo_minibatch_step,
    ppo_settings,
    record_rollouts,
)
from tests.test_ppo import even_token_share, tiny_runs  # noqa: F401 (a fixture)
from tests.test_reward_model import synthetic_file  # noqa: F401 (a fixture)
from tests.test_scale import launch_environment
from training import dpo, ppo, run

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py

FSDP = dict(micro_batch_cost=-1)  # every process runs as many passes


def dpo_run(inputs, output_dir: Path, lora: bool) -> dict:  # noqa: F811
    return dict(dpo_settings(inputs, output_dir), lora_rank=4 * lora, **FSDP)


def ppo_run(inputs, output_dir: Path, batch_size: int) -> dict:  # noqa: F811
    return dict(ppo_settings(inputs, output_dir, batch_size), lora_rank=4)


def run_spec(spec_path: str) -> None:
    """The body of each launched process: FSDP in accelerate's state, then every run of the
    spec in turn (PPO's rollouts written per process beside its output)."""
    from tests.launched import fsdp_on_cpu

    fsdp_on_cpu()
    rank = int(os.environ["RANK"])
    calls = []
    record_rollouts(ppo, calls)
    for trainer, settings in json.loads(Path(spec_path).read_text()):
        if trainer == "ppo_minibatch":
            ppo_minibatch_step(settings)
        elif trainer == "ppo":
            result = ppo.main(ppo.Args(**settings), score_fn=even_token_share)
            out = Path(settings["output_dir"]) / f"rollouts-rank{rank}.json"
            out.write_text(json.dumps(calls))
            if rank == 0:
                print(f"ppo run: {json.dumps(result.get('stopped_after', 'done'))}")
        else:
            dpo.main(dpo.Args(**settings))


@pytest.fixture(scope="module")
def sharded(inputs):  # noqa: F811
    """The launch: DPO with and without LoRA, PPO stopped and resumed, a PPO minibatch step,
    each under FSDP on two gloo processes; returns its folder."""
    root = inputs["root"] / "fsdp"
    ppo_dir = root / "ppo"
    spec = [
        ("dpo", dpo_run(inputs, root / "dpo-lora", lora=True)),
        ("dpo", dpo_run(inputs, root / "dpo", lora=False)),
        ("ppo", dict(ppo_run(inputs, ppo_dir, 8), stop_after=1)),
        ("ppo", dict(ppo_run(inputs, ppo_dir, 8), resume=True)),
        ("ppo_minibatch", {"policy": inputs["policy"], "output_dir": str(root / "ppo-step")}),
    ]
    (inputs["root"] / "fsdp-spec.json").write_text(json.dumps(spec))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node", "2", "-m", "tests.test_sharded_rlhf"]
    command += [str(inputs["root"] / "fsdp-spec.json")]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.getcwd(),
        "ACCELERATE_USE_CPU": "true",
    }
    env |= {k: v for k, v in launch_environment("fsdp")[1].items() if "FSDP" in k}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    errors = [line for line in done.stderr.splitlines() if line.startswith("[rank")]
    assert done.returncode == 0, "\n".join(errors)[-3000:] or done.stderr[-3000:]
    runs = [line for line in done.stdout.splitlines() if line.startswith("ppo run: ")]
    assert runs == ["ppo run: 1", 'ppo run: "done"'], done.stdout[-2000:]
    return root


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_dpo_under_fsdp_trains_as_one_process(inputs, sharded, tmp_path, lora):  # noqa: F811
    """Reference log-probs through the sharded policy (adapters off, or before the first step),
    the same steps as one process, and a plain causal LM saved from the gathered weights."""
    name = "dpo-lora" if lora else "dpo"
    one = dpo.main(dpo.Args(**dpo_run(inputs, tmp_path / "one", lora)))
    two = sharded / name
    saved = two / "policy" / "model.safetensors"
    assert_same_weights(tmp_path / "one" / "policy" / "model.safetensors", saved)
    assert not any("lora" in key for key in load_file(saved))
    metrics = json.loads((two / "metrics.json").read_text())
    assert metrics["train"]["loss"] == pytest.approx(one["train"]["loss"], rel=1e-5)
    assert metrics["train"]["loss"][0] == pytest.approx(0.6931, abs=1e-4)  # policy = reference
    assert metrics["overall"]["accuracy"] == one["overall"]["accuracy"]
    checkpoint = run.latest_checkpoint(two)
    assert len(list((checkpoint / "pytorch_model_fsdp_0").glob("*.distcp"))) == 2
    AutoModelForCausalLM.from_pretrained(two / "policy")


def test_ppo_under_fsdp_deals_out_the_prompts_stops_resumes_and_saves(
    inputs,  # noqa: F811
    sharded,
    tmp_path,
    monkeypatch,
):
    """Stopped after update 1 and resumed to 2: per update, the two processes' prompts are the
    one-process batch of twice the size dealt out, sampled with generators seeded apart; the
    checkpoint is FSDP's (a shard per process); policy/ is a plain causal LM, LoRA merged."""
    calls = []
    with monkeypatch.context() as patch:
        patch.setattr(ppo, "rollout", ppo.rollout)  # restored after the run
        record_rollouts(ppo, calls)
        settings = dict(ppo_settings(inputs, tmp_path / "one", 16), lora_rank=4)
        ppo.main(ppo.Args(**settings), even_token_share)
    ranks = [
        json.loads((sharded / "ppo" / f"rollouts-rank{rank}.json").read_text()) for rank in (0, 1)
    ]
    assert len(calls) == len(ranks[0]) == len(ranks[1]) == 2
    for update, whole in enumerate(calls):
        halves = [ranks[rank][update]["queries"] for rank in (0, 1)]
        assert halves[0] == whole["queries"][0::2] and halves[1] == whole["queries"][1::2]
    assert ranks[0][0]["generator"] == calls[0]["generator"]  # rank 0 seeds as one process does
    assert ranks[0][0]["generator"] != ranks[1][0]["generator"]
    assert ranks[0][1]["generator"] != ranks[0][0]["generator"]  # resumed, the stream went on
    metrics = json.loads((sharded / "ppo" / "metrics.json").read_text())
    assert [record["update"] for record in metrics["history"]] == [1, 2]
    assert all(record["sampling_logprob_error"] < 1e-4 for record in metrics["history"])
    assert metrics["history"][0]["first_minibatch_ratio_error"] < 1e-4
    checkpoint = run.latest_checkpoint(sharded / "ppo")
    assert json.loads((checkpoint / "state.json").read_text())["weights"] == run.ENGINE
    assert len(list((checkpoint / "pytorch_model_fsdp_0").glob("*.distcp"))) == 2
    saved = load_file(sharded / "ppo" / "policy" / "model.safetensors")
    assert not any("lora" in key for key in saved)
    AutoModelForCausalLM.from_pretrained(sharded / "ppo" / "policy")
    start = AutoModelForCausalLM.from_pretrained(inputs["policy"]).state_dict()
    assert any(not torch.equal(saved[k], v) for k, v in start.items() if k in saved)  # it moved


def test_a_ppo_minibatch_step_under_fsdp_is_the_one_process_step(
    inputs,  # noqa: F811
    sharded,
    tmp_path,
):
    """Each process takes half of a fixed batch of rollouts (20 and 6 reply tokens); the
    losses are token means over the whole minibatch, so FSDP's step (gradients reduce-scattered
    and averaged) gives the one-process step's weights."""
    ppo_minibatch_step({"policy": inputs["policy"], "output_dir": str(tmp_path)})
    assert_same_weights(tmp_path / "model.safetensors", sharded / "ppo-step" / "model.safetensors")


if __name__ == "__main__":
    run_spec(sys.argv[1])
