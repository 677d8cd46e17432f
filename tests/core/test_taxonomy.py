"""labels.taxonomy_file: the AddaxAI-style CSV, checked against the labels with one-line errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from animl_lightning.core.taxonomy import Taxonomy, TaxonomyError, read_taxonomy

LABELS = ["coyote", "deer", "gray fox"]
GOOD = """label,class,order,family,genus,species
Coyote,Mammalia,Carnivora,Canidae,Canis,canis latrans
deer,mammalia,artiodactyla,cervidae,odocoileus,
gray fox,mammalia,carnivora,canidae,urocyon,urocyon cinereoargenteus
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "taxonomy.csv"
    path.write_text(text, encoding="utf-8")
    return path


def test_reads_and_rolls_up(tmp_path: Path) -> None:
    taxonomy = read_taxonomy(_write(tmp_path, GOOD), LABELS)
    assert taxonomy.labels == tuple(LABELS)
    assert taxonomy.ranks["family"] == ("canidae", "cervidae", "canidae")  # case folded
    assert taxonomy.ranks["species"][1] == ""  # unknown rank stays empty
    taxa, matrix = taxonomy.rollup_matrix("family")
    assert taxa == ["canidae", "cervidae"]
    summed = np.array([[0.2, 0.5, 0.3]]) @ matrix
    assert summed.tolist() == [[0.5, 0.5]]
    assert taxonomy.description("gray fox") == "mammalia;carnivora;canidae;urocyon;urocyon cinereoargenteus"
    assert taxonomy.taxon_description("family", "canidae") == "mammalia;carnivora;canidae;;"
    assert Taxonomy.from_dict(taxonomy.to_dict()) == taxonomy
    assert read_taxonomy(_write(tmp_path, taxonomy.to_csv()), LABELS) == taxonomy


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("label,class,order,family\ncoyote,m,c,c\n", "columns ['genus', 'species'] are missing"),
        (GOOD.replace("deer,", "elk,"), "labels ['elk'] are not labels of this dataset"),
        (GOOD + "coyote,mammalia,carnivora,canidae,canis,\n", "row 5: label 'coyote' appears twice"),
        ("label,class,order,family,genus,species\ncoyote,m,c,f,g,s\n", "labels ['deer', 'gray fox'] have no row"),
        (GOOD.replace("gray fox,mammalia,carnivora", "gray fox,mammalia,rodentia"), "family 'canidae' has order"),
        (GOOD + ",mammalia,,,,\n", "row 5: field 'label' is empty"),
    ],
)
def test_mistakes_are_named_in_one_line(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(TaxonomyError, match=None) as caught:
        read_taxonomy(_write(tmp_path, text), LABELS)
    assert message in str(caught.value) and "\n" not in str(caught.value)
    assert "taxonomy.csv" in str(caught.value)


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(TaxonomyError, match=r"labels.taxonomy_file: .*nope.csv does not exist"):
        read_taxonomy(tmp_path / "nope.csv", LABELS)
