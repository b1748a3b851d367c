"""The release directory: layout, configs as views, byte reproducibility, immutability."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from hhdata.errors import ReleaseError, SchemaError, VersionError
from hhdata.io.read import bundled_sample_path, read_raw
from hhdata.pairs import build_pairs
from hhdata.release import ParquetSettings, data_file, write_data_files, write_release
from hhdata.release.manifest import read_manifest, validate_manifest
from hhdata.schema import PAIR_SCHEMA


def sample_pairs() -> pa.Table:
    """The bundled real sample as canonical pair rows (2,312 harmless-base test pairs)."""
    pairs, _ = build_pairs(read_raw(bundled_sample_path()).table)
    return pairs


def two_subsets(pairs: pa.Table) -> pa.Table:
    """The sample with its first 600 rows relabelled as a helpful-base train split."""
    relabelled = pairs.slice(0, 600)
    relabelled = relabelled.set_column(1, "subset", pa.array(["helpful-base"] * 600))
    relabelled = relabelled.set_column(2, "family", pa.array(["helpful"] * 600))
    relabelled = relabelled.set_column(3, "split", pa.array(["train"] * 600))
    return pa.concat_tables([relabelled, pairs.slice(600)])


def accounting_for(table: pa.Table) -> dict:
    return {
        "read": table.num_rows,
        "kept": table.num_rows,
        "quarantined": {},
        "removed": {},
        "filtered": {},
    }


def build(table: pa.Table, out: Path, version: str = "1.0.0", **options):
    return write_release(
        table,
        out,
        version,
        sources=[],
        accounting=accounting_for(table),
        settings={"note": "test"},
        **options,
    )


@pytest.fixture(scope="module")
def pairs() -> pa.Table:
    return two_subsets(sample_pairs())


@pytest.fixture(scope="module")
def release(pairs, tmp_path_factory):
    return build(pairs, tmp_path_factory.mktemp("releases"))


def test_layout_has_every_file(release):
    names = sorted(
        p.relative_to(release.path).as_posix() for p in release.path.rglob("*") if p.is_file()
    )
    assert names == [
        "CHANGELOG.md",
        "README.md",
        "croissant.json",
        "data/harmless-base/test-00000-of-00001.parquet",
        "data/helpful-base/train-00000-of-00001.parquet",
        "lengths.png",
        "manifest.json",
    ]


def test_manifest_counts_rows_per_config_and_split(release, pairs):
    manifest = read_manifest(release.path)
    configs = manifest["configs"]
    assert list(configs) == ["all", "helpful", "harmless", "harmless-base", "helpful-base"]
    assert [name for name, view in configs.items() if view["default"]] == ["all"]
    assert configs["all"]["splits"]["train"]["rows"] == 600
    assert configs["all"]["splits"]["test"]["rows"] == pairs.num_rows - 600
    assert configs["helpful"]["splits"] == {
        "train": {"rows": 600, "files": ["data/helpful-base/train-00000-of-00001.parquet"]}
    }
    assert "train" not in configs["harmless"]["splits"]
    assert manifest["subsets"] == {"harmless-base": "harmless", "helpful-base": "helpful"}
    assert manifest["accounting"]["kept"] == pairs.num_rows


def test_every_file_checksum_is_in_the_manifest(release):
    import hashlib

    manifest = read_manifest(release.path)
    for relative, entry in manifest["files"].items():
        data = (release.path / relative).read_bytes()
        assert entry == {**entry, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    assert manifest["files"][data_file("helpful-base", "train")]["rows"] == 600


def test_data_files_keep_input_order_and_the_pair_schema(release, pairs):
    table = pq.read_table(release.path / data_file("harmless-base", "test"))
    assert table.schema.remove_metadata() == PAIR_SCHEMA
    assert table["id"].to_pylist() == pairs.slice(600)["id"].to_pylist()
    assert table.equals(pairs.slice(600).select(PAIR_SCHEMA.names))


def test_parquet_writer_settings_are_pinned(release):
    metadata = pq.ParquetFile(release.path / data_file("harmless-base", "test")).metadata
    settings = ParquetSettings()
    assert metadata.row_group(0).column(0).compression == settings.compression.upper()
    assert all(
        metadata.row_group(i).num_rows <= settings.row_group_size
        for i in range(metadata.num_row_groups)
    )
    assert read_manifest(release.path)["settings"]["parquet"]["use_content_defined_chunking"]


def test_same_inputs_give_byte_identical_releases(pairs, release, tmp_path):
    again = build(pairs, tmp_path)
    first = {
        p.relative_to(release.path): p.read_bytes() for p in release.path.rglob("*") if p.is_file()
    }
    second = {
        p.relative_to(again.path): p.read_bytes() for p in again.path.rglob("*") if p.is_file()
    }
    assert first.keys() == second.keys()
    different = [str(name) for name in first if first[name] != second[name]]
    assert different == []


def test_a_built_version_is_never_overwritten(pairs, release):
    before = (release.path / "manifest.json").read_bytes()
    with pytest.raises(VersionError, match="already exists and versions are immutable"):
        build(pairs.slice(0, 10), release.path.parent, "1.0.0")
    assert (release.path / "manifest.json").read_bytes() == before


def test_a_failed_build_leaves_no_partial_version(tmp_path, pairs):
    with pytest.raises(ReleaseError, match=r"lacks columns \['flags'\]"):
        build(pairs.drop_columns(["flags"]), tmp_path, "1.0.0")
    assert list(tmp_path.iterdir()) == []


def test_staged_data_files_are_removed_when_the_release_is_not_finished(tmp_path, pairs):
    """The pipeline writes the data files while its leakage check runs; a check that fails
    then leaves neither the version nor its staging folder."""
    from hhdata.release import staged_release

    with pytest.raises(RuntimeError, match="leakage check failed"):
        with staged_release(pairs.slice(0, 50), tmp_path, "1.0.0") as staged:
            assert staged.files and all((staged.staging / name).is_file() for name in staged.files)
            raise RuntimeError("leakage check failed")
    assert list(tmp_path.iterdir()) == []


def test_leakage_handed_to_the_writer_is_written_to_the_manifest(tmp_path, pairs):
    leaks = {
        "test_rows": 2,
        "groups_on_both_sides": 1,
        "within_subset": {"harmless-base": 2},
        "across_subsets": {},
    }
    leakage = {"exact": leaks, "near": leaks}
    built = build(pairs.slice(0, 50), tmp_path, leakage=leakage)
    assert built.manifest["leakage"] == leakage
    assert json.loads((built.path / "manifest.json").read_text())["leakage"] == leakage


@pytest.mark.parametrize("version", ["1.0", "v1.0.0", "1.0.0-rc1", "01.0.0"])
def test_a_version_must_be_major_minor_patch(tmp_path, pairs, version):
    with pytest.raises(VersionError, match="is not MAJOR.MINOR.PATCH"):
        build(pairs.slice(0, 5), tmp_path, version)


def test_a_subset_in_two_families_is_refused(tmp_path, pairs):
    mixed = pairs.set_column(
        2,
        "family",
        pc.if_else(
            pc.equal(pc.modulo(pa.array(range(pairs.num_rows)), 2), 0), "helpful", "harmless"
        ),
    )
    with pytest.raises(ReleaseError, match="has rows in both families"):
        build(mixed, tmp_path)


@pytest.mark.parametrize(
    "edit, field",
    [
        (lambda m: m.update(version="1.0"), "version"),
        (lambda m: m["files"][next(iter(m["files"]))].update(sha256="abc"), "sha256"),
        (lambda m: m.pop("accounting"), "accounting"),
        (lambda m: m["configs"].pop("all"), "all"),
        (
            lambda m: m["files"].update({"../escape.parquet": {"sha256": "0" * 64, "bytes": 1}}),
            "escape",
        ),
    ],
)
def test_the_schema_rejects_a_broken_manifest(release, edit, field):
    manifest = copy.deepcopy(read_manifest(release.path))
    validate_manifest(manifest)
    edit(manifest)
    with pytest.raises(SchemaError, match=field):
        validate_manifest(manifest)


def test_reading_a_folder_that_is_not_a_release_names_the_fix(tmp_path):
    with pytest.raises(
        ReleaseError, match="not a release directory; pass the folder of one version"
    ):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(SchemaError, match="line 1: not valid JSON"):
        read_manifest(tmp_path)


def test_manifest_is_deterministic_json(release):
    text = (release.path / "manifest.json").read_text()
    assert text == json.dumps(json.loads(text), indent=2, ensure_ascii=False) + "\n"


def test_a_repeated_pair_id_is_refused(tmp_path, pairs):
    doubled = pa.concat_tables([pairs.slice(0, 3), pairs.slice(1, 1)])
    with pytest.raises(
        ReleaseError,
        match=rf"pair id {pairs['id'][1].as_py()} appears 2 times "
        r"\(1 ids repeat\).*deduplicate first",
    ):
        build(doubled, tmp_path)


def test_a_version_another_live_build_is_staging_is_refused(tmp_path, pairs):
    """A staging folder whose process is alive: another build of this version is running."""
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        staging = tmp_path / f".1.0.0.partial-{other.pid}"
        staging.mkdir()
        with pytest.raises(VersionError) as raised:
            build(pairs.slice(0, 20), tmp_path)
        assert str(raised.value).startswith(
            f"version 1.0.0 is being built by another process (pid {other.pid}"
        )
        assert staging.is_dir() and not (tmp_path / "1.0.0").exists()
    finally:
        other.kill()
        other.wait()


def test_staging_left_by_a_killed_build_is_removed_by_the_next(tmp_path, pairs):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # its pid is free now: the build that used it was killed
    for version in ("1.0.0", "0.9.0"):  # 0.9.0: a killed build of a version never built again
        (tmp_path / f".{version}.partial-{gone.pid}" / "data").mkdir(parents=True)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = tmp_path / f".0.8.0.partial-{other.pid}"  # another version, still being built
        live.mkdir()
        build(pairs.slice(0, 20), tmp_path)
        assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, "1.0.0"]
    finally:
        other.kill()
        other.wait()


def test_the_build_that_loses_a_race_gets_a_clear_error(tmp_path, pairs):
    """Another process renames its finished 1.0.0 into place while this build is writing."""

    from hhdata.release import finish_release, staged_release

    rows = pairs.slice(0, 20)
    with pytest.raises(
        VersionError, match=r"1\.0\.0 already exists: another process built version 1\.0\.0"
    ):
        with staged_release(rows, tmp_path, "1.0.0") as staged:
            (tmp_path / "1.0.0").mkdir()  # the other build finishes while this one writes
            (tmp_path / "1.0.0" / "manifest.json").write_text("{}")
            finish_release(
                staged, sources=[], accounting=accounting_for(rows), settings={"note": "test"}
            )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1.0.0"]  # no staging left behind


def test_parquet_files_carry_the_versions_as_key_value_metadata(release):
    import hhdata

    for subset, split in (("harmless-base", "test"), ("helpful-base", "train")):
        metadata = pq.read_schema(release.path / data_file(subset, split)).metadata
        assert metadata[b"hhdata:release_version"] == b"1.0.0"
        assert metadata[b"hhdata:schema_version"] == b"1.0"
        assert metadata[b"hhdata:version"] == hhdata.__version__.encode()


def test_a_file_with_the_same_rows_keeps_its_first_release_stamp_and_bytes(
    pairs, release, tmp_path
):
    added = pairs.slice(0, 50).set_column(1, "subset", pa.array(["harmless-added"] * 50))
    added = added.set_column(2, "family", pa.array(["harmless"] * 50))
    from hhdata.schema import pair_id

    added = added.set_column(0, "id", pa.array([pair_id(f"c{i}", f"r{i}") for i in range(50)]))
    grown = pa.concat_tables([pairs, added])
    later = build(grown, tmp_path, "1.1.0", previous=release.path)
    unchanged = data_file("harmless-base", "test")
    assert (later.path / unchanged).read_bytes() == (release.path / unchanged).read_bytes()
    assert pq.read_schema(later.path / unchanged).metadata[b"hhdata:release_version"] == b"1.0.0"
    new = pq.read_schema(later.path / data_file("harmless-added", "train")).metadata
    assert new[b"hhdata:release_version"] == b"1.1.0"


# -- provenance sidecars (hhdata.release.provenance) ---------------------------------------


def write_batch(folder: Path, records: list[dict], sidecar, blank_lines: int = 0) -> Path:
    """A raw batch ``folder/train.jsonl`` (plus blank lines) and its sidecar (None: none)."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(record) for record in records] + [""] * blank_lines
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    if sidecar is not None:
        text = sidecar if isinstance(sidecar, str) else json.dumps(sidecar)
        (folder / "train.provenance.json").write_text(text, encoding="utf-8")
    return folder / "train.jsonl"


