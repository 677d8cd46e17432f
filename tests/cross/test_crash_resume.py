"""Crash safety: ``prepare.py`` and ``train.py`` killed with SIGKILL, then re-run, give the uninterrupted result.

Each run is a real subprocess in its own session; a kill sends SIGKILL to the whole process group (the main process
and its crop workers), as a crashed node or the OOM killer would. After every kill, nothing partial may be visible
under a final name: every image in ``images_dir`` has the exact bytes of its S3 object, every crop decodes, every
dataset file parses, every checkpoint loads. The final re-run must give byte-identical ``classification_ds.csv``,
``label_index.json`` and ``splits.json``, the same crop files, and no ``*.tmp-*`` files.

The default run has one fast test (a single kill in the crop stage); the seeded multi-kill runs over S3 downloads and
the training runs are ``slow``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pandas as pd
import pytest
import torch
from PIL import Image, ImageFile

from animl_lightning.core.files import TMP_MARKER
from animl_lightning.prepare.config import DemoSettings
from animl_lightning.prepare.demo import generate_demo_project
from tests.fixtures.datasets import make_prepared_dataset
from tests.fixtures.fault_proxy import FaultRule, fault_proxy, moto_server
from tests.fixtures.hydra import FAST_OVERRIDES, REPO_ROOT
from tests.fixtures.s3 import aws_environment

ROOT = REPO_ROOT
DATASET_FILES = ("classification_ds.csv", "label_index.json", "splits.json")
DEMO = DemoSettings(seed=11, locations=6, images_per_location=8, width=960, height=720)
PREPARE_ARGS = ("split.trials=200", "split.min_locs=2")


# --- running and killing ---------------------------------------------------------------------------------------


def start(script: str, args: list[str], log: Path) -> subprocess.Popen[bytes]:
    """Start ``script`` in its own process group (so a kill reaches its workers too)."""
    handle = log.open("ab")
    return subprocess.Popen(
        [sys.executable, script, *args],
        cwd=ROOT,
        env={**os.environ, **aws_environment(), "HYDRA_FULL_ERROR": "1", "PYTHONUNBUFFERED": "1"},
        stdout=handle,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def kill(process: subprocess.Popen[bytes]) -> bool:
    """SIGKILL the process group; returns whether it was still running (a real interruption)."""
    running = process.poll() is None
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    # give orphaned grandchildren (none expected) no chance to write after the check
    time.sleep(0.05)
    return running


def finish(script: str, args: list[str], log: Path, timeout: float = 300) -> None:
    process = start(script, args, log)
    try:
        code = process.wait(timeout=timeout)
    finally:
        if process.poll() is None:
            kill(process)
    assert code == 0, log.read_text(errors="replace")[-4000:]


def wait_for(condition: Any, process: subprocess.Popen[bytes], timeout: float = 120) -> bool:
    """Poll ``condition()`` until true; False when the process ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if process.poll() is not None:
            return False
        time.sleep(0.02)
    raise AssertionError("timed out waiting for the run to make progress")


# --- checks ----------------------------------------------------------------------------------------------------


def visible_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and TMP_MARKER not in p.name)


def temporaries(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob(f"*{TMP_MARKER}*") if p.is_file())


def decodes(path: Path) -> bool:
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with Image.open(path) as image:
            image.load()
    except (OSError, SyntaxError, ValueError):
        return False
    return True


def assert_nothing_partial(output_dir: Path, images_dir: Path, sources: dict[str, bytes]) -> None:
    """What a reader could open under a final name is complete."""
    for path in visible_files(images_dir):
        rel = path.relative_to(images_dir).as_posix()
        assert path.read_bytes() == sources[rel], f"partial or wrong image visible: {rel}"
    crops = output_dir / "crops"
    if crops.exists():
        for path in visible_files(crops):
            assert decodes(path), f"partial crop visible: {path}"
    for name in (*DATASET_FILES, "prepare_info.json", "prepare_report.json"):
        path = output_dir / name
        if path.exists() and path.suffix == ".json":
            json.loads(path.read_text(encoding="utf-8"))
    for name in ("classification_ds.csv", "split_report.csv"):
        if (output_dir / name).exists():
            pd.read_csv(output_dir / name)


def crop_count(output_dir: Path) -> int:
    crops = output_dir / "crops"
    return len(visible_files(crops)) if crops.exists() else 0


def crop_files(output_dir: Path) -> dict[str, bytes]:
    crops = output_dir / "crops"
    return {p.relative_to(crops).as_posix(): p.read_bytes() for p in visible_files(crops)}


def assert_same_result(
    reference: Path, resumed: Path, images_ref: Path | None = None, images_resumed: Path | None = None
) -> None:
    for name in DATASET_FILES:
        assert (resumed / name).read_bytes() == (reference / name).read_bytes(), name
    ref_crops, got_crops = crop_files(reference), crop_files(resumed)
    assert sorted(got_crops) == sorted(ref_crops)
    assert all(decodes(resumed / "crops" / rel) for rel in got_crops)
    different = [rel for rel in ref_crops if ref_crops[rel] != got_crops[rel]]
    assert not different, f"crops differ from the uninterrupted run: {different[:5]}"
    assert not temporaries(resumed), temporaries(resumed)
    if images_ref is not None and images_resumed is not None:
        assert not temporaries(images_resumed), temporaries(images_resumed)
        assert {p.relative_to(images_resumed) for p in visible_files(images_resumed)} == {
            p.relative_to(images_ref) for p in visible_files(images_ref)
        }


