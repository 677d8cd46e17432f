"""Untrusted files: weights and checkpoints cannot run code, config files cannot run code, paths stay in their root.

A "malicious" file here is a real torch file whose unpickling would create a marker file; every loader must refuse
it (``weights_only=True``) and the marker must never appear. Path containment is checked end to end: a CCT export
with hostile ids, file names, S3 keys and detector names goes through the whole prepare pipeline against a
loopback S3 server, and every file written stays inside ``output_dir`` or ``images_dir``.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
import yaml
from omegaconf import OmegaConf

import train as train_script
from animl_lightning.core.contract import DatasetError, load_prepared_dataset
from animl_lightning.deploy.inference import load_classifier
from animl_lightning.prepare.config import CropSettings, PrepareSettings, S3Settings, SplitSettings
from animl_lightning.prepare.labels import LabelSpecError, load_label_spec
from animl_lightning.prepare.pipeline import run_prepare
from animl_lightning.train.checkpointing import CheckpointError
from animl_lightning.train.classifier import CropClassifier
from animl_lightning.train.pretrained import PretrainedFileError, load_pretrained_file
from tests.fixtures.cct import write_cct
from tests.fixtures.datasets import make_prepared_dataset
from tests.fixtures.files import noise_jpeg
from tests.fixtures.hydra import REPO_ROOT, compose_train
from tests.fixtures.s3 import S3Server

ROOT = REPO_ROOT


class _RunsCode:
    """Unpickling this object writes the marker file (what a malicious checkpoint would do with os.system)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, (f"open({str(self.marker)!r}, 'w').write('code ran')",))


def malicious_file(tmp_path: Path, name: str = "evil.ckpt") -> tuple[Path, Path]:
    """A torch file that runs code when fully unpickled; returns (file, marker)."""
    marker = tmp_path / "CODE_RAN"
    path = tmp_path / name
    model = timm.create_model("test_efficientnet", pretrained=False, num_classes=2)
    payload = {
        "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
        "hyper_parameters": {"model_name": "test_efficientnet", "class_names": ["a", "b"]},
        "epoch": 0,
        "global_step": 0,
        "pytorch-lightning_version": "2.4.0",
        "payload": _RunsCode(marker),
    }
    torch.save(payload, path)
    # control: the file really does run code without weights_only (in a throwaway load)
    torch.load(path, weights_only=False)
    assert marker.exists()
    marker.unlink()
    return path, marker


def test_pretrained_file_refuses_pickled_code(tmp_path: Path) -> None:
    path, marker = malicious_file(tmp_path, "evil.pth")
    model = timm.create_model("test_efficientnet", pretrained=False, num_classes=3)
    with pytest.raises(PretrainedFileError, match=r"evil\.pth"):
        load_pretrained_file(model, path)
    with pytest.raises(PretrainedFileError):
        CropClassifier("test_efficientnet", ["a", "b", "c"], pretrained_file=str(path))
    assert not marker.exists()


def test_plain_weights_still_load(tmp_path: Path) -> None:
    source = timm.create_model("test_efficientnet", pretrained=False, num_classes=5)
    torch.save(source.state_dict(), tmp_path / "weights.pth")
    model = CropClassifier("test_efficientnet", ["a", "b"], pretrained_file=str(tmp_path / "weights.pth"))
    backbone = {k: v for k, v in source.state_dict().items() if not k.startswith("classifier")}
    own = model.model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in backbone.items())


def test_checkpoint_loaders_refuse_pickled_code(tmp_path: Path) -> None:
    path, marker = malicious_file(tmp_path)
    with pytest.raises(CheckpointError, match=r"evil\.ckpt"):
        load_classifier(path, device="cpu")
    with pytest.raises(CheckpointError, match="refusing to load a file that holds more than plain weights"):
        CropClassifier.from_checkpoint(path)
    assert not marker.exists()


