"""The whole prepare.py through Hydra's compose API, on a small generated project."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from animl_lightning.core.contract import (
    CSV_FILENAME,
    INFO_FILENAME,
    LABEL_INDEX_FILENAME,
    REQUIRED_COLUMNS,
    SPLIT_REPORT_FILENAME,
    SPLITS_FILENAME,
    load_prepared_dataset,
    read_splits,
)
from animl_lightning.core.issues import REPORT_FILENAME
from animl_lightning.prepare.pipeline import STAGES, PrepareSummary, format_summary, run_prepare
from animl_lightning.prepare.stage import SKIPPED, PrepareRun, Stage, StageOutcome, fingerprint_of, need
from tests.fixtures.cct import write_cct
from tests.fixtures.hydra import REPO_ROOT, prepare_settings

ROOT = REPO_ROOT
SMALL_DEMO = ["demo.locations=6", "demo.images_per_location=8", "demo.width=160", "demo.height=120"]


def _run(*overrides: str) -> PrepareSummary:
    return run_prepare(prepare_settings(overrides))


def _outputs(out: Path) -> dict[str, bytes]:
    return {name: (out / name).read_bytes() for name in (CSV_FILENAME, LABEL_INDEX_FILENAME, SPLITS_FILENAME)}


def test_demo_project_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    summary = _run(f"output_dir={out}", "crops.workers=2", *SMALL_DEMO)

    assert [s.name for s in summary.stages] == ["ingest", "images", "boxes", "crops", "labels", "dataset", "splits"]
    prepared = load_prepared_dataset(out)  # cross-checks labels, splits and crop files
    assert list(prepared.frame.columns[: len(REQUIRED_COLUMNS)]) == list(REQUIRED_COLUMNS)
    assert prepared.labels == sorted(prepared.labels)
    assert "empty" not in prepared.labels
    assert set(prepared.frame["split"]) == {"train", "val", "test"}
    # whole locations: no (dataset, location) in two splits
    per_location = prepared.frame.groupby(["dataset", "location"])["split"].nunique()
    assert per_location.max() == 1
    with Image.open(prepared.crops_dir / prepared.frame["path"].iloc[0]) as crop:
        assert crop.mode == "RGB"
        # default crops.strategy=square, crops.lossless=false: the strategy's exact square
        assert crop.width == crop.height

    report = json.loads((out / REPORT_FILENAME).read_text())
    assert report["counts"]
    info = json.loads((out / INFO_FILENAME).read_text())
    assert info["crops"]["strategy"] == "square" and info["crops"]["lossless"] is False
    assert set(info["stages"]) >= {"images", "crops", "dataset", "splits"}
    assert (out / SPLIT_REPORT_FILENAME).is_file()
    text = format_summary(summary)
    assert "crops per label and split" in text and "train" in text


def test_second_run_skips_finished_stages_and_changes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    _run(f"output_dir={out}", "crops.workers=1", *SMALL_DEMO)
    first = _outputs(out)
    crop_times = {p: p.stat().st_mtime_ns for p in (out / "crops").rglob("*.jpg")}

    again = _run(f"output_dir={out}", "crops.workers=1", *SMALL_DEMO)
    status = {s.name: s.status for s in again.stages}
    assert status["crops"].startswith("skipped")
    assert status["splits"].startswith("skipped")
    assert _outputs(out) == first
    assert {p: p.stat().st_mtime_ns for p in (out / "crops").rglob("*.jpg")} == crop_times


def test_changed_split_settings_rerun_only_the_split(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    _run(f"output_dir={out}", "crops.workers=1", *SMALL_DEMO)
    again = _run(f"output_dir={out}", "crops.workers=1", "split.test_frac=0", *SMALL_DEMO)
    status = {s.name: s.status for s in again.stages}
    assert status["crops"].startswith("skipped")
    assert status["splits"] == "ran"
    splits = json.loads((out / SPLITS_FILENAME).read_text())
    assert splits["test"] == []
    assert splits["train"] and splits["val"]
    assert load_prepared_dataset(out).split_frame("test").empty


def test_changed_crop_settings_make_every_crop_again(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    # Encoded crops (lossless cuts keep the photo's own quality, whatever crops.quality says).
    _run(f"output_dir={out}", "crops.workers=1", "crops.lossless=false", *SMALL_DEMO)
    before = {path: path.read_bytes() for path in (out / "crops").rglob("*.jpg")}

    again = _run(f"output_dir={out}", "crops.workers=1", "crops.lossless=false", "crops.quality=50", *SMALL_DEMO)
    assert {s.name: s.status for s in again.stages}["crops"] == "ran"
    counts = again.report.counts["crops"]
    assert (counts["redone"], counts["skipped"]) == (len(before), 0)
    assert [i.message for i in again.report.issues_of("crops", "crop_settings_changed")] == [
        "every crop is made again: crops.quality: 90 -> 50"
    ]
    after = {path: path.read_bytes() for path in before}
    assert all(after[path] != before[path] for path in before)
    assert sum(map(len, after.values())) < sum(map(len, before.values()))  # quality 50 is smaller
    info = json.loads((out / INFO_FILENAME).read_text())
    assert info["crops_made_with"]["quality"] == 50

    third = _run(f"output_dir={out}", "crops.workers=1", "crops.lossless=false", "crops.quality=50", *SMALL_DEMO)
    assert {s.name: s.status for s in third.stages}["crops"].startswith("skipped")

    # Turning lossless crops on changes the crops (their geometry too): every one is made again, and counted.
    fourth = _run(f"output_dir={out}", "crops.workers=1", "crops.lossless=true", "crops.quality=50", *SMALL_DEMO)
    assert [i.message for i in fourth.report.issues_of("crops", "crop_settings_changed")] == [
        "every crop is made again: crops.lossless: False -> True"
    ]
    assert fourth.report.counts["crops"]["redone"] == len(before)
    # Every crop is counted, in the report and in prepare_info.json, as cut losslessly or fallen back.
    report = json.loads((out / REPORT_FILENAME).read_text())
    paths = json.loads((out / INFO_FILENAME).read_text())["crop_paths"]
    assert paths == {k: v for k, v in report["counts"]["crops"].items() if k.startswith("lossless")}
    assert paths.get("lossless", 0) > 0 and sum(paths.values()) == report["counts"]["crops"]["redone"]


def test_same_seed_gives_byte_identical_outputs(tmp_path: Path) -> None:
    _run(f"output_dir={tmp_path / 'a'}", "crops.workers=1", *SMALL_DEMO)
    _run(f"output_dir={tmp_path / 'b'}", "crops.workers=2", *SMALL_DEMO)
    assert _outputs(tmp_path / "a") == _outputs(tmp_path / "b")


def test_command_line_reports_config_errors_without_traceback(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "prepare.py", f"output_dir={tmp_path}", "crops.strategy=circle"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "crops.strategy" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_images_dir_is_named(tmp_path: Path) -> None:
    coco = tmp_path / "export.json"
    coco.write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    with pytest.raises(Exception, match="images_dir"):
        _run(f"output_dir={tmp_path / 'out'}", f"coco_file={coco}")


def real_shape_project(root: Path) -> tuple[Path, Path]:
    """A CCT export and its images shaped like the real data that broke the old split: one site with ~89% of the
    images (and four species found only there), 19 cameras with one to three photos, three stations with a few
    dozen; 'Striped skunk' and 'Striped Skunk' spelled both ways."""
    rng = np.random.default_rng(0)
    images, annotations = [], []
    species = ["fox", "deer", "coyote", "bobcat", "Striped skunk", "only_a", "only_b", "only_c", "only_d"]
    plan = [("site_big", s) for s in ("only_a", "only_b", "only_c", "only_d") for _ in range(60)]
    plan += [("site_big", "deer")] * 200 + [("site_big", "coyote")] * 150
    for c in range(19):
        plan += [(f"cam{c:02d}", ["deer", "coyote", "bobcat", "Striped Skunk"][c % 4])] * int(rng.integers(1, 4))
    for station in range(3):
        for label in ("deer", "coyote", "bobcat", "Striped skunk"):
            plan += [(f"station{station}", label)] * int(rng.integers(2, 5))
    pixels = (rng.random((24, 32, 3)) * 255).astype(np.uint8)
    for i, (location, label) in enumerate(plan):
        name = f"{location}/img{i:04d}.jpg"
        path = root / "images" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path, quality=80)
        images.append({"id": f"i{i}", "file_name": name, "location": location, "width": 32, "height": 24})
        category = 99 if label == "Striped Skunk" else species.index(label) + 1
        annotations.append({"id": f"a{i}", "image_id": f"i{i}", "category_id": category, "bbox": [4, 4, 16, 12]})
    categories = [{"id": j + 1, "name": s} for j, s in enumerate(species)] + [{"id": 99, "name": "Striped Skunk"}]
    cct = write_cct(root / "export.json", images, annotations, categories)
    return cct, root / "images"


def test_real_shape_prints_the_shares_and_the_warning(tmp_path: Path) -> None:
    cct, images = real_shape_project(tmp_path / "src")
    out = tmp_path / "out"
    result = subprocess.run(
        [
            sys.executable,
            "prepare.py",
            f"coco_file={cct}",
            f"images_dir={images}",
            f"output_dir={out}",
            "crops.workers=1",
            "split.min_locs=null",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "crop shares per split" in result.stdout and "target" in result.stdout
    assert "WARNING: split 'val' holds" in result.stdout and "site_big" in result.stdout
    splits = read_splits(out / SPLITS_FILENAME)
    assert ("export", "site_big") in splits["train"]
    report = json.loads((out / REPORT_FILENAME).read_text(encoding="utf-8"))
    info = report["info"]["splits"]
    assert info["dominant_groups"][0]["group"] == ["export", "site_big"]
    assert info["labels_only_at_dominant_groups"] == ["only_a", "only_b", "only_c", "only_d"]
    assert {"val", "test"} <= set(info["off_target"])
    folded = [i for i in report["issues"] if i["kind"] == "label_folded"]
    assert len(folded) == 1 and "Striped Skunk" in folded[0]["message"]
    frame = load_prepared_dataset(out).frame
    assert "Striped Skunk" not in set(frame["label"])
    table = pd.read_csv(out / SPLIT_REPORT_FILENAME)
    assert {"target_frac"} <= set(table.columns) and (table["label"] == "*").sum() == 3
    # split.strict turns it into an error naming the cause, without a traceback
    strict = subprocess.run(
        [
            sys.executable,
            "prepare.py",
            f"coco_file={cct}",
            f"images_dir={images}",
            f"output_dir={out}",
            "split.min_locs=null",
            "split.strict=true",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert strict.returncode == 2 and "split.strict=true" in strict.stderr and "site_big" in strict.stderr
    assert "Traceback" not in strict.stderr


def test_group_by_sequence_and_time_blocks_reach_training(tmp_path: Path) -> None:
    out = tmp_path / "seq"
    summary = _run(f"output_dir={out}", "crops.workers=1", "split.group_by=sequence", *SMALL_DEMO)
    frame = load_prepared_dataset(out).frame  # train's reader maps rows to splits by split_group
    assert {"sequence", "split_group"} <= set(frame.columns)
    assert (frame["split_group"] == frame["sequence"]).all()
    assert frame.groupby("split_group")["split"].nunique().max() == 1  # one burst, one split
    assert summary.report.issues_of("splits", "split_unit_leaks_backgrounds")
    blocks = tmp_path / "blocks"
    _run(f"output_dir={blocks}", "crops.workers=1", "split.group_by=location_time", "split.time_block=1d", *SMALL_DEMO)
    frame = load_prepared_dataset(blocks).frame
    assert frame["split_group"].str.match(r"^.+@\d+$").all()
    assert frame.groupby("split_group")["split"].nunique().max() == 1
    info = json.loads((blocks / INFO_FILENAME).read_text(encoding="utf-8"))
    assert info["settings"]["split"]["group_by"] == "location_time"


def test_taxonomy_file_is_checked_against_the_labels_and_copied(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    _run(f"output_dir={out}", *SMALL_DEMO)
    labels = load_prepared_dataset(out).labels
    rows = ["label,class,order,family,genus,species"]
    rows += [f"{label},mammalia,order_{i % 2},family_{i},genus_{i}," for i, label in enumerate(labels)]
    taxonomy_file = tmp_path / "taxonomy_in.csv"
    taxonomy_file.write_text("\n".join(rows) + "\n")
    _run(f"output_dir={out}", *SMALL_DEMO, f"labels.taxonomy_file={taxonomy_file}")
    taxonomy = load_prepared_dataset(out).taxonomy
    assert taxonomy is not None and list(taxonomy.labels) == labels
    assert taxonomy.taxa("order") == ["order_0", "order_1"]

    # A label missing from the file: one line naming the file and the label; the earlier taxonomy is not kept.
    taxonomy_file.write_text("\n".join(rows[:-1]) + "\n")
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "prepare.py"),
            f"output_dir={out}",
            *SMALL_DEMO,
            f"labels.taxonomy_file={taxonomy_file}",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert f"labels ['{labels[-1]}'] have no row" in result.stderr and "Traceback" not in result.stderr
    # Without the key, a rerun removes the old taxonomy.csv (it would describe other labels one day).
    _run(f"output_dir={out}", *SMALL_DEMO)
    assert load_prepared_dataset(out).taxonomy is None


def test_missing_taxonomy_file_stops_before_any_stage(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, str(ROOT / "prepare.py"), f"output_dir={out}", *SMALL_DEMO, "labels.taxonomy_file=nope.csv"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 2 and "labels.taxonomy_file: nope.csv does not exist" in result.stderr
    assert not (out / CSV_FILENAME).exists()


class _CountingStage(Stage):
    """A stage added to the list, as a new one would be: fingerprinted by the labels, current on a second run."""

    name = "count"

    def fingerprint(self, run: PrepareRun) -> str | None:
        return fingerprint_of(run.labels)

    def run(self, run: PrepareRun) -> StageOutcome:
        frame = need(run.frame, "the dataset table")
        if run.is_current(self.name, self.fingerprint(run)):
            return StageOutcome(SKIPPED, "nothing new")
        return StageOutcome(detail=f"{len(frame)} rows", counts={"rows": len(frame)})


def test_the_stage_list_is_the_one_source_of_stages_and_a_new_stage_is_a_line(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    summary = _run(f"output_dir={out}", "crops.workers=1", *SMALL_DEMO)
    # the summary follows STAGES (folders and detect are not wanted without folders.root / detector.model_file)
    wanted = [s.name for s in STAGES if s.name not in ("folders", "detect")]
    assert [s.name for s in summary.stages] == wanted
    assert format_summary(summary).index("\ningest ") < format_summary(summary).index("\nsplits ")
    info = json.loads((out / INFO_FILENAME).read_text())
    assert set(info["stages"]) == {"images", "crops", "dataset", "splits"}

    at = [s.name for s in STAGES].index("dataset") + 1
    stages = (*STAGES[:at], _CountingStage(), *STAGES[at:])
    settings = prepare_settings([f"output_dir={out}", "crops.workers=1", *SMALL_DEMO])
    first = run_prepare(settings, stages)
    assert [s.name for s in first.stages] == [*wanted[: wanted.index("dataset") + 1], "count", "splits"]
    [count] = [s for s in first.stages if s.name == "count"]
    rows = len(load_prepared_dataset(out).frame)
    assert (count.status, count.detail, count.counts) == ("ran", f"{rows} rows", {"rows": rows})
    assert "\ncount     ran " in format_summary(first)
    assert "count" in json.loads((out / INFO_FILENAME).read_text())["stages"]

    again = {s.name: s.status for s in run_prepare(settings, stages).stages}
    assert again["count"] == again["crops"] == again["splits"] == "skipped (current)"