# --- prepare: a single kill in the crop stage (default run) ----------------------------------------------------


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, bytes]]:
    root = tmp_path_factory.mktemp("demo")
    coco_file, images_dir = generate_demo_project(root, DEMO)
    sources = {p.relative_to(images_dir).as_posix(): p.read_bytes() for p in visible_files(images_dir)}
    return coco_file, images_dir, sources


def prepare_args(coco_file: Path, images_dir: Path, output_dir: Path, *extra: str) -> list[str]:
    return [f"coco_file={coco_file}", f"images_dir={images_dir}", f"output_dir={output_dir}", *PREPARE_ARGS, *extra]


@pytest.mark.slow
def test_prepare_killed_in_the_crop_stage_resumes_to_the_same_result(
    demo: tuple[Path, Path, dict[str, bytes]], tmp_path: Path
) -> None:
    coco_file, images_dir, sources = demo
    log = tmp_path / "runs.log"
    reference = tmp_path / "reference"
    finish("prepare.py", prepare_args(coco_file, images_dir, reference, "crops.workers=1"), log)
    n_crops = len(crop_files(reference))
    assert n_crops >= 20

    resumed = tmp_path / "resumed"
    args = prepare_args(coco_file, images_dir, resumed, "crops.workers=1")
    process = start("prepare.py", args, log)
    crops = resumed / "crops"
    # kill as soon as the first crops are on disk: squarely inside the crop stage, however fast the machine
    reached = wait_for(lambda: crop_count(resumed) >= 1, process)
    assert kill(process) and reached, "the run finished before it could be killed"
    partial = crop_files(resumed)
    assert 0 < len(partial) < n_crops
    assert_nothing_partial(resumed, images_dir, sources)
    assert not (resumed / "classification_ds.csv").exists()
    # a damaged crop (from a writer that was not atomic, or a disk fault) is never taken as done
    damaged = sorted(crops.rglob("*.jpg"))[0]
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])

    finish("prepare.py", args, log)
    assert_same_result(reference, resumed)
    report = json.loads((resumed / "prepare_report.json").read_text(encoding="utf-8"))
    counts = report["counts"]["crops"]
    assert counts["skipped"] >= len(partial) - 1 and counts["redone"] >= 1
    assert counts["written"] + counts["redone"] + counts["skipped"] == n_crops


# --- prepare: seeded random kills over S3 download and crops (slow) --------------------------------------------


@pytest.fixture(scope="module")
def s3_demo(demo: tuple[Path, Path, dict[str, bytes]]) -> Iterator[tuple[Path, str, str, dict[str, bytes]]]:
    """The demo images in a moto bucket under their ``serving_bucket_key``; yields (cct, endpoint, bucket, sources)."""
    coco_file, _, sources = demo
    cct = json.loads(coco_file.read_text(encoding="utf-8"))
    bucket = f"crash-{uuid.uuid4().hex[:10]}"
    for name, value in aws_environment().items():
        os.environ.setdefault(name, value)
    with moto_server() as endpoint:
        client = boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )
        client.create_bucket(Bucket=bucket)
        for image in cct["images"]:
            client.put_object(Bucket=bucket, Key=image["serving_bucket_key"], Body=sources[image["file_name"]])
        yield coco_file, endpoint, bucket, sources


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2])
def test_prepare_killed_at_random_points_with_s3_resumes_to_the_same_result(
    s3_demo: tuple[Path, str, str, dict[str, bytes]], tmp_path: Path, seed: int
) -> None:
    coco_file, endpoint, bucket, sources = s3_demo
    log = tmp_path / "runs.log"
    with fault_proxy(endpoint) as proxy:
        # slow transfers stretch the download stage, so that kills land in the middle of writing an image
        proxy.add(FaultRule("", "trickle", count=None, methods=("GET",), delay_s=0.01))

        def args(out: Path, images: Path) -> list[str]:
            return prepare_args(
                coco_file,
                images,
                out,
                f"s3.bucket={bucket}",
                f"s3.endpoint_url={proxy.url}",
                "s3.region=us-east-1",
                "s3.workers=2",
                "crops.workers=2",
            )

        reference, images_ref = tmp_path / "reference", tmp_path / "images_ref"
        began = time.monotonic()
        finish("prepare.py", args(reference, images_ref), log)
        duration = time.monotonic() - began

        resumed, images_resumed = tmp_path / "resumed", tmp_path / "images_resumed"
        n_images, n_crops = len(sources), len(crop_files(reference))
        rng = random.Random(seed)
        # Seeded kill points: two inside the download stage and two inside the crop stage (given as the fraction of
        # files on disk that triggers the kill), then one at a random time, wherever it lands.
        plan = [
            *sorted(("images", rng.uniform(0.05, 0.9)) for _ in range(2)),
            *sorted(("crops", rng.uniform(0.05, 0.9)) for _ in range(2)),
            ("time", rng.uniform(0.2, duration)),
        ]
        landed: list[str] = []
        for stage, point in plan:
            process = start("prepare.py", args(resumed, images_resumed), log)
            if stage == "images":
                wait_for(
                    lambda p=point: (
                        len(visible_files(images_resumed)) >= p * n_images if images_resumed.exists() else False
                    ),
                    process,
                )
            elif stage == "crops":
                wait_for(lambda p=point: crop_count(resumed) >= p * n_crops, process)
            else:
                time.sleep(point)
            if kill(process):
                landed.append(stage)
            assert_nothing_partial(resumed, images_resumed, sources)
        assert landed.count("images") >= 1 and landed.count("crops") >= 1, landed
        finish("prepare.py", args(resumed, images_resumed), log)

    assert_same_result(reference, resumed, images_ref, images_resumed)
    for rel, data in sources.items():
        assert (images_resumed / rel).read_bytes() == data


