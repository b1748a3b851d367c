"""The reward-model trainer: prefix sharing is exact, it learns, and resume changes nothing."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from dataclasses import replace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from transformers import (
    AutoModel,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    pipeline,
)

from hhdata.errors import HhDataError
from hhdata.pairs.transcript import render_transcript
from hhdata.schema import PAIR_SCHEMA, pair_id
from training import models
from training.common import sha256_file
from training.fast import (
    accumulate_pair_loss,
    length_groups,
    naive_batch,
    packed_batch,
    pair_length,
    pair_rewards,
    prefix_sharing_problem,
)
from training.preference_eval import reliability, summarize
from training.reward_model import (
    EXAMPLE,
    Args,
    RewardModel,
    load_reward_model,
    main,
    preference_loss,
    save_reward_model,
    score,
)
from training.text import (
    encode_pair,
    end_of_turn_id,
    render,
    reply_body,
    reward_text,
    truncate_pair,
    uses_chat_template,
)

WORDS = "the a cat dog tree house river blue green quick slow happy sad run jump sing read".split()
MARKER = "certainly"


@pytest.fixture(autouse=True)
def hermetic(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf" / "datasets"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HHDATA_CACHE", str(tmp_path / "hhdata"))


def synthetic_rows(count: int, seed: int) -> list[dict]:
    """Easy preference: the chosen reply always carries the marker word, the rejected never."""
    rng = random.Random(seed)
    rows = []
    for index in range(count):
        words = lambda n: " ".join(rng.choice(WORDS) for _ in range(n))  # noqa: E731
        prompt = [{"role": "user", "content": words(rng.randint(4, 30))}]
        if rng.random() < 0.3:
            prompt += [
                {"role": "assistant", "content": words(5)},
                {"role": "user", "content": words(6)},
            ]
        reply = words(rng.randint(3, 12)).split()
        chosen = " ".join(reply[: len(reply) // 2] + [MARKER] + reply[len(reply) // 2 :])
        rejected = words(rng.randint(3, 12))
        subset = "synth-helpful-base" if index % 2 else "synth-harmless-base"
        chosen_text = render_transcript(prompt + [{"role": "assistant", "content": chosen}])
        rejected_text = render_transcript(prompt + [{"role": "assistant", "content": rejected}])
        rows.append(
            {
                "id": pair_id(chosen_text, rejected_text),
                "subset": subset,
                "family": subset.split("-")[1],
                "split": "test" if index % 5 == 0 else "train",
                "prompt": prompt,
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}],
                "chosen_text": chosen_text,
                "rejected_text": rejected_text,
                "flags": [],
            }
        )
    return rows


@pytest.fixture(scope="module")
def synthetic_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "pairs.parquet"
    pq.write_table(pa.Table.from_pylist(synthetic_rows(500, seed=0), schema=PAIR_SCHEMA), path)
    return path


@pytest.fixture(scope="module")
def synthetic_release(tmp_path_factory):
    """The same pairs as a real release (raw JSONL -> hhdata pipeline -> release 1.0.0)."""
    from hhdata.pipeline import build_release

    raw = tmp_path_factory.mktemp("raw")
    for row in synthetic_rows(500, seed=0):
        path = raw / row["subset"] / f"{row['split']}.jsonl"
        path.parent.mkdir(exist_ok=True)
        with path.open("a") as handle:
            handle.write(
                json.dumps({"chosen": row["chosen_text"], "rejected": row["rejected_text"]}) + "\n"
            )
    out = tmp_path_factory.mktemp("releases")
    subsets = ["synth-helpful-base", "synth-harmless-base"]
    return build_release(raw, version="1.0.0", out=out, include_synthetic=subsets).path


def tiny_reward_model(rows, seed=0):
    texts = [t for r in rows for t in (r["chosen_text"], r["rejected_text"])]
    tokenizer = models.load_tokenizer(models.TINY, texts=texts)
    return RewardModel(models.load_backbone(models.TINY, tokenizer, seed=seed)), tokenizer


def loss_and_grads(model, pairs, pad_id, share_prefix):
    model.zero_grad()
    chosen, rejected = pair_rewards(model, pairs, pad_id, share_prefix, "cpu")
    loss = preference_loss(chosen, rejected)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return chosen.detach(), rejected.detach(), loss.detach(), grads


def test_prefix_sharing_equals_two_sequences_in_loss_and_gradients():
    rows = synthetic_rows(12, seed=1)
    model, tokenizer = tiny_reward_model(rows)
    pairs = [encode_pair(tokenizer, row, 48, chat=False) for row in rows]
    assert len({len(p) + len(c) + len(r) for p, c, r in pairs}) > 1  # padding is exercised
    packed = loss_and_grads(model, pairs, tokenizer.pad_token_id, share_prefix=True)
    naive = loss_and_grads(model, pairs, tokenizer.pad_token_id, share_prefix=False)
    for shared, separate in zip(packed[:3], naive[:3]):
        torch.testing.assert_close(shared, separate, atol=1e-5, rtol=0)
    assert packed[2] > 0.1  # a real loss, not a degenerate zero
    for name, grad in naive[3].items():
        assert grad.abs().sum() > 0 or "embed" in name, name
        torch.testing.assert_close(packed[3][name], grad, atol=1e-5, rtol=0, msg=name)


@pytest.mark.parametrize("share_prefix", [True, False])
def test_micro_batches_by_length_give_the_batch_gradient(share_prefix):
    """Cut into length-sorted micro-batches, the accumulated loss, rewards and gradient are
    those of the whole padded batch (micro_batch_cost)."""
    rows = synthetic_rows(12, seed=2)
    model, tokenizer = tiny_reward_model(rows)
    pairs = [encode_pair(tokenizer, row, 64, chat=False) for row in rows]
    whole = loss_and_grads(model, pairs, tokenizer.pad_token_id, share_prefix)
    lengths = [pair_length(pair, share_prefix) for pair in pairs]
    groups = length_groups(lengths, cost=8)
    assert 1 < len(groups) < len(pairs)  # a real cut, not one group and not singletons
    assert sorted(i for group in groups for i in group) == list(range(len(pairs)))
    assert [max(lengths[i] for i in g) for g in groups] == sorted(
        max(lengths[i] for i in g) for g in groups
    )
    model.zero_grad()
    chosen, rejected, loss = accumulate_pair_loss(
        preference_loss, model, pairs, tokenizer.pad_token_id, share_prefix, "cpu", cost=8
    )
    for got, expected in zip((chosen, rejected, loss), whole[:3]):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, whole[3][name], atol=1e-5, rtol=0, msg=name)


def test_length_groups_cut_where_padding_costs_more_than_a_pass():
    assert length_groups([500, 20, 30, 480], cost=64) == [[1, 2], [3, 0]]
    assert length_groups([500, 20, 30, 480], cost=-1) == [[1, 2, 3, 0]]
    assert length_groups([100, 100, 100], cost=0) == [[0, 1, 2]]  # nothing to save
    assert length_groups([5, 400], cost=10_000) == [[0, 1]]  # a pass costs more than the padding


def test_packed_sequence_positions_and_mask():
    batch = packed_batch([([1, 2], [3], [4, 5]), ([6], [7, 8], [9])], pad_id=0)
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 2, 3]
    assert batch["position_ids"][1].tolist() == [0, 1, 2, 1, 0]
    assert batch["read_at"].tolist() == [[2, 4], [2, 3]]
    allowed = batch["attention_mask"][0, 0] == 0
    assert allowed[3].tolist() == [True, True, False, True, False]  # rejected skips chosen
    assert allowed[2].tolist() == [True, True, True, False, False]
    assert (batch["attention_mask"][1, 0, 4] == 0).tolist() == [False] * 4 + [True]  # pad


def test_prefix_sharing_is_not_exact_for_an_encoder_so_it_is_refused(tmp_path, synthetic_file):
    rows = synthetic_rows(6, seed=2)
    tokenizer = models.load_tokenizer(models.MINILM)
    model = RewardModel(models.load_backbone(models.MINILM, tokenizer)).eval()
    assert models.is_encoder(model.backbone.config)
    pairs = [encode_pair(tokenizer, row, 48, chat=False) for row in rows]
    with torch.no_grad():
        shared = model(**packed_batch(pairs, tokenizer.pad_token_id))
        separate = pair_rewards(model, pairs, tokenizer.pad_token_id, False, "cpu")
    # the prompt attends to its reply in an encoder, so one shared prompt cannot serve both
    assert (shared[:, 0] - separate[0]).abs().max() > 1e-2
    with pytest.raises(HhDataError, match="bidirectional encoder.*--prefix-sharing off"):
        pair_rewards(model, pairs, tokenizer.pad_token_id, True, "cpu")
    with pytest.raises(HhDataError, match="bidirectional encoder"):
        main(
            Args(
                data=str(synthetic_file),
                model=models.MINILM,
                prefix_sharing="on",
                run_dir=str(tmp_path / "run"),
                max_steps=1,
            )
        )


def test_transcript_rendering_and_truncation_keep_reply_ends():
    rows = synthetic_rows(3, seed=3)
    prompt_text, reply_text = render(None, rows[0]["prompt"], rows[0]["chosen"], chat=False)
    assert prompt_text + reply_text == rows[0]["chosen_text"]
    _, tokenizer = tiny_reward_model(rows)
    prompt, chosen, rejected = encode_pair(tokenizer, rows[0], 12, chat=False)
    assert len(prompt) + max(len(chosen), len(rejected)) <= 12
    assert prompt[0] == tokenizer.bos_token_id
    assert chosen[-1] == rejected[-1] == tokenizer.eos_token_id


def test_calibration_metrics_by_hand():
    margins = torch.tensor([4.0, 4.0, -4.0, 0.2])
    stats = summarize(margins, bins=5)
    assert stats["accuracy"] == 0.75
    assert stats["mean_margin"] == pytest.approx(1.05)
    ece, table = reliability(margins, bins=5)
    top = torch.sigmoid(torch.tensor(4.0, dtype=torch.float64)).item()
    low = torch.sigmoid(torch.tensor(0.2, dtype=torch.float64)).item()
    assert [row["pairs"] for row in table] == [1, 3]
    assert table[1]["accuracy"] == pytest.approx(2 / 3)
    assert ece == pytest.approx(0.25 * abs(1 - low) + 0.75 * abs(2 / 3 - top))


def test_tiny_model_learns_the_marker_per_family_from_a_release(tmp_path, synthetic_release):
    run_dir = tmp_path / "run"
    args = Args(
        data=str(synthetic_release),
        run_dir=str(run_dir),
        max_length=64,
        batch_size=16,
        epochs=2,
        learning_rate=3e-3,
        save_every=1000,
    )
    metrics = main(args)
    assert metrics["overall"]["accuracy"] > 0.9, metrics["overall"]
    assert set(metrics["by_family"]) == {"helpful", "harmless"}
    assert set(metrics["by_subset"]) == {"synth-helpful-base", "synth-harmless-base"}
    assert metrics["overall"]["mean_margin"] > 1
    log = [
        json.loads(line)
        for line in (run_dir / "checkpoints/step-0000050/train_log.jsonl").read_text().splitlines()
    ]
    assert log[-1]["loss"] < 0.5 * log[0]["loss"]
    for name in (
        "metrics.json",
        "settings.json",
        "reliability.png",
        "margins.png",
        "loss.png",
        "model/README.md",
        "model/model.safetensors",
        "tokenizer/tokenizer.json",
    ):
        assert (run_dir / name).is_file(), name
    assert list((run_dir / "tensorboard").iterdir())
    settings = json.loads((run_dir / "settings.json").read_text())
    assert settings["share_prefix"] is True and settings["train_pairs"] == 400
    assert settings["provenance"]["version"] == "1.0.0"
    assert settings["provenance"]["manifest_sha256"] == sha256_file(
        synthetic_release / "manifest.json"
    )
    assert "| family helpful |" in (run_dir / "model/README.md").read_text()

    model, tokenizer, saved = load_reward_model(run_dir)
    rows = [r for r in synthetic_rows(500, seed=0) if r["split"] == "test"][:20]
    chosen = score(
        model, tokenizer, saved, [r["prompt"] for r in rows], [r["chosen"] for r in rows]
    )
    rejected = score(
        model, tokenizer, saved, [r["prompt"] for r in rows], [r["rejected"] for r in rows]
    )
    assert (chosen > rejected).float().mean() > 0.9
    assert_standard_reward_model(run_dir / "model", model, tokenizer, saved, rows)
    card = (run_dir / "model/README.md").read_text()
    assert "## Input format" in card and "end-of-turn token `</s>`" in card
    assert (
        json.dumps(reward_text(tokenizer, *EXAMPLE, chat=saved["chat_template"])) in card
    )  # the exact example


def test_train_config_filters_training_but_evaluation_covers_every_family(tmp_path, synthetic_file):
    args = Args(
        data=str(synthetic_file),
        run_dir=str(tmp_path / "run"),
        train_config="helpful",
        max_length=48,
        max_steps=2,
        batch_size=8,
        max_eval_pairs=30,
    )
    metrics = main(args)
    settings = json.loads((tmp_path / "run/settings.json").read_text())
    assert settings["train_pairs"] == 200
    assert settings["provenance"]["sha256"] == sha256_file(synthetic_file)
    assert set(metrics["by_family"]) == {"helpful", "harmless"}
    with pytest.raises(HhDataError, match="already holds a run"):
        main(args)


def test_resume_after_interruption_equals_uninterrupted_run(tmp_path, synthetic_file):
    base = Args(
        data=str(synthetic_file),
        max_length=48,
        batch_size=8,
        max_steps=6,
        save_every=2,
        max_eval_pairs=40,
        learning_rate=3e-3,
    )
    whole = main(replace(base, run_dir=str(tmp_path / "whole")))
    assert main(replace(base, run_dir=str(tmp_path / "cut"), stop_after=3)) == {"stopped_after": 3}
    assert not (tmp_path / "cut/metrics.json").exists()
    with pytest.raises(HhDataError, match="changed settings"):
        main(replace(base, run_dir=str(tmp_path / "cut"), resume=True, seed=2))
    resumed = main(replace(base, run_dir=str(tmp_path / "cut"), resume=True))
    for key in ("overall", "by_family", "by_subset"):
        assert resumed[key] == whole[key]
    final_whole = load_file(tmp_path / "whole/checkpoints/step-0000006/model.safetensors")
    final_cut = load_file(tmp_path / "cut/checkpoints/step-0000006/model.safetensors")
    for name, tensor in final_whole.items():
        assert torch.equal(tensor, final_cut[name]), name
    assert (tmp_path / "whole/checkpoints/step-0000006/train_log.jsonl").read_text().count(
        "\n"
    ) == 6

    def losses(run):
        log = (tmp_path / run / "checkpoints/step-0000006/train_log.jsonl").read_text()
        return [json.loads(line)["loss"] for line in log.splitlines()]

    assert losses("whole") == losses("cut")


def test_help_lists_every_setting_with_its_docstring():
    result = subprocess.run(
        [sys.executable, "-m", "training.reward_model", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "--prefix-sharing {auto,on,off}" in result.stdout
    assert "pairs per optimizer step, over all processes" in result.stdout
    assert "--no-chat-template" in result.stdout


# ---- truncation: the prompt keeps what fits ------------------------------------------


@pytest.fixture(scope="module")
def bundled_rows():
    from training.common import load_pairs

    return load_pairs(None)[0]["test"][:400]


def full_ids(tokenizer, row, chat=False):
    """Untruncated ids of (prompt, chosen body, rejected body), as the data holds them."""
    end = end_of_turn_id(tokenizer, chat)
    bodies = [
        reply_body(tokenizer, row["prompt"], reply, chat)[1]
        for reply in (row["chosen"], row["rejected"])
    ]
    prompt_text = reply_body(tokenizer, row["prompt"], row["chosen"], chat)[0]
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    return encode(prompt_text), [encode(body) for body in bodies], end


def test_prompt_truncation_keeps_the_whole_prompt_when_it_fits_and_exactly_what_fits_otherwise(
    bundled_rows,
):
    """Bug 1 of issue 9: the prompt slice started at len(prompt) - room, negative whenever the
    prompt fitted in less than twice its length, and only room - len(prompt) tokens survived
    (232 of these 1,200 encodings lost prompt tokens although everything fitted)."""
    tokenizer = models.load_tokenizer(models.MINILM)
    lost, cut = 0, 0
    for max_length in (128, 256, 384):
        for row in bundled_rows:
            prompt, replies, end = full_ids(tokenizer, row)
            kept, chosen, rejected = encode_pair(tokenizer, row, max_length, chat=False)
            assert kept[0] == tokenizer.cls_token_id and chosen[-1] == rejected[-1] == end
            assert prompt[len(prompt) - (len(kept) - 1) :] == kept[1:]  # the prompt's last tokens
            longest = max(len(chosen), len(rejected))
            if 1 + len(prompt) + max(map(len, replies)) + 1 <= max_length:
                lost += kept[1:] != prompt
                assert [chosen[:-1], rejected[:-1]] == replies  # everything fits: nothing cut
            else:
                cut += 1
                assert len(kept) + longest == max_length, (
                    max_length,
                    row["id"],
                )  # exactly what fits
    assert lost == 0
    assert cut > 100  # the cut branch ran too


@settings(max_examples=300, deadline=None)
@given(
    start=st.lists(st.integers(0, 5), max_size=1),
    prompt=st.lists(st.integers(10, 99), max_size=60),
    replies=st.lists(st.lists(st.integers(100, 199), max_size=60), min_size=1, max_size=2),
    max_length=st.integers(4, 80),
)
def test_truncate_pair_laws(start, prompt, replies, max_length):
    kept, *closed = truncate_pair(start, prompt, replies, 7, max_length)
    longest = max(map(len, replies)) + 1
    assert (
        kept[: len(start)] == start
        and prompt[len(prompt) - (len(kept) - len(start)) :] == kept[len(start) :]
    )
    for reply, out in zip(replies, closed):
        assert (
            out[-1] == 7 and reply[: len(out) - 1] == out[:-1]
        )  # a prefix, closed by the end token
        assert len(out) - 1 >= min(len(reply), max_length // 2 - 1)  # a reply keeps half the budget
    if len(start) + len(prompt) + longest <= max_length:
        assert kept == start + prompt and [out[:-1] for out in closed] == replies
    else:
        assert len(kept) + max(map(len, closed)) == max_length  # as many prompt tokens as fit


# ---- one end-of-turn token, where the reward is read ----------------------------------


def chatml_tokenizer(rows):
    """A real ChatML tokenizer as SmolLM2's: `<|im_end|>` ends turns and is also the pad token."""
    texts = [t for r in rows for t in (r["chosen_text"], r["rejected_text"])]
    tokenizer = models.train_tiny_tokenizer(texts, vocab_size=512)
    tokenizer.add_special_tokens(
        {"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]}
    )
    tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token = (
        "<|im_start|>",
        "<|im_end|>",
        "<|im_end|>",
    )
    tokenizer.chat_template = (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
        "message['content'] + "
        "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ "
        "'<|im_start|>assistant\\n' }}{% endif %}"
    )
    return tokenizer


@pytest.mark.parametrize("kind", ["plain", "hh-template", "chatml"])
def test_reward_is_read_at_the_end_of_turn_token_truncated_or_not(kind, bundled_rows):
    """Bug 2 of issue 9: with ChatML the reward was read at the newline after <|im_end|>, and a
    truncated chat reply lost its end token."""
    rows = bundled_rows[:60]
    if kind == "chatml":
        tokenizer, chat = chatml_tokenizer(rows), True
        expected = tokenizer.convert_tokens_to_ids("<|im_end|>")
    else:
        _, tokenizer = tiny_reward_model(rows)
        chat, expected = kind == "hh-template", tokenizer.eos_token_id
    assert uses_chat_template(tokenizer, True)  # the tiny tokenizer ships the HH template
    assert end_of_turn_id(tokenizer, chat) == expected
    lengths = set()
    for max_length in (24, 64, 2048):
        pairs = [encode_pair(tokenizer, row, max_length, chat) for row in rows]
        lengths |= {len(p) + len(c) for p, c, _ in pairs}
        for batch in (
            naive_batch(pairs, tokenizer.pad_token_id),
            packed_batch(pairs, tokenizer.pad_token_id),
        ):
            read = batch["input_ids"].gather(1, batch["read_at"])
            assert (read == expected).all(), kind
    assert min(lengths) <= 24 and max(lengths) > 200  # truncated and whole sequences were read


@pytest.mark.parametrize("role", ["cls", "sep"])
def test_start_and_end_tokens_with_id_0_are_kept(role):
    """Bug 4 of issue 9: `cls_token_id or bos_token_id` took id 0 for missing."""
    from tokenizers import Tokenizer, pre_tokenizers, trainers
    from tokenizers import models as token_models
    from transformers import PreTrainedTokenizerFast

    specials = {
        "cls": ["[CLS]", "[SEP]", "<s>", "</s>", "<pad>"],
        "sep": ["[SEP]", "[CLS]", "<s>", "</s>", "<pad>"],
    }[role]
    bpe = Tokenizer(token_models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator([r["chosen_text"] for r in synthetic_rows(20, seed=4)], trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        cls_token="[CLS]",
        sep_token="[SEP]",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )
    assert getattr(tokenizer, f"{role}_token_id") == 0
    prompt, chosen, rejected = encode_pair(tokenizer, synthetic_rows(1, seed=5)[0], 64, chat=False)
    assert (
        prompt[0] == tokenizer.cls_token_id and chosen[-1] == rejected[-1] == tokenizer.sep_token_id
    )


# ---- prefix sharing only where the attention honours the mask and the positions --------


def test_prefix_sharing_is_exact_with_eager_attention_too():
    rows = synthetic_rows(8, seed=6)
    _, tokenizer = tiny_reward_model(rows)
    config = models.tiny_config(tokenizer)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = RewardModel(AutoModel.from_config(config))
    assert (
        model.backbone.config._attn_implementation == "eager"
        and prefix_sharing_problem(model.backbone) is None
    )
    pairs = [encode_pair(tokenizer, row, 48, chat=False) for row in rows]
    packed = loss_and_grads(model, pairs, tokenizer.pad_token_id, share_prefix=True)
    naive = loss_and_grads(model, pairs, tokenizer.pad_token_id, share_prefix=False)
    for shared, separate in zip(packed[:3], naive[:3]):
        torch.testing.assert_close(shared, separate, atol=1e-5, rtol=0)


def test_prefix_sharing_refused_under_flash_attention():
    rows = synthetic_rows(4, seed=7)
    model, tokenizer = tiny_reward_model(rows)
    model.backbone.config._attn_implementation = (
        "flash_attention_2"  # what from_pretrained(attn_implementation=...) sets
    )
    pairs = [encode_pair(tokenizer, row, 48, chat=False) for row in rows]
    with pytest.raises(HhDataError, match="'flash_attention_2' attention.*--prefix-sharing off"):
        pair_rewards(model, pairs, tokenizer.pad_token_id, True, "cpu")


@pytest.fixture(scope="module")
def tiny_bloom(tmp_path_factory):
    """A real ALiBi model (BLOOM, random, tiny) with the tiny tokenizer, as a local model
    directory."""
    from transformers import BloomConfig, BloomModel

    rows = synthetic_rows(200, seed=0)
    tokenizer = models.load_tokenizer(
        models.TINY, texts=[t for r in rows for t in (r["chosen_text"], r["rejected_text"])]
    )
    torch.manual_seed(0)
    config = BloomConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        n_layer=1,
        n_head=2,
        pad_token_id=tokenizer.pad_token_id,
    )
    folder = tmp_path_factory.mktemp("bloom")
    BloomModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_prefix_sharing_refused_for_alibi_and_auto_turns_it_off(
    tmp_path, synthetic_file, tiny_bloom
):
    base = Args(
        data=str(synthetic_file),
        model=str(tiny_bloom),
        max_length=48,
        batch_size=8,
        max_steps=1,
        max_eval_pairs=8,
    )
    with pytest.raises(
        HhDataError, match=r"--prefix-sharing on: .* ALiBi .*; run with --prefix-sharing off"
    ):
        main(replace(base, prefix_sharing="on", run_dir=str(tmp_path / "on")))
    main(replace(base, run_dir=str(tmp_path / "auto")))
    assert json.loads((tmp_path / "auto/settings.json").read_text())["share_prefix"] is False


# ---- the saved model is a standard sequence-classification model ------------------------


def assert_standard_reward_model(folder, model, tokenizer, settings, rows):
    """Every weight loads into AutoModelForSequenceClassification (num_labels 1), and its logits on
    reward_text equal score() in a padded batch."""
    classifier, info = AutoModelForSequenceClassification.from_pretrained(
        folder, output_loading_info=True
    )
    assert classifier.config.num_labels == 1
    assert (
        not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ), info
    saved_tokenizer = AutoTokenizer.from_pretrained(folder)
    chat = settings["chat_template"]
    texts = [reward_text(saved_tokenizer, row["prompt"], row["chosen"], chat) for row in rows]
    pairs = [encode_pair(saved_tokenizer, row, 10**6, chat) for row in rows]
    assert [saved_tokenizer(text)["input_ids"] for text in texts] == [p + c for p, c, _ in pairs]
    fits = [i for i, (p, c, _) in enumerate(pairs) if len(p) + len(c) <= settings["max_length"]][:6]
    rows, texts, pairs = [rows[i] for i in fits], [texts[i] for i in fits], [pairs[i] for i in fits]
    assert (
        classifier.config.pad_token_id == saved_tokenizer.pad_token_id != settings["end_of_turn_id"]
    )
    assert len({len(p) + len(c) for p, c, _ in pairs}) > 1  # the batch below is padded
    with torch.no_grad():
        logits = classifier.eval()(
            **saved_tokenizer(texts, return_tensors="pt", padding=True)
        ).logits[:, 0]
    ours = score(
        model, tokenizer, settings, [row["prompt"] for row in rows], [row["chosen"] for row in rows]
    )
    torch.testing.assert_close(logits, ours, atol=1e-5, rtol=0)
    assert ours.std() > 0  # the rewards differ: a constant would match anywhere
    reward_pipeline = pipeline(
        "text-classification", model=classifier, tokenizer=saved_tokenizer, function_to_apply="none"
    )
    assert reward_pipeline(texts[-1])[0]["score"] == pytest.approx(ours[-1].item(), abs=1e-5)
    return classifier


@pytest.mark.parametrize("kind", ["minilm", "chatml"])
def test_saved_reward_model_is_a_standard_sequence_classifier(kind, tmp_path, bundled_rows):
    rows = bundled_rows[:12]
    if kind == "minilm":
        tokenizer, chat = models.load_tokenizer(models.MINILM), False
        backbone = models.load_backbone(models.MINILM, tokenizer)
    else:
        tokenizer, chat = chatml_tokenizer(bundled_rows[:100]), True
        backbone = models.load_backbone(models.TINY, tokenizer, seed=3)
    model = RewardModel(backbone)
    save_reward_model(
        model, tokenizer, tmp_path, {"max_length": 512, "chat_template": chat, "base_model": kind}
    )
    loaded, loaded_tokenizer, settings = load_reward_model(tmp_path)
    classifier = assert_standard_reward_model(tmp_path, loaded, loaded_tokenizer, settings, rows)
    expected = {
        "minilm": "BertForSequenceClassification",
        "chatml": "LlamaForSequenceClassification",
    }[kind]
    assert type(classifier).__name__ == expected
    if kind == "chatml":  # SmolLM2 pads with its end of turn: the saved pad must be another token
        assert settings["end_of_turn_id"] == tokenizer.convert_tokens_to_ids("<|im_end|>")
        assert tokenizer.pad_token_id == settings["end_of_turn_id"] != settings["pad_token_id"]
