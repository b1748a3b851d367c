"""DPO: prefix sharing is exact, the losses match their formulas, it learns a planted
preference (and flipped labels unlearn it), resume changes nothing, and the scale flags (LoRA
against the base as reference, bf16, gradient checkpointing) work."""

from __future__ import annotations

import json
import math
import random
from dataclasses import replace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from hhdata.pairs.transcript import render_transcript
from hhdata.schema import PAIR_SCHEMA, pair_id
from tests.test_scale import count_calls
from training import models, scale
from training.common import UsageError, load_pairs, parse_args, run_cli
from training.dpo import Args, all_logprobs, dpo_loss, main, reference_logprobs
from training.fast import (
    ReplyLogprobs,
    accumulate_reply_loss,
    pair_logprobs,
    pair_logprobs_reference,
)
from training.text import encode_pair

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py

WORDS = "the a cat dog tree house river blue green quick slow happy sad run jump sing".split()
MARKER = "certainly"


def marker_rows(count: int, seed: int, flip_train: bool = False) -> list[dict]:
    """Pairs whose chosen reply carries the marker word and whose rejected reply never does;
    one in five is a test pair. `flip_train` swaps chosen and rejected in the training pairs
    only: what a sign error in the loss would teach."""
    rng = random.Random(seed)
    rows = []
    for index in range(count):
        words = lambda n: " ".join(rng.choice(WORDS) for _ in range(n))  # noqa: E731
        prompt = [{"role": "user", "content": words(rng.randint(4, 20))}]
        if rng.random() < 0.3:
            prompt += [
                {"role": "assistant", "content": words(5)},
                {"role": "user", "content": words(6)},
            ]
        reply = words(rng.randint(3, 10)).split()
        chosen = " ".join(reply[: len(reply) // 2] + [MARKER] + reply[len(reply) // 2 :])
        rejected = words(rng.randint(3, 10))
        split = "test" if index % 5 == 0 else "train"
        if flip_train and split == "train":
            chosen, rejected = rejected, chosen
        subset = "synth-helpful-base" if index % 2 else "synth-harmless-base"
        chosen_text = render_transcript(prompt + [{"role": "assistant", "content": chosen}])
        rejected_text = render_transcript(prompt + [{"role": "assistant", "content": rejected}])
        rows.append(
            {
                "id": pair_id(chosen_text, rejected_text),
                "subset": subset,
                "family": subset.split("-")[1],
                "split": split,
                "prompt": prompt,
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}],
                "chosen_text": chosen_text,
                "rejected_text": rejected_text,
                "flags": [],
            }
        )
    return rows


def write_rows(path, rows):
    pq.write_table(pa.Table.from_pylist(rows, schema=PAIR_SCHEMA), path)
    return path


@pytest.fixture(scope="module")
def marker_file(tmp_path_factory):
    return write_rows(tmp_path_factory.mktemp("data") / "pairs.parquet", marker_rows(400, seed=0))


# ---- prefix sharing: the same log-probs, loss and gradient as full sequences ---------------


@pytest.fixture(scope="module")
def pairs_and_models():
    """A policy and another reference (float64, so that only the math is compared) and pairs
    of real HH-RLHF text, some cut by max_length, with prompts and replies of many lengths."""
    rows = load_pairs(None)[0]["test"][:300]
    tokenizer = models.train_tiny_tokenizer([r["chosen_text"] for r in rows], vocab_size=512)
    policy = models.load_causal_lm(models.TINY, tokenizer, seed=3, dtype=torch.float64)
    reference = models.load_causal_lm(models.TINY, tokenizer, seed=4, dtype=torch.float64)
    spread = sorted(rows, key=lambda row: len(row["chosen_text"]))[::30]  # short to long
    pairs = [encode_pair(tokenizer, row, 96, chat=False) for row in spread]
    assert len({tuple(map(len, pair)) for pair in pairs}) >= 8  # many shapes
    longest = [len(prompt) + max(len(chosen), len(rejected)) for prompt, chosen, rejected in pairs]
    assert min(longest) < 96 and max(longest) == 96  # some whole, some cut
    return policy, reference, pairs, tokenizer.pad_token_id


