"""Training recipes (issue 20): every ingredient alone on top of ``recipe=seed``, EMA weights end to end, test-time
augmentation parity from the tables to the served bundle, exact resume and DDP with ``recipe=modern``, and
``recipe=seed`` against the code before the recipes.

The fits are real ``train.py`` runs (``model=tiny`` at 32 px on CPU, default callbacks, progress bar included);
:class:`tests.fixtures.recipes.RecipeProbe` records from inside them what each ingredient changed, and the checks
recompute it independently: the label prior from ``classification_ds.csv``, the EMA from the recorded live weights,
the predictions from a timm network rebuilt from the checkpoint's weights.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import timm
import torch
from lightning import Trainer
from PIL import Image
from timm.data import resolve_model_data_config
from torch import Tensor, nn
from torch.nn import functional

import train as train_script
from animl_lightning.deploy.export import sidecar, supports_dynamic_size, torchscript_bytes
from animl_lightning.deploy.export_formats import export_checkpoint
from animl_lightning.deploy.inference import load_classifier
from animl_lightning.train.calibration import CALIBRATION_KEY, fit_temperature
from animl_lightning.train.checkpointing import THRESHOLDS_KEY
from animl_lightning.train.classifier import LIVE_WEIGHTS_KEY, CropClassifier
from animl_lightning.train.datamodule import eval_transform
from animl_lightning.train.thresholds import ThresholdSettings, choose_for_run
from tests.fixtures.datasets import make_prepared_dataset, squash_every_other_crop
from tests.fixtures.hydra import REPO_ROOT, compose_train
from tests.fixtures.scripts import SCRIPT_OVERRIDES, command_env, run_train_script

LABELS = ["bird", "fox", "skunk"]
SPLITS = ["train", "val", "test"]
# Crops per location and label: a long tail, so the log prior of the logit-adjusted loss is not a constant (a
# constant shift would leave cross-entropy unchanged and the check could not fail).
LABEL_COUNTS = {"bird": 6, "fox": 2, "skunk": 4}
IMAGE_SIZE = 32
PROBE_FILE = "probe.pt"
# Off: what the tests below do not read (plots, galleries, report.html) and would only slow every fit down.
QUIET = (
    f"data.image_size={IMAGE_SIZE}",
    "report.enabled=false",
    "callbacks.error_galleries=null",
    "callbacks.metric_tables.confusion_plot=false",
)
EMA_DECAY = 0.9
# What seed's optimizer (AdamW) starts at.
LR = 1e-3

Fit = Callable[..., Path]


def probe_overrides(output: Path, weights: bool = False, losses: bool = True) -> list[str]:
    return [
        "+callbacks.recipe_probe._target_=tests.fixtures.recipes.RecipeProbe",
        f"+callbacks.recipe_probe.path={output / PROBE_FILE}",
        f"+callbacks.recipe_probe.weights={str(weights).lower()}",
        f"+callbacks.recipe_probe.losses={str(losses).lower()}",
    ]


def read_probe(run: Path) -> dict[str, Any]:
    record: dict[str, Any] = torch.load(run / PROBE_FILE, map_location="cpu", weights_only=True)
    return record


def read_checkpoint_file(path: Path) -> dict[str, Any]:
    raw: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    return raw


def network_weights(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The timm network's weights of a Lightning state dict (``model.`` keys, prefix removed)."""
    return {key.removeprefix("model."): value for key, value in state.items() if key.startswith("model.")}


def max_difference(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) if a[k].numel() else 0.0 for k in a)


def timm_network(weights: Mapping[str, Tensor]) -> nn.Module:
    """``model=tiny``'s network rebuilt with timm alone from ``weights``, in eval mode."""
    network = timm.create_model("test_efficientnet", pretrained=False, num_classes=len(LABELS))
    network.load_state_dict(dict(weights))
    return network.eval()


def crop_batch(data_dir: Path, paths: Sequence[str], data_config: Mapping[str, Any]) -> Tensor:
    """The crops at ``paths`` (relative to ``crops/``) preprocessed as evaluation and deployment do."""
    transform = eval_transform(data_config)
    crops = []
    for path in paths:
        with Image.open(data_dir / "crops" / path) as image:
            crops.append(transform(image.convert("RGB")))
    return torch.stack(crops)


