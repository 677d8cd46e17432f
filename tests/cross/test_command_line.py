"""What a new user types on the command line (issue 25): every command run in this process through its Hydra entry
point, as ``python train.py ...`` or ``python -m animl_lightning.<name> ...`` would run it, with the defaults a user
gets."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import filelock
import pytest
import yaml
from omegaconf import DictConfig, OmegaConf

from animl_lightning.cli import refuse_unknown_keys
from animl_lightning.core.errors import ConfigError
from animl_lightning.core.files import LOCK_FILENAME
from animl_lightning.core.serving import BUNDLE_FILENAME
from animl_lightning.deploy.animl_bundle import bundle_description
from animl_lightning.deploy.inference import load_classifier
from tests.fixtures.datasets import make_prepared_dataset
from tests.fixtures.hydra import compose_config
from tests.fixtures.models import write_checkpoint
from tests.fixtures.scripts import SCRIPT_OVERRIDES, run_in_process

# The module whose main() each command runs.
ENTRY_POINTS = {
    "train.py": "train",
    "prepare.py": "prepare",
    "classify": "animl_lightning.classify",
    "export": "animl_lightning.export",
    "serve": "animl_lightning.serve",
    "report": "animl_lightning.report",
    "review": "animl_lightning.review",
}


def run_main(
    command: str, args: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> tuple[int, str]:
    """Run ``command ARGS`` in this process; return its exit status and stderr."""
    main = importlib.import_module(ENTRY_POINTS[command]).main
    return run_in_process(main, [command, *args], monkeypatch), capsys.readouterr().err


def one_error_line(stderr: str, command: str) -> str:
    """The one line a command that refused its input printed (no traceback)."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith(f"{command}: error: ")]
    assert len(lines) == 1, stderr
    return lines[0]


