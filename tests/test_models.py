"""Model options: the tiny model is seeded and self-contained, the embedded ones load offline."""

from __future__ import annotations

import pytest
import torch

from training import models
from training.reward_model import render

TEXTS = ["\n\nHuman: How do I bake bread?\n\nAssistant: Mix flour, water, salt and yeast."] * 30


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_tiny_tokenizer_round_trips_and_has_the_special_tokens():
    tokenizer = models.load_tokenizer(models.TINY, texts=TEXTS)
    ids = tokenizer(TEXTS[0])["input_ids"]
    assert tokenizer.decode(ids) == TEXTS[0]
    assert len(ids) < len(TEXTS[0]) / 2  # merges were learned, not bytes only
    assert {tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token} == {"<s>", "</s>", "<pad>"}


def test_tiny_model_weights_are_decided_by_the_seed(tmp_path):
    tokenizer = models.load_tokenizer(models.TINY, texts=TEXTS)
    first = models.load_backbone(models.TINY, tokenizer, seed=3)
    again = models.load_backbone(models.TINY, tokenizer, seed=3)
    other = models.load_backbone(models.TINY, tokenizer, seed=4)
    weight = "layers.0.self_attn.q_proj.weight"
    assert torch.equal(first.state_dict()[weight], again.state_dict()[weight])
    assert not torch.equal(first.state_dict()[weight], other.state_dict()[weight])
    assert not models.is_encoder(first.config)
    lm = models.load_causal_lm(models.TINY, tokenizer, seed=3)
    assert lm.config.vocab_size == len(tokenizer)
    first.save_pretrained(tmp_path / "saved")
    tokenizer.save_pretrained(tmp_path / "saved")
    reloaded = models.load_backbone(str(tmp_path / "saved"), models.load_tokenizer(str(tmp_path / "saved")))
    assert torch.equal(reloaded.state_dict()[weight], first.state_dict()[weight])


def test_tiny_tokenizer_needs_the_texts():
    with pytest.raises(models.ModelError, match="texts="):
        models.load_tokenizer(models.TINY)


def test_minilm_loads_offline_from_its_package():
    tokenizer = models.load_tokenizer(models.MINILM)
    model = models.load_backbone(models.MINILM, tokenizer)
    assert models.is_encoder(model.config) and model.config.hidden_size == 384
    assert model.pooler is None  # the reward head reads token states, not the pooler
    batch = tokenizer(["a cat sat", "a dog ran far away"], return_tensors="pt", padding=True)
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    assert hidden.shape == (2, batch["input_ids"].shape[1], 384)
    assert torch.isfinite(hidden).all()


def test_unknown_model_names_the_options(tmp_path):
    with pytest.raises(models.ModelError, match="tiny"):
        models.load_tokenizer(str(tmp_path / "no-such-model"))


# ~20-50 s on two busy cores (GGUF de-quantisation): run with `pytest -m benchmark`
@pytest.mark.benchmark
def test_smollm2_loads_from_gguf_with_its_chat_template():
    tokenizer = models.load_tokenizer(models.SMOLLM2)
    assert tokenizer.chat_template
    prompt = [{"role": "user", "content": "Hi"}]
    head, reply = render(tokenizer, prompt, [{"role": "assistant", "content": "Hello!"}], chat=True)
    assert head.endswith("<|im_start|>assistant\n") and reply.startswith("Hello!")
    model = models.load_causal_lm(models.SMOLLM2, tokenizer)
    assert model.config.model_type == "llama" and model.config.hidden_size == 576
    ids = tokenizer(head, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits[0, -1]
    # a pretrained instruct model answers a greeting with a word, not noise
    assert tokenizer.decode(logits.argmax()).strip().isalpha()


@pytest.mark.benchmark
def test_smollm2_reward_model_saves_as_safetensors_and_loads_back(tmp_path):
    # transformers keeps a GGUF quantizer on de-quantised models and then refuses to save them
    from training.reward_model import RewardModel, load_reward_model, save_reward_model

    tokenizer = models.load_tokenizer(models.SMOLLM2)
    model = RewardModel(models.load_backbone(models.SMOLLM2, tokenizer))
    save_reward_model(model, tokenizer, tmp_path, {"max_length": 64, "chat_template": True})
    loaded, _, _ = load_reward_model(tmp_path)
    before = dict(model.named_parameters())
    assert all(torch.equal(before[name], value) for name, value in loaded.named_parameters())
