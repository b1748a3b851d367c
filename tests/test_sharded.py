"""Checkpoints, resume and final saves under sharded and data-parallel launches (issue 16).

Each launch runs two CPU processes over gloo with ``torch.distributed.run``. FSDP runs from the
environment accelerate's own launcher makes of training/configs/fsdp.yaml (FSDP2, per-layer
units, sharded checkpoints), through tests/launched.py: accelerate never picks FSDP on CPU
processes by itself, so that script sets it in accelerate's state before the trainer starts.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from tests.launched import two_processes
from tests.test_reward_model import synthetic_file  # noqa: F401 (a fixture)
from tests.test_scale import launch_environment
from training import reward_model, run, scale
from training.common import UsageError

LAUNCHED = str(Path(__file__).with_name("launched.py"))
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py

FLAGS = dict(
    max_length=48,
    batch_size=8,
    max_steps=4,
    max_train_pairs=32,
    max_eval_pairs=16,
    learning_rate=3e-3,
    lora_rank=4,
    save_every=2,
    micro_batch_cost=-1,  # FSDP: the same number of passes on every process
)


def launch(tmp_path, *runs: dict, fsdp: bool) -> subprocess.CompletedProcess:
    """training.reward_model with FLAGS and each of `runs`' flags in turn, in two gloo
    processes (tests/launched.py): under FSDP (fsdp.yaml's environment) or plain data
    parallel."""
    command = [LAUNCHED] + ["--fsdp"] * fsdp + ["training.reward_model"]
    for number, extra in enumerate(runs):
        flags = {**FLAGS, "data": str(tmp_path / "pairs.parquet"), **extra}
        command += ["--then"] * bool(number) + [
            f"--{name.replace('_', '-')}" + ("" if value is True else f"={value}")
            for name, value in flags.items()
        ]
    env = {}
    if fsdp:
        env = {k: v for k, v in launch_environment("fsdp")[1].items() if "FSDP" in k}
    return two_processes(*command, env=env, timeout=300)


def failure(done: subprocess.CompletedProcess) -> str:
    """What a failed launch said: the trainer's one-line errors and exception lines, or the end
    of its output."""
    lines = [line for line in done.stderr.splitlines() if "rror" in line and "Warn" not in line]
    return "\n".join(lines[-20:]) or done.stderr[-3000:]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, synthetic_file):  # noqa: F811
    """The unbroken one-process run that two processes must reproduce."""
    folder = tmp_path_factory.mktemp("one")
    (folder / "pairs.parquet").write_bytes(synthetic_file.read_bytes())
    reward_model.main(
        reward_model.Args(data=str(folder / "pairs.parquet"), run_dir=str(folder / "run"), **FLAGS)
    )
    return folder


def interrupted_and_resumed(tmp_path, one_process, fsdp: bool):
    """Two processes stopped after step 2, then resumed to step 4; returns the run folder."""
    (tmp_path / "pairs.parquet").write_bytes((one_process / "pairs.parquet").read_bytes())
    run_dir = str(tmp_path / "run")
    done = launch(
        tmp_path,
        {"run_dir": run_dir, "stop_after": 2},
        {"run_dir": run_dir, "resume": True},
        fsdp=fsdp,
    )
    assert done.returncode == 0, failure(done)
    assert 'run 0: {"stopped_after": 2}' in done.stdout and 'run 1: "done"' in done.stdout
    return tmp_path / "run"


def assert_same_model(run_dir, one_process) -> None:
    """The resumed two-process run saved the one-process run's model and losses."""
    a = load_file(one_process / "run" / "model" / "model.safetensors")
    b = load_file(run_dir / "model" / "model.safetensors")
    assert a.keys() == b.keys() and not any("lora" in name for name in b)
    for name, tensor in a.items():
        assert torch.allclose(b[name], tensor, atol=1e-5), name
    one = json.loads((one_process / "run" / "metrics.json").read_text())
    two = json.loads((run_dir / "metrics.json").read_text())
    assert two["train"]["final_loss"] == pytest.approx(one["train"]["final_loss"], rel=1e-4)
    log = [record["loss"] for record in checkpoint_log(run_dir)]
    assert log == pytest.approx(
        [record["loss"] for record in checkpoint_log(one_process / "run")], 1e-4
    )


def checkpoint_log(run_dir) -> list[dict]:
    """The training log kept in a run's latest checkpoint, one record per step."""
    checkpoint = run.latest_checkpoint(run_dir)
    return [json.loads(line) for line in (checkpoint / "train_log.jsonl").read_text().splitlines()]


def test_fsdp_run_interrupted_and_resumed_trains_as_one_process(tmp_path, one_process):
    """Under FSDP the checkpoint is accelerate's (each process's shard of the weights and of
    the Adam moments); resumed, the run ends where an unbroken one-process run ends, and the
    final save gathers whole weights, merges LoRA and loads as a plain classifier."""
    run_dir = interrupted_and_resumed(tmp_path, one_process, fsdp=True)
    checkpoint = run.latest_checkpoint(run_dir)
    state = json.loads((checkpoint / "state.json").read_text())
    assert state["weights"] == run.ENGINE and state["step"] == 4
    for engine_folder in ("pytorch_model_fsdp_0", "optimizer_0"):  # a shard per process
        assert len(list((checkpoint / engine_folder).glob("*.distcp"))) == 2
    assert not (checkpoint / "model.safetensors").exists()
    assert_same_model(run_dir, one_process)
    classifier = AutoModelForSequenceClassification.from_pretrained(run_dir / "model")
    assert classifier.num_labels == 1


def test_ddp_run_interrupted_and_resumed_trains_as_one_process(tmp_path, one_process):
    """Data parallel keeps the project's own checkpoint (safetensors, no pickle), loaded
    after prepare like the sharded one."""
    run_dir = interrupted_and_resumed(tmp_path, one_process, fsdp=False)
    checkpoint = run.latest_checkpoint(run_dir)
    assert (checkpoint / "model.safetensors").is_file()
    assert "weights" not in json.loads((checkpoint / "state.json").read_text())
    assert_same_model(run_dir, one_process)


def test_a_checkpoint_resumes_only_under_its_own_kind_of_launch(tmp_path):
    """An FSDP checkpoint holds shards, not the files an unsharded run reads: refused."""
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    (folder / "state.json").write_text(
        json.dumps({"step": 2, "processes": 1, "weights": "accelerate"})
    )
    accelerator = scale.make_accelerator("fp32")
    with pytest.raises(UsageError, match="written by a sharded launch"):
        run.load_checkpoint(folder, {}, None, accelerator)


def test_fsdp_for_generating_trainers_is_refused():
    from accelerate.utils import DistributedType

    with pytest.raises(UsageError, match="launch it with training/configs/ddp.yaml"):
        scale.refuse_sharding(DistributedType.FSDP)
    scale.refuse_sharding(DistributedType.FSDP, allow_fsdp=True)
    scale.refuse_sharding(DistributedType.MULTI_CPU)
