"""The online loop (training/online.py, training/labellers.py): two rounds on tiny models, each
version released locally and on the local Hub, a kill after every step resumed to the same
final state, the gold annotator's noise, and a malformed label batch that releases nothing."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
from pathlib import Path

import pytest
import torch

from hhdata.io.read import bundled_sample_path
from hhdata.pairs.transcript import render_transcript
from hhdata.pipeline import build_release
from hhdata.release.diff import diff_releases
from hhdata.release.load import load_release
from hhdata.release.manifest import read_manifest
from hhdata.schema import family_of
from training import models, online, reward_model, sft
from training.common import run_cli
from training.labellers import (
    LabelError,
    expected_disagreement,
    gold_choices,
    label_queue,
    parse_labeller,
    preference_probability,
)

TRAIN, TEST = 160, 40  # bundled harmless-base pairs placed as a helpful-base release (below)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One torch thread (before the module's loops run): on two shared cores more threads only
    wait for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def start(tmp_path_factory) -> dict[str, str]:
    """Release 1.0.0 of real pairs, a proxy reward model (its tokenizer), SFT and a gold model.

    The bundled pairs are harmless-base; they are placed as helpful-base here, so the loop's
    comparisons go to helpful-online (harmless prompts' go to harmless-online: tested below).
    """
    root = tmp_path_factory.mktemp("online-start")
    lines = gzip.open(bundled_sample_path(), "rt", encoding="utf-8").read().splitlines()
    raw = root / "raw" / "helpful-base"
    raw.mkdir(parents=True)
    (raw / "train.jsonl").write_text("\n".join(lines[:TRAIN]) + "\n", encoding="utf-8")
    (raw / "test.jsonl").write_text("\n".join(lines[TRAIN : TRAIN + TEST]) + "\n", encoding="utf-8")
    release = build_release([root / "raw"], version="1.0.0", out=root / "releases").path
    settings = dict(data=str(release), max_length=128, batch_size=8, max_eval_pairs=16)
    settings["learning_rate"] = 2e-3
    reward_model.main(reward_model.Args(run_dir=str(root / "rm0"), max_steps=4, **settings))
    sft.main(
        sft.Args(
            data=str(release),
            tokenizer=str(root / "rm0"),
            output_dir=str(root / "sft"),
            max_steps=4,
            batch_size=8,
            max_length=128,
            eval_rows=8,
        )
    )
    # the gold model: trained apart (another seed, more steps), never the proxy being trained
    reward_model.main(
        reward_model.Args(run_dir=str(root / "gold"), seed=2, max_steps=8, **settings)
    )
    return {name: str(root / name) for name in ("rm0", "sft", "gold")} | {"release": str(release)}


def loop_args(start: dict, work_dir: Path, **changes) -> online.Args:
    """The tiniest loop that still trains: 8 comparisons a round, 2 PPO updates."""
    args = online.Args(
        data=start["release"],
        policy=start["sft"],
        labeller=f"gold:{start['gold']}",
        reward_model=start["rm0"],
        work_dir=str(work_dir),
        rounds=2,
        comparisons_per_round=8,
        response_length=8,
        query_length=96,
        sample_batch_size=8,
        eval_prompts=8,
        rm_batch_size=8,
        rm_max_steps=2,
        rm_max_length=128,
        rm_max_eval_pairs=8,
        rm_learning_rate=2e-3,
        ppo_total_episodes=16,
        ppo_batch_size=8,
        ppo_learning_rate=1e-3,
        ppo_reward_norm_samples=8,
        ppo_eval_prompts=4,
    )
    return dataclasses.replace(args, **changes)


@pytest.fixture(scope="module")
def unbroken(start, local_hub, tmp_path_factory) -> Path:
    """A 2-round loop run straight through, publishing to the local Hub."""
    work_dir = tmp_path_factory.mktemp("unbroken") / "loop"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_TOKEN", local_hub.token)
        online.main(loop_args(start, work_dir, repo="org/online-a"))
    return work_dir


def gz_lines(path: Path) -> list[str]:
    return gzip.open(path, "rt", encoding="utf-8").read().splitlines()


# ---- the loop --------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_rounds_release_minor_versions_locally_and_on_the_hub(unbroken, start, local_hub):
    from huggingface_hub import HfApi

    from hhdata.hub import download_release

    releases = unbroken / "releases"
    journal = online.read_journal(unbroken)
    previous = Path(start["release"])
    start_rows = read_manifest(previous)["accounting"]["kept"]
    for number, version in ((1, "1.1.0"), (2, "1.2.0")):
        manifest = read_manifest(releases / version)
        released = journal[(number, "release")]["result"]
        written = journal[(number, "write")]["result"]["helpful-online/train"]
        # row counts add up: the starting rows, plus every comparison written so far, less
        # those the build dropped (all of them new comparisons), each with its reason
        assert written == sum(journal[(n, "label")]["result"]["labelled"] for n in (1, 2)[:number])
        dropped = sum(released["dropped"].values())
        assert set(released["dropped"]) <= {"near_duplicate", "exact_duplicate"}
        assert manifest["accounting"]["kept"] == start_rows + written - dropped
        assert manifest["accounting"]["read"] == start_rows + written
        change = diff_releases(previous, releases / version)
        assert change.change == "minor"
        added = manifest["accounting"]["kept"] - read_manifest(previous)["accounting"]["kept"]
        assert len(change.configs["all"].added) == added > 0
        # on the Hub: tagged, and the tag holds exactly this release
        hub_copy = download_release("org/online-a", version)
        assert (Path(hub_copy) / "manifest.json").read_bytes() == (
            releases / version / "manifest.json"
        ).read_bytes()
        previous = releases / version
    tags = {
        ref.name
        for ref in HfApi(endpoint=local_hub.endpoint)
        .list_repo_refs("org/online-a", repo_type="dataset")
        .tags
    }
    assert {"v1.1.0", "v1.2.0"} <= tags


@pytest.mark.slow
def test_raw_subset_is_byte_exact_hh_with_one_provenance_object_per_line(unbroken, start):
    raw = unbroken / "raw" / "helpful-online"
    lines = gz_lines(raw / "train.jsonl.gz")
    provenance = json.loads((raw / "train.provenance.json").read_text())
    assert len(provenance) == len(lines)
    assert [p["round"] for p in provenance] == sorted(p["round"] for p in provenance)
    assert {p["round"] for p in provenance} == {1, 2}
    assert {p["labeller"] for p in provenance} == {f"gold:{start['gold']}"}
    assert {p["tau"] for p in provenance} == {1.0}
    # the raw records stay {chosen, rejected}, and render the sampled prompt and replies exactly
    labels = [
        label
        for number in (1, 2)
        for label in online.read_jsonl(online.round_dir(unbroken, number) / "labels.jsonl")
    ]
    samples = {
        s["key"]: s
        for number in (1, 2)
        for s in online.read_jsonl(online.round_dir(unbroken, number) / "samples.jsonl")
    }
    for line, label, meta in zip(lines, labels, provenance):
        record = json.loads(line)
        assert set(record) == {"chosen", "rejected"}
        prompt = samples[label["key"]]["prompt"]
        assert record["chosen"] == render_transcript(
            prompt + [{"role": "assistant", "content": label["chosen"]}]
        )
        assert meta["key"] == label["key"]
    # the release's helpful-online rows are exactly these transcripts
    rows = load_release(unbroken / "releases" / "1.2.0")["train"].to_list()
    # the release manifest summarises the sidecar (hhdata build, issue 14's provenance key)
    summary = read_manifest(unbroken / "releases" / "1.2.0")["provenance"]["helpful-online/train"]
    assert summary["rows"] == len(lines)
    assert (
        summary["sha256"]
        == hashlib.sha256((raw / "train.provenance.json").read_bytes()).hexdigest()
    )
    rounds = [p["round"] for p in provenance]
    assert summary["fields"]["round"] == {"1": rounds.count(1), "2": rounds.count(2)}
    assert summary["fields"]["labeller"] == {f"gold:{start['gold']}": len(lines)}
    assert summary["fields"]["tau"] == {"1.0": len(lines)}
    released = {r["chosen_text"] for r in rows if r["subset"] == "helpful-online"}
    dropped = sum(online.read_journal(unbroken)[(2, "release")]["result"]["dropped"].values())
    assert released <= {json.loads(line)["chosen"] for line in lines}
    assert len(released) == len(lines) - dropped


@pytest.mark.slow
def test_measurements_go_to_rounds_json_the_plot_and_the_readme(unbroken):
    report = json.loads((unbroken / "rounds.json").read_text())
    assert [r["version"] for r in report["rounds"]] == ["1.1.0", "1.2.0"]
    for entry in report["rounds"]:
        for name in ("proxy_accuracy_before", "proxy_accuracy_after", "gold_agreement"):
            assert 0.0 <= entry[name] <= 1.0
        low, high = entry["gold_score"]["ci95"]
        assert low <= entry["gold_score"]["mean"] <= high
        assert 0.0 <= entry["win_rate_vs_previous"]["mean"] <= 1.0
        assert set(entry["seconds"]) == set(online.STEPS)
    assert (unbroken / "rounds.png").stat().st_size > 0
    readme = (unbroken / "README.md").read_text()
    assert "| 2 | 1.2.0 |" in readme and "Seconds per step" in readme


def tree_digest(work_dir: Path) -> dict[str, str]:
    """sha256 of what a loop's final state is made of: raw data, samples, labels, the releases'
    data files, every round's final weights; plus rounds.json without the timings."""
    patterns = ["raw/**/*.gz", "raw/**/*.json", "round-*/*.jsonl", "releases/*/data/**/*.parquet"]
    patterns += ["round-*/reward-model/model/*.safetensors", "round-*/ppo/policy/*.safetensors"]
    digests = {
        str(path.relative_to(work_dir)): hashlib.sha256(path.read_bytes()).hexdigest()
        for pattern in patterns
        for path in work_dir.glob(pattern)
    }
    report = json.loads((work_dir / "rounds.json").read_text())
    for entry in report["rounds"]:
        entry.pop("seconds")
    report["setup"].pop("release")
    digests["rounds.json"] = json.dumps(report, sort_keys=True)
    return digests


@pytest.mark.slow
def test_a_kill_after_each_step_resumes_to_the_same_final_state(
    unbroken, start, local_hub, tmp_path, monkeypatch
):
    monkeypatch.setenv("HF_TOKEN", local_hub.token)
    work_dir = tmp_path / "loop"  # the same name as the unbroken loop's: keys and paths agree
    args = loop_args(start, work_dir, repo="org/online-b")
    stops = ["0:setup"] + [f"{n}:{step}" for n in (1, 2) for step in online.STEPS]
    for index, stop in enumerate(stops):
        result = online.main(dataclasses.replace(args, resume=index > 0, stop_after=stop))
        assert result == {"stopped_after": stop}
        if stop == "1:release":  # killed after publishing but before recording it
            online.publish_once(work_dir / "releases" / "1.1.0", "org/online-b", local_hub.token)
    online.main(dataclasses.replace(args, resume=True))
    journal = online.read_journal(work_dir)
    assert len(journal) == len(stops)  # every step ran exactly once
    assert journal[(1, "publish")]["result"]["already_published"] is True  # not sent twice
    assert "commit" in journal[(2, "publish")]["result"]
    assert tree_digest(work_dir) == tree_digest(unbroken)


@pytest.mark.slow
def test_a_fresh_loop_refuses_a_used_work_dir_and_resume_refuses_changed_settings(unbroken, start):
    with pytest.raises(online.UsageError, match="already holds a loop; pass --resume"):
        online.main(loop_args(start, unbroken))
    with pytest.raises(online.UsageError, match=r"changed settings \['tau'\]"):
        online.main(loop_args(start, unbroken, resume=True, tau=0.5, repo="org/online-a"))


def test_a_malformed_label_batch_stops_the_round_and_releases_nothing(
    start, local_hub, tmp_path, monkeypatch
):
    from huggingface_hub import HfApi

    monkeypatch.setenv("HF_TOKEN", local_hub.token)
    labels = tmp_path / "labels.jsonl"
    args = loop_args(start, tmp_path / "loop", labeller=f"file:{labels}", repo="org/online-c")
    online.main(dataclasses.replace(args, stop_after="1:sample"))
    samples = online.read_jsonl(tmp_path / "loop" / "round-001" / "samples.jsonl")
    good = [
        {"key": s["key"], "chosen": s["replies"][1], "rejected": s["replies"][0]} for s in samples
    ]
    bad = [*good[:2], {**good[2], "chosen": "a reply nobody sampled"}, *good[3:]]
    labels.write_text("".join(json.dumps(r) + "\n" for r in bad))
    with pytest.raises(LabelError, match=r"round 1: .*labels.jsonl line 3: .*not the two replies"):
        online.main(dataclasses.replace(args, resume=True))
    assert not (tmp_path / "loop" / "releases").exists()
    assert not (tmp_path / "loop" / "raw" / "helpful-online").exists()
    api = HfApi(endpoint=local_hub.endpoint)
    assert not api.repo_exists("org/online-c", repo_type="dataset")
    # a missing label is refused too, naming the first key without one
    labels.write_text("".join(json.dumps(r) + "\n" for r in good[:-1]))
    with pytest.raises(
        LabelError, match=f"round 1: .*no label for 1 of the round's .*{good[-1]['key']}"
    ):
        online.main(dataclasses.replace(args, resume=True))
    # fixed: the file's labels are the round's comparisons, and version 1.1.0 is published
    labels.write_text("".join(json.dumps(r) + "\n" for r in good) + "\n")
    assert online.main(dataclasses.replace(args, resume=True, stop_after="1:publish")) == {
        "stopped_after": "1:publish"
    }
    lines = gz_lines(tmp_path / "loop" / "raw" / "helpful-online" / "train.jsonl.gz")
    assert len(lines) == len(good)
    assert [json.loads(x)["chosen"].endswith(r["chosen"]) for x, r in zip(lines, good)] == [
        True
    ] * len(good)
    tags = {ref.name for ref in api.list_repo_refs("org/online-c", repo_type="dataset").tags}
    assert tags == {"v1.1.0"}


def test_the_cli_turns_a_bad_labeller_into_one_line_and_exit_code_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(online.main, online.Args, ["--data", "x", "--labeller", "oracle:x"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "--labeller 'oracle:x'" in error


# ---- the labellers and the sampler, alone -----------------------------------------------------


@pytest.mark.parametrize("tau", [0.5, 1.0, 3.0])
def test_gold_labels_disagree_with_the_gold_ranking_as_often_as_tau_says(tau):
    generator = torch.Generator().manual_seed(0)
    margins = torch.randn(40_000, generator=generator) * 2.0
    a_wins = gold_choices(margins, tau, seed=7)
    disagree = (a_wins != (margins > 0)).float().mean().item()
    expected = expected_disagreement(margins, tau)
    standard_error = (expected * (1 - expected) / len(margins)) ** 0.5
    assert abs(disagree - expected) < 4 * standard_error
    # and tau is what sets it: a margin of tau * ln 3 is flipped a quarter of the time
    flipped = ~gold_choices(
        torch.full((40_000,), tau * torch.log(torch.tensor(3.0)).item()), tau, 3
    )
    assert abs(flipped.float().mean().item() - 0.25) < 4 * (0.25 * 0.75 / 40_000) ** 0.5


def test_gold_labels_are_noiseless_at_tau_zero_and_reproducible_by_seed():
    margins = torch.tensor([2.0, -1.0, 0.5, -0.1])
    assert gold_choices(margins, 0.0, seed=1).tolist() == [True, False, True, False]
    assert preference_probability(torch.tensor([0.0]), 0.0).item() == 0.5
    noisy = torch.randn(1000, generator=torch.Generator().manual_seed(2))
    assert torch.equal(gold_choices(noisy, 1.0, 5), gold_choices(noisy, 1.0, 5))
    assert not torch.equal(gold_choices(noisy, 1.0, 5), gold_choices(noisy, 1.0, 6))


def test_each_familys_comparisons_go_to_its_online_subset_which_a_build_knows():
    assert online.online_subset("helpful") == "helpful-online"
    assert online.online_subset("harmless") == "harmless-online"
    assert family_of("harmless-online") == "harmless"


@pytest.mark.parametrize("text", ["gold", "gold:", "people:x", ":x"])
def test_a_labeller_must_be_kind_colon_arg(text):
    with pytest.raises(LabelError, match="expected KIND:ARG"):
        parse_labeller(text)


def test_a_reply_is_cut_where_the_model_starts_a_new_turn():
    tokenizer = models.load_tokenizer("tiny", texts=["\n\nHuman: a\n\nAssistant: b"] * 20)
    ids = torch.tensor(tokenizer("Sure.\n\nHuman: and then")["input_ids"])
    assert online.reply_text(tokenizer, ids, torch.ones_like(ids, dtype=torch.bool)) == "Sure."


@pytest.mark.slow
def test_the_queue_labeller_posts_the_pairs_waits_for_people_and_reads_their_labels(
    tmp_path, monkeypatch
):
    """Against the real feedback app (a subprocess): people label on /queue while the
    labeller polls; a pair nobody labels before the timeout stops the round."""
    import html
    import re
    import threading

    from tests.test_feedback_support import Annotator, Server, save_tiny_policy, token_for

    server = Server(save_tiny_policy(tmp_path / "policy"), tmp_path / "feedback.sqlite").start()
    try:
        monkeypatch.setenv("LOOP_ADMIN", token_for(server.db_path, "loop", admin=True))
        samples = [
            {
                "key": "loop/round-001/00000",
                "family": "helpful",
                "prompt": [{"role": "user", "content": "Name a colour"}],
                "replies": ["Blue.", "I refuse."],
                "models": ["sft", "sft"],
            },
            {
                "key": "loop/round-001/00001",
                "family": "harmless",
                "prompt": [{"role": "user", "content": "Insult me"}],
                "replies": ["You idiot.", "I'd rather not."],
                "models": ["sft", "sft"],
            },
        ]
        found: list = []
        waiting = threading.Thread(
            target=lambda: found.append(
                label_queue(samples, server.url, 1, "LOOP_ADMIN", timeout=120, poll_seconds=0.2)
            )
        )
        waiting.start()
        alice = Annotator(server.url, token_for(server.db_path, "alice"))
        # alice prefers "Blue."; in the red-team task she picks the more harmful reply
        wanted = {"Name a colour": "Blue.", "Insult me": "You idiot."}
        for _ in range(2):
            page = alice.client.get("/queue").text
            while 'id="empty"' in page:  # the labeller has not posted yet
                page = alice.client.get("/queue").text
            prompt = next(message for message in wanted if message in page)
            shown = dict(re.findall(r'id="reply-(a|b)">(.*?)</div>', page, flags=re.S))
            side = "A" if html.unescape(shown["a"]) == wanted[prompt] else "B"
            qid = re.search(r'action="/queue/(\d+)/choose"', page).group(1)
            assert alice.post(f"/queue/{qid}/choose", pick=f"{side}:2").status_code == 303
        waiting.join(timeout=120)
        labels = {label["key"]: label for label in found[0]}
        assert (
            labels["loop/round-001/00000"]["chosen"],
            labels["loop/round-001/00000"]["rejected"],
        ) == ("Blue.", "I refuse.")
        # red team: the less harmful reply is the chosen one
        assert labels["loop/round-001/00001"]["chosen"] == "I'd rather not."
        unanswered = [{**samples[0], "key": "loop/round-002/00000"}]
        with pytest.raises(LabelError, match="round 2: .*no label for 1 of the round's 1 pairs"):
            label_queue(unanswered, server.url, 2, "LOOP_ADMIN", timeout=0.5, poll_seconds=0.2)
    finally:
        server.stop()
