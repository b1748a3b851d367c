"""croissant.json: Croissant 1.0 (MLCommons) metadata of a release, from its manifest.

Every data file is a ``cr:FileObject`` with its sha256 and size; each config is a
``cr:FileSet`` over its files and a ``cr:RecordSet`` whose fields follow the canonical pair
row (repeated struct fields for the turns). The splits are a ``cr:Split`` RecordSet
(``splits``) that each config's ``split`` field references. ``url`` is the release on the
Hub when the release's name is a repo id (``org/name``), else left out; ``isBasedOn`` is
the upstream dataset. tests/test_card.py validates it with mlcroissant (no errors; the one
warning is the missing ``datePublished``, left out so builds stay byte-reproducible) and
loads records of a config.
"""

from __future__ import annotations

import json
from pathlib import Path

from hhdata.release.card import CITATION_BIBTEX, DESCRIPTION, LICENSE_URL, is_repo_id

CROISSANT_NAME = "croissant.json"
CONFORMS_TO = "http://mlcommons.org/croissant/1.0"
UPSTREAM_URL = "https://huggingface.co/datasets/Anthropic/hh-rlhf"
SPLITS = "splits"
# Croissant's semantic split types; other split names get none
SPLIT_TYPES = {
    "train": "cr:TrainingSplit",
    "validation": "cr:ValidationSplit",
    "test": "cr:TestSplit",
}
CONTEXT = {
    "@language": "en",
    "@vocab": "https://schema.org/",
    "citeAs": "cr:citeAs",
    "column": "cr:column",
    "conformsTo": "dct:conformsTo",
    "cr": "http://mlcommons.org/croissant/",
    "rai": "http://mlcommons.org/croissant/RAI/",
    "data": {"@id": "cr:data", "@type": "@json"},
    "dataType": {"@id": "cr:dataType", "@type": "@vocab"},
    "dct": "http://purl.org/dc/terms/",
    "examples": {"@id": "cr:examples", "@type": "@json"},
    "extract": "cr:extract",
    "field": "cr:field",
    "fileProperty": "cr:fileProperty",
    "fileObject": "cr:fileObject",
    "equivalentProperty": "cr:equivalentProperty",
    "fileSet": "cr:fileSet",
    "format": "cr:format",
    "includes": "cr:includes",
    "isLiveDataset": "cr:isLiveDataset",
    "jsonPath": "cr:jsonPath",
    "key": "cr:key",
    "md5": "cr:md5",
    "parentField": "cr:parentField",
    "path": "cr:path",
    "recordSet": "cr:recordSet",
    "references": "cr:references",
    "regex": "cr:regex",
    "repeated": "cr:repeated",
    "replace": "cr:replace",
    "samplingRate": "cr:samplingRate",
    "sc": "https://schema.org/",
    "separator": "cr:separator",
    "source": "cr:source",
    "subField": "cr:subField",
    "transform": "cr:transform",
}
_TEXT_COLUMNS = ("id", "subset", "family", "split", "chosen_text", "rejected_text")
_TURN_COLUMNS = ("prompt", "chosen", "rejected")


