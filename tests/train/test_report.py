"""report.html: built by a real train.py run, parsed section by section and row by row; rebuilt by the command;
rendered by a real headless Chromium (slow); light with 200 labels (slow)."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from PIL import Image

from tests.fixtures.datasets import make_prepared_dataset
from tests.fixtures.hydra import FAST_OVERRIDES
from tests.fixtures.scripts import run_command, run_train_script

SECTIONS = [
    "card",
    "dataset",
    "training",
    "results",
    "confusion",
    "calibration",
    "thresholds",
    "locations",
    "galleries",
]
# The documented ceiling for a run with 200 labels (README, "report.html").
MAX_BYTES_200_LABELS = 3_000_000


class ReportParser(HTMLParser):
    """Sections, tables (rows per ``data-table``), embedded images, scripts."""

    def __init__(self) -> None:
        super().__init__()
        self.sections: list[str] = []
        self.tables: dict[str, int] = {}
        self.images: list[tuple[str, str]] = []
        self.scripts = 0
        self._table: str | None = None
        self._in_head = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "section" and values.get("id"):
            self.sections.append(str(values["id"]))
        elif tag == "table" and values.get("data-table"):
            self._table = str(values["data-table"])
            self.tables[self._table] = 0
        elif tag == "thead":
            self._in_head = True
        elif tag == "tr" and self._table is not None and not self._in_head:
            self.tables[self._table] += 1
        elif tag == "img":
            self.images.append((str(values.get("alt")), str(values.get("src"))))
        elif tag == "script":
            self.scripts += 1

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self._table, self._in_head = None, False
        elif tag == "thead":
            self._in_head = False


def parse(path: Path) -> ReportParser:
    parser = ReportParser()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


def _train(data_dir: Path, run: Path, *extra: str) -> None:
    result = run_train_script(
        [f"data_dir={data_dir}", f"hydra.run.dir={run}", *FAST_OVERRIDES, "trainer.max_epochs=3", *extra],
        cwd=run.parent,
    )
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("report")
    data = make_prepared_dataset(root / "data", per_label=8, size=48)
    (data / "taxonomy.csv").write_text(
        "label,class,order,family,genus,species\nbird,aves,,,,\n"
        "fox,mammalia,carnivora,canidae,vulpes,\nskunk,mammalia,carnivora,mephitidae,mephitis,\n"
    )
    folder = root / "run"
    _train(data, folder, "thresholds.min_support=2", "thresholds.target_precision=0.8")
    return folder


def test_every_section_table_row_and_image_is_there(run: Path) -> None:
    report = run / "report.html"
    assert report.is_file()
    page = parse(report)
    assert page.sections == SECTIONS
    assert page.scripts == 0  # readable without JavaScript
    metrics = run / "metrics"
    expected_rows = {
        "overall": len(pd.read_csv(metrics / "overall.csv")),
        "per label, crop level": len(pd.read_csv(metrics / "per_label.csv")),
        "per label, image level": len(pd.read_csv(metrics / "per_label_image.csv")),
        "per label, sequence level": len(pd.read_csv(metrics / "per_label_sequence.csv")),
        "per family": len(pd.read_csv(metrics / "per_label_family.csv")),
        "per class": len(pd.read_csv(metrics / "per_label_class.csv")),
        "thresholds and coverage (thresholds.csv)": len(pd.read_csv(metrics / "thresholds.csv")),
        "per location": len(pd.read_csv(metrics / "per_location.csv")),
        "crops, images and locations per label and split": 3,
        "split report (split_report.csv)": len(pd.read_csv(run.parent / "data" / "split_report.csv"))
        if (run.parent / "data" / "split_report.csv").is_file()
        else None,
    }
    for title, rows in expected_rows.items():
        if rows is None:
            continue
        assert page.tables.get(title) == rows, title
    assert page.tables["versions"] >= 5 and page.tables["calibration"] >= 1
    alts = [alt for alt, _ in page.images]
    assert "training curves" in alts and "reliability diagram" in alts
    assert {"confusion matrix train", "confusion matrix val", "confusion matrix test"} <= set(alts)
    for alt, src in page.images:
        assert src.startswith("data:image/png;base64,"), alt  # self-contained
        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as image:
            image.verify()
    text = report.read_text(encoding="utf-8")
    assert "python train.py data_dir=" in text  # the command that made it
    assert "Known limits" in text and "Intended use" in text


def test_the_command_rebuilds_the_same_page(run: Path, tmp_path: Path) -> None:
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "report.html").unlink()
    result = run_command("report", [f"run_dir={copy}"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "wrote" in result.stdout
    rebuilt, original = parse(copy / "report.html"), parse(run / "report.html")
    assert rebuilt.sections == original.sections and rebuilt.tables == original.tables
    assert len(rebuilt.images) == len(original.images)

    result = run_command("report", [f"run_dir={tmp_path}"])
    assert result.returncode == 2
    assert "has no metrics/per_label.csv" in result.stderr and result.stderr.strip().count("\n") == 0


def test_wandb_gets_the_report_as_an_artifact(run: Path, tmp_path: Path) -> None:
    data = run.parent / "data"
    folder = tmp_path / "wandb_run"
    env = {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path)}
    result = run_train_script(
        [f"data_dir={data}", f"hydra.run.dir={folder}", *FAST_OVERRIDES, "trainer.max_epochs=1", "logger=wandb"],
        cwd=tmp_path,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (folder / "report.html").is_file()
    offline = next((folder / "wandb").glob("offline-run-*"))
    run_id = offline.name.rsplit("-", 1)[1]
    # Offline, wandb records the logged artifact in the run's .wandb file (uploaded by `wandb sync`).
    records = next(offline.glob("run-*.wandb")).read_bytes()
    assert f"report-{run_id}".encode() in records and b"report.html" in records


@pytest.mark.slow
def test_a_real_browser_renders_every_image(run: Path, tmp_path: Path) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("Debian's chromium is not installed (.ci/run installs it)")
    checked = tmp_path / "checked.html"
    probe = """<script>
    window.addEventListener('load', () => {
      const images = Array.from(document.images);
      const bad = images.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt);
      const out = document.createElement('pre');
      out.id = 'image-check';
      out.textContent = JSON.stringify({total: images.length, bad: bad});
      document.body.appendChild(out);
    });
    </script>"""
    checked.write_text((run / "report.html").read_text(encoding="utf-8").replace("</body>", probe + "</body>"))
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    dom = subprocess.run(
        [browser, *flags, "--virtual-time-budget=10000", "--dump-dom", checked.as_uri()],
        capture_output=True,
        text=True,
        timeout=180,
    )
    found = re.search(r'<pre id="image-check">(.*?)</pre>', dom.stdout)
    assert found, dom.stderr[-2000:]
    result: dict[str, Any] = json.loads(found.group(1).replace("&quot;", '"'))
    assert result["bad"] == [] and result["total"] == len(parse(run / "report.html").images)
    shot = tmp_path / "report.png"
    subprocess.run(
        [browser, *flags, "--window-size=1280,2400", f"--screenshot={shot}", (run / "report.html").as_uri()],
        capture_output=True,
        timeout=180,
        check=True,
    )
    with Image.open(shot) as image:
        assert image.size == (1280, 2400)
        # Not a blank page: the rendered screenshot has text and plots.
        assert len(set(image.convert("L").getdata())) > 20


@pytest.mark.slow
def test_a_run_with_200_labels_stays_light(tmp_path: Path) -> None:
    labels = [f"species_{i:03d}" for i in range(200)]
    data = make_prepared_dataset(tmp_path / "data", labels=labels, per_label=1, size=32, seed=3)
    folder = tmp_path / "run"
    _train(data, folder, "data.image_size=32", "trainer.max_epochs=1", "data.batch_size=64")
    report = folder / "report.html"
    size = report.stat().st_size
    assert size < MAX_BYTES_200_LABELS, size
    page = parse(report)
    assert page.tables["per label, crop level"] == 600  # every row is there, folded
    assert "<details><summary>per label, crop level (600 rows" in report.read_text(encoding="utf-8")
    assert not any(alt.startswith("confusion matrix") for alt, _ in page.images)  # too many labels for an image
    assert page.tables["val: the 30 largest confusions"] <= 30
