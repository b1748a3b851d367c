"""Model options: the tiny model is seeded and self-contained, the embedded ones load offline."""

from __future__ import annotations

import pytest
import torch

from training import models
from training.text import render

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
    assert {tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token} == {
        "<s>",
        "</s>",
        "<pad>",
    }


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
    reloaded = models.load_backbone(
        str(tmp_path / "saved"), models.load_tokenizer(str(tmp_path / "saved"))
    )
    assert torch.equal(reloaded.state_dict()[weight], first.state_dict()[weight])


def test_tiny_tokenizer_chat_template_renders_hh_transcripts_byte_exact():
    """Issue 9: the tiny tokenizer ships a chat template, so tools that need one (TRL's
    trainers) render exactly the transcripts the data holds."""
    from trl.data_utils import apply_chat_template

    from training.common import load_pairs

    rows = load_pairs(None)[0]["test"]
    tokenizer = models.load_tokenizer(models.TINY, texts=[row["chosen_text"] for row in rows[:200]])
    for row in rows:
        for reply, text in (
            (row["chosen"], row["chosen_text"]),
            (row["rejected"], row["rejected_text"]),
        ):
            assert tokenizer.apply_chat_template(row["prompt"] + reply, tokenize=False) == text, (
                row["id"]
            )
    assert any(
        turn["content"] == "" for row in rows for turn in row["chosen"] + row["prompt"]
    )  # edge case covered
    head = tokenizer.apply_chat_template(
        rows[0]["prompt"], tokenize=False, add_generation_prompt=True
    )
    assert head == render(None, rows[0]["prompt"], rows[0]["chosen"], chat=False)[0]
    example = {key: rows[0][key] for key in ("prompt", "chosen", "rejected")}
    rendered = apply_chat_template(example, tokenizer)  # TRL's own preference-data rendering
    assert rendered["prompt"] + rendered["chosen"] == rows[0]["chosen_text"]
    assert rendered["prompt"] + rendered["rejected"] == rows[0]["rejected_text"]
    with pytest.raises(Exception, match="user or assistant, not system"):
        tokenizer.apply_chat_template([{"role": "system", "content": "x"}], tokenize=False)


def test_tiny_tokenizer_needs_the_texts():
    with pytest.raises(models.ModelError, match="texts="):
        models.load_tokenizer(models.TINY)


def test_minilm_loads_offline_from_its_package():
    tokenizer = models.load_tokenizer(models.MINILM)
    model = models.load_backbone(models.MINILM, tokenizer)
    assert models.is_encoder(model.config) and model.config.hidden_size == 384
    assert (
        model.pooler is not None
    )  # kept: the reward model reads it, as BertForSequenceClassification does
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
def test_smollm2_reward_model_saves_as_a_standard_sequence_classifier(tmp_path):
    # transformers keeps a GGUF quantizer on de-quantised models and then refuses to save them;
    # SmolLM2 pads with <|im_end|>, its end of turn, so the saved pad token must be another one
    from transformers import AutoModelForSequenceClassification

    from training.reward_model import RewardModel, load_reward_model, save_reward_model, score
    from training.text import reward_text

    tokenizer = models.load_tokenizer(models.SMOLLM2)
    model = RewardModel(models.load_backbone(models.SMOLLM2, tokenizer))
    save_reward_model(model, tokenizer, tmp_path, {"max_length": 64, "chat_template": True})
    loaded, loaded_tokenizer, settings = load_reward_model(tmp_path)
    before = dict(model.named_parameters())
    assert all(torch.equal(before[name], value) for name, value in loaded.named_parameters())
    classifier, info = AutoModelForSequenceClassification.from_pretrained(
        tmp_path, output_loading_info=True
    )
    assert not info["missing_keys"] and classifier.config.num_labels == 1
    assert (
        settings["end_of_turn_id"]
        == tokenizer.convert_tokens_to_ids("<|im_end|>")
        != classifier.config.pad_token_id
    )
    prompts = [
        [{"role": "user", "content": "Hi"}],
        [{"role": "user", "content": "How do I bake bread at home?"}],
    ]
    replies = [
        [{"role": "assistant", "content": "Hello!"}],
        [{"role": "assistant", "content": "Mix flour and water."}],
    ]
    texts = [reward_text(loaded_tokenizer, p, r, chat=True) for p, r in zip(prompts, replies)]
    assert texts[0].endswith(
        "Hello!<|im_end|>"
    )  # read at the end of turn, not the newline after it
    with torch.no_grad():
        logits = classifier(**loaded_tokenizer(texts, return_tensors="pt", padding=True)).logits[
            :, 0
        ]
    torch.testing.assert_close(
        logits, score(loaded, loaded_tokenizer, settings, prompts, replies), atol=1e-4, rtol=0
    )