def logits_of(network: nn.Module, images: Tensor, hflip: bool = False) -> Tensor:
    with torch.no_grad():
        logits: Tensor = network(images)
        if hflip:
            logits = (logits + network(torch.flip(images, dims=[-1]))) / 2
    return logits


def read_predictions(run: Path, split: str = "val") -> pd.DataFrame:
    """``metrics/predictions_<split>.csv``: path, label, prediction, then one probability per label."""
    return pd.read_csv(run / "metrics" / f"predictions_{split}.csv")


def train_label_prior(data_dir: Path) -> Tensor:
    """log of each label's share of the train crops, counted from the dataset files."""
    crops = pd.read_csv(data_dir / "classification_ds.csv")
    splits = json.loads((data_dir / "splits.json").read_text())
    train_locations = {location for _, location in splits["train"]}
    counts = crops[crops["location"].isin(train_locations)]["label"].value_counts().reindex(LABELS)
    return torch.log(torch.tensor((counts / counts.sum()).to_numpy(), dtype=torch.float32))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_prepared_dataset(tmp_path_factory.mktemp("data"), label_counts=LABEL_COUNTS, size=IMAGE_SIZE)


@pytest.fixture(scope="module")
def fit(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Fit:
    """``fit(name, overrides, weights=False)``: one probed ``train.py`` run per name, shared by the module's tests."""
    runs: dict[str, Path] = {}

    def run(name: str, overrides: Sequence[str], weights: bool = False) -> Path:
        if name not in runs:
            output = tmp_path_factory.mktemp(name)
            cfg = compose_train(data_dir, output, [*QUIET, *probe_overrides(output, weights), *overrides])
            train_script.train(cfg)
            runs[name] = output
        return runs[name]

    return run


# ---------------------------------------------------------------- each ingredient alone on top of recipe=seed


def check_seed(run: Path, probe: dict[str, Any], data_dir: Path) -> None:
    # The control: none of the ingredients below is on, so each of their checks fails here.
    assert [g["lr"] for g in probe["param_groups"]] == [LR]
    assert probe["scheduler"] == "CosineAnnealingLR"
    assert [s["type"] for s in probe["train_transform"]] == [
        "RandomResizedCrop",
        "RandomHorizontalFlip",
        "ColorJitter",
        "RandomGrayscale",
        "ToTensor",
        "Normalize",
    ]
    assert probe["sampler"] == "WeightedRandomSampler"
    assert not probe["drop_path_rates"] and not probe["ema_active"]
    assert probe["trainable"] == [probe["all_params"]] * 2
    first = probe["first_batch"]
    assert first["soft_targets"] is None
    assert first["recipe_loss"] == pytest.approx(float(functional.cross_entropy(first["logits"], first["target"])))
    best = read_checkpoint_file(run / "checkpoints" / "best.ckpt")
    assert LIVE_WEIGHTS_KEY not in best and best["hyper_parameters"]["tta"] == "none"


def check_auto_augment(expected: str) -> Callable[[Path, dict[str, Any], Path], None]:
    def check(run: Path, probe: dict[str, Any], data_dir: Path) -> None:
        steps = probe["train_transform"]
        # After the geometric steps, before the colour steps (as timm's own training transform orders them).
        assert [s["type"] for s in steps] == [
            "RandomResizedCrop",
            "RandomHorizontalFlip",
            expected,
            "ColorJitter",
            "RandomGrayscale",
            "ToTensor",
            "Normalize",
        ]
        if expected == "RandAugment":  # rand-m7-mstd0.5-inc1
            policy = steps[2]
            assert policy["num_layers"] == 2
            assert set(policy["magnitudes"]) == {7.0} and set(policy["magnitude_std"]) == {0.5}
            assert set(policy["translate_const"]) == {int(IMAGE_SIZE * 0.45)}

    return check


def check_mixup(run: Path, probe: dict[str, Any], data_dir: Path) -> None:
    first = probe["first_batch"]
    target, soft = first["target"], first["soft_targets"]
    assert soft is not None and soft.shape == (len(target), len(LABELS))
    assert torch.allclose(soft.sum(dim=1), torch.ones(len(target)))
    assert float(soft.max(dim=1).values.min()) < 0.99  # mixed labels, not one-hot ones
    assert not torch.equal(first["mixed_images"], first["images"])
    soft_target_ce = -(soft * functional.log_softmax(first["mixed_logits"], dim=-1)).sum(dim=-1).mean()
    assert first["recipe_loss"] == pytest.approx(float(soft_target_ce), rel=1e-5)
    plain = functional.cross_entropy(first["logits"], target)
    assert abs(first["recipe_loss"] - float(plain)) > 1e-3


def check_label_smoothing(run: Path, probe: dict[str, Any], data_dir: Path) -> None:
    first = probe["first_batch"]
    smoothed = functional.cross_entropy(first["logits"], first["target"], label_smoothing=0.1)
    assert first["recipe_loss"] == pytest.approx(float(smoothed), rel=1e-5)
    plain = functional.cross_entropy(first["logits"], first["target"])
    assert abs(first["recipe_loss"] - float(plain)) > 1e-3


def check_ema(run: Path, probe: dict[str, Any], data_dir: Path) -> None:
    assert probe["ema_active"]
    best = read_checkpoint_file(run / "checkpoints" / "best.ckpt")
    live = network_weights(best[LIVE_WEIGHTS_KEY])
    averaged = network_weights(best["state_dict"])
    assert max_difference(averaged, live) > 1e-4  # test_ema_... checks which weights these are


def check_warmup_cosine(run: Path, probe: dict[str, Any], data_dir: Path) -> None:
    assert probe["scheduler"] == "SequentialLR"
    # 2 epochs: the warmup epoch at warmup_start_factor (0.1) x lr, then the cosine from lr.
    assert probe["epoch_lrs"] == [[pytest.approx(0.1 * LR)], [pytest.approx(LR)]]


def check_backbone_lr_scale(run: Path, probe: dict[str, Any], data_dir: Path) -> None:
    backbone, head = probe["param_groups"]
    assert set(head["params"]) == set(probe["head_params"]) and head["params"]
    assert sorted(backbone["params"] + head["params"]) == sorted(probe["all_params"])
    assert probe["epoch_lrs"][0] == [pytest.approx(0.1 * LR), pytest.approx(LR)]
    # The cosine decays both groups alike, from their own base rates.
    second = probe["epoch_lrs"][1]
    assert second[1] < LR and second[0] == pytest.approx(0.1 * second[1])
    # history.csv reports the head's rate as `lr` (optimizer.lr's schedule) and the backbone's beside it.
    history = pd.read_csv(run / "history.csv")
    assert list(history["lr"]) == pytest.approx([lrs[1] for lrs in probe["epoch_lrs"]])
    assert list(history["lr_backbone"]) == pytest.approx([lrs[0] for lrs in probe["epoch_lrs"]])


def check_finetune(run: Path, probe: dict[str, Any], data_dir: Path) -> None:
    head, everything = probe["trainable"]
    assert sorted(head) == sorted(probe["head_params"]) and sorted(everything) == sorted(probe["all_params"])
    before, after = probe["epoch_start_weights"]  # at the start of epochs 0 and 1
    head_keys = {name.removeprefix("model.") for name in probe["head_params"]}
    backbone = [key for key in before if key not in head_keys]
    # The head-only epoch moved no backbone weight and no BatchNorm statistic, and did move the head.
    assert max_difference({k: before[k] for k in backbone}, {k: after[k] for k in backbone}) == 0.0
    assert max_difference({k: before[k] for k in head_keys}, {k: after[k] for k in head_keys}) > 0.0


def check_drop_path(run: Path, probe: dict[str, Any], data_dir: Path) -> None:
    rates = probe["drop_path_rates"]
    assert rates and 0.0 < max(rates) <= 0.1


def check_logit_adjustment(run: Path, probe: dict[str, Any], data_dir: Path) -> None:
    assert probe["sampler"] == "RandomSampler"  # data.label_weighted=false: the loss corrects the tail instead
    first = probe["first_batch"]
    prior = train_label_prior(data_dir)
    adjusted = functional.cross_entropy(first["logits"] + prior, first["target"])
    assert first["recipe_loss"] == pytest.approx(float(adjusted), rel=1e-5)
    plain = functional.cross_entropy(first["logits"], first["target"])
    assert abs(first["recipe_loss"] - float(plain)) > 1e-3


def check_tta(run: Path, probe: dict[str, Any], data_dir: Path) -> None:
    best = read_checkpoint_file(run / "checkpoints" / "best.ckpt")
    assert best["hyper_parameters"]["tta"] == "hflip"
    table = read_predictions(run)
    network = timm_network(network_weights(best["state_dict"]))
    images = crop_batch(data_dir, table["path"], best["hyper_parameters"]["data_config"])
    flipped = logits_of(network, images, hflip=True).softmax(dim=-1).numpy()
    plain = logits_of(network, images).softmax(dim=-1).numpy()
    got = table[LABELS].to_numpy()
    assert np.abs(got - flipped).max() < 1e-4
    assert np.abs(got - plain).max() > 1e-3


INGREDIENTS = [
    pytest.param([], check_seed, id="seed"),
    pytest.param(["data.auto_augment=rand-m7-mstd0.5-inc1"], check_auto_augment("RandAugment"), id="randaugment"),
    pytest.param(["data.auto_augment=trivialaugment"], check_auto_augment("TrivialAugmentWide"), id="trivialaugment"),
    pytest.param(
        ["model.mixup_alpha=0.2", "model.cutmix_alpha=1.0", "model.mixup_prob=1.0"], check_mixup, id="mixup_cutmix"
    ),
    pytest.param(["model.label_smoothing=0.1"], check_label_smoothing, id="label_smoothing"),
    pytest.param([f"model.ema_decay={EMA_DECAY}"], check_ema, id="ema"),
    pytest.param(["scheduler=warmup_cosine"], check_warmup_cosine, id="warmup_cosine"),
    pytest.param(["model.backbone_lr_scale=0.1"], check_backbone_lr_scale, id="backbone_lr_scale"),
    pytest.param(["model.finetune_epochs=1"], check_finetune, id="finetune"),
    pytest.param(["model.drop_path_rate=0.1"], check_drop_path, id="drop_path"),
    pytest.param(["model.logit_adjustment=1.0", "data.label_weighted=false"], check_logit_adjustment, id="logit_adj"),
    pytest.param(["eval.tta=hflip"], check_tta, id="tta_hflip"),
]


@pytest.mark.parametrize(("overrides", "check"), INGREDIENTS)
def test_each_ingredient_alone_trains_the_demo_model(
    fit: Fit, data_dir: Path, request: pytest.FixtureRequest, overrides: list[str], check: Callable[..., None]
) -> None:
    name = request.node.callspec.id
    run = fit(name, ["recipe=seed", *overrides])
    overall = pd.read_csv(run / "metrics" / "overall.csv")
    assert list(zip(overall["split"], overall["level"], strict=True)) == [
        (split, level) for split in SPLITS for level in ("crop", "image", "sequence")
    ]
    assert np.isfinite(overall[overall["level"] == "crop"]["loss"]).all()
    per_label = pd.read_csv(run / "metrics" / "per_label.csv")
    per_location = sum(LABEL_COUNTS.values())  # 2 train, 1 val and 1 test location
    supports = {"train": 2 * per_location, "val": per_location, "test": per_location}
    assert per_label.groupby("split")["support"].sum().to_dict() == supports
    history = pd.read_csv(run / "history.csv")
    assert list(history["epoch"]) == [0, 1] and np.isfinite(history["train/loss"]).all()
    check(run, read_probe(run), data_dir)


# ---------------------------------------------------------------- EMA: the averaged weights are the model


def replay_ema(live: Mapping[int, Mapping[str, Tensor]], decay: float, until_step: int) -> dict[str, Tensor]:
    """timm's ModelEmaV3 with warmup, replayed from the weights after each optimizer step.

    After global step s the average moves by 1 - d towards the weights, d = min(decay, 1 - s**(-2/3)); at s = 1
    (d = 0) it takes them as they are. Integer buffers are copied.
    """
    average: dict[str, Tensor] = {}
    for step in sorted(s for s in live if s <= until_step):
        d = 0.0 if step <= 1 else min(decay, 1 - step ** (-2 / 3))
        for key, value in live[step].items():
            if key not in average or not value.is_floating_point():
                average[key] = value.clone()
            else:
                average[key] = torch.lerp(average[key], value, 1.0 - d)
    return average


@pytest.fixture(scope="module")
def ema_run(fit: Fit) -> Path:
    # A model that learns something in 4 epochs (a temperature inside its bounds), and thresholds reachable on 12
    # val crops, so that the calibration and threshold records hold numbers that tell weights apart.
    overrides = [f"model.ema_decay={EMA_DECAY}", "optimizer.lr=0.01", "trainer.max_epochs=4", "calibrate=true"]
    thresholds = ["thresholds.target_precision=0.5", "thresholds.min_support=2"]
    return fit("ema_calibrated", ["recipe=seed", *overrides, *thresholds], weights=True)


def test_the_ema_weights_are_checkpointed_validated_calibrated_thresholded_and_exported(
    ema_run: Path, data_dir: Path, tmp_path: Path
) -> None:
    best_path = ema_run / "checkpoints" / "best.ckpt"
    best = read_checkpoint_file(best_path)
    live = read_probe(ema_run)["live_weights"]
    step = int(best["global_step"])
    averaged = replay_ema(live, EMA_DECAY, step)
    stored = network_weights(best["state_dict"])
    assert max_difference(stored, averaged) < 1e-6
    assert max_difference(network_weights(best[LIVE_WEIGHTS_KEY]), live[step]) == 0.0
    assert max_difference(averaged, live[step]) > 1e-3  # so the two checks above tell them apart

    # Validation ran the averaged network: the best epoch's val loss is the loss of best.ckpt's weights.
    history = pd.read_csv(ema_run / "history.csv").set_index("epoch")
    overall = pd.read_csv(ema_run / "metrics" / "overall.csv")
    val_loss = overall[(overall["split"] == "val") & (overall["level"] == "crop")]["loss"].item()
    assert history.loc[best["epoch"], "val/loss"] == pytest.approx(val_loss, rel=1e-5)

    table = read_predictions(ema_run)
    labels = torch.tensor(table["label"].map(LABELS.index).to_numpy())
    images = crop_batch(data_dir, table["path"], best["hyper_parameters"]["data_config"])
    ema_logits = logits_of(timm_network(averaged), images)
    live_logits = logits_of(timm_network(live[step]), images)

    calibration = best[CALIBRATION_KEY]
    assert calibration["nll_before"] == pytest.approx(float(functional.cross_entropy(ema_logits, labels)), rel=1e-5)
    assert abs(calibration["nll_before"] - float(functional.cross_entropy(live_logits, labels))) > 1e-3
    temperature = calibration["temperature"]
    assert temperature == pytest.approx(fit_temperature(ema_logits, labels), rel=1e-4)
    assert abs(temperature - fit_temperature(live_logits, labels)) > 1e-3 * temperature

    ema_probs = (ema_logits / temperature).softmax(dim=-1).numpy()
    live_probs = (live_logits / temperature).softmax(dim=-1).numpy()
    assert np.abs(table[LABELS].to_numpy() - ema_probs).max() < 1e-4
    assert np.abs(table[LABELS].to_numpy() - live_probs).max() > 1e-3

    settings = ThresholdSettings(target_precision=0.5, min_support=2)
    chosen = choose_for_run((ema_probs, labels.numpy()), None, LABELS, settings).record["per_label"]
    assert any(value is not None for value in chosen.values())
    assert best[THRESHOLDS_KEY]["per_label"] == pytest.approx(chosen, abs=1e-6)

    from animl_lightning.deploy.onnx_runtime import OnnxClassifier

    exported = export_checkpoint(best_path, "onnx", tmp_path / "model.onnx")
    onnx_probs = OnnxClassifier(exported.model_file)(images.numpy())
    assert np.abs(onnx_probs - ema_probs).max() < 1e-4
    assert np.abs(onnx_probs - live_probs).max() > 1e-3


# ---------------------------------------------------------------- eval.tta=hflip: one model from tables to server


def classify_val_crops(checkpoint: Path, data_dir: Path, paths: Sequence[str], backend: str, output: Path) -> Any:
    """classify's probabilities for the val crops, each given as one whole-frame detection of its crop file."""
    from animl_lightning.deploy.classify import ClassifySettings, classify_detections
    from animl_lightning.deploy.classify_inputs import detections_from_crops_folder

    folder = data_dir / "crops" / "synthetic" / "loc2"  # the val location
    detections = detections_from_crops_folder(folder)
    settings = ClassifySettings(
        threshold=0.5, min_conf=0.0, top_k=len(LABELS), num_workers=0, batch_size=5, backend=backend, thresholds=False
    )
    classify_detections(load_classifier(checkpoint, device="cpu"), detections, folder, output, settings)
    result = json.loads(output.read_text())
    probabilities = {}
    for image in result["images"]:
        (detection,) = image["detections"]
        row = np.zeros(len(LABELS))
        for class_id, conf in detection["classifications"]:
            row[int(class_id)] = conf
        probabilities[f"synthetic/loc2/{image['file']}"] = row
    assert sorted(probabilities) == sorted(paths)
    return np.stack([probabilities[path] for path in paths])


def test_tta_is_the_same_from_the_tables_to_classify_export_and_the_served_bundle(
    fit: Fit, data_dir: Path, tmp_path: Path
) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")  # fastapi's TestClient
    pytest.importorskip("model_archiver")
    from fastapi.testclient import TestClient

    from animl_lightning.deploy.animl_bundle import export_animl
    from animl_lightning.deploy.onnx_runtime import OnnxClassifier
    from animl_lightning.deploy.server import create_app
    from tests.fixtures.serving import animl_request

    run = fit("tta_hflip", ["recipe=seed", "eval.tta=hflip"])
    best = run / "checkpoints" / "best.ckpt"
    table = read_predictions(run)
    paths = list(table["path"])
    evaluated = table[LABELS].to_numpy()

    answers: dict[str, Any] = {}
    for backend in ("torch", "onnxruntime"):
        answers[f"classify {backend}"] = classify_val_crops(
            best, data_dir, paths, backend, tmp_path / f"{backend}.json"
        )

    bundle = export_animl(
        str(best), str(tmp_path / "bundle"), model_id=None, version="v1", description="", threshold=0.5
    )
    # The bundle's model.onnx is what `export format=onnx` writes (one exporter); the flip is inside its graph.
    loaded = load_classifier(best, device="cpu")
    assert sidecar(loaded, "onnx", dynamic_size=True)["tta"] == "hflip"
    images = crop_batch(data_dir, paths, loaded.transform.to_dict())
    answers["model.onnx"] = OnnxClassifier(bundle.folder / "model.onnx")(images.numpy())
    served = []
    with TestClient(create_app(bundle.folder)) as client:
        for path in paths:
            body = animl_request((data_dir / "crops" / path).read_bytes(), [0, 0, 1, 1])
            response = client.post("/invocations", json=body)
            assert response.status_code == 200, response.text
            served.append([response.json()[label] for label in LABELS])
    answers["bundle server"] = np.array(served)

    for name, probabilities in answers.items():
        assert np.abs(probabilities - evaluated).max() <= 1e-4, name

    # Without the flip the same checkpoint evaluates to other probabilities, so the parity above could fail.
    plain = tmp_path / "tta_none"
    train_script.train(compose_train(data_dir, plain, [*QUIET, "train=false", f"ckpt_path={best}", "eval.tta=none"]))
    assert np.abs(read_predictions(plain)[LABELS].to_numpy() - evaluated).max() > 1e-3


def test_hflip_keeps_a_fixed_size_architecture_fixed_in_the_export(tmp_path: Path) -> None:
    # timm's test_vit takes only its own input size; the flip wrapper must not hide that from the exporter.
    sizes = {}
    for tta in ("none", "hflip"):
        reference = timm.create_model("test_vit", pretrained=False, num_classes=len(LABELS))
        model = CropClassifier(
            model_name="test_vit",
            class_names=LABELS,
            data_config=resolve_model_data_config(reference),
            channels_last=False,
            tta=tta,
        )
        trainer = Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
        trainer.strategy.connect(model)
        trainer.save_checkpoint(tmp_path / f"{tta}.ckpt")
        loaded = load_classifier(tmp_path / f"{tta}.ckpt", device="cpu")
        assert loaded.tta == tta
        sizes[tta] = (supports_dynamic_size(loaded), torchscript_bytes(loaded)[1])
    assert sizes == {"none": (False, False), "hflip": (False, False)}


# ---------------------------------------------------------------- recipe=modern: exact resume, DDP

# Everything recipe=modern switches on: head-first, EMA, mixup/CutMix, RandAugment, stochastic depth, hflip.
MODERN = ("recipe=modern", "test=false")


def check_same_end(reference: Path, resumed: Path) -> None:
    """The resumed run ended where the uninterrupted one did: weights (averaged and live) and tables, bit for bit."""
    expected = read_checkpoint_file(reference / "checkpoints" / "last.ckpt")
    got = read_checkpoint_file(resumed / "checkpoints" / "last.ckpt")
    assert (got["epoch"], got["global_step"]) == (expected["epoch"], expected["global_step"])
    assert got["hyper_parameters"]["ema_decay"] > 0 and got["hyper_parameters"]["tta"] == "hflip"
    assert max_difference(got["state_dict"], expected["state_dict"]) == 0.0
    assert max_difference(got[LIVE_WEIGHTS_KEY], expected[LIVE_WEIGHTS_KEY]) == 0.0
    assert max_difference(network_weights(got["state_dict"]), network_weights(got[LIVE_WEIGHTS_KEY])) > 0.0
    for name in ("overall.csv", "per_label.csv", "predictions_val.csv"):
        assert (resumed / "metrics" / name).read_bytes() == (reference / "metrics" / name).read_bytes(), name


def test_modern_recipe_resumes_exactly_from_last_checkpoint(data_dir: Path, tmp_path: Path) -> None:
    def fit(run: Path, *extra: str) -> None:
        train_script.train(compose_train(data_dir, run, [*QUIET, *MODERN, *extra]))

    # Stopped after the head-only epoch and resumed into the whole-network one, on the same schedule.
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    fit(reference, "trainer.max_epochs=2", "scheduler.max_epochs=2")
    fit(resumed, "trainer.max_epochs=1", "scheduler.max_epochs=2")
    last = resumed / "checkpoints" / "last.ckpt"
    assert read_checkpoint_file(last)["epoch"] == 0
    fit(resumed, "trainer.max_epochs=2", "scheduler.max_epochs=2", f"ckpt_path={last}")
    check_same_end(reference, resumed)


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """recipe=modern on 2 CPU processes: 3 epochs straight, and 2 epochs then resumed to 3 (probed on rank 0)."""
    data = squash_every_other_crop(make_prepared_dataset(tmp_path_factory.mktemp("ddp_data"), per_label=3))
    root = tmp_path_factory.mktemp("ddp_runs")

    def fit(run: Path, *extra: str) -> None:
        overrides = [*SCRIPT_OVERRIDES, *MODERN, "scheduler.max_epochs=3", "trainer=ddp", "trainer.devices=2"]
        # Epoch-start snapshots only: a probe that ran the network in one run but not the other could not disturb it
        # either, but this keeps the two runs' callbacks alike.
        probe = probe_overrides(run, losses=False)
        run_train_script([f"data_dir={data}", f"hydra.run.dir={run}", *overrides, *probe, *extra], cwd=root)

    reference, resumed = root / "reference", root / "resumed"
    fit(reference, "trainer.max_epochs=3")
    fit(resumed, "trainer.max_epochs=2")
    fit(resumed, "trainer.max_epochs=3", f"ckpt_path={resumed / 'checkpoints' / 'last.ckpt'}")
    return {"data": data, "reference": reference, "resumed": resumed}


@pytest.mark.slow
def test_ddp_with_the_modern_recipe_resumes_exactly(ddp_runs: dict[str, Path]) -> None:
    reference, resumed = ddp_runs["reference"], ddp_runs["resumed"]
    assert (reference / "train_ddp_process_1.log").is_file()  # rank 1 really ran
    log = (resumed / "train.log").read_text()
    assert "epoch 0: training the head only" in (reference / "train.log").read_text()
    assert "not bit-exact" not in log
    check_same_end(reference, resumed)


@pytest.mark.slow
def test_ddp_with_the_modern_recipe_freezes_the_backbone_and_tables_the_evaluated_model(
    ddp_runs: dict[str, Path], tmp_path: Path
) -> None:
    reference = ddp_runs["reference"]
    probe = read_probe(reference)
    first, second = probe["epoch_start_weights"][:2]
    head_keys = {name.removeprefix("model.") for name in probe["head_params"]}
    backbone = [key for key in first if key not in head_keys]
    # DDP searches for the frozen parameters (they get no gradient) and leaves them exactly as they were.
    assert max_difference({k: first[k] for k in backbone}, {k: second[k] for k in backbone}) == 0.0
    assert max_difference({k: first[k] for k in head_keys}, {k: second[k] for k in head_keys}) > 0.0

    single = tmp_path / "single"
    best = reference / "checkpoints" / "best.ckpt"
    cfg = compose_train(ddp_runs["data"], single, ["train=false", f"ckpt_path={best}", "test=false"])
    train_script.train(cfg)
    for name in ("per_label", "overall", "predictions_train", "predictions_val"):
        pd.testing.assert_frame_equal(
            pd.read_csv(reference / "metrics" / f"{name}.csv"),
            pd.read_csv(single / "metrics" / f"{name}.csv"),
            rtol=1e-4,
            obj=name,
        )


# ---------------------------------------------------------------- recipe=seed is the code before the recipes

BEFORE_RECIPES = "37ba92a"


def run_script(code: Path, script: str, args: Sequence[str], cwd: Path) -> None:
    """``python <code>/<script> args`` from ``cwd``, importing the package of ``code`` (not the installed one)."""
    env = command_env({"PYTHONPATH": str(code)})
    command = [sys.executable, str(code / script), *args]
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, f"{command}\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"


@pytest.mark.slow
def test_seed_recipe_reproduces_the_tables_of_the_code_before_the_recipes(tmp_path: Path) -> None:
    if shutil.which("git") is None:
        pytest.skip("git is not installed: cannot export the code before the recipes")
    found = subprocess.run(
        ["git", "cat-file", "-e", f"{BEFORE_RECIPES}^{{commit}}"], cwd=REPO_ROOT, capture_output=True
    )
    if found.returncode != 0:
        pytest.skip(f"git history with commit {BEFORE_RECIPES} (the code before the recipes) is not available")
    before = tmp_path / "before"
    before.mkdir()
    archive = subprocess.run(["git", "archive", BEFORE_RECIPES], cwd=REPO_ROOT, capture_output=True, check=True)
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(before, filter="data")

    data = tmp_path / "demo_data"
    run_script(before, "prepare.py", [f"output_dir={data}"], tmp_path)
    runs = {"before": tmp_path / "run_before", "seed": tmp_path / "run_seed"}
    run_script(before, "train.py", ["experiment=demo", f"data_dir={data}", f"hydra.run.dir={runs['before']}"], tmp_path)
    now = ["experiment=demo", "recipe=seed", f"data_dir={data}", f"hydra.run.dir={runs['seed']}"]
    run_script(REPO_ROOT, "train.py", now, tmp_path)
    for name in ("per_label.csv", "overall.csv"):
        expected = (runs["before"] / "metrics" / name).read_bytes()
        assert (runs["seed"] / "metrics" / name).read_bytes() == expected, name
    # A demo run that learned something: identical tables of an untrained model would prove little.
    overall = pd.read_csv(runs["seed"] / "metrics" / "overall.csv")
    assert overall[(overall["split"] == "val") & (overall["level"] == "crop")]["top1"].item() > 0.5
