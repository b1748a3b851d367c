"""The dataset card (README.md of a release), rendered from the manifest.

The YAML header declares ``configs`` (views over the per-subset Parquet files, so plain
``datasets.load_dataset(path, "helpful")`` works) and ``dataset_info``; the body follows the
Hugging Face dataset card sections, filled with the manifest's numbers. The template is
``hhdata/cards/dataset_card.md.tmpl`` (``string.Template``: ``$name`` placeholders).
"""

from __future__ import annotations

import json
import re
from importlib import resources
from string import Template

import datasets
import yaml

from hhdata.release.provenance import MAX_VALUES
from hhdata.schema import PAIR_SCHEMA, is_synthetic

TEMPLATE = "cards/dataset_card.md.tmpl"
LICENSE_URL = "https://opensource.org/licenses/MIT"
DESCRIPTION = (
    "Human preference data about helpfulness and harmlessness from Anthropic's HH-RLHF "
    "(Bai et al. 2022), as canonical pair rows: prompt turns, chosen and rejected final "
    "replies, the original transcripts, subset, family and parsing flags."
)
_AUTHORS = (
    "Yuntao Bai, Andy Jones, Kamal Ndousse, Amanda Askell, Anna Chen, Nova DasSarma, Dawn Drain, "
    "Stanislav Fort, Deep Ganguli, Tom Henighan, Nicholas Joseph, Saurav Kadavath, Jackson "
    "Kernion, Tom Conerly, Sheer El-Showk, Nelson Elhage, Zac Hatfield-Dodds, Danny Hernandez, "
    "Tristan Hume, Scott Johnston, Shauna Kravec, Liane Lovitt, Neel Nanda, Catherine Olsson, "
    "Dario Amodei, Tom Brown, Jack Clark, Sam McCandlish, Chris Olah, Ben Mann, Jared Kaplan"
).split(", ")
CITATION_BIBTEX = (
    "@misc{bai2022training,\n"
    "  title = {Training a Helpful and Harmless Assistant with Reinforcement Learning from Human "
    "Feedback},\n"
    f"  author = {{{' and '.join(_AUTHORS)}}},\n"
    "  year = {2022},\n"
    "  eprint = {2204.05862},\n"
    "  archivePrefix = {arXiv},\n"
    "  primaryClass = {cs.CL}\n"
    "}"
)
_SIZE_CATEGORIES = (
    (1_000, "n<1K"),
    (10_000, "1K<n<10K"),
    (100_000, "10K<n<100K"),
    (1_000_000, "100K<n<1M"),
    (10_000_000, "1M<n<10M"),
)


def card_metadata(manifest: dict) -> dict:
    """The card's YAML header: license, tags, ``configs`` and ``dataset_info``."""
    features = datasets.Features.from_arrow_schema(PAIR_SCHEMA)._to_yaml_list()
    total = sum(split["rows"] for split in manifest["configs"]["all"]["splits"].values())
    configs, infos = [], []
    for name, view in manifest["configs"].items():
        entry = {"config_name": name}
        if view["default"]:
            entry["default"] = True
        entry["data_files"] = [
            {"split": split, "path": list(s["files"])} for split, s in view["splits"].items()
        ]
        configs.append(entry)
        files = {path for s in view["splits"].values() for path in s["files"]}
        infos.append(
            {
                "config_name": name,
                "features": features,
                "splits": [
                    {
                        "name": split,
                        "num_bytes": _memory_bytes(manifest, s["files"]),
                        "num_examples": s["rows"],
                    }
                    for split, s in view["splits"].items()
                ],
                "download_size": sum(manifest["files"][path]["bytes"] for path in sorted(files)),
                "dataset_size": _memory_bytes(manifest, sorted(files)),
            }
        )
    return {
        "license": "mit",
        "language": ["en"],
        "pretty_name": f"{manifest['name']} {manifest['version']}",
        "size_categories": [
            next((label for limit, label in _SIZE_CATEGORIES if total < limit), "n>10M")
        ],
        "task_categories": ["text-generation"],
        "tags": ["human-feedback", "rlhf", "preference", "harmlessness", "helpfulness"],
        "configs": configs,
        "dataset_info": infos,
    }


def _memory_bytes(manifest: dict, files: list[str]) -> int:
    return sum(manifest["files"][path].get("memory_bytes", 0) for path in files)


class _NoAliasDumper(yaml.SafeDumper):
    """Writes repeated objects (the features of each config) out in full: no &id001 anchors."""

    def ignore_aliases(self, data):
        return True


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) if rows else "(none)"


