"""A bar per stage for `hhdata build`, `hhdata dedup` and `hhdata leakage` on a terminal (a
real pseudo-terminal), none in pipes or under CI, and the same release either way."""

from __future__ import annotations

import json

import pytest

from tests.test_progress import run_hhdata

# each stage's bar, as tqdm draws it once the stage is done: the label, then the share done
READ = "read: 100%"
DEDUP_STAGES = ["exact dedup: 100%", "near: sketching: 100%", "near: banding + verification: 100%"]
BUILD_STAGES = [READ, *DEDUP_STAGES, "writing Parquet: 100%", "leakage check: 100%"]
LABELS = ["read", "exact dedup", "near:", "writing Parquet", "leakage check", "%|"]


@pytest.fixture(scope="module")
def builds(sample_path, tmp_path_factory):
    """`hhdata build` of the bundled sample three ways: on a terminal, piped, and on a
    terminal under CI=1; each (stdout, stderr, manifest)."""
    done = {}
    for way, terminal, env in (
        ("terminal", True, {}),
        ("piped", False, {}),
        ("ci", True, {"CI": "1"}),
    ):
        out = tmp_path_factory.mktemp(way)
        stdout, stderr = run_hhdata(
            ["build", str(sample_path), "--version", "1.0.0", "--out", str(out)], terminal, **env
        )
        manifest = json.loads((out / "1.0.0" / "manifest.json").read_text())
        done[way] = stdout, stderr, manifest
    return done


def test_build_on_a_terminal_shows_every_stage_in_order(builds):
    out, err, _ = builds["terminal"]
    assert "built " in out
    places = [err.find(stage) for stage in BUILD_STAGES]
    assert -1 not in places, f"stages missing from the terminal: {err!r}"
    assert places == sorted(places)  # the bars follow the flow: read, dedup, write, leakage


@pytest.mark.parametrize("way", ["piped", "ci"])
def test_build_piped_or_under_ci_shows_no_bar(builds, way):
    out, err, _ = builds[way]
    assert "built " in out
    for label in LABELS:
        assert label not in err and label not in out.replace("read 2312", "")
    if way == "piped":
        assert err == ""


def test_the_bars_change_nothing_in_the_release(builds):
    (out, _, manifest), (piped_out, _, piped) = builds["terminal"], builds["piped"]
    assert manifest["files"] == piped["files"]  # every file's sha256, bytes and rows
    assert manifest == piped
    # the same report, but for the line naming the (temporary) release folder
    assert out.splitlines()[1:] == piped_out.splitlines()[1:]


def test_dedup_and_leakage_show_their_stages_on_a_terminal_only(sample_path, tmp_path):
    out, err = run_hhdata(["dedup", str(sample_path)], terminal=True)
    assert "kept 2,312" in out
    for stage in [READ, *DEDUP_STAGES]:
        assert stage in err
    piped_out, piped_err = run_hhdata(["dedup", str(sample_path)], terminal=False)
    assert piped_out == out and piped_err == ""

    out, err = run_hhdata(["leakage", str(sample_path)], terminal=True)
    assert "exact: " in out and READ in err and "leakage check: 100%" in err
    piped_out, piped_err = run_hhdata(["leakage", str(sample_path)], terminal=False)
    assert piped_out == out and piped_err == ""
