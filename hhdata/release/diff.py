"""Compare two releases row by row, classify the change, and write the CHANGELOG.

Versions follow semantic versioning for data (DESIGN.md):

- patch: the same rows (same ids, same content), different bytes or metadata;
- minor: rows only added;
- major: rows removed or edited.

A row is identified by its id (a hash of the original chosen and rejected texts); it is
*edited* when the id is in both releases but anything else about the row differs: its
subset, family or split, its parsed turns, or its flags.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from hhdata.errors import VersionError
from hhdata.release.manifest import read_manifest

PATCH, MINOR, MAJOR = "patch", "minor", "major"
_VERSION_RE = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)$")
_CONTENT_COLUMNS = ("subset", "family", "split", "prompt", "chosen", "rejected", "flags")
CHANGELOG_TITLE = "# Changelog\n"
CHANGELOG_IDS_SHOWN = 1000


def parse_version(version: str) -> tuple[int, int, int]:
    """``"1.2.3"`` -> ``(1, 2, 3)``; raises VersionError for anything but MAJOR.MINOR.PATCH.

    >>> parse_version("1.10.0")
    (1, 10, 0)
    """
    match = _VERSION_RE.match(version)
    if match is None:
        raise VersionError(
            f"version {version!r} is not MAJOR.MINOR.PATCH (e.g. 1.0.0); "
            "releases use semantic versioning for data"
        )
    return tuple(int(part) for part in match.groups())


def next_version(previous: str, change: str) -> str:
    """The version that follows ``previous`` for a change of the given kind.

    >>> next_version("1.4.2", "minor"), next_version("1.4.2", "major")
    ('1.5.0', '2.0.0')
    """
    major, minor, patch = parse_version(previous)
    return {
        PATCH: f"{major}.{minor}.{patch + 1}",
        MINOR: f"{major}.{minor + 1}.0",
        MAJOR: f"{major + 1}.0.0",
    }[change]


@dataclass
class ConfigDiff:
    """Pair ids added, removed and edited in one config (each sorted)."""

    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    edited: list[str] = field(default_factory=list)


@dataclass
class ReleaseDiff:
    """What changed between two releases, per config, and which kind of version it is."""

    old_version: str
    new_version: str
    configs: dict[str, ConfigDiff]
    changed_files: list[str]

    @property
    def change(self) -> str:
        """patch, minor or major, by DESIGN.md's rules."""
        if any(c.removed or c.edited for c in self.configs.values()):
            return MAJOR
        if any(c.added for c in self.configs.values()):
            return MINOR
        return PATCH

    def summary(self) -> str:
        """A few readable lines: the kind of change and the counts per config."""
        lines = [
            f"{self.old_version} -> {self.new_version}: {self.change} change "
            f"({len(self.changed_files)} files with different bytes)"
        ]
        width = max((len(name) for name in self.configs), default=6)
        for name, config in self.configs.items():
            lines.append(
                f"  {name:<{width}}  +{len(config.added)} added  "
                f"-{len(config.removed)} removed  ~{len(config.edited)} edited"
            )
        return "\n".join(lines)


def diff_releases(
    old: str | Path, new: str | Path, *, new_manifest: dict | None = None
) -> ReleaseDiff:
    """Diff two release directories config by config.

    ``new_manifest`` lets a release being built be compared before its manifest is written.
    Both releases' data files are checked against their manifests first (IntegrityError).
    """
    from hhdata.release.load import verify_files

    old_manifest = read_manifest(old)
    verify_files(old, old_manifest)
    if new_manifest is None:
        new_manifest = read_manifest(new)
        verify_files(new, new_manifest)
    old_ids, old_rows = _read_rows(Path(old), old_manifest)
    new_ids, new_rows = _read_rows(Path(new), new_manifest)
    edited_anywhere = edited_ids(old_rows, new_rows)
    configs = {}
    for name in _union(old_manifest["configs"], new_manifest["configs"]):
        before = _config_ids(old_manifest, name, old_ids)
        after = _config_ids(new_manifest, name, new_ids)
        configs[name] = ConfigDiff(
            added=sorted(after - before),
            removed=sorted(before - after),
            edited=sorted(edited_anywhere & before & after),
        )
    changed = sorted(
        path
        for path in _union(old_manifest["files"], new_manifest["files"])
        if old_manifest["files"].get(path, {}).get("sha256")
        != new_manifest["files"].get(path, {}).get("sha256")
    )
    return ReleaseDiff(old_manifest["version"], new_manifest["version"], configs, changed)


def _union(first: dict, second: dict) -> list[str]:
    return list(first) + [key for key in second if key not in first]


def _read_rows(root: Path, manifest: dict) -> tuple[dict[str, set[str]], pa.Table]:
    """The ids of each data file, and every row's id and content columns in one table."""
    data_files = sorted(
        {
            path
            for config in manifest["configs"].values()
            for split in config["splits"].values()
            for path in split["files"]
        }
    )
    ids, tables = {}, []
    for path in data_files:
        table = pq.read_table(root / path, columns=["id", *_CONTENT_COLUMNS])
        ids[path] = set(table["id"].to_pylist())
        tables.append(table)
    return ids, pa.concat_tables(tables) if tables else None