def render_card(manifest: dict) -> str:
    """README.md of a release, rendered from its manifest.

    >>> render_card(manifest).startswith("---\\nlicense: mit")  # doctest: +SKIP
    True
    """
    template = Template(resources.files("hhdata").joinpath(TEMPLATE).read_text("utf-8"))
    header = yaml.dump(
        card_metadata(manifest),
        Dumper=_NoAliasDumper,
        sort_keys=False,
        allow_unicode=True,
        width=1000,
    )
    splits = sorted(
        {split for view in manifest["configs"].values() for split in view["splits"]},
        key=lambda s: (s != "train", s),
    )
    config_rows = [
        [
            f"`{name}`" + (" (default)" if view["default"] else ""),
            *(view["splits"].get(split, {}).get("rows", 0) for split in splits),
            ", ".join(
                sorted({p.split("/")[1] for s in view["splits"].values() for p in s["files"]})
            ),
        ]
        for name, view in manifest["configs"].items()
    ]
    accounting = manifest["accounting"]
    accounting_rows = [["read", "", accounting["read"]], ["kept", "", accounting["kept"]]]
    for fate in ("quarantined", "removed", "filtered"):
        accounting_rows += [
            [fate, f"`{reason}`", count] for reason, count in accounting[fate].items()
        ]
    previous = manifest["previous"]
    return template.substitute(
        yaml=header,
        name=manifest["name"],
        version=manifest["version"],
        description=DESCRIPTION,
        tool_version=manifest["tool"]["version"],
        pyarrow_version=manifest["tool"]["pyarrow"],
        schema_version=manifest["schema_version"],
        previous=(
            f"A {previous['change']} change from {previous['version']}; see CHANGELOG.md."
            if previous
            else "The first release."
        ),
        config_table=_table(["config", *splits, "subsets"], config_rows),
        length_table=_table(
            ["field", "mean", "median", "p90", "p99", "max"],
            [
                [f"`{name}`", s["mean"], s["p50"], s["p90"], s["p99"], s["max"]]
                for name, s in manifest["lengths"].items()
            ],
        ),
        plot="lengths.png",
        accounting_table=_table(["fate", "reason", "rows"], accounting_rows),
        flags_table=_table(["flag", "rows"], [[f"`{f}`", n] for f, n in manifest["flags"].items()]),
        sources_table=_table(
            ["file", "bytes", "sha256"],
            [[f"`{s['path']}`", s["bytes"], f"`{s['sha256']}`"] for s in manifest["sources"]],
        ),
        settings=json.dumps(manifest["settings"], indent=2),
        citation=CITATION_BIBTEX,
        leakage=_leakage(manifest.get("leakage")),
        synthetic_note=_synthetic_note(manifest),
        provenance=provenance_section(manifest.get("provenance")),
        usage=usage(manifest),
    )


STRICT_MODEL = (
    "mistralai/Mistral-7B-Instruct-v0.3"  # its chat template refuses non-alternating roles
)
_USAGE = """Configs: $configs. `repo` below is $where.

```python
import datasets

$repo_line
ds = datasets.load_dataset(repo, "$config", split="$split", revision="v$version")
```

Plain `datasets` reads the files as they are and checks nothing; for a local folder it also
caches by the folder's name and file times, not content, so two folders named `$version` can
share a cache entry. `hhdata.load` first checks every file it reads against the sha256 in
`manifest.json`:

```python
import hhdata

ds = hhdata.load(repo, "$config", split="$split", version="$version")
```

**Strict chat templates.** Llama-2 and Mistral chat templates raise "Conversation roles must
alternate" on a few real transcripts with two Assistant turns in a row, and some replies are
empty. Keep only the rows every strict template accepts (alternating user/assistant turns
from the user, non-empty replies) with hhdata, or with a plain `datasets` filter:

```python
strict = hhdata.load(repo, "$config", split="$split", version="$version", strict_roles=True)


def strict_template_ok(row):  # the same rule, without hhdata
    return all(
        [t["role"] for t in row["prompt"] + row[side]]
        == ["user", "assistant"] * ((len(row["prompt"]) + len(row[side])) // 2)
        and all(t["content"].strip() for t in row[side])
        for side in ("chosen", "rejected")
    )


assert ds.filter(strict_template_ok)["id"] == strict["id"]
```

**Use with TRL.** `prompt`, `chosen` and `rejected` are TRL's conversational preference
format, so the rows go to its trainers as they are:

```python
import torch
from trl import DPOConfig, DPOTrainer

args = DPOConfig(output_dir="dpo-hh-rlhf", bf16=torch.cuda.is_available())
trainer = DPOTrainer(model="$model", args=args, train_dataset=strict)
trainer.train()
```

**Lazy queries.** `hhdata.scan` gives a polars LazyFrame over the Parquet files of a config;
filters and column choices are pushed down into the scan, so only what a query needs is read:

```python
import polars as pl

lazy = hhdata.scan(repo, "$config", version="$version")
lazy.filter(pl.col("split") == "$split").group_by("subset").agg(pl.len()).collect()
```"""


