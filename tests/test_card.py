"""The dataset card and the Croissant metadata: rendered from the manifest, consistent with it."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

import hhdata
from hhdata.io.read import bundled_sample_path, read_raw
from hhdata.pairs import build_pairs
from hhdata.release import write_release
from hhdata.release.card import render_card
from hhdata.release.croissant import CONFORMS_TO

SECTIONS = [
    "## Dataset details",
    "## Uses",
    "**Out-of-scope use.**",
    "## Dataset structure",
    "## Dataset creation",
    "## Bias, risks and limitations",
    "## Citation",
]


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    table, _ = build_pairs(read_raw(bundled_sample_path()).table)
    helpful = table.slice(0, 400)
    helpful = helpful.set_column(1, "subset", pa.array(["helpful-base"] * 400))
    helpful = helpful.set_column(2, "family", pa.array(["helpful"] * 400))
    table = pa.concat_tables([helpful, table.slice(400)])
    accounting = {
        "read": 2400,
        "kept": table.num_rows,
        "quarantined": {"invalid_json": 50},
        "removed": {"exact_duplicate": 38},
        "filtered": {},
    }
    sources = [{"path": "harmless-base/test.jsonl.gz", "sha256": "ab" * 32, "bytes": 742801}]
    return write_release(
        table,
        tmp_path_factory.mktemp("out"),
        "1.0.0",
        sources=sources,
        accounting=accounting,
        settings={"dedup": {"threshold": 0.8}},
    )


@pytest.fixture(scope="module")
def card(release):
    return (release.path / "README.md").read_text()


def header(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


CONFIGS = ["all", "helpful", "harmless", "harmless-base", "helpful-base"]
HARMLESS_FILE = "data/harmless-base/test-00000-of-00001.parquet"
HELPFUL_FILE = "data/helpful-base/test-00000-of-00001.parquet"


def test_header_declares_license_and_one_config_per_view(card):
    meta = header(card)
    assert meta["license"] == "mit"
    assert [config["config_name"] for config in meta["configs"]] == CONFIGS
    assert [c["config_name"] for c in meta["configs"] if c.get("default")] == ["all"]
    files = {c["config_name"]: c["data_files"] for c in meta["configs"]}
    assert files == {
        "all": [{"split": "test", "path": [HARMLESS_FILE, HELPFUL_FILE]}],
        "helpful": [{"split": "test", "path": [HELPFUL_FILE]}],
        "harmless": [{"split": "test", "path": [HARMLESS_FILE]}],
        "harmless-base": [{"split": "test", "path": [HARMLESS_FILE]}],
        "helpful-base": [{"split": "test", "path": [HELPFUL_FILE]}],
    }


def test_the_cards_configs_match_the_parquet_files_on_disk(card, release):
    """Each config's files, read back with pyarrow, hold the rows dataset_info promises, all
    of the config's families: checked against the fixture's own 400 / 1,912 split."""
    meta = header(card)
    infos = {info["config_name"]: info for info in meta["dataset_info"]}
    expected_rows = {
        "all": 2312,
        "helpful": 400,
        "harmless": 1912,
        "harmless-base": 1912,
        "helpful-base": 400,
    }
    for config in meta["configs"]:
        name = config["config_name"]
        for entry in config["data_files"]:
            table = pa.concat_tables([pq.read_table(release.path / path) for path in entry["path"]])
            assert table.num_rows == expected_rows[name]
            assert set(table["split"].to_pylist()) == {entry["split"]}
            if name in ("helpful", "harmless"):
                assert set(table["family"].to_pylist()) == {name}
            info_rows = {s["name"]: s["num_examples"] for s in infos[name]["splits"]}
            assert info_rows == {entry["split"]: table.num_rows}
    on_disk = sum(
        pq.ParquetFile(release.path / p).metadata.num_rows for p in (HARMLESS_FILE, HELPFUL_FILE)
    )
    assert on_disk == 2312
    assert [f["name"] for f in infos["all"]["features"]][:4] == ["id", "subset", "family", "split"]
    assert meta["size_categories"] == ["1K<n<10K"]


def test_body_has_the_dataset_card_sections_in_order(card):
    positions = [card.index(section) for section in SECTIONS]
    assert positions == sorted(positions)


def test_body_carries_warning_license_and_citation(card):
    assert "**Content warning.**" in card.split("## Dataset details")[0]
    assert "**License:** MIT" in card
    assert "eprint = {2204.05862}" in card and "arXiv:2204.05862" in card
    assert "Bai" in card


def test_numbers_come_from_the_manifest(card, release):
    manifest = release.manifest
    assert "| read |  | 2400 |" in card
    assert "| quarantined | `invalid_json` | 50 |" in card
    assert "| removed | `exact_duplicate` | 38 |" in card
    assert "| `helpful` | 400 | helpful-base |" in card
    lengths = manifest["lengths"]["chosen"]
    assert f"| `chosen` | {lengths['mean']} | {lengths['p50']} |" in card
    for flag, count in manifest["flags"].items():
        assert f"| `{flag}` | {count} |" in card
    assert f"`{'ab' * 32}`" in card
    assert '"threshold": 0.8' in card


def test_the_length_plot_is_shipped_and_shown(card, release):
    assert "![Length distribution of prompts and final replies](lengths.png)" in card
    assert (release.path / "lengths.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "lengths.png" in release.manifest["files"]


def test_croissant_lists_every_data_file_with_its_checksum(release):
    document = json.loads((release.path / "croissant.json").read_text())
    assert document["conformsTo"] == CONFORMS_TO
    assert document["@type"] == "sc:Dataset" and document["version"] == "1.0.0"
    objects = {d["@id"]: d for d in document["distribution"] if d["@type"] == "cr:FileObject"}
    assert sorted(objects) == [HARMLESS_FILE, HELPFUL_FILE]
    for path, entry in objects.items():
        data = (release.path / path).read_bytes()
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()
        assert entry["contentSize"] == f"{len(data)} B"
    record_sets = {r["@id"]: r for r in document["recordSet"]}
    assert list(record_sets) == ["splits", *CONFIGS]
    fields = {f["name"]: f for f in record_sets["helpful"]["field"]}
    assert fields["prompt"]["repeated"] is True
    assert [sub["name"] for sub in fields["prompt"]["subField"]] == ["role", "content"]
    file_sets = {d["@id"]: d for d in document["distribution"] if d["@type"] == "cr:FileSet"}
    assert file_sets["files-helpful"]["includes"] == [HELPFUL_FILE]


def test_real_data_carries_no_synthetic_note_and_synthetic_data_does(card, release):
    assert "**Synthetic data.**" not in card
    manifest = dict(
        release.manifest, subsets={**release.manifest["subsets"], "synth-helpful-base": "helpful"}
    )
    rendered = render_card(manifest)
    warning = rendered.split("## Dataset details")[0]
    assert (
        "> **Synthetic data.** The subsets `synth-helpful-base` were generated by `hhdata.synth`"
        in warning
    )


def croissant_of(release) -> dict:
    return json.loads((release.path / "croissant.json").read_text())


def test_croissant_validates_with_mlcroissant_and_yields_each_configs_rows(release):
    import mlcroissant

    dataset = mlcroissant.Dataset(jsonld=release.path / "croissant.json")
    assert dataset.metadata.ctx.issues.errors == set()
    # the one recommendation left: a publication date would make builds depend on the clock
    assert [w for w in dataset.metadata.ctx.issues.warnings] == [
        '[Metadata(hh-rlhf)] Property "https://schema.org/datePublished" is recommended, but does '
        "not exist."
    ]
    records = list(dataset.records("helpful"))
    on_disk = pq.read_table(release.path / HELPFUL_FILE)
    assert [r["helpful/id"].decode() for r in records] == on_disk["id"].to_pylist()
    assert {r["helpful/split"] for r in records} == {b"test"}
    first = on_disk.slice(0, 1).to_pylist()[0]
    assert [
        (t["helpful/prompt/role"].decode(), t["helpful/prompt/content"].decode())
        for t in records[0]["helpful/prompt"]
    ] == [(t["role"], t["content"]) for t in first["prompt"]]
    assert list(dataset.records("splits")) == [
        {"splits/name": "test", "splits/url": "cr:TestSplit"}
    ]


def test_croissant_is_based_on_upstream_and_points_at_the_release_not_upstream(release, tmp_path):
    document = croissant_of(release)
    assert document["isBasedOn"] == "https://huggingface.co/datasets/Anthropic/hh-rlhf"
    assert "url" not in document  # the name "hh-rlhf" is no repo id: no address to give
    named = write_release(
        pq.read_table(release.path / HELPFUL_FILE),
        tmp_path,
        "2.1.0",
        sources=[],
        accounting={"read": 400, "kept": 400, "quarantined": {}, "removed": {}, "filtered": {}},
        settings={},
        name="org/hh-rlhf",
    )
    assert croissant_of(named)["url"] == "https://huggingface.co/datasets/org/hh-rlhf/tree/v2.1.0"


def test_croissant_splits_are_a_split_record_set_each_config_references(release):
    document = croissant_of(release)
    record_sets = {r["@id"]: r for r in document["recordSet"]}
    splits = record_sets["splits"]
    assert splits["dataType"] == "cr:Split"
    assert splits["data"] == [{"splits/name": "test", "splits/url": "cr:TestSplit"}]
    for config in CONFIGS:
        field = next(f for f in record_sets[config]["field"] if f["name"] == "split")
        assert field["references"] == {"field": {"@id": "splits/name"}}


# -- the usage section: every python block runs as written -----------------------------------
RUNNER = """
import json, sys, traceback
snippets = json.load(open(sys.argv[1]))
scope = {}
for number, code in enumerate(snippets):
    try:
        exec(compile(code, f"<card snippet {number}>", "exec"), scope)
    except BaseException:
        print(f"card snippet {number} failed:\\n{code}"); traceback.print_exc(); sys.exit(1)
    print(f"card snippet {number} ran", flush=True)