def loss_and_grads(policy, logprobs_fn, reference_logprobs, tokens):
    policy.zero_grad()
    logprobs = logprobs_fn()
    loss = dpo_loss(logprobs, reference_logprobs, tokens, Args(beta=0.5, label_smoothing=0.1))
    loss.backward()
    grads = {name: p.grad.clone() for name, p in policy.named_parameters()}
    return logprobs.detach(), loss.detach(), grads


@pytest.mark.parametrize("share_prefix", [True, False])
def test_reply_logprobs_equal_full_sequences_in_logprobs_loss_and_gradients(
    pairs_and_models, share_prefix
):
    policy, reference, pairs, pad = pairs_and_models
    tokens = torch.tensor([[len(c), len(r)] for _, c, r in pairs])
    with torch.no_grad():
        reference_logprobs = pair_logprobs_reference(reference, pairs)
        fast_reference = pair_logprobs(ReplyLogprobs(reference), pairs, pad, share_prefix, "cpu")
    torch.testing.assert_close(fast_reference, reference_logprobs, atol=1e-5, rtol=0)
    plain = loss_and_grads(
        policy, lambda: pair_logprobs_reference(policy, pairs), reference_logprobs, tokens
    )
    fast = loss_and_grads(
        policy,
        lambda: pair_logprobs(ReplyLogprobs(policy), pairs, pad, share_prefix, "cpu"),
        reference_logprobs,
        tokens,
    )
    torch.testing.assert_close(fast[0], plain[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(fast[1], plain[1], atol=1e-5, rtol=0)
    for name, grad in plain[2].items():
        torch.testing.assert_close(fast[2][name], grad, atol=1e-5, rtol=0, msg=name)
    assert plain[0].std() > 1  # the pairs' log-probs differ: a mix-up of pairs would show


def test_micro_batches_give_the_batch_gradient(pairs_and_models):
    policy, reference, pairs, pad = pairs_and_models
    tokens = torch.tensor([[len(c), len(r)] for _, c, r in pairs])
    with torch.no_grad():
        reference_logprobs = pair_logprobs_reference(reference, pairs)

    def loss_fn(logprobs, group, batch_pairs):
        return dpo_loss(logprobs, reference_logprobs[group], tokens[group], Args(), batch_pairs)

    results = {}
    for cost in (-1, 0):  # one padded batch; as many micro-batches as saves padding
        policy.zero_grad()
        logprobs, loss = accumulate_reply_loss(
            loss_fn, ReplyLogprobs(policy), pairs, pad, True, "cpu", cost
        )
        results[cost] = logprobs, loss, [p.grad.clone() for p in policy.parameters()]
    torch.testing.assert_close(results[0][0], results[-1][0], atol=1e-5, rtol=0)
    torch.testing.assert_close(results[0][1], results[-1][1], atol=1e-5, rtol=0)
    for got, expected in zip(results[0][2], results[-1][2]):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


# ---- the losses against values computed by hand --------------------------------------------

# summed log-probs of (chosen, rejected): policy, reference; reply lengths 2 and 4 tokens
POLICY, REFERENCE = torch.tensor([[-3.0, -5.0]]), torch.tensor([[-4.0, -4.5]])
TOKENS = torch.tensor([[2, 4]])
# h = (-3 - -4) - (-5 - -4.5) = 1.5; with beta 0.1, beta * h = 0.15


def test_sigmoid_loss_by_hand():
    loss = dpo_loss(POLICY, REFERENCE, TOKENS, Args(beta=0.1))
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-0.15)), abs=1e-6)


def test_label_smoothing_is_conservative_dpo_by_hand():
    loss = dpo_loss(POLICY, REFERENCE, TOKENS, Args(beta=0.1, label_smoothing=0.2))
    expected = 0.8 * math.log(1 + math.exp(-0.15)) + 0.2 * math.log(1 + math.exp(0.15))
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    # smoothing pulls the loss's optimum back from an infinite margin: at beta * h = log(4) the
    # gradient vanishes when eps = 0.2 (sigmoid(beta h) = 1 - eps)
    h = torch.tensor(math.log(4) / 0.1, requires_grad=True)
    margin = torch.stack([h, torch.tensor(0.0)])[None]
    dpo_loss(margin, torch.zeros(1, 2), TOKENS, Args(beta=0.1, label_smoothing=0.2)).backward()
    assert abs(h.grad.item()) < 1e-7