def _config_ids(manifest: dict, name: str, ids: dict[str, set[str]]) -> set[str]:
    config = manifest["configs"].get(name, {"splits": {}})
    return set().union(
        *(ids[path] for split in config["splits"].values() for path in split["files"])
    )


def edited_ids(old: pa.Table | None, new: pa.Table | None) -> set[str]:
    """Ids present in both tables whose content columns differ, compared column by column."""
    if old is None or new is None:
        return set()
    before = old.filter(pc.is_in(old["id"], value_set=new["id"])).sort_by("id")
    after = new.filter(pc.is_in(new["id"], value_set=old["id"])).sort_by("id")
    changed = np.zeros(before.num_rows, dtype=bool)
    for column in _CONTENT_COLUMNS:
        changed |= _differs(before[column].combine_chunks(), after[column].combine_chunks())
    return set(pc.filter(before["id"], pa.array(changed)).to_pylist())


def _differs(left: pa.Array, right: pa.Array) -> np.ndarray:
    """Per row: does ``left`` differ from ``right``? Recurses through lists and structs."""
    if pa.types.is_list(left.type):
        left_lengths = pc.list_value_length(left).to_numpy(zero_copy_only=False)
        right_lengths = pc.list_value_length(right).to_numpy(zero_copy_only=False)
        differs = left_lengths != right_lengths
        same = np.flatnonzero(~differs)
        elements = _differs(left.take(same).flatten(), right.take(same).flatten())
        owner = np.repeat(same, left_lengths[same])  # element -> its row
        differs[owner[elements]] = True
        return differs
    if pa.types.is_struct(left.type):
        differs = np.zeros(len(left), dtype=bool)
        for left_field, right_field in zip(left.flatten(), right.flatten()):
            differs |= _differs(left_field, right_field)
        return differs
    unequal = pc.fill_null(pc.not_equal(left, right), False).to_numpy(zero_copy_only=False)
    return unequal | (
        left.is_null().to_numpy(zero_copy_only=False)
        != right.is_null().to_numpy(zero_copy_only=False)
    )


def check_version(change: ReleaseDiff, allow_mismatch: bool = False) -> dict:
    """Check the new version against the change; returns the manifest's ``previous`` entry.

    The new version must be exactly the next one of the change's kind (1.0.0 -> 1.1.0 when
    rows were only added). Raises VersionError otherwise, unless ``allow_mismatch``; even
    then the new version must be greater than the old one.
    """
    old, new = change.old_version, change.new_version
    expected = next_version(old, change.change)
    if new != expected:
        if parse_version(new) <= parse_version(old):
            raise VersionError(
                f"version {new} is not greater than the previous release {old}; "
                f"the next version is {expected}"
            )
        if not allow_mismatch:
            raise VersionError(
                f"the change from {old} is {change.change} ({_counts(change)}), so the new "
                f"version must be {expected}, not {new}; use --version {expected}, or pass "
                "--allow-version-mismatch to release it as a different number anyway"
            )
    return {
        "version": old,
        "change": change.change,
        "version_check": "enforced" if new == expected else "overridden",
    }


def _counts(change: ReleaseDiff) -> str:
    everything = change.configs.get("all", ConfigDiff())
    return (
        f"{len(everything.added)} rows added, {len(everything.removed)} removed, "
        f"{len(everything.edited)} edited"
    )


def read_changelog_entries(release_dir: str | Path) -> str:
    """The entries of a release's CHANGELOG.md without its title (empty if it has none)."""
    path = Path(release_dir) / "CHANGELOG.md"
    if not path.exists():
        return ""
    return path.read_text(encoding="utf-8").removeprefix(CHANGELOG_TITLE).lstrip("\n")


def changelog(manifest: dict, change: ReleaseDiff | None, history: str = "") -> str:
    """CHANGELOG.md: this version's entry on top of the previous release's entries."""
    version = manifest["version"]
    if change is None:
        total = sum(s["rows"] for s in manifest["configs"]["all"]["splits"].values())
        entry = [
            f"## {version}\n",
            f"First release: {total} pairs in "
            f"{len(manifest['subsets'])} subsets ({', '.join(manifest['subsets'])}).\n",
        ]
    else:
        entry = [
            f"## {version}\n",
            f"A {change.change} change from {change.old_version}: {_counts(change)}; "
            f"{len(change.changed_files)} files have different bytes.\n",
            "| config | added | removed | edited |",
            "|---|---:|---:|---:|",
        ]
        entry += [
            f"| {name} | {len(c.added)} | {len(c.removed)} | {len(c.edited)} |"
            for name, c in change.configs.items()
        ]
        entry.append("")
        everything = change.configs.get("all", ConfigDiff())
        for label, ids in (
            ("Added", everything.added),
            ("Removed", everything.removed),
            ("Edited", everything.edited),
        ):
            if ids:
                shown = ids[:CHANGELOG_IDS_SHOWN]
                more = f" (first {len(shown)} of {len(ids)})" if len(ids) > len(shown) else ""
                entry += [
                    f"<details><summary>{label} ids{more}</summary>\n",
                    " ".join(shown),
                    "\n</details>\n",
                ]
    return CHANGELOG_TITLE + "\n" + "\n".join(entry) + "\n" + (f"\n{history}" if history else "")
