"""The online loop's scale flags (training/online.py): --precision and --lora-rank reach both
trainers launched as two CPU processes (accelerate launch, gloo), a failed
launch stopping the round with one line, and the trainer Args built from the loop's flags."""

from __future__ import annotations

import dataclasses
import gzip
import json
from pathlib import Path

import pytest
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from hhdata.io.read import bundled_sample_path
from hhdata.pipeline import build_release
from tests.test_online import TEST, TRAIN, loop_args
from training import online, ppo, reward_model, sft
from training.common import UsageError, parse_args, run_cli

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def start(tmp_path_factory) -> dict[str, str]:
    """tests/test_online.py's starting point, cheaper: release 1.0.0 of real pairs, a reward
    model of 2 steps (proxy and gold at once: these tests check the training steps, not the
    labels) and an SFT policy of 2 steps on its tokenizer."""
    root = tmp_path_factory.mktemp("online-scale-start")
    lines = gzip.open(bundled_sample_path(), "rt", encoding="utf-8").read().splitlines()
    raw = root / "raw" / "helpful-base"
    raw.mkdir(parents=True)
    (raw / "train.jsonl").write_text("\n".join(lines[:TRAIN]) + "\n", encoding="utf-8")
    (raw / "test.jsonl").write_text("\n".join(lines[TRAIN : TRAIN + TEST]) + "\n", encoding="utf-8")
    release = str(build_release([root / "raw"], version="1.0.0", out=root / "releases").path)
    rm = reward_model.Args(
        data=release, run_dir=str(root / "rm0"), max_steps=2, max_length=128, batch_size=8
    )
    reward_model.main(dataclasses.replace(rm, max_eval_pairs=8))
    sft.main(
        sft.Args(
            data=release,
            tokenizer=str(root / "rm0"),
            output_dir=str(root / "sft"),
            max_steps=2,
            batch_size=8,
            max_length=128,
            eval_rows=8,
        )
    )
    rm0, policy = str(root / "rm0"), str(root / "sft")
    return {"release": release, "rm0": rm0, "gold": rm0, "sft": policy}


def one_round(start: dict, work_dir: Path, **changes) -> online.Args:
    """The test_online loop cut to one round of 2 reward-model steps and one PPO update."""
    changes = {"rounds": 1, "ppo_total_episodes": 8} | changes
    return loop_args(start, work_dir, **changes)


def settings(run_dir: Path) -> dict:
    return json.loads((run_dir / "settings.json").read_text())


def assert_trained_plain_models(round_dir: Path) -> None:
    """Both trainers saved plain transformers models (LoRA merged), loadable with AutoModel."""
    rm, policy = round_dir / "reward-model" / "model", round_dir / "ppo" / "policy"
    AutoModelForSequenceClassification.from_pretrained(rm)
    AutoModelForCausalLM.from_pretrained(policy)
    for folder in (rm, policy):
        assert not any("lora" in name for name in load_file(folder / "model.safetensors"))


@pytest.mark.slow
def test_two_process_launches_train_the_round(start, tmp_path, monkeypatch):
    """--launch-config training/configs/ddp.yaml --num-processes 2 --precision bf16
    --lora-rank 4: both training steps run as two-process launches (on CPU:
    ACCELERATE_USE_CPU, so accelerate takes gloo) at bf16 with rank-4 adapters (their settings
    say so), the loop's own flags reach them, they save merged models, and the loop reads their
    metrics from the run folders."""
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    work_dir = tmp_path / "loop"
    args = one_round(
        start,
        work_dir,
        launch_config="training/configs/ddp.yaml",
        num_processes=2,
        precision="bf16",
        lora_rank=4,
        stop_after="1:ppo",  # measuring runs in the loop's process, as without a launch
    )
    assert online.main(args) == {"stopped_after": "1:ppo"}
    folder = online.round_dir(work_dir, 1)
    journal = online.read_journal(work_dir)
    assert journal[(1, "release")]["result"]["version"] == "1.1.0"
    for step, run_dir in (("reward_model", "reward-model"), ("ppo", "ppo")):
        recorded = settings(folder / run_dir)
        assert recorded["processes"] == 2
        assert (recorded["args"]["precision"], recorded["args"]["lora_rank"]) == ("bf16", 4)
        assert recorded["args"]["seed"] == 1
        assert (folder / f"{step}.log").is_file()
        metrics = json.loads((folder / run_dir / "metrics.json").read_text())
        assert journal[(1, step)]["result"]["run"] == str(folder / run_dir)
    assert journal[(1, "ppo")]["result"]["proxy_win_rate"] == metrics["evaluation"]["win_rate"]
    assert settings(folder / "reward-model")["args"]["batch_size"] == 8  # --rm-batch-size
    assert settings(folder / "ppo")["args"]["learning_rate"] == 1e-3  # --ppo-learning-rate
    assert_trained_plain_models(folder)