@pytest.mark.parametrize("mode", ["resume", "evaluate"])
def test_train_refuses_a_malicious_ckpt_path(tmp_path: Path, mode: str) -> None:
    path, marker = malicious_file(tmp_path)
    data_dir = make_prepared_dataset(tmp_path / "data", per_label=2)
    overrides = [f"ckpt_path={path}", "trainer.max_epochs=1"] + (["train=false"] if mode == "evaluate" else [])
    cfg = compose_train(data_dir, tmp_path / "run", overrides)
    with pytest.raises(CheckpointError, match="refusing to load a file that holds more than plain weights"):
        train_script.train(cfg)
    assert not marker.exists()


# --- config files cannot run code --------------------------------------------------------------------------------


def test_yaml_configs_are_parsed_safely(tmp_path: Path) -> None:
    marker = tmp_path / "CODE_RAN"
    hostile = tmp_path / "hostile.yaml"
    hostile.write_text(f"labels:\n  map: !!python/object/apply:os.system ['touch {marker}']\n", encoding="utf-8")
    with pytest.raises(yaml.YAMLError):
        OmegaConf.load(hostile)
    assert not marker.exists()


def test_label_spec_values_are_data_not_code(tmp_path: Path) -> None:
    marker = tmp_path / "CODE_RAN"
    # the old pipeline eval()-ed prioritize strings from a CSV; here a string is just a wrong type
    spec = {
        "fox": {
            "dataset_labels": {"ds": ["fox"]},
            "max_count": 10,
            "prioritize": f"__import__('pathlib').Path({str(marker)!r}).touch() or [['ds']]",
        }
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec), encoding="utf-8")
    with pytest.raises(LabelSpecError, match="prioritize"):
        load_label_spec(tmp_path / "spec.json")
    assert not marker.exists()


def _calls(tree: ast.AST) -> list[ast.Call]:
    return [node for node in ast.walk(tree) if isinstance(node, ast.Call)]


def _name(func: ast.expr) -> str:
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return f"{_name(func.value)}.{func.attr}"
    return ""


def test_no_code_runs_from_data_anywhere_in_the_package() -> None:
    """Static guard: no eval/exec/pickle, YAML only through safe loaders, torch.load only with weights_only=True."""
    sources = [*sorted((ROOT / "animl_lightning").rglob("*.py")), ROOT / "train.py", ROOT / "prepare.py"]
    problems = []
    for source in sources:
        tree = ast.parse(source.read_text(encoding="utf-8"), filename=str(source))
        for call in _calls(tree):
            name = _name(call.func)
            where = f"{source.relative_to(ROOT)}:{call.lineno}"
            keywords = {k.arg: k.value for k in call.keywords}
            if name in {"eval", "exec", "builtins.eval", "builtins.exec"}:
                problems.append(f"{where}: {name}()")
            if name.startswith(("pickle.", "cPickle.", "dill.", "joblib.load", "marshal.load")):
                problems.append(f"{where}: {name}()")
            if name in {"yaml.load", "yaml.unsafe_load", "yaml.full_load"}:
                problems.append(f"{where}: {name}()")
            if name == "torch.load":
                flag = keywords.get("weights_only")
                if not (isinstance(flag, ast.Constant) and flag.value is True):
                    problems.append(f"{where}: torch.load without weights_only=True")
            if name.endswith(("load_from_checkpoint", ".fit", ".test", ".validate", ".predict")) and (
                "ckpt_path" in keywords or name.endswith("load_from_checkpoint")
            ):
                flag = keywords.get("weights_only")
                if not (isinstance(flag, ast.Constant) and flag.value is True):
                    problems.append(f"{where}: {name} loads a checkpoint without weights_only=True")
    assert not problems, "\n".join(problems)


