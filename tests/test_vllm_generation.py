"""training.vllm_generation: --generator vllm refuses, in one line naming the fix, where vLLM or a
GPU is missing (here both are: the refusals are real, not mocked); the weights pushed into the
engine are the transformers checkpoint's, LoRA merged as peft merges it, the trainer's model left
as it was; vLLM's replies take fast.sample's shape. The engine itself runs only where vllm and
CUDA are (test_real_engine_samples_the_synced_weights, skipped elsewhere)."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
from safetensors import safe_open

from training import best_of_n, models, online, ppo, scale, vllm_generation
from training.common import UsageError, load_pairs, run_cli
from training.rollout import truncate_at_stop

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py
HAVE_VLLM = importlib.util.find_spec("vllm") is not None
HAVE_CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def tokenizer():
    rows = load_pairs(None)[0]["test"]
    return models.train_tiny_tokenizer([row["chosen_text"] for row in rows[:300]], vocab_size=512)


def tiny_lm(tokenizer, seed=0):
    return models.load_causal_lm(models.TINY, tokenizer, seed=seed).eval()


# ---- the refusals ---------------------------------------------------------------------------


@pytest.mark.skipif(HAVE_VLLM and HAVE_CUDA, reason="this machine can run vLLM")
def test_vllm_is_refused_in_one_line_naming_the_fix():
    with pytest.raises(UsageError) as refused:
        vllm_generation.require("vllm")
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith("--generator vllm needs ")
    assert "pip install 'hhdata[vllm]'" in message and "--generator transformers" in message
    assert ("the vllm package" in message) == (not HAVE_VLLM)
    assert ("a CUDA GPU" in message) == (not HAVE_CUDA)
    vllm_generation.require("transformers")  # the default never needs either


@pytest.mark.skipif(HAVE_VLLM and HAVE_CUDA, reason="this machine can run vLLM")
@pytest.mark.parametrize(
    "trainer, argv",
    [
        (ppo, ["--policy", "nowhere", "--reward-model", "nowhere"]),
        (best_of_n, ["--policy", "nowhere", "--reward-model", "nowhere"]),
        (online, ["--data", "nowhere", "--work-dir", "nowhere"]),
    ],
    ids=["ppo", "best_of_n", "online"],
)
def test_each_sampling_trainer_exits_2_on_generator_vllm_before_any_work(
    trainer, argv, capsys, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exited:
        run_cli(trainer.main, trainer.Args, [*argv, "--generator", "vllm"])
    assert exited.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --generator vllm needs ")
    assert "pip install 'hhdata[vllm]'" in lines[0]
    assert not any(tmp_path.iterdir())  # refused before writing anything


def test_generator_flags_parse_and_default_to_transformers():
    assert ppo.Args().generator == best_of_n.Args().generator == "transformers"
    assert online.Args().generator == "transformers"
    args = ppo.Args(generator="vllm", vllm_gpu_memory_utilization=0.5)
    assert args.vllm_gpu_memory_utilization == 0.5 and args.lora_rank == 0  # ScaleArgs kept


# ---- the weights pushed into the engine ------------------------------------------------------


def checkpoint_shapes(model, folder) -> dict[str, tuple]:
    model.save_pretrained(folder, safe_serialization=True)
    with safe_open(str(folder / "model.safetensors"), "pt") as saved:
        return {name: tuple(saved.get_slice(name).get_shape()) for name in saved.keys()}


def test_payload_is_the_transformers_checkpoint_names_and_values(tmp_path, tokenizer):
    model = tiny_lm(tokenizer)
    payload = dict(vllm_generation.checkpoint_weights(model))
    saved = checkpoint_shapes(model, tmp_path)
    assert {name: tuple(t.shape) for name, t in payload.items()} == saved
    assert "lm_head.weight" not in payload  # tied to the embeddings: the checkpoint drops it
    for name, tensor in model.state_dict().items():
        if name in payload:
            assert torch.equal(payload[name], tensor)


def test_payload_merges_lora_as_peft_does_and_leaves_the_trainer_unchanged(tmp_path, tokenizer):
    model = tiny_lm(tokenizer)
    lora = scale.add_lora(model, rank=4, alpha=8)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():  # adapters that change the weights (B starts at zero)
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}

    payload = {name: t.clone() for name, t in vllm_generation.checkpoint_weights(model)}

    after = model.state_dict()
    assert after.keys() == before.keys()  # still adapted: nothing merged or removed
    assert all(torch.equal(after[name], before[name]) for name in before)
    merged = copy.deepcopy(lora).merge_and_unload()
    assert {name: tuple(t.shape) for name, t in payload.items()} == checkpoint_shapes(
        merged, tmp_path
    )
    reference = merged.state_dict()
    for name, tensor in payload.items():
        torch.testing.assert_close(tensor, reference[name], rtol=0, atol=1e-6)
    adapted = [name for name in payload if name not in before]  # before: ...base_layer.weight
    assert adapted and all(name.endswith("proj.weight") for name in adapted)
    for name in adapted:  # they carry the adapters' update, not the bare base weight
        base = before[name.replace(".weight", ".base_layer.weight")]
        assert not torch.allclose(payload[name], base)


def test_payload_with_adapters_switched_off_is_the_base(tokenizer):
    model = tiny_lm(tokenizer)
    base = dict(vllm_generation.checkpoint_weights(copy.deepcopy(model)))
    lora = scale.add_lora(model, rank=4, alpha=8)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.fill_(0.5)
    with lora.disable_adapter():
        payload = dict(vllm_generation.checkpoint_weights(model))
    assert payload.keys() == base.keys()
    assert all(torch.equal(payload[name], base[name]) for name in base)


def test_engine_architecture_ignores_dtype_and_refuses_a_non_folder(tmp_path, tokenizer):
    model = tiny_lm(tokenizer)
    model.save_pretrained(tmp_path / "fp32")
    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    # one engine serves both (the online loop's rounds): same layout, other dtype and path
    assert vllm_generation.architecture(str(tmp_path / "fp32")) == vllm_generation.architecture(
        str(tmp_path / "bf16")
    )
    with pytest.raises(UsageError, match="no config.json.*pass an SFT run directory"):
        vllm_generation.architecture("smollm2-135m")


# ---- vLLM's replies in fast.sample's shape -----------------------------------------------------


def test_replies_padded_like_fast_sample():
    stop = 2
    tokens, logprobs = vllm_generation.pad_replies(
        [[5, 6, 2], [7, 8, 9, 10, 11], [4], [9, 9]],
        [[-0.1, -0.2, -0.3], [-1.0] * 5, [-0.5], [-0.7, -0.8]],
        response_length=4,
        stop_id=stop,
        stopped=[True, False, False, True],
    )
    assert tokens.tolist() == [[5, 6, 2, 2], [7, 8, 9, 10], [4, 2, 2, 2], [9, 9, 2, 2]]
    expected = [[-0.1, -0.2, -0.3, 0], [-1.0] * 4, [-0.5, 0, 0, 0], [-0.7, -0.8, 0, 0]]
    torch.testing.assert_close(logprobs, torch.tensor(expected))
    keep, has_stop = truncate_at_stop(tokens, stop)
    # the fill is the stop token, so a reply cut by the length limit and stopping right there,
    # or a short one, reads as stopped: as with fast.sample's own fill
    assert keep.sum(1).tolist() == [3, 4, 2, 3]
    assert has_stop.tolist() == [True, False, True, True]


# ---- the real engine (a CUDA GPU with vllm installed only) --------------------------------------


@pytest.mark.skipif(not (HAVE_VLLM and HAVE_CUDA), reason="needs vllm and a CUDA GPU")
def test_real_engine_samples_the_synced_weights(tmp_path, tokenizer):
    folder = tmp_path / "policy"
    tiny_lm(tokenizer, seed=0).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    other = tiny_lm(tokenizer, seed=1)
    args = vllm_generation.GeneratorArgs(generator="vllm", vllm_dtype="float32")
    engine = vllm_generation.engine(str(folder), args, max_model_len=64, seed=0)
    engine.sync_weights(other)
    queries = [tokenizer("Human: hello")["input_ids"], tokenizer("Human: what is")["input_ids"]]
    tokens, logprobs = engine.generate(queries, 3, 8, temperature=1.0, stop_id=2, seed=0)
    assert tokens.shape == logprobs.shape == (6, 8)
    # greedy (temperature 0) is the synced model's argmax continuation, up to the stop token
    stop = tokenizer.eos_token_id
    greedy, _ = engine.generate(queries[:1], 1, 6, temperature=0.0, stop_id=stop, seed=0)
    ids = torch.tensor([queries[0]])
    with torch.no_grad():
        for _ in range(6):
            ids = torch.cat([ids, other(input_ids=ids).logits[:, -1:].argmax(-1)], 1)
    expected = ids[0, len(queries[0]) :].tolist()
    if stop in expected:
        expected = expected[: expected.index(stop) + 1]
    assert greedy[0].tolist() == expected + [stop] * (6 - len(expected))
