"""What a new user broke, each reproduced with a real fault: a full tmpfs, SIGKILL and SIGINT, a socket that never
answers, a second process on the same folder, damaged files, and the mistakes that used to end in a traceback."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import filelock
import pandas as pd
import pytest
import torch

import train as train_script
from animl_lightning.cli import run_command as run_command_main
from animl_lightning.core.contract import read_splits
from animl_lightning.core.crop_files import has_jpeg_markers
from animl_lightning.core.files import LOCK_FILENAME
from animl_lightning.deploy.classify import run_classify
from animl_lightning.deploy.export_formats import export_checkpoint
from animl_lightning.prepare.pipeline import run_prepare
from animl_lightning.train.checkpointing import CheckpointError, read_checkpoint
from tests.fixtures.cct import write_cct
from tests.fixtures.datasets import make_prepared_dataset
from tests.fixtures.hydra import FAST_OVERRIDES, compose_train, prepare_settings
from tests.fixtures.models import write_checkpoint, write_megadetector_file
from tests.fixtures.scripts import command, command_env, run_command

SMALL_DEMO = ["demo.locations=6", "demo.images_per_location=8", "demo.width=160", "demo.height=120"]
TRAIN = [*FAST_OVERRIDES, "logger=csv"]


def one_error_line(stderr: str, command_name: str) -> str:
    """The stderr of a command that failed cleanly: no traceback, one line that starts with the command's name."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith(f"{command_name}: ")]
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_prepared_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[[Path, int], Path]]:
    """Mount a tmpfs of a given size (a real full disk); unmounted at the end of the test."""
    mounted: list[Path] = []

    def mount(path: Path, size: int) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True
        )
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {result.stderr.strip()}")
        mounted.append(path)
        return path

    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], check=False)


# --- 1. checkpoints survive a full disk and a kill -------------------------------------------------------------------


@pytest.mark.slow
def test_a_full_disk_keeps_the_last_good_checkpoint(
    data_dir: Path, tmp_path: Path, tmpfs: Callable[[Path, int], Path]
) -> None:
    probe = tmp_path / "probe"
    assert (
        run_command(
            "train.py", [f"data_dir={data_dir}", f"hydra.run.dir={probe}", *TRAIN, "trainer.max_epochs=1"]
        ).returncode
        == 0
    )
    size = (probe / "checkpoints" / "last.ckpt").stat().st_size
    # Room for best.ckpt, last.ckpt and the logs of the first epoch, not for a third checkpoint being written.
    run = tmpfs(tmp_path / "full", int(2.5 * size) + 256 * 1024)
    result = run_command("train.py", [f"data_dir={data_dir}", f"hydra.run.dir={run}", *TRAIN, "trainer.max_epochs=4"])
    assert result.returncode == 2
    line = one_error_line(result.stderr, "train.py")
    assert "No space left on device" in line
    checkpoints = run / "checkpoints"
    for name in ("best.ckpt", "last.ckpt"):
        contents = read_checkpoint(checkpoints / name)  # whole, not truncated
        assert contents.raw["epoch"] == 0
    assert not [p for p in checkpoints.iterdir() if ".tmp-" in p.name]  # the failed write cleaned up after itself