"""
REPO = "org/hh-rlhf"
# rows of the bundled split: 86 has an empty chosen reply, 667 and 763 two Assistant turns in a row
BAD_ROWS = [86, 667, 763]


def python_blocks(card: str) -> list[str]:
    """The code of every ```python block of a card, in order."""
    return re.findall(r"^```python\n(.*?)^```$", card, flags=re.S | re.M)


@pytest.fixture(scope="module")
def usage_release(tmp_path_factory):
    """A small release named like its Hub repo: helpful-base train/test and harmless-base test."""
    table, _ = build_pairs(read_raw(bundled_sample_path()).table)
    rows = table.take(list(range(30)) + BAD_ROWS).to_pylist()
    for number, row in enumerate(rows):
        helpful = number < 20 or number >= 30
        row.update(
            subset="helpful-base" if helpful else "harmless-base",
            family="helpful" if helpful else "harmless",
            split="test" if 6 <= number < 30 else "train",
        )  # a small train split: one DPO batch
    pairs = pa.Table.from_pylist(rows, schema=table.schema)
    accounting = {"read": 33, "kept": 33, "quarantined": {}, "removed": {}, "filtered": {}}
    return write_release(
        pairs,
        tmp_path_factory.mktemp("usage"),
        "1.2.0",
        sources=[],
        accounting=accounting,
        settings={},
        name=REPO,
    )


@pytest.fixture(scope="module")
def strict_model(tmp_path_factory):
    """A folder named like the card's model id, holding the tiny Llama with a strict chat
    template."""
    from transformers import LlamaForCausalLM

    from hhdata.release.card import STRICT_MODEL
    from tests.test_roles import STRICT_TEMPLATE
    from training.models import tiny_config, train_tiny_tokenizer

    root = tmp_path_factory.mktemp("models")
    tokenizer = train_tiny_tokenizer(hhdata.load(split="test")["chosen_text"][:200], vocab_size=300)
    tokenizer.chat_template = STRICT_TEMPLATE
    LlamaForCausalLM(tiny_config(tokenizer)).save_pretrained(root / STRICT_MODEL)
    tokenizer.save_pretrained(root / STRICT_MODEL)
    return root


def run_snippets(snippets: list[str], cwd, env: dict) -> subprocess.CompletedProcess:
    (cwd / "snippets.json").write_text(json.dumps(snippets))
    return subprocess.run(
        [sys.executable, "-c", RUNNER, "snippets.json"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


def test_usage_names_only_configs_and_splits_the_release_has(card, usage_release):
    # the bundled-sample release has no train split: its examples load the test split
    assert 'datasets.load_dataset(repo, "helpful", split="test", revision="v1.0.0")' in card
    assert 'split="train"' not in card
    assert "repo = os.getcwd()" in card  # its name is no repo id: the folder of the README
    usage = (usage_release.path / "README.md").read_text()
    assert f'repo = "{REPO}"' in usage
    assert 'hhdata.load(repo, "helpful", split="train", version="1.2.0")' in usage


def test_every_python_block_of_the_card_runs_against_a_local_copy(
    usage_release, strict_model, tmp_path
):
    snippets = python_blocks((usage_release.path / "README.md").read_text())
    assert len(snippets) == 5
    shutil.copytree(usage_release.path, tmp_path / REPO)  # where `repo` points, as a local path
    shutil.copytree(strict_model / "mistralai", tmp_path / "mistralai")
    # the TRL block trains; it runs once, in the Hub test below
    local = [code for code in snippets if "DPOTrainer" not in code]
    run = run_snippets(local, tmp_path, {**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    assert run.stdout.count("ran") == 4


def test_every_python_block_of_the_card_runs_against_the_hub(
    local_hub, usage_release, strict_model, tmp_path
):
    from hhdata import hub

    hub.publish(usage_release.path, REPO, token=local_hub.token, retries=1, backoff=0.01)
    snippets = python_blocks((usage_release.path / "README.md").read_text())
    shutil.copytree(strict_model / "mistralai", tmp_path / "mistralai")
    env = {**os.environ, **local_hub.env(tmp_path / "hf-home")}
    run = run_snippets(snippets, tmp_path, env)
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    assert run.stdout.count("ran") == 5
    assert (tmp_path / "dpo-hh-rlhf").is_dir()  # the TRL block trained and saved


def test_without_the_strict_filter_the_cards_trl_block_stops_in_the_tokenising_map(
    usage_release, strict_model, tmp_path
):
    snippets = python_blocks((usage_release.path / "README.md").read_text())
    trl_block = next(code for code in snippets if "DPOTrainer" in code)
    unfiltered = trl_block.replace("train_dataset=strict", "train_dataset=ds")
    assert unfiltered != trl_block
    shutil.copytree(usage_release.path, tmp_path / REPO)
    shutil.copytree(strict_model / "mistralai", tmp_path / "mistralai")
    run = run_snippets(
        [snippets[0], snippets[1], unfiltered], tmp_path, {**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    assert run.returncode == 1
    assert "card snippet 2 failed" in run.stdout
    assert "Conversation roles must alternate" in run.stderr


def test_build_name_flag_reaches_the_card_and_croissant(tmp_path):
    from hhdata.cli import main as cli_main

    code = cli_main(
        [
            "build",
            str(bundled_sample_path()),
            "--version",
            "1.0.0",
            "--out",
            str(tmp_path),
            "--name",
            "org/hh-rlhf",
        ]
    )
    assert code == 0
    card = (tmp_path / "1.0.0" / "README.md").read_text()
    assert 'repo = "org/hh-rlhf"' in card
    assert 'datasets.load_dataset(repo, "harmless", split="test", revision="v1.0.0")' in card
    document = json.loads((tmp_path / "1.0.0" / "croissant.json").read_text())
    assert document["url"] == "https://huggingface.co/datasets/org/hh-rlhf/tree/v1.0.0"


def test_a_card_without_a_repo_id_runs_in_its_own_folder(card, release, tmp_path):
    snippets = [code for code in python_blocks(card) if "DPOTrainer" not in code]
    assert len(snippets) == 4
    shutil.copytree(release.path, tmp_path / "copy")
    run = run_snippets(snippets, tmp_path / "copy", {**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    assert run.stdout.count("ran") == 4