# --- path containment --------------------------------------------------------------------------------------------


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def test_no_path_from_input_data_escapes_its_root(tmp_path: Path, s3_server: S3Server) -> None:
    work = tmp_path / "work"
    images_dir, output_dir = work / "images", work / "out"
    # bait files a path traversal would read or overwrite
    (tmp_path / "secret.jpg").write_bytes(noise_jpeg(99, size=(96, 64), quality=85))
    (work / "secret.jpg").parent.mkdir(parents=True)
    (work / "secret.jpg").write_bytes(noise_jpeg(98, size=(96, 64), quality=85))
    bait = {p: p.read_bytes() for p in (tmp_path / "secret.jpg", work / "secret.jpg")}

    hostile_names = ["../secret.jpg", "../../secret.jpg", str(tmp_path / "secret.jpg"), "cam/../../secret.jpg"]
    hostile_keys = ["../../escape.jpg", "/etc/passwd", "a/../../../b.jpg"]
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    objects: dict[str, bytes] = {}
    for i in range(12):
        key = f"serving/{i}.jpg"
        images.append(
            {
                "id": f"img{i}",
                "file_name": f"loc{i % 4}/img {i}.jpg",
                "location": f"loc{i % 4}",
                "width": 96,
                "height": 64,
                "serving_bucket_key": key,
            }
        )
        objects[key] = noise_jpeg(i, size=(96, 64), quality=85)
        # hostile annotation ids become part of crop file names
        annotations.append(
            {
                "id": f"../../../escaped{i}" if i % 2 else f"/abs/{i}",
                "image_id": f"img{i}",
                "category_id": 1 + i % 2,
                "bbox": [10, 10, 40, 30],
            }
        )
    for j, name in enumerate(hostile_names):
        images.append(
            {
                "id": f"bad{j}",
                "file_name": name,
                "location": "loc0",
                "width": 96,
                "height": 64,
                "serving_bucket_key": f"serving/{j}.jpg",
            }
        )
        annotations.append({"id": f"badann{j}", "image_id": f"bad{j}", "category_id": 1, "bbox": [1, 1, 20, 20]})
    for j, key in enumerate(hostile_keys):
        images.append(
            {
                "id": f"badkey{j}",
                "file_name": f"loc1/key{j}.jpg",
                "location": "loc1",
                "width": 96,
                "height": 64,
                "serving_bucket_key": key,
            }
        )
        annotations.append({"id": f"keyann{j}", "image_id": f"badkey{j}", "category_id": 1, "bbox": [1, 1, 20, 20]})
    cct = write_cct(work / "export.json", images, annotations)

    s3_server.create_bucket("hostile", objects)
    before = _files(tmp_path)
    settings = PrepareSettings(
        output_dir=str(output_dir),
        coco_file=str(cct),
        images_dir=str(images_dir),
        s3=S3Settings(
            bucket="hostile", endpoint_url=s3_server.endpoint_url, region="us-east-1", workers=2, max_attempts=1
        ),
        crops=CropSettings(workers=1),
        split=SplitSettings(trials=20, min_locs=1),
    )
    summary = run_prepare(settings)

    created = _files(tmp_path) - before
    assert created, "the run wrote nothing"
    outside = [p for p in created if not (p.is_relative_to(output_dir) or p.is_relative_to(images_dir))]
    assert not outside, outside
    assert all(p.read_bytes() == data for p, data in bait.items()), "a file outside the roots was overwritten"
    issues = summary.report.issues
    refused_names = {i.record for i in issues if i.kind in {"unsafe_file_name"}}
    assert refused_names == {f"bad{j}" for j in range(len(hostile_names))}
    refused_keys = {i.record for i in issues if i.kind == "unsafe_s3_key"}
    assert refused_keys == {f"badkey{j}" for j in range(len(hostile_keys))}
    # the hostile annotation ids became flat names inside crops/, and the dataset validates
    dataset = load_prepared_dataset(output_dir)
    assert len(dataset.frame) == 12
    for rel in dataset.frame["path"]:
        crop = (output_dir / "crops" / rel).resolve()
        assert crop.is_relative_to((output_dir / "crops").resolve()) and crop.is_file()


def test_dataset_paths_cannot_escape_the_crops_folder(tmp_path: Path) -> None:
    root = make_prepared_dataset(tmp_path / "data", per_label=2)
    (tmp_path / "data" / "outside.jpg").write_bytes(noise_jpeg(1, size=(96, 64), quality=85))
    csv = root / "classification_ds.csv"
    lines = csv.read_text(encoding="utf-8").splitlines()
    first = lines[1].split(",")
    first[0] = "../outside.jpg"
    lines[1] = ",".join(first)
    csv.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DatasetError, match=r"'path' escapes"):
        load_prepared_dataset(root)
    cfg = compose_train(root, tmp_path / "run")
    with pytest.raises(DatasetError, match=r"\.\./outside\.jpg"):
        train_script.train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()
