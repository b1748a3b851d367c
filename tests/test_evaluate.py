"""training.evaluate on tiny models and the local lm_eval task (tests/data/hh_mc), run as
users run it (the command line, offline): every policy and column in the table, the JSON
and the table agreeing, the alignment tax, the judge refused when a policy was trained
against it, and the model-card section replaced, never duplicated."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from hhdata.schema import PAIR_SCHEMA
from training import models
from training.common import UsageError, load_pairs, parse_args, run_cli
from training.evaluate import (
    CARD_END,
    CARD_START,
    Args,
    card_section,
    main,
    update_card,
)
from training.reward_model import RewardModel, save_reward_model

ROOT = Path(__file__).resolve().parents[1]
LOCAL_TASK = ROOT / "tests" / "data" / "hh_mc"

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def mc_items() -> list[dict]:
    """The local multiple-choice task's questions."""
    lines = (LOCAL_TASK / "hh_mc.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def learn_the_answers(model, tokenizer, steps: int = 40) -> None:
    """A few steps of language modelling on the task's questions with their right answers, so
    one policy knows more than the base (its capability rises: an alignment bonus)."""
    texts = [
        f"\n\nHuman: {item['question']}\n\nAssistant: {item['choices'][item['label']]}"
        for item in mc_items()
    ]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        model(**batch, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def save_reward_model_run(folder: Path, tokenizer, seed: int) -> None:
    """A reward-model run directory: the model, and settings.json saying what it trained on."""
    reward = RewardModel(models.load_backbone(models.TINY, tokenizer, seed=seed))
    saved = {"max_length": 128, "chat_template": False, "base_model": "tiny"}
    save_reward_model(reward, tokenizer, folder / "model", saved)
    args = {"data": None, "eval_fraction": 0.2, "train_config": "all", "max_train_pairs": None}
    (folder / "settings.json").write_text(
        json.dumps({"args": args, "provenance": load_pairs(None)[1]})
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory, two_family_rows):
    """base (random), sft (base that learned the task's answers), ppo (policy/ beside the
    settings.json of a run against `proxy`), a judge and a proxy reward model."""
    root = tmp_path_factory.mktemp("runs")
    rows = load_pairs(None)[0]["test"][:300]
    texts = [r["chosen_text"] for r in rows] + [json.dumps(item) for item in mc_items()] * 5
    tokenizer = models.train_tiny_tokenizer(texts, vocab_size=512)
    for name, seed in (("base", 3), ("sft", 3), ("ppo/policy", 5)):
        model = models.load_causal_lm(models.TINY, tokenizer, seed=seed)
        if name == "sft":
            learn_the_answers(model, tokenizer)
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    (root / "sft" / "args.json").write_text(json.dumps({"args": {}, "chat_template": False}))
    save_reward_model_run(root / "judge", tokenizer, seed=11)
    save_reward_model_run(root / "proxy", tokenizer, seed=12)
    ppo_settings = {"args": {"reward_model": str(root / "proxy"), "judge": None}}
    (root / "ppo" / "settings.json").write_text(json.dumps(ppo_settings))
    (root / "ppo" / "policy" / "README.md").write_text("# A PPO policy\n\nIts own card.\n")
    # harmless and helpful pair rows (tests/conftest.py), so every table has both families'
    # columns
    pairs = pa.Table.from_pylist(two_family_rows(40), schema=PAIR_SCHEMA)
    pq.write_table(pairs, root / "pairs.parquet")
    return root


def policy_flags(runs: Path) -> list[str]:
    return [
        flag
        for name in ("base", "sft", "ppo/policy")
        for flag in ("--policy", f"{name.split('/')[0]}={runs / name}")
    ]


@pytest.fixture(scope="module")
def evaluated(runs, tmp_path_factory):
    """`python -m training.evaluate` on the three policies and the local task, offline."""
    out = tmp_path_factory.mktemp("evaluation")
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "HF_DATASETS_OFFLINE": "1",  # lm_eval and datasets must not need the network
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(out / "hf"),
        "OMP_NUM_THREADS": "1",
    }
    command = [
        sys.executable,
        "-m",
        "training.evaluate",
        *policy_flags(runs),
        "--judge",
        str(runs / "judge"),
        "--tasks",
        str(LOCAL_TASK),
        "--data",
        str(runs / "pairs.parquet"),
        "--prompts",
        "16",
        "--query-length",
        "48",
        "--response-length",
        "8",
        "--out",
        str(out / "report"),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    evaluation = json.loads((out / "report" / "evaluation.json").read_text())
    return evaluation, out / "report"


def table_rows(markdown: str, header_start: str) -> tuple[list[str], list[list[str]]]:
    """The header cells and body rows of the markdown table whose header starts so."""
    lines = markdown.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    header = [cell.strip() for cell in lines[first].strip("|").split("|")]
    body = []
    for line in lines[first + 2 :]:
        if not line.startswith("|"):
            break
        body.append([cell.strip() for cell in line.strip("|").split("|")])
    return header, body


def test_the_table_has_every_policy_and_column(evaluated):
    evaluation, folder = evaluated
    markdown = (folder / "evaluation.md").read_text()
    header, body = table_rows(markdown, "| policy | judge score")
    assert header == [
        "policy",
        "judge score: all",
        "judge score: harmless",
        "judge score: helpful",
        "KL to sft",
        "reply tokens: all",
        "reply tokens: harmless",
        "reply tokens: helpful",
    ]
    assert [row[0] for row in body] == ["base", "sft", "ppo"]
    header, body = table_rows(markdown, "| policy | against")
    assert header == [
        "policy",
        "against",
        "win rate: all",
        "win rate: harmless",
        "win rate: helpful",
    ]
    assert len(body) == 6  # every ordered pair of the three policies
    header, body = table_rows(markdown, "| policy | hh_mc")
    assert header == ["policy", "hh_mc: accuracy", "hh_mc: Δ vs base"]
    assert [row[0] for row in body] == ["base", "sft", "ppo"]
    assert (folder / "evaluation.png").stat().st_size > 0


def test_the_json_and_the_table_agree(evaluated):
    evaluation, folder = evaluated
    markdown = (folder / "evaluation.md").read_text()
    _, body = table_rows(markdown, "| policy | judge score")
    for name, *scores, kl, tokens_all, _, _ in body:
        result = evaluation["policies"][name]
        for cell, part in zip(scores, ("all", "harmless", "helpful")):
            stat = result["score"][part]
            assert cell == f"{stat['mean']:.3f} ± {stat['ci95']:.3f}"
        assert kl == f"{result['kl_to_reference']:.3f}"
        assert tokens_all == f"{result['reply_tokens']['all']['mean']:.1f}"
        counts = {part: result["score"][part]["n"] for part in ("all", "harmless", "helpful")}
        assert counts == evaluation["prompts"] and counts["all"] == 16
        assert min(counts["harmless"], counts["helpful"]) > 2
    _, body = table_rows(markdown, "| policy | against")
    for mine, theirs, rate, *_ in body:
        assert rate == f"{evaluation['win_rates'][mine][theirs]['all']:.3f}"
        # a win counts for one side, a tie half for each: the two rates add up to one
        other = evaluation["win_rates"][theirs][mine]["all"]
        assert evaluation["win_rates"][mine][theirs]["all"] + other == pytest.approx(1.0)
    _, body = table_rows(markdown, "| policy | hh_mc")
    for name, accuracy, tax in body:
        result = evaluation["capability"][name]["hh_mc"]
        assert accuracy == f"{result['acc']:.3f} ± {result['stderr']:.3f}"
        assert tax == f"{result['vs_base']:+.3f}"


def test_kl_to_the_reference_and_the_alignment_tax(evaluated):
    evaluation, _ = evaluated
    policies = evaluation["policies"]
    assert policies["sft"]["kl_to_reference"] == 0.0  # the reference itself
    assert policies["ppo"]["kl_to_reference"] > 0
    capability = evaluation["capability"]
    n = len(mc_items())
    for name in ("base", "sft", "ppo"):
        acc = capability[name]["hh_mc"]["acc"]
        assert (acc * n) == pytest.approx(round(acc * n))  # a share of the 20 questions
        # lm_eval's stderr of a mean: the sample standard deviation over sqrt(n)
        expected = math.sqrt(acc * (1 - acc) * n / (n - 1) / n)
        assert capability[name]["hh_mc"]["stderr"] == pytest.approx(expected, abs=1e-6)
    assert capability["sft"]["hh_mc"]["acc"] > capability["base"]["hh_mc"]["acc"] + 0.2
    bonus = capability["sft"]["hh_mc"]["acc"] - capability["base"]["hh_mc"]["acc"]
    assert capability["sft"]["hh_mc"]["vs_base"] == pytest.approx(bonus)
    assert capability["base"]["hh_mc"]["vs_base"] == 0.0


def test_the_card_section_is_written_once_and_replaced(runs, evaluated):
    evaluation, _ = evaluated
    for name in ("base", "sft", "ppo/policy"):
        card = (runs / name / "README.md").read_text()
        assert card.count(CARD_START) == card.count(CARD_END) == 1
        assert f"This policy is `{name.split('/')[0]}`" in card
    readme = runs / "ppo" / "policy" / "README.md"
    before = readme.read_text()
    assert before.startswith("# A PPO policy\n\nIts own card.\n")  # the card's own text kept
    update_card(readme, card_section("ppo", evaluation))  # a re-run with the same results
    assert readme.read_text() == before
    changed = json.loads(json.dumps(evaluation))
    changed["policies"]["ppo"]["score"]["all"]["mean"] = 123.0
    update_card(readme, card_section("ppo", changed))
    after = readme.read_text()
    assert after.count(CARD_START) == 1 and "123.000 ±" in after
    assert after.startswith("# A PPO policy\n\nIts own card.\n")
    update_card(readme, card_section("ppo", evaluation))
    assert readme.read_text() == before


@pytest.mark.parametrize("judge", ["proxy", "proxy/model"])
def test_refuses_a_judge_a_policy_was_trained_against(runs, tmp_path, judge):
    args = Args(policy=tuple(policy_flags(runs)[1::2]), judge=str(runs / judge), out=str(tmp_path))
    with pytest.raises(UsageError, match=r"--policy ppo=.* was trained against the reward model"):
        main(args)
    assert not (tmp_path / "evaluation.json").exists()


def test_policy_is_a_repeated_flag_and_bad_values_are_one_line_errors(runs, capsys):
    args = parse_args(Args, ["--policy", "a=x", "--policy", "b=y"])
    assert args.policy == ("a=x", "b=y")
    assert parse_args(Args, []).policy == ()
    for argv, message in (
        (["--policy", "nodir", "--judge", "j"], "--policy 'nodir': write NAME=DIR"),
        (["--policy", f"a={runs / 'missing'}", "--judge", "j"], "no such folder"),
        ([*policy_flags(runs), "--judge", "j", "--reference", "dpo"], "--reference dpo: no such"),
    ):
        with pytest.raises(SystemExit) as exit_:
            run_cli(main, Args, argv)
        assert exit_.value.code == 2
        error = capsys.readouterr().err
        assert error.startswith("error: ") and message in error and error.count("\n") == 1
