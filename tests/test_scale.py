"""training.scale: LoRA trains only adapters and merges into plain transformers models, gradient
checkpointing keeps the gradients, bf16 runs every trainer, PPO's reference is the policy with
its adapters off and PPO's gradient accumulation is exact (two gloo processes training as one:
tests/test_distributed.py)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from hhdata.errors import HhDataError
from tests.test_ppo import SMALL, even_token_share, tiny_runs  # noqa: F401 (a fixture)
from tests.test_reward_model import synthetic_file  # noqa: F401 (a fixture)
from tests.test_sft import tiny_args, write_pairs
from training import models, ppo, reward_model, scale, sft
from training.common import UsageError, load_pairs

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def rows():
    return load_pairs(None)[0]["test"]


@pytest.fixture(scope="module")
def tokenizer(rows):
    return models.train_tiny_tokenizer([row["chosen_text"] for row in rows[:400]], vocab_size=512)


def tiny_lm(tokenizer, seed=0):
    return models.load_causal_lm(models.TINY, tokenizer, seed=seed)


def lm_batch(tokenizer, rows, count=4):
    batch = tokenizer(
        [row["chosen_text"][:200] for row in rows[:count]], return_tensors="pt", padding=True
    )
    return {**batch, "labels": batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)}


def train_steps(model, batch, steps=3, lr=1e-2):
    optimizer = torch.optim.AdamW(scale.trainable_parameters(model), lr=lr)
    for _ in range(steps):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


# ---- LoRA -------------------------------------------------------------------------------------


def test_lora_trains_only_the_adapters_and_the_merged_save_is_a_plain_model(
    tmp_path, tokenizer, rows
):
    model = tiny_lm(tokenizer)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    lora = scale.add_lora(model, rank=4, alpha=8)
    batch = lm_batch(tokenizer, rows)
    with torch.no_grad():  # B starts at zero: the adapted model is the base model
        assert torch.equal(model(**batch).logits, tiny_lm(tokenizer)(**batch).logits)
    train_steps(model, batch)
    after = model.state_dict()
    adapters = [name for name in after if "lora_" in name]
    assert adapters and all(".lora_A." in n or ".lora_B." in n for n in adapters)
    for name, tensor in after.items():
        if "lora_" not in name:  # every base weight, wherever LoRA sits or not
            assert torch.equal(tensor, before[name.replace(".base_layer", "")]), name
    assert any(not torch.equal(after[n], torch.zeros_like(after[n])) for n in adapters if "_B" in n)
    with torch.no_grad():
        adapted = model(**batch).logits

    scale.merge_lora(lora)
    model.save_pretrained(tmp_path / "merged")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert set(loaded.state_dict()) == set(before)  # plain names, no adapter left
    with torch.no_grad():
        assert torch.allclose(loaded(**batch).logits, adapted, atol=1e-5)
        assert not torch.allclose(loaded(**batch).logits, tiny_lm(tokenizer)(**batch).logits)
    changed = {n for n in before if not torch.equal(loaded.state_dict()[n], before[n])}
    targets = scale.lora_targets("llama")
    assert changed and all(n.split(".")[-2] in targets for n in changed)  # only adapted layers


def test_the_reference_is_the_policy_with_its_adapters_off(tokenizer, rows):
    policy = tiny_lm(tokenizer)
    lora = scale.add_lora(policy, rank=4, alpha=8)
    train_steps(policy, lm_batch(tokenizer, rows))
    reference = scale.AdapterDisabled(policy, lora)
    base = tiny_lm(tokenizer)  # the SFT weights the policy started from
    ids = lm_batch(tokenizer, rows)["input_ids"]
    with torch.no_grad():
        assert torch.allclose(reference(input_ids=ids).logits, base(input_ids=ids).logits)
        hidden = reference.get_decoder()(input_ids=ids).last_hidden_state
        assert torch.allclose(hidden, base.get_decoder()(input_ids=ids).last_hidden_state)
        assert not torch.allclose(policy(input_ids=ids).logits, base(input_ids=ids).logits)
    assert reference.config is policy.config
    assert sum(p.numel() for p in scale.trainable_parameters(policy)) < 0.2 * sum(
        p.numel() for p in policy.parameters()
    )


def test_lora_targets_per_architecture_and_errors(tokenizer):
    assert scale.lora_targets("bert")[:3] == ["query", "key", "value"]
    assert scale.lora_targets("llama", "q_proj, v_proj") == ["q_proj", "v_proj"]
    with pytest.raises(UsageError, match="no default LoRA target modules for model type 'xlnet'"):
        scale.lora_targets("xlnet")
    with pytest.raises(UsageError, match="--lora-target-modules"):
        scale.add_lora(tiny_lm(tokenizer), 4, 8, "no_such_layer")


def test_lora_on_the_minilm_encoder_leaves_the_pooler_alone():
    tokenizer = models.load_tokenizer(models.MINILM)
    backbone = models.load_backbone(models.MINILM, tokenizer)
    scale.add_lora(backbone, rank=2, alpha=4)
    adapted = {n.split(".lora_")[0] for n, _ in backbone.named_parameters() if ".lora_" in n}
    assert len(adapted) == 6 * 6  # six layers: query, key, value, 2 output denses, intermediate
    assert not any(name.startswith("pooler") for name in adapted)


# ---- gradient checkpointing ------------------------------------------------------------------


def count_calls(module) -> list:
    """A list that grows by one at each run of `module.forward` (hooks are not re-run when a
    checkpoint recomputes, so the forward itself is wrapped)."""
    calls, forward = [], module.forward

    def counted(*args, **kwargs):
        calls.append(1)
        return forward(*args, **kwargs)

    module.forward = counted
    return calls


def test_gradient_checkpointing_gives_the_same_gradients(tokenizer, rows):
    batch = lm_batch(tokenizer, rows)
    grads, calls = {}, {}
    for checkpointing in (False, True):
        model = tiny_lm(tokenizer).train()
        if checkpointing:
            scale.enable_gradient_checkpointing(model)
        # the layer's forward is what is checkpointed: its MLP runs again in the backward pass
        count = count_calls(model.model.layers[0].mlp)
        model(**batch).loss.backward()
        grads[checkpointing] = {n: p.grad for n, p in model.named_parameters()}
        calls[checkpointing] = len(count)
    assert calls == {False: 1, True: 2}  # the layer ran again in the backward pass
    for name, grad in grads[False].items():
        assert torch.allclose(grads[True][name], grad, atol=1e-6), name


# ---- the trainers under the flags ----------------------------------------------------------


def test_fp16_without_a_gpu_is_refused(tmp_path):
    """accelerate would train in fp32 and the run would record fp16; the trainer refuses."""
    with pytest.raises(UsageError, match=r"--precision fp16 needs a GPU .* use --precision bf16"):
        sft.main(sft.Args(precision="fp16", output_dir=str(tmp_path / "sft")))


def test_sft_in_bf16_with_lora_and_checkpointing_saves_a_plain_model(tmp_path, rows, tokenizer):
    data = write_pairs(tmp_path / "pairs.parquet", rows[:40], ["train"])
    runs = {}
    for name, flags in {
        "fp32": {},
        "bf16": dict(precision="bf16", lora_rank=4, gradient_checkpointing=True),
    }.items():
        args = tiny_args(tmp_path, tokenizer, data=data, output_dir=str(tmp_path / name), **flags)
        runs[name] = sft.main(args)
    losses = runs["bf16"]["train_loss"]
    assert len(losses) == 2 and all(map(torch.isfinite, torch.tensor(losses)))
    assert losses[0] != runs["fp32"]["train_loss"][0]  # autocast did act (bf16 rounding)
    assert losses[0] == pytest.approx(runs["fp32"]["train_loss"][0], rel=0.02)
    saved = load_file(tmp_path / "bf16" / "model.safetensors")
    assert not any("lora" in name for name in saved)
    initial = tiny_lm(tokenizer, seed=1).state_dict()  # sft seeds the tiny model with --seed
    assert torch.equal(saved["model.embed_tokens.weight"], initial["model.embed_tokens.weight"])
    assert not torch.equal(
        saved["model.layers.0.self_attn.q_proj.weight"],
        initial["model.layers.0.self_attn.q_proj.weight"],
    )
    settings = json.loads((tmp_path / "bf16" / "args.json").read_text())["args"]
    assert settings["precision"] == "bf16" and settings["lora_rank"] == 4


def test_an_interrupted_lora_run_resumes_to_the_same_weights(tmp_path, rows, tokenizer):
    """Checkpoints hold the adapters beside the frozen weights; resuming rebuilds the adapters
    and lands on the unbroken run's merged model."""
    data = write_pairs(tmp_path / "pairs.parquet", rows[:40], ["train"])
    flags = dict(data=data, max_steps=3, save_every=10, lora_rank=4, learning_rate=1e-2)
    whole = tiny_args(tmp_path, tokenizer, output_dir=str(tmp_path / "whole"), **flags)
    sft.main(whole)
    cut = dataclasses.replace(whole, output_dir=str(tmp_path / "cut"), stop_after=2)
    assert sft.main(cut) == {"stopped_after": 2}
    sft.main(dataclasses.replace(cut, stop_after=0, resume=True))
    a, b = (load_file(tmp_path / run / "model.safetensors") for run in ("whole", "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


def test_reward_model_in_bf16_with_lora_saves_a_plain_classifier(tmp_path, synthetic_file):  # noqa: F811
    args = reward_model.Args(
        data=str(synthetic_file),
        run_dir=str(tmp_path / "rm"),
        max_length=48,
        batch_size=8,
        max_steps=2,
        max_train_pairs=32,
        max_eval_pairs=16,
        precision="bf16",
        lora_rank=4,
        gradient_checkpointing=True,
    )
    metrics = reward_model.main(args)
    assert torch.isfinite(torch.tensor(metrics["train"]["final_loss"]))
    checkpoint = load_file(tmp_path / "rm" / "checkpoints" / "step-0000002" / "model.safetensors")
    assert any(".lora_A." in name for name in checkpoint)  # resumable as it trained
    classifier = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm" / "model")
    assert set(classifier.state_dict()) == {
        name.replace(".base_layer", "").replace("backbone.", "model.")
        for name in checkpoint
        if "lora_" not in name
    }


def test_ppo_with_lora_in_bf16_trains_adapters_against_the_base_as_reference(tiny_runs, tmp_path):  # noqa: F811
    settings = dict(SMALL, total_episodes=32, batch_size=16, eval_prompts=8, learning_rate=3e-2)
    args = ppo.Args(
        policy=str(tiny_runs / "sft"),
        output_dir=str(tmp_path / "ppo"),
        precision="bf16",
        lora_rank=8,
        lora_alpha=16,
        gradient_checkpointing=True,
        **settings,
    )
    metrics = ppo.main(args, score_fn=even_token_share)
    first, last = metrics["history"][0], metrics["history"][-1]
    # before the first step the policy is its reference: KL 0 (up to bf16 rounding of one pass)
    assert abs(first["kl"]) < 0.05 and last["kl"] > first["kl"]
    assert metrics["held_out"][0]["kl"] == pytest.approx(0.0, abs=0.05)
    saved = load_file(tmp_path / "ppo" / "policy" / "model.safetensors")
    sft_weights = load_file(tiny_runs / "sft" / "model.safetensors")
    assert saved.keys() == sft_weights.keys()  # merged: loads as the SFT model did
    assert torch.equal(saved["model.norm.weight"], sft_weights["model.norm.weight"])
    assert not torch.equal(
        saved["model.layers.1.mlp.down_proj.weight"],
        sft_weights["model.layers.1.mlp.down_proj.weight"],
    )
    value = load_file(tmp_path / "ppo" / "value.safetensors")
    assert not any("lora" in name for name in value)


def test_ppo_gradient_accumulation_takes_the_same_step(tiny_runs, tmp_path):  # noqa: F811
    settings = dict(SMALL, total_episodes=16, batch_size=16, eval_prompts=8, num_ppo_epochs=2)
    base = ppo.Args(policy=str(tiny_runs / "sft"), output_dir=str(tmp_path / "one"), **settings)
    ppo.main(base, score_fn=even_token_share)
    cut = dataclasses.replace(
        base, output_dir=str(tmp_path / "four"), gradient_accumulation_steps=4
    )
    ppo.main(cut, score_fn=even_token_share)
    one, four = (
        load_file(tmp_path / run / "policy" / "model.safetensors") for run in ("one", "four")
    )
    sft_weights = load_file(tiny_runs / "sft" / "model.safetensors")
    for name, tensor in one.items():
        assert torch.allclose(four[name], tensor, atol=1e-5), name
    assert any(not torch.equal(one[n], sft_weights[n]) for n in one)  # it did take steps
    with pytest.raises(HhDataError, match="8 is not divisible by 3"):
        ppo.main(dataclasses.replace(cut, gradient_accumulation_steps=3))


# ---- the accelerate configs ------------------------------------------------------------------


def launch_environment(config: str) -> tuple[object, dict]:
    """What `accelerate launch --config_file training/configs/<config>.yaml` makes of a config:
    the launcher's validated arguments and the environment it gives each process."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    argv = ["--config_file", f"training/configs/{config}.yaml", "-m", "training.sft"]
    args, defaults, _ = _validate_launch_command(launch_command_parser().parse_args(argv))
    if args.use_deepspeed:  # as accelerate's launch_command does before its DeepSpeed launcher
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        return args, prepare_deepspeed_cmd_env(args)[1]
    return args, prepare_multi_gpu_env(args)


def test_the_accelerate_configs_mean_what_docs_scaling_says(monkeypatch):
    from accelerate.utils import DeepSpeedPlugin

    args, _ = launch_environment("ddp")
    assert args.multi_gpu and not args.use_fsdp and not args.use_deepspeed
    args, environment = launch_environment("fsdp")
    assert args.use_fsdp
    fsdp = ("FSDP_VERSION", "FSDP_RESHARD_AFTER_FORWARD", "FSDP_STATE_DICT_TYPE")
    assert {k: environment[k] for k in fsdp} == {
        "FSDP_VERSION": "2",  # per-parameter sharding: frozen and trained weights mix (LoRA)
        "FSDP_RESHARD_AFTER_FORWARD": "true",  # full shard
        "FSDP_STATE_DICT_TYPE": "SHARDED_STATE_DICT",  # checkpoints: one shard per process
    }
    assert environment["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP"
    for stage in (2, 3):
        args, environment = launch_environment(f"deepspeed-zero{stage}")
        with monkeypatch.context() as patch:
            for name, value in environment.items():
                patch.setenv(name, value)
            plugin = DeepSpeedPlugin()  # reads the launcher's environment, as each process does
        assert plugin.zero_stage == stage
        gather = plugin.deepspeed_config["zero_optimization"][
            "stage3_gather_16bit_weights_on_model_save"
        ]
        assert gather == (stage == 3)
    docs = open("docs/scaling.md").read()
    for config in ("ddp", "fsdp", "deepspeed-zero2", "deepspeed-zero3"):
        assert f"accelerate launch --config_file training/configs/{config}.yaml" in docs


# ---- bench/gpu_check.sh ------------------------------------------------------------------------


def gpu_check(*argv: str, tmp_path) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "PYTHONPATH": os.getcwd(),
        "PATH": "/usr/bin:/bin",
    }
    return subprocess.run(
        ["bash", "bench/gpu_check.sh", *argv], capture_output=True, text=True, timeout=900, env=env
    )


def test_gpu_check_stops_at_the_first_failure(tmp_path):
    """set -euo pipefail: no output folder is a usage error, and without a GPU (no nvidia-smi
    here) the script stops before running anything."""
    usage = gpu_check(tmp_path=tmp_path)
    assert usage.returncode != 0 and "usage: bash bench/gpu_check.sh" in usage.stderr
    no_gpu = gpu_check(str(tmp_path / "out"), tmp_path=tmp_path)
    assert no_gpu.returncode != 0 and not (tmp_path / "out").exists()


@pytest.mark.benchmark  # minutes on two busy cores: four trainer runs
def test_gpu_check_dry_run_writes_its_table(tmp_path):
    done = gpu_check("--dry-run", str(tmp_path / "out"), tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "results.json").read_text())
    assert result["dry_run"] and [run["run"] for run in result["runs"]] == [
        "reward model",
        "reward model LoRA r16",
        "PPO",
        "PPO LoRA r16",
    ]
    assert all(run["tokens_per_second"] > 0 for run in result["runs"])
    assert "| PPO LoRA r16 | 2 |" in (tmp_path / "out" / "results.md").read_text()