def test_ipo_loss_by_hand():
    # per token: (-3 - -4) / 2 - (-5 - -4.5) / 4 = 0.625; target 1 / (2 * 0.1) = 5
    loss = dpo_loss(POLICY, REFERENCE, TOKENS, Args(loss="ipo", beta=0.1))
    assert loss.item() == pytest.approx((0.625 - 5) ** 2, abs=1e-5)


def test_a_micro_batch_divides_by_the_batch_pairs():
    two = torch.cat([POLICY, POLICY]), torch.cat([REFERENCE, REFERENCE]), torch.cat([TOKENS] * 2)
    whole = dpo_loss(*two, Args())
    assert dpo_loss(POLICY, REFERENCE, TOKENS, Args(), batch_pairs=2) * 2 == pytest.approx(
        whole.item()
    )


# ---- training: it learns the planted preference; flipped labels unlearn it ----------------


@pytest.mark.parametrize("flip", [False, True], ids=["labels", "flipped-labels"])
def test_dpo_learns_the_marker_word_and_flipped_labels_fail(tmp_path, flip):
    data = write_rows(tmp_path / "pairs.parquet", marker_rows(400, seed=0, flip_train=flip))
    metrics = main(
        Args(
            policy="tiny",
            data=str(data),
            output_dir=str(tmp_path / "dpo"),
            learning_rate=5e-3,
            beta=0.5,
            batch_size=16,
            max_steps=16,
            max_length=48,
        )
    )
    accuracy = metrics["overall"]["accuracy"]
    # held-out pairs keep their true labels: a model trained on flipped labels (the same as a
    # sign error in the loss) prefers the wrong reply
    assert accuracy < 0.5 if flip else accuracy > 0.9, accuracy
    if flip:
        return
    assert metrics["overall"]["pairs"] == 80
    assert set(metrics["by_family"]) == {"helpful", "harmless"}
    assert set(metrics["by_subset"]) == {"synth-helpful-base", "synth-harmless-base"}
    assert metrics["reward_chosen"] > metrics["reward_rejected"]
    losses = metrics["train"]["loss"]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-5)  # the policy starts as its reference
    assert sum(losses[-3:]) / 3 < 0.5
    run_dir = tmp_path / "dpo"
    assert json.loads((run_dir / "metrics.json").read_text())["overall"]["accuracy"] == accuracy
    card = (run_dir / "policy" / "README.md").read_text()
    assert "family helpful" in card and f"{accuracy:.3f}" in card
    assert "16 steps of 16 pairs" in card
    assert (run_dir / "policy" / "model.safetensors").is_file()
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    loaded = models.load_causal_lm(
        str(run_dir / "policy"), models.load_tokenizer(str(run_dir / "policy"))
    )
    assert loaded.config.model_type == "llama"


def test_resume_after_interruption_equals_uninterrupted_run(tmp_path, marker_file):
    base = Args(
        policy="tiny",
        data=str(marker_file),
        learning_rate=3e-3,
        batch_size=8,
        max_steps=6,
        save_every=2,
        max_length=48,
        max_eval_pairs=24,
    )
    whole = main(replace(base, output_dir=str(tmp_path / "whole")))
    assert main(replace(base, output_dir=str(tmp_path / "cut"), stop_after=3)) == {
        "stopped_after": 3
    }
    assert not (tmp_path / "cut/metrics.json").exists()
    resumed = main(replace(base, output_dir=str(tmp_path / "cut"), resume=True))
    for key in ("overall", "by_family", "by_subset", "reward_chosen", "reward_rejected"):
        assert resumed[key] == whole[key]
    assert resumed["train"]["loss"] == whole["train"]["loss"]
    final = "checkpoints/step-0000006/policy.safetensors"
    final_whole, final_cut = (
        load_file(tmp_path / "whole" / final),
        load_file(tmp_path / "cut" / final),
    )
    for name, tensor in final_whole.items():
        assert torch.equal(tensor, final_cut[name]), name


# ---- the scale flags: LoRA with the base as reference, bf16, gradient checkpointing --------