def test_a_release_without_sidecars_has_no_provenance_key_or_section(release):
    assert "provenance" not in release.manifest
    assert "Provenance" not in (release.path / "README.md").read_text(encoding="utf-8")


@pytest.mark.parametrize(
    ("sidecar", "message"),
    [
        ([{"round": 1}] * 2, "has 2 entries but {raw} has 3 records (non-blank lines)"),
        ([{"round": 1}] * 4, "has 4 entries but {raw} has 3 records (non-blank lines)"),
        ('{"round": 1}', "not a JSON list of objects"),
        ("[1, 2, 3]", "not a JSON list of objects"),
        ('[{"round": 1},', "line 1: not valid UTF-8 JSON"),
    ],
)
def test_a_sidecar_that_does_not_match_its_data_file_stops_the_build(
    tmp_path, sample_records, capsys, sidecar, message
):
    from hhdata.cli import main

    raw = write_batch(tmp_path / "raw" / "helpful-online", sample_records[:3], sidecar)
    out = tmp_path / "releases"
    assert main(["build", str(tmp_path / "raw"), "--version", "1.0.0", "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("hhdata build: error: ")
    assert str(raw.with_name("train.provenance.json")) in error
    assert message.format(raw=raw) in error
    assert not (out / "1.0.0").exists()


def test_sidecar_counts_scalars_names_the_rest_and_skips_blank_lines(tmp_path, sample_records):
    from hhdata import pipeline
    from hhdata.release.manifest import file_digest

    sidecar = [
        {"round": i % 2, "labeller": "gold", "tau": 0.5, "ok": True, "seed": None, "at": f"t{i}"}
        | {"sampling": {"temperature": 1.0}}
        for i in range(25)
    ]
    write_batch(tmp_path / "raw" / "helpful-online", sample_records[:25], sidecar, blank_lines=2)
    built = pipeline.build_release(tmp_path / "raw", version="1.0.0", out=tmp_path / "out")
    digest = file_digest(tmp_path / "raw" / "helpful-online" / "train.provenance.json")[0]
    assert built.manifest["provenance"] == {
        "helpful-online/train": {
            "rows": 25,
            "sha256": digest,
            "fields": {
                "labeller": {"gold": 25},
                "ok": {"true": 25},
                "round": {"0": 13, "1": 12},
                "seed": {"null": 25},
                "tau": {"0.5": 25},
            },
            "other_fields": ["at", "sampling"],  # 25 distinct times; a nested object
        }
    }
    card = (built.path / "README.md").read_text(encoding="utf-8")
    section = card.split("### Provenance")[1].split("## Bias")[0]
    assert "`helpful-online/train`: 25 rows" in section
    assert "| `round` | `0` 13, `1` 12 |" in section and "| `labeller` | `gold` 25 |" in section
    assert "Not counted (nested, or more than 20 values): `at`, `sampling`." in section
    assert read_manifest(built.path) == built.manifest  # the schema takes the key


def test_sidecars_of_one_subset_and_split_in_two_folders_are_summed(tmp_path, sample_records):
    from hhdata.release.manifest import file_digest
    from hhdata.release.provenance import summarise_sidecars

    first = write_batch(tmp_path / "a" / "harmless-online", sample_records[:2], [{"r": 1}] * 2)
    second = write_batch(tmp_path / "b" / "harmless-online", sample_records[2:5], [{"r": 2}] * 3)
    no_sidecar = write_batch(tmp_path / "c" / "harmless-online", sample_records[5:6], None)
    summary = summarise_sidecars([first, no_sidecar, second])["harmless-online/train"]
    digests = [file_digest(path.with_name("train.provenance.json"))[0] for path in (first, second)]
    assert summary["rows"] == 5 and summary["fields"] == {"r": {"1": 2, "2": 3}}
    assert summary["sidecars"] == [
        {"rows": 2, "sha256": digests[0]},
        {"rows": 3, "sha256": digests[1]},
    ]
    assert summary["sha256"] not in digests


def test_build_takes_the_subset_split_and_family_of_a_single_file(tmp_path, sample_records, capsys):
    from hhdata.cli import main

    raw = tmp_path / "batch-7.jsonl"
    raw.write_text("".join(json.dumps(r) + "\n" for r in sample_records[:4]), encoding="utf-8")
    (tmp_path / "batch-7.provenance.json").write_text(json.dumps([{"round": 7}] * 4))
    out = tmp_path / "releases"
    args = ["build", str(raw), "--version", "1.0.0", "--out", str(out), "--subset", "batch-7"]
    assert main([*args, "--split", "train"]) == 2  # a new subset's family must be declared
    assert "declare its family" in capsys.readouterr().err
    assert main([*args, "--split", "train", "--family", "helpful"]) == 0
    manifest = read_manifest(out / "1.0.0")
    assert manifest["subsets"] == {"batch-7": "helpful"}
    assert list(manifest["configs"]["helpful"]["splits"]) == ["train"]
    assert manifest["provenance"]["batch-7/train"]["fields"] == {"round": {"7": 4}}


def interleaved(pairs: pa.Table) -> pa.Table:
    """The two-subset sample with its rows dealt out in a fixed shuffle, so that each data
    file's rows are scattered through the table."""
    order = sorted(range(pairs.num_rows), key=lambda i: (i * 7919) % pairs.num_rows)
    return pairs.take(order)


def test_data_files_are_written_in_row_batches_with_the_bytes_of_one_write(tmp_path, pairs):
    # four copies of the sample, in row groups of 5 rows: each file is gathered in batches
    # of 320 rows (64 groups)
    rows = interleaved(pa.concat_tables([pairs] * 4))
    settings = ParquetSettings(row_group_size=5)
    pool = pa.proxy_memory_pool(pa.default_memory_pool())
    previous = pa.default_memory_pool()
    pa.set_memory_pool(pool)
    try:
        files = write_data_files(rows, tmp_path, settings, {"k": "v"})
    finally:
        pa.set_memory_pool(previous)
    # at most one batch of rows (and the writer's pages) in memory, not a copy of each file
    assert pool.max_memory() < rows.nbytes / 4
    for (subset, split), count in [
        (("helpful-base", "train"), 4 * 600),
        (("harmless-base", "test"), 4 * 1712),
    ]:
        relative = data_file(subset, split)
        whole = rows.filter(
            pc.and_(pc.equal(rows["subset"], subset), pc.equal(rows["split"], split))
        )
        pq.write_table(
            whole.replace_schema_metadata({"k": "v"}),
            tmp_path / "one.parquet",
            **settings.write_options(),
        )
        assert (tmp_path / relative).read_bytes() == (tmp_path / "one.parquet").read_bytes()
        assert files[relative]["rows"] == count == whole.num_rows
        # the batches' Arrow sizes add up to the whole's but for validity bitmaps, which
        # round up to a byte per batch (in each of the 10 columns' nested arrays)
        batches = -(-count // 320)
        assert abs(files[relative]["memory_bytes"] - whole.combine_chunks().nbytes) <= 40 * batches