# --- train: killed during training, resumed from last.ckpt (slow) ----------------------------------------------

TRAIN_ARGS = (*FAST_OVERRIDES, "trainer.max_epochs=4", "logger=csv", "seed=7")


@pytest.fixture(scope="module")
def train_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """An uninterrupted run and a run killed twice (seeded delays) and resumed from its last.ckpt."""
    root = tmp_path_factory.mktemp("train_crash")
    data_dir = make_prepared_dataset(root / "data")
    log = root / "runs.log"

    def args(run: Path, *extra: str) -> list[str]:
        return [f"data_dir={data_dir}", f"hydra.run.dir={run}", *TRAIN_ARGS, *extra]

    reference = root / "reference"
    finish("train.py", args(reference), log)

    run = root / "crashed"
    last = run / "checkpoints" / "last.ckpt"
    rng = random.Random(3)
    kills: list[dict[str, Any]] = []
    for attempt in range(2):
        extra = [f"ckpt_path={last}"] if last.exists() else []
        before = last.stat().st_mtime_ns if last.exists() else None
        process = start("train.py", args(run, *extra), log)
        # wait for a new last.ckpt (one more epoch done), then kill at a seeded point of the next epoch
        wait_for(lambda b=before: last.exists() and last.stat().st_mtime_ns != b, process, timeout=240)
        # well inside the next epoch: a kill after the final epoch would leave nothing to resume
        time.sleep(rng.uniform(0.0, 0.6))
        interrupted = kill(process)
        state = torch.load(last, map_location="cpu", weights_only=True)  # never a partial checkpoint
        kills.append({"attempt": attempt, "interrupted": interrupted, "epoch": state["epoch"]})
        for ckpt in (run / "checkpoints").glob("*.ckpt"):
            torch.load(ckpt, map_location="cpu", weights_only=True)
    finish("train.py", args(run, f"ckpt_path={last}"), log)
    return {"reference": reference, "resumed": run, "kills": kills}


@pytest.mark.slow
def test_train_resumes_from_last_checkpoint_after_kills(train_runs: dict[str, Any]) -> None:
    reference, resumed = train_runs["reference"], train_runs["resumed"]
    assert any(k["interrupted"] for k in train_runs["kills"]), train_runs["kills"]
    ref_state = torch.load(reference / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    got_state = torch.load(resumed / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert got_state["epoch"] == ref_state["epoch"]
    assert got_state["global_step"] == ref_state["global_step"]
    for name in ("per_label.csv", "overall.csv"):
        ref_table = pd.read_csv(reference / "metrics" / name)
        got_table = pd.read_csv(resumed / "metrics" / name)
        assert list(got_table.columns) == list(ref_table.columns)
        assert len(got_table) == len(ref_table)
    assert not temporaries(resumed)


@pytest.mark.slow
def test_train_resumed_after_kills_ends_with_the_uninterrupted_metrics(train_runs: dict[str, Any]) -> None:
    reference, resumed = train_runs["reference"], train_runs["resumed"]
    # CPU, fixed seed, no nondeterministic kernels: an exact match is possible, so only float round-off is allowed
    for name in ("overall.csv", "per_label.csv"):
        pd.testing.assert_frame_equal(
            pd.read_csv(resumed / "metrics" / name), pd.read_csv(reference / "metrics" / name), rtol=1e-6
        )


def test_helpers_see_partial_files(tmp_path: Path) -> None:
    """The checks above would catch a partial file: a truncated JPEG does not decode, a temporary is found."""
    buffer = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(buffer, format="JPEG")
    (tmp_path / "whole.jpg").write_bytes(buffer.getvalue())
    (tmp_path / "half.jpg").write_bytes(buffer.getvalue()[:1000])
    (tmp_path / f".x.jpg{TMP_MARKER}abc").write_bytes(b"")
    assert decodes(tmp_path / "whole.jpg") and not decodes(tmp_path / "half.jpg")
    assert [p.name for p in temporaries(tmp_path)] == [f".x.jpg{TMP_MARKER}abc"]
    shutil.rmtree(tmp_path)
