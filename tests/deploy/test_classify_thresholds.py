"""classify with the checkpoint's thresholds: unknown below a label's threshold, taxonomy rollup, descriptions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from animl_lightning.core.label_index import LabelIndex
from animl_lightning.core.taxonomy import TAXONOMY_KEY, Taxonomy
from animl_lightning.deploy.classify import ClassifySettings, classify_detections
from animl_lightning.deploy.classify_inputs import read_detections_file
from animl_lightning.deploy.decisions import ThresholdRule, decision_categories
from animl_lightning.deploy.inference import load_classifier
from animl_lightning.train.checkpointing import THRESHOLDS_KEY, update_checkpoint
from tests.fixtures.models import CLASS_NAMES, write_checkpoint, write_megadetector_file

# CLASS_NAMES = bird, deer, fox, rabbit
TAXONOMY = Taxonomy(
    labels=tuple(CLASS_NAMES),
    ranks={
        "class": ("aves", "mammalia", "mammalia", "mammalia"),
        "order": ("", "artiodactyla", "carnivora", "lagomorpha"),
        "family": ("", "cervidae", "canidae", "leporidae"),
        "genus": ("", "odocoileus", "vulpes", "sylvilagus"),
        "species": ("", "", "vulpes vulpes", ""),
    },
)
SETTINGS = ClassifySettings(threshold=0.8, min_conf=0.0, batch_size=4, num_workers=0, top_k=4, backend="torch")


def _checkpoint(tmp_path: Path, record: dict[str, Any], taxonomy: Taxonomy | None) -> Path:
    path = write_checkpoint(tmp_path / "best.ckpt")
    update_checkpoint(path, THRESHOLDS_KEY, record)
    if taxonomy is not None:
        update_checkpoint(path, TAXONOMY_KEY, taxonomy.to_dict())
    return path


def _classified(output: Path) -> list[dict[str, Any]]:
    data = json.loads(output.read_text())
    return [d for image in data["images"] for d in image["detections"] or [] if "classifications" in d]


def test_below_its_threshold_a_detection_is_unknown_and_keeps_the_models_list(tmp_path: Path) -> None:
    validator = pytest.importorskip("megadetector.postprocessing.validate_batch_results")
    # deer never passes (1.0), every other label always passes (0.0).
    record = {"per_label": {"bird": 0.0, "deer": 1.0, "fox": 0.0, "rabbit": 0.0}, "per_taxon": {}}
    loaded = load_classifier(_checkpoint(tmp_path, record, None), device="cpu")
    detections_file, images_dir, _ = write_megadetector_file(tmp_path)
    output = tmp_path / "out.json"
    summary = classify_detections(loaded, read_detections_file(detections_file), images_dir, output, SETTINGS)
    data = json.loads(output.read_text())
    assert data["classification_categories"]["4"] == "unknown"
    unknown = 0
    for detection in _classified(output):
        model = detection["classifications"]
        if model[0][0] == "4":
            unknown += 1
            assert model[1][0] == "1" and model[0][1] == model[1][1]  # deer was the best label, same confidence
            assert [c[0] for c in model[1:]] != []
        else:
            assert model[0][0] != "1"
    assert unknown == summary.detections_below_threshold
    assert validator.validate_batch_results(str(output))["validation_results"]["errors"] == []
    assert data["info"]["classifier_metadata"]["thresholds_applied"] is True

    # classify.thresholds=false: the model's labels only, and no unknown category.
    off = tmp_path / "off.json"
    classify_detections(
        loaded,
        read_detections_file(detections_file),
        images_dir,
        off,
        ClassifySettings(**{**vars(SETTINGS), "thresholds": False}),
    )
    assert "4" not in json.loads(off.read_text())["classification_categories"]
    assert all(d["classifications"][0][0] != "4" for d in _classified(off))


def test_the_csv_reports_what_the_json_reports(tmp_path: Path) -> None:
    # bird (this untrained model's best label for every crop) never passes; every other label always passes.
    record = {"per_label": {"bird": 1.0, "deer": 0.0, "fox": 0.0, "rabbit": 0.0}, "per_taxon": {}}
    loaded = load_classifier(_checkpoint(tmp_path, record, None), device="cpu")
    detections_file, images_dir, _ = write_megadetector_file(tmp_path)
    output, output_csv = tmp_path / "out.json", tmp_path / "out.csv"
    summary = classify_detections(
        loaded, read_detections_file(detections_file), images_dir, output, SETTINGS, output_csv=output_csv
    )
    data = json.loads(output.read_text())
    names = data["classification_categories"]
    reported = {
        (image["file"], j): (names[d["classifications"][0][0]], d["classifications"][0][1])
        for image in data["images"]
        for j, d in enumerate(image["detections"] or [])
        if "classifications" in d
    }
    frame = pd.read_csv(output_csv, keep_default_na=False, na_values=[""])
    classified = frame[frame["failure"].isna()]
    assert len(classified) == len(reported) and summary.detections_below_threshold > 0
    for row in classified.itertuples(index=False):
        decision, score = reported[(row.file, row.detection)]
        assert (row.decision, row.decision_score) == (decision, pytest.approx(score, abs=1e-6))
        # Below its threshold the model's best label is still there, beside the decision.
        assert row.decision == ("unknown" if row.label_1 == "bird" else row.label_1)
    assert frame.loc[frame["failure"].notna(), "decision"].isna().all()  # failed detections decide nothing


def test_rollup_reports_the_lowest_taxon_that_passes(tmp_path: Path) -> None:
    validator = pytest.importorskip("megadetector.postprocessing.validate_batch_results")
    # No label passes; among taxa only 'mammalia' (class) has a threshold low enough for everything.
    record = {
        "per_label": dict.fromkeys(CLASS_NAMES, 1.0),
        "per_taxon": {"class": {"mammalia": 0.0, "aves": 1.0}, "family": {"canidae": 1.0}},
    }
    loaded = load_classifier(_checkpoint(tmp_path, record, TAXONOMY), device="cpu")
    detections_file, images_dir, _ = write_megadetector_file(tmp_path)
    output = tmp_path / "out.json"
    classify_detections(loaded, read_detections_file(detections_file), images_dir, output, SETTINGS)
    data = json.loads(output.read_text())
    categories = data["classification_categories"]
    descriptions = data["classification_category_descriptions"]
    assert set(descriptions) == set(categories)
    assert all(len(text.split(";")) == 7 for text in descriptions.values())  # SpeciesNet's layout, for MD tools
    mammalia = next(k for k, v in categories.items() if v == "mammalia")
    assert descriptions[mammalia] == "mammalia;mammalia;;;;;mammalia"
    for detection in _classified(output):
        first, *model = detection["classifications"]
        best = CLASS_NAMES[int(model[0][0])]
        if best == "bird":
            assert first[0] == "4"  # aves does not pass: unknown
        else:
            assert first[0] == mammalia
            mammals = sum(c[1] for c in model if CLASS_NAMES[int(c[0])] != "bird")
            assert first[1] == pytest.approx(mammals, abs=4e-4)  # the summed probability, not the label's
    assert validator.validate_batch_results(str(output))["validation_results"]["errors"] == []


def test_rule_on_hand_made_probabilities() -> None:
    categories = decision_categories(LabelIndex.of(CLASS_NAMES), TAXONOMY)
    record = {
        "per_label": {"bird": 0.6, "deer": 0.6, "fox": 0.9, "rabbit": None},
        "per_taxon": {"genus": {"vulpes": 0.95}, "family": {"canidae": 0.7}, "class": {"mammalia": 0.8}},
    }
    rule = ThresholdRule.from_record(record, CLASS_NAMES, TAXONOMY)
    names = categories.names
    assert rule.decide(np.array([0.7, 0.1, 0.1, 0.1]), categories) is None  # bird passes 0.6
    # fox 0.8 < 0.9; genus vulpes 0.8 < 0.95; family canidae 0.8 >= 0.7: canidae.
    decided = rule.decide(np.array([0.05, 0.1, 0.8, 0.05]), categories)
    assert decided is not None and names[decided[0]] == "canidae" and decided[1] == pytest.approx(0.8)
    # rabbit has no threshold and its lineage has only mammalia (0.1 + 0.2 + 0.55 = 0.85 >= 0.8).
    decided = rule.decide(np.array([0.15, 0.1, 0.2, 0.55]), categories)
    assert decided is not None and names[decided[0]] == "mammalia" and decided[1] == pytest.approx(0.85)
    # Nothing passes: unknown with the label's own probability.
    decided = rule.decide(np.array([0.3, 0.3, 0.1, 0.3]), categories)
    assert decided == (categories.unknown_id, pytest.approx(0.3))


def test_mlmodel_categories_carry_thresholds_and_taxonomy(tmp_path: Path) -> None:
    from animl_lightning.deploy.animl_bundle import mlmodel_record

    record = {"per_label": {"bird": 0.7, "deer": None, "fox": 0.9, "rabbit": 0.8}, "per_taxon": {}}
    loaded = load_classifier(_checkpoint(tmp_path, record, TAXONOMY), device="cpu")
    categories = {c["_id"]: c for c in mlmodel_record(loaded, "m", "v1", "d", 0.5)["categories"]}
    assert categories["fox"]["taxonomy"] == "mammalia;carnivora;canidae;vulpes;vulpes vulpes"
    assert categories["fox"]["confThreshold"] == 0.9
    # deer has no threshold: classify calls it unknown whatever its probability, and Animl never applies it either.
    assert categories["deer"]["confThreshold"] == 1.0