def test_lora_dpo_in_bf16_with_checkpointing_trains_adapters_and_saves_a_plain_model(
    tmp_path, marker_file
):
    run_dir = tmp_path / "dpo"
    metrics = main(
        Args(
            policy="tiny",
            data=str(marker_file),
            output_dir=str(run_dir),
            learning_rate=1e-2,
            batch_size=8,
            max_steps=2,
            max_length=48,
            max_eval_pairs=8,
            precision="bf16",
            gradient_checkpointing=True,
            lora_rank=4,
        )
    )
    losses = metrics["train"]["loss"]
    assert len(losses) == 2 and all(map(math.isfinite, losses))
    # the adapters start as a zero update: the policy is its reference, in bf16 too
    assert losses[0] == pytest.approx(math.log(2), abs=1e-4)
    checkpoint = load_file(run_dir / "checkpoints/step-0000002/policy.safetensors")
    assert any(".lora_A." in name for name in checkpoint)  # resumable with its adapters
    loaded = AutoModelForCausalLM.from_pretrained(run_dir / "policy")
    tokenizer = models.load_tokenizer(str(run_dir / "tokenizer"))
    initial = models.load_causal_lm(models.TINY, tokenizer, seed=1).state_dict()  # --seed 1
    saved = loaded.state_dict()
    assert set(saved) == set(initial)  # merged: plain names, no adapter left
    changed = {name for name in initial if not torch.equal(saved[name], initial[name])}
    targets = scale.lora_targets("llama")
    assert changed and all(name.split(".")[-2] in targets for name in changed)
    settings = json.loads((run_dir / "settings.json").read_text())["args"]
    assert settings["precision"] == "bf16" and settings["lora_rank"] == 4


def test_an_interrupted_lora_run_resumes_to_the_same_adapters(tmp_path, marker_file):
    """Checkpoints hold the adapters beside the frozen weights; a resumed run rebuilds the
    adapters (and the optimizer over them only) and lands on the unbroken run's weights."""
    base = Args(
        policy="tiny",
        data=str(marker_file),
        learning_rate=1e-2,
        batch_size=8,
        max_steps=4,
        save_every=2,
        max_length=48,
        max_eval_pairs=8,
        lora_rank=4,
    )
    whole = main(replace(base, output_dir=str(tmp_path / "whole")))
    main(replace(base, output_dir=str(tmp_path / "cut"), stop_after=2))
    resumed = main(replace(base, output_dir=str(tmp_path / "cut"), resume=True))
    assert resumed["train"]["loss"] == whole["train"]["loss"]
    assert resumed["overall"] == whole["overall"]
    final = "checkpoints/step-0000004/policy.safetensors"
    final_whole, final_cut = (
        load_file(tmp_path / "whole" / final),
        load_file(tmp_path / "cut" / final),
    )
    assert any("lora_B" in name for name in final_whole)
    for name, tensor in final_whole.items():
        assert torch.equal(tensor, final_cut[name]), name


@pytest.fixture(scope="module")
def tiny_pairs():
    """A tiny tokenizer and a few pairs of real HH-RLHF text."""
    rows = load_pairs(None)[0]["test"][:200]
    tokenizer = models.train_tiny_tokenizer([r["chosen_text"] for r in rows], vocab_size=512)
    return tokenizer, [encode_pair(tokenizer, row, 64, chat=False) for row in rows[:6]]


def test_the_reference_with_adapters_off_equals_a_frozen_sft_copy(tiny_pairs):
    tokenizer, pairs = tiny_pairs
    accelerator = scale.make_accelerator("fp32")
    policy = models.load_causal_lm(models.TINY, tokenizer, seed=5)  # the SFT weights
    lora = scale.add_lora(policy, rank=4, alpha=8)
    with torch.no_grad():  # trained adapters: the policy is no longer its base
        for name, parameter in policy.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.2)
    separate = ReplyLogprobs(models.load_causal_lm(models.TINY, tokenizer, seed=5))  # a copy
    pad = tokenizer.pad_token_id
    expected = all_logprobs(separate, pairs, pad, True, 4, accelerator)
    shared = reference_logprobs(ReplyLogprobs(policy), lora, pairs, pad, True, 4, accelerator)
    torch.testing.assert_close(shared, expected, atol=1e-5, rtol=0)
    with torch.no_grad():
        adapted = pair_logprobs(ReplyLogprobs(policy), pairs, pad, True, "cpu")
    assert (adapted - expected).abs().max() > 0.1  # the adapters are on for the policy itself
    assert all(parameter.grad is None for parameter in policy.parameters())