def usage(manifest: dict) -> str:
    """The usage section's text and code, naming configs and splits this release has.

    Every ``python`` block runs as written (tests/test_card.py executes them in order).
    """
    configs = manifest["configs"]
    config = next(
        (name for name in ("helpful", "harmless") if name in configs),
        next(name for name, view in configs.items() if view["default"]),
    )
    splits = list(configs[config]["splits"])
    split = "train" if "train" in splits else splits[0]
    named = is_repo_id(manifest["name"])
    return Template(_USAGE).substitute(
        configs=", ".join(
            f"`{name}`{' (default)' if view['default'] else ''} ({', '.join(view['splits'])})"
            for name, view in configs.items()
        ),
        where=(
            "its Hub repo id; a local copy of this version's folder works the same way"
            if named
            else "the folder of this README; once published, the Hub repo id (`org/name`)"
        ),
        # datasets needs a folder name it can read a dataset name from: not "."
        repo_line=(
            f'repo = "{manifest["name"]}"'
            if named
            else "import os\n\nrepo = os.getcwd()  # run in the folder of this README"
        ),
        config=config,
        split=split,
        version=manifest["version"],
        model=STRICT_MODEL,
    )


def is_repo_id(name: str) -> bool:
    """Whether a release name is a Hub repo id (``org/name``).

    >>> is_repo_id("org/hh-rlhf"), is_repo_id("hh-rlhf")
    (True, False)
    """
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name) is not None


def _synthetic_note(manifest: dict) -> str:
    """A warning naming the synthetic subsets, when the release was asked to include any."""
    synthetic = [subset for subset in manifest["subsets"] if is_synthetic(subset)]
    if not synthetic:
        return ""
    return (
        f"\n> **Synthetic data.** The subsets {', '.join(f'`{s}`' for s in synthetic)} were "
        "generated by `hhdata.synth` for tests and benchmarks: they are not human preferences "
        "and must not be used to train or evaluate models.\n"
    )


def provenance_section(provenance: dict | None) -> str:
    """The card's "Provenance" part: per subset and split with a sidecar, a table of the
    counted fields, one row each with its values and their rows, most frequent first;
    "" when the release has none (upstream data carries none).

    >>> print(provenance_section({"helpful-online/train": {"rows": 3, "sha256": "ab" * 32,
    ...     "fields": {"picked": {"A": 1, "B": 2}, "task": {"helpful": 3}},
    ...     "other_fields": ["models"]}}))
    <BLANKLINE>
    ### Provenance
    <BLANKLINE>
    Rows of new batches carry a provenance sidecar (`<subset>/<split>.provenance.json`, one
    entry per raw record), summarised here; the sidecars stay with the raw data.
    <BLANKLINE>
    `helpful-online/train`: 3 rows (sidecar sha256 `abababababab...`).
    <BLANKLINE>
    | field | values (rows) |
    |---|---|
    | `picked` | `B` 2, `A` 1 |
    | `task` | `helpful` 3 |
    <BLANKLINE>
    Not counted (nested, or more than 20 values): `models`.
    <BLANKLINE>
    """
    if not provenance:
        return ""
    parts = [
        "",
        "### Provenance",
        "",
        "Rows of new batches carry a provenance sidecar (`<subset>/<split>.provenance.json`, one",
        "entry per raw record), summarised here; the sidecars stay with the raw data.",
        "",
    ]
    for key, summary in provenance.items():
        rows = [
            [
                f"`{field}`",
                ", ".join(f"{_cell(value)} {count}" for value, count in _by_count(counts)),
            ]
            for field, counts in summary["fields"].items()
        ]
        parts += [
            f"`{key}`: {summary['rows']} row{'' if summary['rows'] == 1 else 's'} (sidecar "
            f"sha256 `{summary['sha256'][:12]}...`).",
            "",
            _table(["field", "values (rows)"], rows),
            "",
        ]
        if summary["other_fields"]:
            named = ", ".join(f"`{field}`" for field in summary["other_fields"])
            parts += [f"Not counted (nested, or more than {MAX_VALUES} values): {named}.", ""]
    return "\n".join(parts)


def _by_count(counts: dict[str, int]) -> list[tuple[str, int]]:
    """Values by falling count, then by name: the same order for the same counts."""
    return sorted(counts.items(), key=lambda item: (-item[1], item[0]))


def _cell(value: str) -> str:
    """A value as a table cell: in backticks, with the characters that break a row escaped."""
    text = value.replace("|", "\\|").replace("`", "'")  # GFM: \| inside a table's code span
    return f"`{' '.join(text.split())}`"


def _leakage(leakage: dict | None) -> str:
    """One sentence on train/test prompt overlap, from the manifest."""
    if leakage is None:
        return "Train/test prompt leakage was not checked for this release."
    exact, near = leakage["exact"], leakage["near"]
    where = "; ".join(
        f"{name}: {count}"
        for name, count in {**near["within_subset"], **near["across_subsets"]}.items()
    )
    return (
        f"Train/test leakage: {exact['test_rows']} test pairs have a prompt that is also a "
        f"train prompt (after normalisation) and {near['test_rows']} share a near-duplicate "
        f"prompt cluster with train pairs{f' ({where})' if where else ''}. "
        "`hhdata.dedup.configs.resplit` makes a group-aware split that keeps each cluster on one "
        "side."
    )