def croissant(manifest: dict) -> dict:
    """The Croissant 1.0 JSON-LD document of a release."""
    data_files = {
        path: entry for path, entry in manifest["files"].items() if path.endswith(".parquet")
    }
    distribution = [
        {
            "@type": "cr:FileObject",
            "@id": path,
            "name": path,
            "contentUrl": path,
            "encodingFormat": "application/x-parquet",
            "contentSize": f"{entry['bytes']} B",
            "sha256": entry["sha256"],
        }
        for path, entry in data_files.items()
    ]
    record_sets = [_splits(manifest)]
    for config, view in manifest["configs"].items():
        files = sorted({path for split in view["splits"].values() for path in split["files"]})
        file_set = f"files-{config}"
        distribution.append(
            {
                "@type": "cr:FileSet",
                "@id": file_set,
                "name": file_set,
                "encodingFormat": "application/x-parquet",
                "includes": files,
            }
        )
        record_sets.append(
            {
                "@type": "cr:RecordSet",
                "@id": config,
                "name": config,
                "description": f"config {config}: "
                + ", ".join(f"{split} {s['rows']} pairs" for split, s in view["splits"].items()),
                "key": {"@id": f"{config}/id"},
                "field": _fields(config, file_set),
            }
        )
    document = {
        "@context": CONTEXT,
        "@type": "sc:Dataset",
        "conformsTo": CONFORMS_TO,
        "name": manifest["name"],
        "description": DESCRIPTION,
        "version": manifest["version"],
        "license": LICENSE_URL,
        "url": release_url(manifest),
        "isBasedOn": UPSTREAM_URL,
        "citeAs": CITATION_BIBTEX,
        "creator": {"@type": "sc:Organization", "name": "Anthropic"},
        "isLiveDataset": False,
        "distribution": distribution,
        "recordSet": record_sets,
    }
    if document["url"] is None:
        del document["url"]
    return document


def release_url(manifest: dict) -> str | None:
    """The release's page on the Hub (its tag) when its name is a repo id, else None.

    >>> release_url({"name": "org/hh-rlhf", "version": "1.2.0"})
    'https://huggingface.co/datasets/org/hh-rlhf/tree/v1.2.0'
    """
    if not is_repo_id(manifest["name"]):
        return None
    return f"https://huggingface.co/datasets/{manifest['name']}/tree/v{manifest['version']}"


def _splits(manifest: dict) -> dict:
    """The ``splits`` RecordSet: every split name of the release, with its Croissant type."""
    names = []
    for view in manifest["configs"].values():
        names += [split for split in view["splits"] if split not in names]
    data = [
        {f"{SPLITS}/name": name, f"{SPLITS}/url": SPLIT_TYPES.get(name, name)} for name in names
    ]
    return {
        "@type": "cr:RecordSet",
        "@id": SPLITS,
        "name": SPLITS,
        "description": "the splits of this release",
        "dataType": "cr:Split",
        "key": {"@id": f"{SPLITS}/name"},
        "field": [
            {"@type": "cr:Field", "@id": f"{SPLITS}/name", "name": "name", "dataType": "sc:Text"},
            {"@type": "cr:Field", "@id": f"{SPLITS}/url", "name": "url", "dataType": "sc:Text"},
        ],
        "data": data,
    }


def _fields(config: str, file_set: str) -> list[dict]:
    def source(column: str, json_path: str | None = None) -> dict:
        found = {"fileSet": {"@id": file_set}, "extract": {"column": column}}
        if json_path:
            found["transform"] = {"jsonPath": json_path}
        return found

    fields = [
        {
            "@type": "cr:Field",
            "@id": f"{config}/{column}",
            "name": column,
            "dataType": "sc:Text",
            "source": source(column),
        }
        for column in _TEXT_COLUMNS
    ]
    split = next(field for field in fields if field["name"] == "split")
    split["references"] = {"field": {"@id": f"{SPLITS}/name"}}
    for column in _TURN_COLUMNS:
        fields.append(
            {
                "@type": "cr:Field",
                "@id": f"{config}/{column}",
                "name": column,
                "repeated": True,
                "subField": [
                    {
                        "@type": "cr:Field",
                        "@id": f"{config}/{column}/{part}",
                        "name": part,
                        "dataType": "sc:Text",
                        "source": source(column, part),
                    }
                    for part in ("role", "content")
                ],
            }
        )
    fields.append(
        {
            "@type": "cr:Field",
            "@id": f"{config}/flags",
            "name": "flags",
            "dataType": "sc:Text",
            "repeated": True,
            "source": source("flags"),
        }
    )
    return fields


def write_croissant(release_dir: Path, manifest: dict) -> Path:
    """Write croissant.json deterministically into a release directory; returns its path."""
    path = Path(release_dir) / CROISSANT_NAME
    path.write_text(json.dumps(croissant(manifest), indent=2, ensure_ascii=False) + "\n", "utf-8")
    return path