def test_a_missing_launch_config_is_one_line_before_anything_runs(tmp_path, capsys):
    work_dir = tmp_path / "loop"
    argv = ["--data", "releases/1.0.0", "--work-dir", str(work_dir)]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(online.main, online.Args, argv + ["--launch-config", "nowhere.yaml"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "--launch-config nowhere.yaml: no such file" in error
    assert not work_dir.exists()


@pytest.mark.parametrize("config", ["fsdp.yaml", "deepspeed-zero3.yaml"])
def test_a_sharded_launch_config_needs_one_reward_model_batch_per_process(config):
    """FSDP and DeepSpeed run as many passes on every process: the reward model refuses
    micro-batches cut by each process's lengths, so the loop refuses the config before round 1
    unless --rm-micro-batch-cost -1, which reaches the reward model's Args."""
    path = f"training/configs/{config}"
    with pytest.raises(UsageError, match="add --rm-micro-batch-cost -1"):
        online.check_launch(online.Args(launch_config=path))
    args = online.Args(launch_config=path, rm_micro_batch_cost=-1)
    online.check_launch(args)
    assert online.trainer_args(reward_model.Args, args, "rm_").micro_batch_cost == -1


def test_a_failed_launch_is_one_line_naming_the_step_and_its_log(tmp_path):
    """A config accelerate reads but its launcher refuses (two processes on one GPU id):
    LaunchError (an HhDataError: one line, exit code 2 on the command line) naming the step and
    its log, and no metrics read."""
    config = tmp_path / "one-gpu.yaml"
    config.write_text(
        Path("training/configs/ddp.yaml").read_text().replace("gpu_ids: all", "gpu_ids: '0'")
    )
    args = online.Args(launch_config=str(config), num_processes=2)
    online.check_launch(args)  # accelerate reads it: the failure comes from the launch itself
    run_dir, log = tmp_path / "rm", tmp_path / "reward_model.log"
    trainer = reward_model.Args(run_dir=str(run_dir), max_steps=1)
    with pytest.raises(online.LaunchError) as error:
        online.train(args, reward_model, trainer, run_dir, log, "round 1 reward_model")
    message = str(error.value)
    assert message.startswith(
        f"round 1 reward_model: the launched trainer exited with code 1; its output is in {log} "
        "(last line: ValueError: Less than two GPU ids"
    )
    assert "\n" not in message and log.is_file()
    assert not (run_dir / "metrics.json").exists()


@pytest.mark.parametrize(
    "trainer",
    [
        reward_model.Args(run_dir="r", max_steps=3, learning_rate=2e-3, resume=True),
        ppo.Args(policy="p", normalize_reward=False, precision="bf16", lora_rank=4, kl_coef=0.1),
    ],
)
def test_a_launched_trainer_parses_the_args_the_loop_built(trainer):
    """command_line(args) is what the launched trainer's own command line reads back as args."""
    assert parse_args(type(trainer), online.command_line(trainer)) == trainer


def test_trainer_args_take_the_prefixed_and_the_scale_flags():
    args = online.Args(rm_max_steps=3, ppo_kl_coef=0.2, precision="bf16", lora_rank=2)
    rm = online.trainer_args(reward_model.Args, args, "rm_", run_dir="x")
    policy = online.trainer_args(ppo.Args, args, "ppo_", generator="transformers")
    assert (rm.max_steps, rm.run_dir, rm.precision, rm.lora_rank) == (3, "x", "bf16", 2)
    assert (policy.kl_coef, policy.precision, policy.lora_rank) == (0.2, "bf16", 2)
    assert policy.batch_size == args.ppo_batch_size and policy.total_episodes == 256
