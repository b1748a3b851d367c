"""training.run: checkpoints written atomically and restored exactly, the resume checks, cards
from the package's templates, dropout switched off."""

from __future__ import annotations

import dataclasses
import json
import random

import pytest
import torch
from accelerate import Accelerator

from training import run
from training.common import UsageError


@dataclasses.dataclass(frozen=True)
class Args:
    seed: int = 1
    learning_rate: float = 0.1
    resume: bool = False
    stop_after: int = 0


def tiny_training(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 1))
    return model, torch.optim.AdamW(model.parameters(), lr=0.1)


def train_step(model, optimizer, generator) -> None:
    x = torch.randn(16, 4, generator=generator)
    model(x).pow(2).mean().backward()
    optimizer.step()
    optimizer.zero_grad()


def test_a_checkpoint_restores_weights_moments_rng_and_state(tmp_path):
    accelerator = Accelerator(cpu=True)
    model, optimizer = tiny_training(0)
    generator = torch.Generator().manual_seed(7)
    for _ in range(3):
        train_step(model, optimizer, generator)
    state = {"step": 3, "log": [{"step": 3, "loss": 0.25}], "kl_coef": 0.05}
    run.save_checkpoint(tmp_path, 3, {"model": model}, optimizer, accelerator, state, generator)
    random_draw = random.random()
    train_step(model, optimizer, generator)  # what an unbroken run does next
    expected = {k: v.clone() for k, v in model.state_dict().items()}

    restored, restored_optimizer = tiny_training(1)  # other weights, no moments
    other_generator = torch.Generator().manual_seed(99)
    folder = run.latest_checkpoint(tmp_path)
    assert folder == tmp_path / "checkpoints" / "step-0000003"
    loaded = run.load_checkpoint(
        folder, {"model": restored}, restored_optimizer, accelerator, other_generator
    )
    assert loaded == state
    assert random.random() == random_draw  # python's RNG too
    train_step(restored, restored_optimizer, other_generator)
    for key, value in restored.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_saving_replaces_the_previous_checkpoint_and_ignores_a_half_written_one(tmp_path):
    accelerator = Accelerator(cpu=True)
    model, optimizer = tiny_training(0)
    for step in (1, 2):
        run.save_checkpoint(tmp_path, step, {"model": model}, optimizer, accelerator, {})
    folders = sorted(c.name for c in (tmp_path / "checkpoints").iterdir())
    assert folders == ["step-0000002"]
    (tmp_path / "checkpoints" / "step-0000003.partial").mkdir()  # a save killed half-way
    assert run.latest_checkpoint(tmp_path).name == "step-0000002"
    run.save_checkpoint(tmp_path, 3, {"model": model}, optimizer, accelerator, {})
    assert sorted(c.name for c in (tmp_path / "checkpoints").iterdir()) == ["step-0000003"]


def test_resume_checks(tmp_path):
    accelerator = Accelerator(cpu=True)
    assert run.start_or_resume(tmp_path, Args(), "settings.json", "--run-dir") is None
    with pytest.raises(UsageError, match="no complete checkpoint to resume from"):
        run.start_or_resume(tmp_path, Args(resume=True), "settings.json", "--run-dir")
    run.write_json(tmp_path / "settings.json", run.settings_record(Args(), data="bundled"))
    model, optimizer = tiny_training(0)
    run.save_checkpoint(tmp_path, 1, {"model": model}, optimizer, accelerator, {})
    with pytest.raises(UsageError, match="already holds a run; pass --resume .* --run-dir"):
        run.start_or_resume(tmp_path, Args(), "settings.json", "--run-dir")
    resumed = Args(resume=True, stop_after=5)  # how far to run may change
    assert run.start_or_resume(tmp_path, resumed, "settings.json", "--run-dir").name == (
        "step-0000001"
    )
    with pytest.raises(UsageError, match=r"changed settings \['learning_rate'\]"):
        run.start_or_resume(tmp_path, Args(resume=True, learning_rate=1.0), "settings.json", "-")
    saved = json.loads((tmp_path / "settings.json").read_text())
    assert saved["args"] == {"seed": 1, "learning_rate": 0.1} and "torch" in saved["versions"]


def test_cards_come_from_the_package_templates(tmp_path):
    from importlib import resources

    fields = dict.fromkeys(
        "policy reward_model judge data split held_out episodes updates eval_table samples "
        "settings".split(),
        "FIELD",
    )
    run.write_card(tmp_path / "README.md", "policy_card.md", **fields)
    card = (tmp_path / "README.md").read_text()
    template = resources.files("hhdata").joinpath("cards", "policy_card.md").read_text("utf-8")
    assert card == template.format(**fields) and "FIELD" in card


def test_disable_dropout_zeroes_modules_and_config():
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=50,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=8,
    )
    model = BertModel(config)
    run.disable_dropout(model)
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    assert model.config.hidden_dropout_prob == model.config.attention_probs_dropout_prob == 0.0