def test_in_bf16_the_reference_runs_under_the_policys_autocast(tiny_pairs):
    """At step 0 the adapters are a zero update: the policy (prepared, so under accelerate's
    autocast) and its reference must give the same log-probs, or the first loss is not
    log 2 and the implicit rewards carry a bf16 rounding offset."""
    tokenizer, pairs = tiny_pairs
    accelerator = scale.make_accelerator("bf16")
    policy = models.load_causal_lm(models.TINY, tokenizer, seed=5)
    lora = scale.add_lora(policy, rank=4, alpha=8)
    scorer = accelerator.prepare(ReplyLogprobs(policy))
    pad = tokenizer.pad_token_id
    with torch.no_grad():
        in_bf16 = pair_logprobs(scorer, pairs, pad, True, "cpu")
        in_fp32 = pair_logprobs(ReplyLogprobs(policy), pairs, pad, True, "cpu")
    assert not torch.equal(in_bf16, in_fp32)  # autocast acts on the policy
    reference = reference_logprobs(scorer, lora, pairs, pad, True, 4, accelerator)
    assert torch.equal(reference, in_bf16)


def test_gradient_checkpointing_gives_the_dpo_gradients(tiny_pairs):
    tokenizer, pairs = tiny_pairs
    tokens = torch.tensor([[len(c), len(r)] for _, c, r in pairs])
    reference = torch.full((len(pairs), 2), -50.0)
    grads, calls = {}, {}
    for checkpointing in (False, True):
        policy = models.load_causal_lm(models.TINY, tokenizer, seed=2).train()
        if checkpointing:
            scale.enable_gradient_checkpointing(policy)
        count = count_calls(policy.model.layers[0].mlp)
        logprobs = pair_logprobs(ReplyLogprobs(policy), pairs, tokenizer.pad_token_id, True, "cpu")
        dpo_loss(logprobs, reference, tokens, Args()).backward()
        grads[checkpointing] = {n: p.grad for n, p in policy.named_parameters()}
        calls[checkpointing] = len(count)
    assert calls == {False: 1, True: 2}  # the layer ran again in the backward pass
    for name, grad in grads[False].items():
        torch.testing.assert_close(grads[True][name], grad, atol=1e-6, rtol=1e-5, msg=name)


# ---- the command line ------------------------------------------------------------------------


def test_from_an_sft_run_and_usage_errors_on_the_command_line(tmp_path, marker_file, capsys):
    from training import sft

    sft.main(
        sft.Args(
            data=str(marker_file),
            output_dir=str(tmp_path / "sft"),
            max_steps=2,
            max_length=48,
            eval_rows=8,
        )
    )
    metrics = main(
        Args(
            policy=str(tmp_path / "sft"),
            data=str(marker_file),
            output_dir=str(tmp_path / "dpo"),
            max_steps=2,
            max_length=48,
            max_eval_pairs=8,
        )
    )
    assert metrics["train"]["loss"][0] == pytest.approx(math.log(2), abs=1e-5)
    settings = json.loads((tmp_path / "dpo/settings.json").read_text())
    assert settings["policy_run"]["args"]["max_steps"] == 2  # the SFT run's own settings

    with pytest.raises(UsageError, match=r"must be in \[0, 0.5\)"):
        main(Args(label_smoothing=0.5, output_dir=str(tmp_path / "x")))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_code:  # python -m training.dpo runs run_cli
        run_cli(
            main,
            Args,
            ["--policy", str(tmp_path / "sft"), "--data", str(marker_file), "--no-chat-template",
             "--output-dir", str(tmp_path / "other")],
        )  # fmt: skip
    assert exit_code.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and error.count("\n") == 1
    assert error.endswith("; pass --chat-template\n")


def test_help_lists_every_setting_with_its_docstring(capsys):
    with pytest.raises(SystemExit):
        parse_args(Args, ["--help"])
    helped = capsys.readouterr().out
    assert "--loss {sigmoid,ipo}" in helped
    assert "conservative DPO" in helped
    assert "--no-chat-template" in helped