# --- 4. a key added with + that the settings do not know --------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "args", "expected"),
    [
        ("train.py", ["+calibrat=true"], "calibrat: unknown key; did you mean calibrate?"),
        ("train.py", ["+eval.ttaa=hflip"], "eval.ttaa: unknown key; did you mean eval.tta?"),
        (
            "train.py",
            ["+model.label_smothing=0.1"],
            "model.label_smothing: unknown key; did you mean model.label_smoothing?",
        ),
        ("prepare.py", ["+split.val_fracc=0.3"], "split.val_fracc: unknown key; did you mean split.val_frac?"),
        (
            "classify",
            ["checkpoint=C", "output_file=O", "+classify.min_confidence=0.5"],
            "classify.min_confidence: unknown key; did you mean classify.min_conf?",
        ),
        ("export", ["checkpoint=C", "output=O", "+formt=onnx"], "formt: unknown key; did you mean format?"),
        ("serve", ["bundle=B", "+prot=8081"], "prot: unknown key; did you mean port?"),
        (
            "report",
            ["run_dir=R", "+report.table_row=3"],
            "report.table_row: unknown key; did you mean report.table_rows?",
        ),
    ],
)
def test_a_key_the_settings_do_not_know_is_refused_naming_the_nearest(
    command: str,
    args: list[str],
    expected: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    run, out = tmp_path / "run", tmp_path / "out"
    extra = {"train.py": [f"hydra.run.dir={run}", f"data_dir={tmp_path}"], "prepare.py": [f"output_dir={out}"]}
    status, stderr = run_main(command, [*extra.get(command, []), *args], monkeypatch, capsys)
    assert status == 2
    assert one_error_line(stderr, command) == f"{command}: error: {expected}"
    # Refused before any work: prepare made no dataset folder, train wrote no config or checkpoint.
    assert not out.exists()
    assert not (run / ".hydra").exists() and not (run / "checkpoints").exists()


@pytest.mark.parametrize(
    ("config", "overrides"),
    [
        # arguments of the _target_ the key configures (the call checks the value)
        ("train", ["+trainer.limit_train_batches=1", "+callbacks.early_stopping.check_finite=false"]),
        ("train", ["+logger.csv.flush_logs_every_n_steps=5", "+optimizer.amsgrad=true"]),
        # a key that exists, set again with ++; a key of a recipe; a free dict; a new object config
        ("train", ["++seed=3", "recipe=modern", "eval.tta=hflip", "+model.model_kwargs.img_size=96"]),
        ("train", ["+callbacks.swa={_target_: lightning.pytorch.callbacks.StochasticWeightAveraging, swa_lrs: 0.01}"]),
        ("train", ["experiment=demo", "+ckpt_path=last.ckpt"]),
        ("prepare", ["+labels.map.Fox=fox", "++split.val_frac=0.3"]),
    ],
)
def test_keys_the_settings_know_are_accepted(config: str, overrides: list[str]) -> None:
    if config == "prepare":
        importlib.import_module("prepare")  # registers prepare's schema, as the command does
    cfg = compose_config(config, overrides)
    refuse_unknown_keys(cfg)  # no error
    added = [o.lstrip("+").split("=", 1)[0] for o in overrides if o.startswith("+")]
    assert all(OmegaConf.select(cfg, key) is not None for key in added)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["+optimizer.learning_rate=0.1"], "optimizer.learning_rate: unknown key; optimizer has amsgrad, betas,"),
        (["+optimizer.weight_dcay=0.1"], "optimizer.weight_dcay: unknown key; did you mean optimizer.weight_decay?"),
        (["+max_epochs=3"], "max_epochs: unknown key; did you mean trainer.max_epochs?"),
        (["+experment=demo"], "did you mean the config group experiment (experiment=NAME, no +)?"),
        (["+zzz=1"], "zzz: unknown key; the top level has calibrate, callbacks, ckpt_path"),
    ],
)
def test_an_unknown_key_names_the_argument_or_group_meant(overrides: list[str], expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        refuse_unknown_keys(compose_config("train", overrides))
    assert expected in str(caught.value)


# --- 4b. what Hydra refuses while composing: one line too ---------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "args", "expected"),
    [
        (
            "prepare.py",
            ["split.val_frac=abc"],
            "Error merging override split.val_frac=abc: Value 'abc' of type 'str' could not be converted to Float",
        ),
        ("prepare.py", ["split.val_fraction=0.3"], "split.val_fraction: unknown key; did you mean split.val_frac?"),
        (
            "train.py",
            ["model=tiny", "model.drop_rat=0.1"],
            "model.drop_rat: unknown key; did you mean model.drop_rate?",
        ),
        ("train.py", ["model=effnet_b9"], "Could not find 'model/effnet_b9' Available options in 'model': base, "),
        ("classify", ["int8.min_agrement=0.5"], "int8.min_agrement: unknown key; did you mean int8.min_agreement?"),
        ("export", ["precision==["], "Error parsing override 'precision==['"),
        ("review", ["review.page_crops=lots"], "Error merging override review.page_crops=lots"),
        ("report", ["report.tabel_rows=3"], "report.tabel_rows: unknown key; did you mean report.table_rows?"),
        ("serve", ["bundel=B"], "bundel: unknown key; did you mean bundle?"),
    ],
)
def test_what_hydra_refuses_while_composing_is_one_line(
    command: str,
    args: list[str],
    expected: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    status, stderr = run_main(command, args, monkeypatch, capsys)
    assert status == 2
    assert one_error_line(stderr, command).startswith(f"{command}: error: ")
    assert expected in stderr and len(stderr.strip().splitlines()) == 1, stderr
    # The switch is put back: the next command (or a test) sees the environment it had.
    assert "HYDRA_FULL_ERROR" not in os.environ


def test_the_work_itself_runs_without_hydras_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    """HYDRA_FULL_ERROR is set only while composing: the work, and every process it starts (DDP ranks, review
    folds), does not inherit it."""
    from animl_lightning.hydra_entry import command_main

    seen: list[str | None] = []

    @command_main("serve", "serve")
    def main(cfg: DictConfig) -> None:
        seen.append(os.environ.get("HYDRA_FULL_ERROR"))

    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    assert run_in_process(main, ["serve", "bundle=B"], monkeypatch) == 0
    assert seen == [None] and "HYDRA_FULL_ERROR" not in os.environ


def test_hydra_full_error_keeps_hydras_own_report(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from hydra.errors import ConfigCompositionException

    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(ConfigCompositionException, match=r"split\.val_frac=abc"):
        run_main("prepare.py", ["split.val_frac=abc"], monkeypatch, capsys)


# --- 5. a second train.py on a running run's folder ------------------------------------------------------------


def test_a_refused_second_train_leaves_the_running_runs_config_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    run, not_prepared = tmp_path / "run", tmp_path / "not_prepared"
    not_prepared.mkdir()
    # A run that holds its folder writes .hydra/ as Hydra did (it then stops: the dataset folder is empty).
    first = [f"data_dir={not_prepared}", f"hydra.run.dir={run}", *SCRIPT_OVERRIDES, "report.enabled=false"]
    status, stderr = run_main("train.py", first, monkeypatch, capsys)
    assert status == 2 and "classification_ds.csv" in one_error_line(stderr, "train.py")
    hydra_dir = run / ".hydra"
    assert yaml.safe_load((hydra_dir / "overrides.yaml").read_text()) == [a for a in first if "hydra." not in a]
    assert yaml.safe_load((hydra_dir / "config.yaml").read_text())["report"]["enabled"] is False
    assert yaml.safe_load((hydra_dir / "hydra.yaml").read_text())["hydra"]["runtime"]["output_dir"] == str(run)
    before = {path.name: path.read_bytes() for path in hydra_dir.iterdir()}
    # While a run holds the folder, a second command on it is refused and leaves that run's config and command.
    with filelock.FileLock(run / LOCK_FILENAME, timeout=0):
        second = [f"data_dir={not_prepared}", f"hydra.run.dir={run}", *SCRIPT_OVERRIDES, "trainer.max_epochs=7"]
        status, stderr = run_main("train.py", second, monkeypatch, capsys)
    assert status == 2
    assert "in use by another train.py" in one_error_line(stderr, "train.py")
    assert {path.name: path.read_bytes() for path in hydra_dir.iterdir()} == before
    # Started as the console command, the refusal names that command.
    with filelock.FileLock(run / LOCK_FILENAME, timeout=0):
        status = run_in_process(importlib.import_module("train").main, ["animl-train", *second], monkeypatch)
    assert status == 2
    assert "in use by another animl-train" in one_error_line(capsys.readouterr().err, "animl-train")


# --- tracebacks where the README promises one line --------------------------------------------------------------


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_prepared_dataset(tmp_path_factory.mktemp("data"), per_label=4, size=32)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["optimizer.lr=-1"], ("optimizer: AdamW(lr=-1, weight_decay=0.01) refuses", "Invalid learning rate: -1")),
        (["optimizer.lr=abc"], ("optimizer: AdamW(lr='abc', weight_decay=0.01) refuses",)),
        (["model=base"], ("model=base: base is what every model config extends, not a model", "'effnet_b3'")),
    ],
)
def test_bad_train_settings_are_one_line(
    args: list[str],
    expected: tuple[str, ...],
    data_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run = tmp_path / "run"
    overrides = [f"data_dir={data_dir}", f"hydra.run.dir={run}", *SCRIPT_OVERRIDES, "trainer.max_epochs=2", *args]
    status, stderr = run_main("train.py", overrides, monkeypatch, capsys)
    assert status == 2, stderr
    line = one_error_line(stderr, "train.py")
    assert all(fragment in line for fragment in expected), line
    assert not (run / "checkpoints").exists()


@pytest.fixture
def read_only_folder(tmp_path: Path) -> Iterator[Path]:
    """A read-only file system (a tmpfs mounted ro): even root cannot write there."""
    folder = tmp_path / "read_only"
    folder.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {result.stderr.decode().strip()}")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=False)


@pytest.mark.parametrize("where", ["read-only", "below-a-file"])
def test_a_run_folder_that_cannot_be_written_is_one_line(
    where: str,
    data_dir: Path,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    if where == "read-only":
        run = request.getfixturevalue("read_only_folder") / "run"
        reason = "Read-only file system"
    else:
        (tmp_path / "a_file").write_text("not a folder")
        run, reason = tmp_path / "a_file" / "run", "Not a directory"
    status, stderr = run_main("train.py", [f"data_dir={data_dir}", f"hydra.run.dir={run}"], monkeypatch, capsys)
    assert status == 2
    assert one_error_line(stderr, "train.py") == f"train.py: error: hydra.run.dir: cannot write to {run}: {reason}"


@pytest.mark.parametrize(("port", "shown"), [("99999", "99999"), ("abc", "'abc'"), ("0", "0"), ("true", "True")])
def test_serve_refuses_a_port_that_is_not_one(
    port: str, shown: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    status, stderr = run_main("serve", [f"bundle={tmp_path}", f"port={port}"], monkeypatch, capsys)
    assert status == 2
    assert one_error_line(stderr, "serve") == f"serve: error: port: must be a whole number from 1 to 65535, got {shown}"


def test_serve_refuses_a_damaged_model_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    loaded = load_classifier(write_checkpoint(tmp_path / "model.ckpt"), device="cpu")
    (bundle / BUNDLE_FILENAME).write_text(json.dumps(bundle_description(loaded)), encoding="utf-8")
    (bundle / "model.onnx").write_bytes(b"\x08\x07" + b"not a protobuf" * 10)
    status, stderr = run_main("serve", [f"bundle={bundle}", "port=8765"], monkeypatch, capsys)
    assert status == 2
    line = one_error_line(stderr, "serve")
    assert f"{bundle / 'model.onnx'}: ONNX Runtime cannot load it (" in line and line.endswith("; export it again")


@pytest.mark.parametrize(
    ("command", "args", "module", "extra"),
    [
        ("serve", ["bundle=B"], "uvicorn", "deploy"),
        ("export", ["checkpoint=C", "output=O", "format=onnx"], "onnxscript", "export"),
        ("export", ["checkpoint=C", "output=O", "format=animl"], "model_archiver", "deploy"),
    ],
)
def test_a_missing_extra_is_named_with_its_install_command(
    command: str,
    args: list[str],
    module: str,
    extra: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # any 'import <module>' now fails as if it were not installed
    status, stderr = run_main(command, args, monkeypatch, capsys)
    assert status == 2
    expected = f'{module} is not installed; install the {extra} extra: pip install "animl-lightning[{extra}]"'
    assert one_error_line(stderr, command) == f"{command}: error: {expected}"


def test_export_lists_every_format(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    status, stderr = run_main("export", ["checkpoint=C", "output=O", "format=bogus"], monkeypatch, capsys)
    assert status == 2
    line = one_error_line(stderr, "export")
    assert line == "export: error: format: must be one of ['onnx', 'torchscript', 'animl'], got 'bogus'"
