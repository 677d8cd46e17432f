"""Ctrl-C in ``prepare.py``'s crop stage: it stops within seconds, leaves no partial crop, says so, and resumes.

Each run is a real subprocess in its own session. A terminal's Ctrl-C reaches the whole process group (the main
process and its crop workers); ``kill -INT <pid>`` reaches the main process only: both must stop the stage. The
dataset is the demo project at full camera resolution with every image copied several times, so that the crop stage
runs long enough (well over the few seconds allowed to stop) on any machine.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from animl_lightning.prepare.config import DemoSettings
from animl_lightning.prepare.demo import generate_demo_project
from tests.cross.test_crash_resume import crop_count, crop_files, decodes, temporaries, wait_for
from tests.fixtures.hydra import REPO_ROOT
from tests.fixtures.scripts import command_env

DEMO = DemoSettings(seed=5, locations=4, images_per_location=6, width=1920, height=1440)
COPIES = 20  # 24 images x 20 = 480 images, about 500 crops of 1920x1440 images
ARGS = ("split.trials=50", "split.min_locs=2", "crops.workers=2")
STOP_WITHIN_S = 5.0
EXIT_WITHIN_S = 10.0
MESSAGE = "prepare.py: interrupted: {} of {} crops written; run the same command again to resume"


@pytest.fixture(scope="module")
def big_demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The demo CCT with every image (a hard link, so no copy on disk) and its boxes repeated ``COPIES`` times."""
    root = tmp_path_factory.mktemp("big_demo")
    coco_file, images_dir = generate_demo_project(root / "demo", DEMO)
    cct = json.loads(coco_file.read_text(encoding="utf-8"))
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for copy in range(COPIES):
        for image in cct["images"]:
            name = f"copy{copy:02d}/{image['file_name']}"
            target = images_dir / name
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(images_dir / image["file_name"], target)
            images.append({**image, "id": f"{image['id']}-{copy}", "file_name": name})
        annotations += [
            {**a, "id": f"{a['id']}-{copy}", "image_id": f"{a['image_id']}-{copy}"} for a in cct["annotations"]
        ]
    big = root / "big_cct.json"
    big.write_text(json.dumps({**cct, "images": images, "annotations": annotations}), encoding="utf-8")
    return big, images_dir


def start(args: list[str], stderr: Path) -> subprocess.Popen[bytes]:
    with stderr.open("wb") as handle:
        return subprocess.Popen(
            [sys.executable, str(REPO_ROOT / "prepare.py"), *args],
            cwd=REPO_ROOT,
            env=command_env({"PYTHONUNBUFFERED": "1"}),
            stdout=subprocess.DEVNULL,
            stderr=handle,
            start_new_session=True,
        )


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def interrupt(args: list[str], output_dir: Path, whole_group: bool) -> tuple[str, float, float]:
    """Start prepare, send one SIGINT once crops appear.

    Returns stderr and the seconds from the signal to the message and to the exit; the exit also waits for the
    interpreter's teardown (torch's takes 1-3 s on a busy 2-core machine), which no stop can shorten.
    """
    log = output_dir.parent / f"{output_dir.name}.stderr"
    process = start(args, log)
    try:
        before = crop_count(output_dir)
        # a few crops past any left by an earlier run: squarely inside the crop stage
        assert wait_for(lambda: crop_count(output_dir) >= before + 5, process, timeout=240), "ended before crops"
        sent = time.monotonic()
        if whole_group:
            os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        else:
            os.kill(process.pid, signal.SIGINT)
        said = wait_for(lambda: b"interrupted" in log.read_bytes(), process, timeout=60)
        to_message = time.monotonic() - sent
        process.wait(timeout=60)
        to_exit = time.monotonic() - sent
        assert said or b"interrupted" in log.read_bytes(), log.read_text(errors="replace")[-3000:]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    stderr = log.read_text(errors="replace")
    assert process.returncode == 130, stderr[-3000:]
    # no worker is left behind to write more crops after the command has returned
    deadline = time.monotonic() + 2
    while group_alive(process.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not group_alive(process.pid), "crop workers outlived prepare.py"
    return stderr, to_message, to_exit


def assert_clean_stop(stderr: str, to_message: float, to_exit: float, output_dir: Path, total: int) -> int:
    """The stop was quick and quiet, nothing partial is left, and the message counts the crops on disk."""
    print(f"message {to_message:.2f}s, exit {to_exit:.2f}s after SIGINT")
    assert to_message < STOP_WITHIN_S, f"took {to_message:.1f}s to stop after SIGINT"
    assert to_exit < EXIT_WITHIN_S, f"took {to_exit:.1f}s to exit after SIGINT"
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if "interrupted" in line]
    written = crop_count(output_dir)
    assert lines == [MESSAGE.format(written, total)], stderr[-3000:]
    assert stderr.rstrip().splitlines()[-1] == lines[0]
    assert 0 < written < total
    time.sleep(1.0)
    assert crop_count(output_dir) == written, "crops were still being written after the exit"
    assert not temporaries(output_dir / "crops")
    assert all(decodes(path) for path in (output_dir / "crops").rglob("*.jpg"))
    return written


@pytest.mark.slow
def test_ctrl_c_in_the_crop_stage_stops_at_once_and_resumes(big_demo: tuple[Path, Path], tmp_path: Path) -> None:
    coco_file, images_dir = big_demo

    def args(output_dir: Path, *extra: str) -> list[str]:
        return [f"coco_file={coco_file}", f"images_dir={images_dir}", f"output_dir={output_dir}", *ARGS, *extra]

    reference = tmp_path / "reference"
    began = time.monotonic()
    done = subprocess.run(
        [sys.executable, str(REPO_ROOT / "prepare.py"), *args(reference)],
        cwd=REPO_ROOT,
        env=command_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    uninterrupted_s = time.monotonic() - began
    print(f"uninterrupted run {uninterrupted_s:.1f}s")
    assert done.returncode == 0, done.stderr[-3000:]
    expected = crop_files(reference)
    total = len(expected)
    assert total >= 400

    resumed = tmp_path / "resumed"
    # Ctrl-C in a terminal: the main process and both crop workers get SIGINT
    stderr, to_message, to_exit = interrupt(args(resumed), resumed, whole_group=True)
    first = assert_clean_stop(stderr, to_message, to_exit, resumed, total)
    # the stop came while work was left: crops were still missing when the command returned
    assert first < total, (first, total, uninterrupted_s)

    # kill -INT to the main process only, in the single-process path: the workers never see the signal there
    stderr, to_message, to_exit = interrupt(args(resumed, "crops.workers=1"), resumed, whole_group=False)
    second = assert_clean_stop(stderr, to_message, to_exit, resumed, total)
    assert second > first  # the second run resumed: it kept the first run's crops and added to them

    final = subprocess.run(
        [sys.executable, str(REPO_ROOT / "prepare.py"), *args(resumed)],
        cwd=REPO_ROOT,
        env=command_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert final.returncode == 0, final.stderr[-3000:]
    assert crop_files(resumed) == expected
    assert not temporaries(resumed)
    counts = json.loads((resumed / "prepare_report.json").read_text(encoding="utf-8"))["counts"]["crops"]
    # only the missing crops were made
    assert counts["skipped"] == second and counts["written"] == total - second, counts