@pytest.mark.slow
def test_a_kill_during_a_checkpoint_save_keeps_the_previous_one(data_dir: Path, tmp_path: Path) -> None:
    """SIGKILL the moment a checkpoint's temporary file appears: the checkpoint it replaces must stay whole."""
    caught = None
    for attempt in range(6):
        run = tmp_path / f"run{attempt}"
        checkpoints = run / "checkpoints"
        args = [f"data_dir={data_dir}", f"hydra.run.dir={run}", *TRAIN, "trainer.max_epochs=300"]
        args += ["+trainer.limit_train_batches=1", "+trainer.limit_val_batches=1", "callbacks.early_stopping=null"]
        process = subprocess.Popen(
            command("train.py", args), env=command_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 240
        try:
            while time.monotonic() < deadline and process.poll() is None:
                if checkpoints.is_dir() and (checkpoints / "last.ckpt").exists():
                    partial = [e.name for e in os.scandir(checkpoints) if ".tmp-" in e.name]
                    if partial:
                        process.kill()
                        caught = (run, partial)
                        break
        finally:
            process.kill()
            process.wait()
        if caught is not None:
            break
    assert caught is not None, "never caught a save in progress"
    run, partial = caught
    leftovers = [p.name for p in (run / "checkpoints").iterdir() if ".tmp-" in p.name]
    assert leftovers, "the kill landed during a save, so its temporary file is still there"
    last = read_checkpoint(run / "checkpoints" / "last.ckpt")  # the previous last.ckpt, whole
    # Resuming removes the stale temporary and goes on from the whole checkpoint.
    args = [f"data_dir={data_dir}", f"hydra.run.dir={run}", *TRAIN, f"trainer.max_epochs={last.raw['epoch'] + 2}"]
    result = run_command("train.py", [*args, f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}"])
    assert result.returncode == 0, result.stderr
    assert not [p for p in (run / "checkpoints").iterdir() if ".tmp-" in p.name]


@pytest.mark.slow
def test_checkpoints_are_written_in_their_own_folder_not_the_temp_folder(data_dir: Path, tmp_path: Path) -> None:
    # Lightning's writer staged checkpoints in the system temp folder and fell back to a truncating copy when that
    # was another file system; nothing may be staged there now.
    temp = tmp_path / "system_tmp"
    temp.mkdir()
    run = tmp_path / "run"
    result = run_command(
        "train.py", [f"data_dir={data_dir}", f"hydra.run.dir={run}", *TRAIN], env={"TMPDIR": str(temp)}
    )
    assert result.returncode == 0, result.stderr
    assert read_checkpoint(run / "checkpoints" / "last.ckpt").raw["epoch"] == 1
    assert not [p for p in temp.rglob("*") if p.suffix == ".ckpt" or "ckpt" in p.name]


# --- 2. resume into another dataset --------------------------------------------------------------------------------


def test_resume_refuses_a_checkpoint_of_other_labels_or_crops(data_dir: Path, tmp_path: Path) -> None:
    first = tmp_path / "a"
    train_script.train(compose_train(data_dir, first, ["trainer.max_epochs=1"]))
    last = first / "checkpoints" / "last.ckpt"
    other_labels = make_prepared_dataset(tmp_path / "b", labels=("bird", "deer", "skunk"), per_label=2)
    with pytest.raises(
        CheckpointError, match=r"trained on labels \['bird', 'fox', 'skunk'\].*\['bird', 'deer', 'skunk'\]"
    ):
        train_script.train(compose_train(other_labels, tmp_path / "r1", [f"ckpt_path={last}"]))
    other_crops = make_prepared_dataset(tmp_path / "c", per_label=2)
    info = json.loads((other_crops / "prepare_info.json").read_text())
    info["crops"]["strategy"] = "pad"
    (other_crops / "prepare_info.json").write_text(json.dumps(info))
    with pytest.raises(CheckpointError, match="crops cut with"):
        train_script.train(compose_train(other_crops, tmp_path / "r2", [f"ckpt_path={last}"]))
    assert not (tmp_path / "r1" / "checkpoints").exists() and not (tmp_path / "r2" / "checkpoints").exists()


# --- 3. a damaged crop -----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_damaged_crop_is_redone_by_prepare_and_named_by_train(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    run_prepare(prepare_settings([f"output_dir={out}", "crops.workers=1", *SMALL_DEMO]))
    crops = sorted((out / "crops").rglob("*.jpg"))
    crops[3].write_bytes(b"")  # emptied
    crops[5].write_bytes(crops[5].read_bytes()[:200])  # truncated
    summary = run_prepare(prepare_settings([f"output_dir={out}", "crops.workers=1", *SMALL_DEMO]))
    stage = next(s for s in summary.stages if s.name == "crops")
    assert stage.status == "ran"
    assert has_jpeg_markers(crops[3]) and has_jpeg_markers(crops[5])
    assert summary.report.counts["crops"]["redone"] == 2
    # Damaged after prepare: train names every damaged crop before any training.
    crops[3].write_bytes(b"")
    crops[7].write_bytes(crops[7].read_bytes()[:100])
    run = tmp_path / "run"
    result = run_command("train.py", [f"data_dir={out}", f"hydra.run.dir={run}", *TRAIN])
    assert result.returncode == 2
    line = one_error_line(result.stderr, "train.py")
    assert "2 crop files" in line and "not complete JPEGs" in line
    assert crops[3].name in result.stderr + result.stdout and crops[7].name in result.stderr + result.stdout
    assert not (run / "checkpoints").exists()


# --- 4. classify resumes only with the same checkpoint and settings ----------------------------------------------


def test_classify_resume_with_another_checkpoint_classifies_again(tmp_path: Path) -> None:
    from animl_lightning.deploy.classify import ClassifySettings, run_classify
    from animl_lightning.deploy.classify_inputs import read_detections_file

    detections, images, _ = write_megadetector_file(tmp_path / "md")
    first = write_checkpoint(tmp_path / "a.ckpt")
    second = write_checkpoint(tmp_path / "b.ckpt", seed=1)
    output = tmp_path / "out.json"
    settings = ClassifySettings(num_workers=0, backend="torch")
    run_classify(first, output, detections_file=detections, images_dir=images, device="cpu", settings=settings)
    summary = run_classify(
        second, output, detections_file=detections, images_dir=images, device="cpu", settings=settings
    )
    assert summary.detections_resumed == 0 and summary.detections_classified > 0
    fresh = tmp_path / "fresh.json"
    run_classify(second, fresh, detections_file=detections, images_dir=images, device="cpu", settings=settings)
    got, expected = read_detections_file(output), read_detections_file(fresh)
    assert [i.get("detections") for i in got["images"]] == [i.get("detections") for i in expected["images"]]
    assert got["info"]["classifier_metadata"]["checkpoint_sha256"] == read_checkpoint(second).sha256
    # And the same checkpoint again resumes everything.
    again = run_classify(second, output, detections_file=detections, images_dir=images, device="cpu", settings=settings)
    assert again.detections_classified == 0 and again.detections_resumed > 0


# --- 5. exact resume with a loader worker --------------------------------------------------------------------------


@pytest.mark.slow
def test_resume_with_a_loader_worker_is_exact(data_dir: Path, tmp_path: Path) -> None:
    overrides = ["data.num_workers=1", "scheduler.T_max=3", "test=false", "seed=11"]
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    train_script.train(compose_train(data_dir, reference, [*overrides, "trainer.max_epochs=3"]))
    train_script.train(compose_train(data_dir, resumed, [*overrides, "trainer.max_epochs=2"]))
    last = resumed / "checkpoints" / "last.ckpt"
    train_script.train(compose_train(data_dir, resumed, [*overrides, "trainer.max_epochs=3", f"ckpt_path={last}"]))
    expected = torch.load(reference / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    got = torch.load(last, map_location="cpu", weights_only=True)
    assert (got["epoch"], got["global_step"]) == (expected["epoch"], expected["global_step"])
    for key, value in expected["state_dict"].items():
        assert torch.equal(got["state_dict"][key], value), key
    for name in ("overall.csv", "per_label.csv", "predictions_val.csv"):
        assert (resumed / "metrics" / name).read_bytes() == (reference / "metrics" / name).read_bytes(), name


# --- 7. a failed sweep job does not stop the sweep ------------------------------------------------------------------


@pytest.mark.slow
def test_a_failed_sweep_job_is_a_failed_row_and_the_sweep_goes_on(data_dir: Path, tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    result = run_command(
        "train.py",
        [
            "-m",
            f"data_dir={data_dir}",
            *TRAIN,
            "trainer.max_epochs=1",
            "data.batch_size=0,8",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=tmp_path,
    )
    assert result.returncode == 1, result.stderr
    assert "1 of 2 sweep jobs failed" in result.stderr
    summary = pd.read_csv(sweep / "sweep_summary.csv")
    assert summary["status"].tolist() == ["FAILED", "COMPLETED"]
    assert "data.batch_size: must be >= 1" in summary.loc[0, "error"]
    assert (sweep / "1" / "metrics" / "per_label.csv").is_file()  # the job after the failed one ran


# --- 8. an S3 endpoint that never answers ------------------------------------------------------------------------


@pytest.fixture
def silent_endpoint() -> Iterator[str]:
    """A TCP server on 127.0.0.1 that accepts connections and never says a word."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except TimeoutError:
                continue
            except OSError:
                return

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join(timeout=2)
    for connection in held:
        connection.close()
    server.close()


def s3_project(root: Path) -> Path:
    images = [
        {"id": f"i{n}", "file_name": f"cam/{n}.jpg", "location": f"l{n % 4}", "width": 32, "height": 24}
        for n in range(30)
    ]
    annotations = [
        {"id": f"a{n}", "image_id": f"i{n}", "category_id": 1 + n % 2, "bbox": [2, 2, 10, 10]} for n in range(30)
    ]
    return write_cct(root / "export.json", images, annotations)


@pytest.mark.parametrize("endpoint_kind", ["silent", "refused"])
def test_an_s3_endpoint_that_never_answers_stops_prepare_early(
    endpoint_kind: str, silent_endpoint: str, tmp_path: Path
) -> None:
    if endpoint_kind == "silent":
        endpoint, reason = silent_endpoint, "read timeout"
    else:
        closed = socket.socket()
        closed.bind(("127.0.0.1", 0))
        endpoint, reason = f"http://127.0.0.1:{closed.getsockname()[1]}", "cannot connect"
        closed.close()
    cct = s3_project(tmp_path)
    started = time.monotonic()
    result = run_command(
        "prepare.py",
        [
            f"coco_file={cct}",
            f"images_dir={tmp_path / 'images'}",
            f"output_dir={tmp_path / 'out'}",
            "s3.bucket=animl-images",
            f"s3.endpoint_url={endpoint}",
            "s3.connect_timeout=1",
            "s3.read_timeout=1",
        ],
        env={"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"},
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 2
    line = one_error_line(result.stderr, "prepare.py")
    assert endpoint in line and reason in line and "s3.read_timeout=1s" in line and "s3.connect_timeout=1s" in line
    assert "labelled boxes" not in line  # the real cause, not a downstream symptom
    assert elapsed < 60, elapsed
    assert "images to check or download" in result.stdout + result.stderr  # said what it was doing from the start


# --- 9. two runs on one folder ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_second_prepare_on_the_same_folder_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    args = [f"output_dir={out}", "crops.workers=1", "demo.locations=6", "demo.images_per_location=40"]
    first = subprocess.Popen(
        command("prepare.py", args), env=command_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    lock = filelock.FileLock(out / LOCK_FILENAME, timeout=0)
    deadline = time.monotonic() + 60
    held = False
    while time.monotonic() < deadline and first.poll() is None and not held:
        try:
            with lock:
                pass
            time.sleep(0.02)
        except filelock.Timeout:
            held = True
    assert held, "the first prepare.py never held the folder's lock"
    second = run_command("prepare.py", args)
    assert second.returncode == 2
    line = one_error_line(second.stderr, "prepare.py")
    assert "in use by another prepare.py" in line and str(out) in line
    assert first.wait(timeout=120) == 0
    assert read_splits(out / "splits.json")["train"]


@pytest.mark.slow
def test_train_into_a_folder_in_use_is_refused(data_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    with filelock.FileLock(run / LOCK_FILENAME, timeout=0):
        result = run_command("train.py", [f"data_dir={data_dir}", f"hydra.run.dir={run}", *TRAIN])
    assert result.returncode == 2
    assert "in use by another train.py" in one_error_line(result.stderr, "train.py")


# --- a bare traceback where a one-line error belongs -------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("trained")
    train_script.train(compose_train(data_dir, run, ["trainer.max_epochs=1"]))
    return run / "checkpoints" / "best.ckpt"


def bad_checkpoints(root: Path, good: Path) -> dict[str, tuple[Path, str]]:
    root.mkdir(parents=True, exist_ok=True)
    empty = root / "empty.ckpt"
    empty.write_bytes(b"")
    truncated = root / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    foreign = root / "foreign.ckpt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    return {
        "empty": (empty, "is empty (0 bytes)"),
        "truncated": (truncated, "cannot be read (truncated"),
        "foreign": (foreign, "not written by train.py"),
    }


def train_as_the_command(cfg: Any, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """``train.py``'s own error handling in this process (the subprocess tests above show it is the command's)."""
    try:
        run_command_main(lambda: train_script.train(cfg), "train.py")
    except SystemExit as stop:
        return int(stop.code or 0), capsys.readouterr().err
    return 0, capsys.readouterr().err


@pytest.mark.parametrize("mode", ["evaluate", "resume"])
@pytest.mark.parametrize("kind", ["empty", "truncated", "foreign"])
def test_unusable_checkpoints_are_one_line_errors(
    data_dir: Path, trained: Path, tmp_path: Path, mode: str, kind: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path, expected = bad_checkpoints(tmp_path / "ckpts", trained)[kind]
    extra = ["train=false"] if mode == "evaluate" else []
    cfg = compose_train(data_dir, tmp_path / "run", [f"ckpt_path={path}", *extra])
    status, stderr = train_as_the_command(cfg, capsys)
    assert status == 2
    line = one_error_line(stderr, "train.py")
    assert expected in line and path.name in line


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["monitor=val/nope"], "monitor: 'val/nope' is not a logged metric; choose one of"),
        (["+optimizer.learning_rate=0.1"], "optimizer.learning_rate: unknown key; optimizer has amsgrad, betas"),
        (["+scheduler.warmup=3"], "scheduler.warmup: unknown key; scheduler has T_max, eta_min,"),
    ],
)
def test_config_mistakes_are_one_line_errors(
    data_dir: Path, tmp_path: Path, overrides: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    status, stderr = train_as_the_command(compose_train(data_dir, tmp_path / "run", overrides), capsys)
    assert status == 2
    assert expected in one_error_line(stderr, "train.py")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_output_folders_that_cannot_be_used_are_one_line_errors(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    result = run_command("prepare.py", [f"output_dir={a_file}"])
    assert result.returncode == 2 and "is a file, not a folder" in one_error_line(result.stderr, "prepare.py")
    result = run_command("prepare.py", [f"output_dir={a_file / 'below'}"])
    assert result.returncode == 2 and "cannot create the folder" in one_error_line(result.stderr, "prepare.py")

    def as_command(name: str, task: Callable[[], object]) -> tuple[int, str]:
        try:
            run_command_main(task, name)
        except SystemExit as stop:
            return int(stop.code or 0), capsys.readouterr().err
        return 0, capsys.readouterr().err

    detections, images, _ = write_megadetector_file(tmp_path / "md")
    folder = tmp_path / "a_folder"
    folder.mkdir()
    for output, expected in ((folder, "is a folder"), (a_file / "out.json", "cannot write")):
        status, stderr = as_command(
            "classify",
            lambda output=output: run_classify(trained, output, detections_file=detections, images_dir=images),
        )
        assert status == 2
        line = one_error_line(stderr, "classify")
        assert expected in line and "output_file" in line
    for output, expected in ((folder, "is a folder"), (a_file / "model.onnx", "cannot write")):
        status, stderr = as_command("export", lambda output=output: export_checkpoint(trained, "onnx", output))
        assert status == 2
        line = one_error_line(stderr, "export")
        assert expected in line and "output" in line


@pytest.mark.slow
def test_a_full_disk_while_writing_the_tables_is_named(
    data_dir: Path, tmp_path: Path, tmpfs: Callable[[Path, int], Path]
) -> None:
    full = tmpfs(tmp_path / "full", 64 * 1024)
    (full / "filler").write_bytes(b"\0" * (60 * 1024))
    result = run_command(
        "train.py",
        [
            f"data_dir={data_dir}",
            f"hydra.run.dir={tmp_path / 'run'}",
            *TRAIN,
            f"callbacks.metric_tables.dirpath={full}",
        ],
    )
    assert result.returncode == 2
    line = one_error_line(result.stderr, "train.py")
    assert "No space left on device" in line and str(full) in line


def test_huge_image_sizes_in_the_cct_are_reported_not_a_traceback(tmp_path: Path) -> None:
    images = [
        {"id": f"i{n}", "file_name": f"cam/{n}.jpg", "location": f"l{n}", "width": 2**63, "height": 2**64}
        for n in range(3)
    ]
    cct = write_cct(tmp_path / "export.json", images, [])
    (tmp_path / "images").mkdir()
    result = run_command(
        "prepare.py", [f"coco_file={cct}", f"images_dir={tmp_path / 'images'}", f"output_dir={tmp_path / 'out'}"]
    )
    assert "Traceback" not in result.stderr
    report = json.loads((tmp_path / "out" / "prepare_report.json").read_text())
    sizes = [i for i in report["issues"] if i["kind"] == "invalid_size"]
    assert len(sizes) == 6 and "up to 1,000,000" in sizes[0]["message"]


# --- Ctrl-C ----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_ctrl_c_during_training_says_how_to_resume_and_writes_no_partial_tables(data_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = [
        f"data_dir={data_dir}",
        f"hydra.run.dir={run}",
        *TRAIN,
        "trainer.max_epochs=200",
        "callbacks.early_stopping=null",
    ]
    process = subprocess.Popen(
        command("train.py", args), env=command_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    last = run / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 120
    while not last.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert last.exists()
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130
    line = one_error_line(stderr, "train.py")
    assert "interrupted; resume with the same command plus ckpt_path=" in line and str(last) in line
    assert not (run / "metrics").exists()  # the tables are a set or nothing
    epoch = read_checkpoint(last).raw["epoch"]
    result = run_command("train.py", [*args[:-2], f"trainer.max_epochs={epoch + 2}", f"ckpt_path={last}"])
    assert result.returncode == 0, result.stderr
    assert (run / "metrics" / "per_label.csv").is_file()


@pytest.mark.slow
def test_ctrl_c_during_prepare_resumes_with_the_same_command(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    args = [
        f"output_dir={out}",
        "crops.workers=1",
        "demo.locations=6",
        "demo.images_per_location=30",
        "demo.width=1024",
        "demo.height=768",
    ]
    process = subprocess.Popen(
        command("prepare.py", args), env=command_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    crops = out / "crops"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if crops.is_dir() and sum(1 for _ in crops.rglob("*.jpg")) >= 5:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    if process.returncode == 0:
        pytest.fail("prepare.py finished before the interrupt; make the demo larger")
    assert process.returncode == 130
    # Interrupted in the crop stage, it says how far it got.
    line = one_error_line(stderr, "prepare.py")
    assert re.search(r"prepare\.py: interrupted: \d+ of \d+ crops written; run the same command again to resume", line)
    again = run_command("prepare.py", args)
    assert again.returncode == 0, again.stderr
    assert read_splits(out / "splits.json")["train"]


# --- noise -----------------------------------------------------------------------------------------------------


NOISE = ("litlogger", "LeafSpec", "Total FLOPs: 0", "num_workers", "anonymous setting", "Traceback")


@pytest.mark.slow
def test_a_demo_run_prints_no_library_noise(data_dir: Path, tmp_path: Path) -> None:
    result = run_command(
        "train.py",
        [
            f"data_dir={data_dir}",
            f"hydra.run.dir={tmp_path / 'run'}",
            "experiment=demo",
            "trainer.max_epochs=1",
            "data.image_size=64",
        ],
    )
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    assert not [n for n in NOISE if n in output], [n for n in NOISE if n in output]
    assert "Total FLOPs" in output  # the summary counts them now


@pytest.mark.slow
def test_export_says_what_it_wrote_once_without_exporter_chatter(trained: Path, tmp_path: Path) -> None:
    result = run_command("export", [f"checkpoint={trained}", "format=onnx", f"output={tmp_path / 'm.onnx'}"])
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    assert output.count("wrote ") == 1
    assert "unused nodes" not in output and "constant folding" not in output


@pytest.mark.slow
def test_wandb_offline_prints_no_deprecation(data_dir: Path, tmp_path: Path) -> None:
    result = run_command(
        "train.py",
        [f"data_dir={data_dir}", f"hydra.run.dir={tmp_path / 'run'}", *TRAIN, "trainer.max_epochs=1", "logger=wandb"],
        env={"WANDB_SILENT": "false"},
    )
    assert result.returncode == 0, result.stderr
    assert "anonymous" not in result.stdout + result.stderr
