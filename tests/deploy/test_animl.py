"""export format=animl, the ONNX server and the TorchServe handler: Animl's contract, one preprocessing, bad requests.

Everything runs for real: the export is the user's command; the server is uvicorn on 127.0.0.1 queried over HTTP;
the handler is loaded from the unpacked ``.mar`` in a process where the training stack cannot be imported; a slow
test starts TorchServe itself (Java) on the archive.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from animl_lightning.core.crop_rule import CropRule
from animl_lightning.core.preprocessing import EvalTransform
from animl_lightning.core.serving import (
    MAX_REQUEST_PIXELS,
    RequestError,
    ServingBundle,
    answer_request,
    parse_request,
)
from animl_lightning.deploy.animl_bundle import torchserve_config
from animl_lightning.deploy.classify import ClassifySettings, classify_detections
from animl_lightning.deploy.inference import load_classifier
from animl_lightning.train.checkpointing import THRESHOLDS_KEY, update_checkpoint
from tests.fixtures.files import write_jpeg
from tests.fixtures.models import CLASS_NAMES, write_checkpoint
from tests.fixtures.readme import first_column_names, section
from tests.fixtures.scripts import command_env, run_command
from tests.fixtures.serving import (
    TRAINING_STACK,
    animl_request,
    blocker_source,
    call,
    free_port,
    running,
)

pytest.importorskip("onnxruntime")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("model_archiver")

THRESHOLDS = {"deer": 0.62, "fox": 0.71}
# [ymin, xmin, ymax, xmax] boxes touching every edge and corner of the frame, the whole frame, thin and tiny boxes.
EDGE_BOXES = [
    [0.0, 0.0, 1.0, 1.0],
    [0.0, 0.0, 0.3, 0.25],
    [0.0, 0.7, 0.4, 1.0],
    [0.65, 0.0, 1.0, 0.35],
    [0.8, 0.75, 1.0, 1.0],
    [0.0, 0.3, 1.0, 0.5],
    [0.45, 0.0, 0.55, 1.0],
    [0.2, 0.9, 0.9, 1.0],
    [0.97, 0.4, 1.0, 0.6],
    [0.5, 0.5, 0.52, 0.53],
]
IMAGE_SIZES = [(320, 240), (241, 333), (64, 48)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = write_checkpoint(tmp_path_factory.mktemp("animl") / "best.ckpt", crop_rule=CropRule("pad", 200))
    update_checkpoint(path, THRESHOLDS_KEY, {"target_precision": 0.95, "per_label": THRESHOLDS})
    return path


@pytest.fixture(scope="module")
def bundle(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder written by the user's command."""
    output = tmp_path_factory.mktemp("export") / "animl_model"
    result = run_command("export", [f"checkpoint={checkpoint}", "format=animl", f"output={output}", "animl.version=v2"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "wrote" in result.stdout
    return output


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("photos")
    return [write_jpeg(root / f"photo_{i}.jpg", w, h, seed=i + 7) for i, (w, h) in enumerate(IMAGE_SIZES)]


@pytest.fixture(scope="module")
def server(bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The bundle's own server (``serving/``, as Dockerfile.onnx runs it) on 127.0.0.1, torch and training blocked."""
    port = free_port()
    source = (
        f"{blocker_source((*TRAINING_STACK, 'torch'))}; import uvicorn; "
        f"uvicorn.run('animl_lightning.deploy.server:app_from_environment', factory=True, host='127.0.0.1', "
        f"port={port}, log_level='warning')"
    )
    env = command_env() | {"ANIML_BUNDLE": str(bundle), "PYTHONPATH": ""}
    log = tmp_path_factory.mktemp("server") / "server.log"
    url = f"http://127.0.0.1:{port}"
    with running([sys.executable, "-c", source], f"{url}/ping", log, cwd=bundle / "serving", env=env):
        yield url


def _answers_by_handler(bundle: Path, rows: list[str], tmp_path: Path) -> dict[str, Any]:
    """TorchServe's ``handle()`` of the unpacked .mar, in a process where the training stack cannot be imported."""
    model_dir = tmp_path / "mar"
    with zipfile.ZipFile(next(bundle.glob("*.mar"))) as archive:
        archive.extractall(model_dir)
    requests_file = tmp_path / "requests.json"
    requests_file.write_text(json.dumps(rows))
    out = tmp_path / "answers.json"
    probe = Path(__file__).resolve().parents[1] / "fixtures" / "serving.py"
    env = command_env() | {"PYTHONPATH": ""}
    result = subprocess.run(
        [sys.executable, str(probe), "handler", str(model_dir), str(requests_file), str(out)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    answers: dict[str, Any] = json.loads(out.read_text())
    assert answers["crop_rule_file"].startswith(str(model_dir))  # the archive's own copy, not the installed package
    assert answers["training_stack_loaded"] == []
    return answers


def test_bundle_holds_what_animl_needs(bundle: Path, checkpoint: Path) -> None:
    files = {p.name for p in bundle.iterdir()}
    assert {
        "model.onnx",
        "model.pt",
        "bundle.json",
        "index_to_name.json",
        "mlmodel.json",
        "config.properties",
        "Dockerfile",
        "Dockerfile.onnx",
        "sample_request.json",
        "sample_response.json",
        "README.md",
        "serving",
    } <= files
    mar = next(bundle.glob("*.mar"))
    assert mar.name == "test_efficientnet-best.mar"
    with zipfile.ZipFile(mar) as archive:
        names = set(archive.namelist())
        manifest = json.loads(archive.read("MAR-INF/MANIFEST.json"))
    assert {"model.pt", "handler.py", "index_to_name.json", "bundle.json", "animl_lightning/core/crop_rule.py"} <= names
    assert not any(n.startswith(("animl_lightning/train", "animl_lightning/prepare")) for n in names)
    assert manifest["model"]["modelVersion"] == "v2" and manifest["model"]["handler"] == "handler.py"

    record = json.loads((bundle / "mlmodel.json").read_text())
    assert record["_id"] == "test_efficientnet-best" and record["version"] == "v2"
    assert record["expectsCrops"] is True and record["defaultConfThreshold"] == 0.5
    assert [c["_id"] for c in record["categories"]] == CLASS_NAMES
    assert all(c["name"] == c["_id"] for c in record["categories"])
    colours = [c["color"] for c in record["categories"]]
    assert all(re.fullmatch(r"#[0-9a-f]{6}", c) for c in colours) and len(set(colours)) == len(colours)
    # Labels training found no threshold for (bird, rabbit) are never applied on their own: classify calls them unknown.
    expected = {label: THRESHOLDS.get(label, 1.0) for label in CLASS_NAMES}
    assert {c["_id"]: c["confThreshold"] for c in record["categories"]} == expected
    assert json.loads((bundle / "index_to_name.json").read_text()) == {str(i): n for i, n in enumerate(CLASS_NAMES)}

    properties = (bundle / "config.properties").read_text()
    assert "disable_token_authorization=true" in properties and "inference_address=http://0.0.0.0:8080" in properties
    dockerfile = (bundle / "Dockerfile").read_text()
    assert f'"torch=={torch.__version__.split("+")[0]}"' in dockerfile
    assert f"COPY {mar.name} " in dockerfile
    assert "animl_lightning.deploy.server:app_from_environment" in (bundle / "Dockerfile.onnx").read_text()
    requirements = (bundle / "serving" / "requirements.txt").read_text()
    assert "onnxruntime==" in requirements and "torch" not in requirements

    loaded = ServingBundle.load(bundle)
    assert list(loaded.labels) == CLASS_NAMES and dict(loaded.thresholds) == THRESHOLDS
    assert loaded.crop_rule.strategy == "pad" and loaded.crop_rule.max_size == 200
    response = json.loads((bundle / "sample_response.json").read_text())
    assert list(response) == CLASS_NAMES and abs(sum(response.values()) - 1) < 1e-4
    assert "Register it in Animl" in (bundle / "README.md").read_text()

    # The user's README lists every file of the bundle.
    documented = {name.rstrip("/") for name in first_column_names(section("Deploying to Animl"))}
    written = {"<id>.mar" if p.suffix == ".mar" else p.name for p in bundle.iterdir()} - {"__pycache__"}
    assert written <= documented, written - documented


def test_handler_server_and_classify_give_the_same_probabilities(
    bundle: Path, server: str, checkpoint: Path, photos: list[Path], tmp_path: Path
) -> None:
    cases = [(photo, bbox) for photo in photos for bbox in EDGE_BOXES]
    rows = [json.dumps(animl_request(photo.read_bytes(), bbox)) for photo, bbox in cases]

    by_handler = _answers_by_handler(bundle, rows, tmp_path)
    assert by_handler["statuses"] == {}
    handler = np.array([[a[label] for label in CLASS_NAMES] for a in by_handler["answers"]])

    by_server = []
    for row in rows:
        status, body = call(f"{server}/invocations", row.encode())
        assert status == 200, body
        answer = json.loads(body)
        assert list(answer) == CLASS_NAMES  # every label, Animl's ids, nothing else
        by_server.append([answer[label] for label in CLASS_NAMES])
    served = np.array(by_server)

    # classify on the same boxes, as a MegaDetector file ([x, y, w, h]), with both backends.
    detections = {
        "info": {"format_version": "1.4", "detector": "md_v5a.0.0.pt"},
        "detection_categories": {"1": "animal"},
        "images": [
            {
                "file": photo.name,
                "detections": [
                    {"category": "1", "conf": 0.9, "bbox": [b[1], b[0], b[3] - b[1], b[2] - b[0]]} for b in EDGE_BOXES
                ],
            }
            for photo in photos
        ],
    }
    loaded = load_classifier(checkpoint, device="cpu")
    classified = {}
    for backend in ("torch", "onnxruntime"):
        settings = ClassifySettings(
            threshold=0.5,
            min_conf=0.0,
            top_k=len(CLASS_NAMES),
            num_workers=2,
            batch_size=4,
            backend=backend,
            thresholds=False,  # the model's probabilities, not the unknown/threshold decisions
        )
        output = tmp_path / f"{backend}.json"
        classify_detections(loaded, detections, photos[0].parent, output, settings)
        result = json.loads(output.read_text())
        table = np.zeros((len(cases), len(CLASS_NAMES)))
        row = 0
        for image in result["images"]:
            for detection in image["detections"]:
                for class_id, conf in detection["classifications"]:
                    table[row, int(class_id)] = conf
                row += 1
        classified[backend] = table

    assert handler.shape == served.shape == (len(cases), len(CLASS_NAMES))
    assert np.abs(handler - served).max() <= 1e-4
    for table in classified.values():
        assert np.abs(table - served).max() <= 1e-4  # classify rounds to 4 digits: at most 5e-5 of the gap
    # The boxes differ, so the crops and the answers must too (a server ignoring the bbox would pass the above).
    assert len({tuple(np.round(r, 3)) for r in served}) > len(cases) // 2


BAD_REQUESTS: list[tuple[str, bytes, int, str]] = [
    ("not JSON", b"{image: nope", 400, "not JSON"),
    ("empty body", b"", 400, "not JSON"),
    ("a list", b"[1, 2]", 400, "JSON object"),
    ("no image", json.dumps({"bbox": [0, 0, 1, 1]}).encode(), 400, "'image' is missing"),
    ("image not base64", json.dumps({"image": "%%% not base64"}).encode(), 400, "base64"),
    ("image not an image", json.dumps(animl_request(b"hello, not a JPEG" * 10)).encode(), 415, "not a readable"),
    ("bbox of 3", json.dumps(animl_request(b"x", [0, 0, 1])).encode(), 400, "[ymin, xmin, ymax, xmax]"),
    ("bbox outside", json.dumps(animl_request(b"x", [0, 0, 1.2, 1])).encode(), 400, "in [0, 1]"),
    ("bbox negative", json.dumps(animl_request(b"x", [-0.1, 0, 1, 1])).encode(), 400, "in [0, 1]"),
    ("bbox inverted", json.dumps(animl_request(b"x", [0.6, 0, 0.2, 1])).encode(), 400, "ymin < ymax"),
    ("bbox of text", json.dumps(animl_request(b"x", ["a", 0, 1, 1])).encode(), 400, "finite numbers"),
    ("bbox string not JSON", json.dumps(animl_request(b"x", "0 0 1 1")).encode(), 400, "not a JSON list"),
]


@pytest.mark.parametrize(("case", "body", "status", "reason"), BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_a_bad_request_gets_a_4xx_with_one_line_and_the_server_keeps_serving(
    server: str, photos: list[Path], case: str, body: bytes, status: int, reason: str
) -> None:
    got, answer = call(f"{server}/invocations", body)
    assert got == status, (case, answer)
    error = json.loads(answer)["error"]
    assert reason in error and "\n" not in error and "Traceback" not in error
    good = json.dumps(animl_request(photos[0].read_bytes(), [0.1, 0.1, 0.9, 0.9])).encode()
    assert call(f"{server}/invocations", good)[0] == 200
    assert call(f"{server}/ping") == (200, b'{"status":"Healthy"}')


def test_bbox_as_a_json_string_or_left_out_is_accepted(server: str, photos: list[Path]) -> None:
    image = photos[0].read_bytes()
    as_list = call(f"{server}/invocations", json.dumps(animl_request(image, [0.1, 0.2, 0.8, 0.9])).encode())
    as_string = call(f"{server}/invocations", json.dumps(animl_request(image, "[0.1, 0.2, 0.8, 0.9]")).encode())
    assert as_list == as_string and as_list[0] == 200
    whole = call(f"{server}/invocations", json.dumps(animl_request(image, [0, 0, 1, 1])).encode())
    default = call(f"{server}/invocations", json.dumps(animl_request(image)).encode())
    assert whole == default and whole[0] == 200
    assert whole[1] != as_list[1]


def test_a_burst_of_concurrent_requests_gets_the_answers_of_sequential_ones(server: str, photos: list[Path]) -> None:
    rows = [json.dumps(animl_request(photo.read_bytes(), bbox)).encode() for photo in photos for bbox in EDGE_BOXES[:6]]
    sequential = [call(f"{server}/invocations", row) for row in rows]
    with ThreadPoolExecutor(12) as pool:
        burst = list(pool.map(lambda row: call(f"{server}/invocations", row), rows * 3))
    assert all(status == 200 for status, _ in burst)
    for i, (_, body) in enumerate(burst):
        assert json.loads(body) == pytest.approx(json.loads(sequential[i % len(rows)][1]), abs=1e-6)


def test_handler_answers_bad_requests_with_their_status(bundle: Path, photos: list[Path], tmp_path: Path) -> None:
    good = json.dumps(animl_request(photos[1].read_bytes(), [0.0, 0.0, 0.5, 0.5]))
    rows = [good, "{not json", json.dumps({"bbox": [0, 0, 1, 1]}), json.dumps(animl_request(b"x", [0.5, 0, 0.2, 1]))]
    result = _answers_by_handler(bundle, rows, tmp_path)
    assert list(result["answers"][0]) == CLASS_NAMES
    assert result["statuses"]["1"][0] == 400 and "not JSON" in result["statuses"]["1"][1]
    assert result["statuses"]["2"][0] == 400 and "'image' is missing" in result["answers"][2]["error"]
    assert result["statuses"]["3"][0] == 400 and "ymin < ymax" in result["answers"][3]["error"]
    assert "0" not in result["statuses"]


def test_sample_response_is_what_the_server_answers_to_the_sample_request(bundle: Path, server: str) -> None:
    status, body = call(f"{server}/invocations", (bundle / "sample_request.json").read_bytes())
    assert status == 200
    assert json.loads(body) == pytest.approx(json.loads((bundle / "sample_response.json").read_text()), abs=1e-6)


def test_parse_request_turns_animl_boxes_into_megadetector_boxes() -> None:
    parsed = parse_request(animl_request(b"jpeg bytes", [0.1, 0.2, 0.5, 0.9]))
    assert parsed.box == pytest.approx((0.2, 0.1, 0.7, 0.4))
    assert parse_request(animl_request(b"jpeg bytes")).box == (0.0, 0.0, 1.0, 1.0)
    with pytest.raises(RequestError, match="ymin < ymax"):
        parse_request(animl_request(b"jpeg bytes", [0.5, 0.2, 0.5, 0.9]))


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"bbox": [0, 0, 1, 1]}, "field 'image' is missing"),
        ({"image": 12345}, "field 'image' must be a string (the base64 of the full image), got int"),
        ({"image": ["aGk="]}, "field 'image' must be a string (the base64 of the full image), got list"),
        ({"image": ""}, "field 'image' is empty"),
    ],
)
def test_a_request_image_that_is_not_base64_text_is_named_for_what_it_is(
    payload: dict[str, object], message: str
) -> None:
    with pytest.raises(RequestError) as caught:
        parse_request(payload)
    assert str(caught.value).startswith(message)


def _uniform_probabilities(inputs: np.ndarray) -> np.ndarray:
    """A stand-in for the model: the request path up to it is the subject here."""
    return np.full((len(inputs), len(CLASS_NAMES)), 1 / len(CLASS_NAMES), dtype=np.float32)


def test_a_large_camera_photo_is_answered_and_the_pixel_limit_is_named() -> None:
    transform = EvalTransform.from_config({"input_size": [3, 64, 64], "mean": [0.5] * 3, "std": [0.25] * 3})
    # A 12000x9000 photo (108 million pixels): Animl sends it as it is when it is at most 2.8 MB, as this one is.
    photo = io.BytesIO()
    Image.new("L", (12000, 9000), 90).save(photo, format="JPEG", quality=80)
    assert photo.tell() <= 2_800_000
    body = animl_request(photo.getvalue(), [0.2, 0.3, 0.6, 0.7])
    assert list(answer_request(body, _uniform_probabilities, CLASS_NAMES, transform, CropRule())) == CLASS_NAMES
    # Past the limit a request is refused, saying the limit (read from the header: nothing is decoded).
    over = io.BytesIO()
    Image.new("1", (13000, 12000)).save(over, format="PNG")
    with pytest.raises(RequestError) as caught:
        answer_request(animl_request(over.getvalue()), _uniform_probabilities, CLASS_NAMES, transform, CropRule())
    assert caught.value.status == 415
    assert f"13000x12000 is 156,000,000 pixels, over the limit of {MAX_REQUEST_PIXELS:,}" in str(caught.value)


def test_serve_command_serves_a_bundle_and_refuses_a_folder_that_is_not_one(
    bundle: Path, photos: list[Path], tmp_path: Path
) -> None:
    port = free_port()
    command = [sys.executable, "-m", "animl_lightning.serve", f"bundle={bundle}", f"port={port}"]
    url = f"http://127.0.0.1:{port}"
    with running(command, f"{url}/ping", tmp_path / "serve.log", env=command_env()):
        image = io.BytesIO()
        Image.open(photos[2]).save(image, format="PNG")  # Animl sends JPEGs; any image Pillow reads works
        status, body = call(f"{url}/invocations", json.dumps(animl_request(image.getvalue(), [0, 0, 1, 1])).encode())
        assert status == 200 and list(json.loads(body)) == CLASS_NAMES

    not_a_bundle = tmp_path / "empty"
    not_a_bundle.mkdir()
    result = run_command("serve", [f"bundle={not_a_bundle}", f"port={free_port()}"])
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "bundle.json does not exist" in result.stderr


def test_export_animl_refuses_bad_settings_with_one_line(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from animl_lightning.export import main

    a_file = tmp_path / "model.txt"
    a_file.write_text("x")
    cases = [
        ((f"output={a_file}",), "is a file"),
        ((f"output={tmp_path / 'out'}", "animl.model_id=bad.id"), "model_id"),
        ((f"output={tmp_path / 'out'}", "animl.default_threshold=1.5"), "threshold"),
    ]
    for extra, reason in cases:
        monkeypatch.setattr(sys, "argv", ["animl_lightning.export", f"checkpoint={checkpoint}", "format=animl", *extra])
        with pytest.raises(SystemExit) as stop:
            main()
        assert stop.value.code == 2
        captured = capsys.readouterr()
        assert reason in captured.err and "Traceback" not in captured.out + captured.err
        assert not (tmp_path / "out").exists()
        assert not list(tmp_path.glob(".*tmp*"))


def _tree(folder: Path) -> dict[str, bytes | None]:
    """Every entry below ``folder``: a file's bytes, None for a folder."""
    return {p.relative_to(folder).as_posix(): None if p.is_dir() else p.read_bytes() for p in folder.rglob("*")}


def test_export_animl_refuses_a_folder_it_did_not_write_and_touches_nothing(
    checkpoint: Path, bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from animl_lightning.deploy.bundle_folder import output_folder
    from animl_lightning.export import main

    work = tmp_path / "work"  # a user's working folder: a document and a folder of photos
    work.mkdir()
    (work / "field notes.odt").write_bytes(b"PK\x03\x04 six months of field notes")
    for i, (width, height) in enumerate(IMAGE_SIZES):
        write_jpeg(work / "photos" / f"IMG_{i:04d}.JPG", width, height, seed=i)
    added_to = tmp_path / "earlier_bundle"  # an earlier bundle, with a file of the user's added to it
    shutil.copytree(bundle, added_to)
    (added_to / "serving" / "deployment notes.txt").write_text("endpoint: animl-classifier-prod\n")
    before = _tree(tmp_path)
    cases = [
        (tmp_path, str(work), "holds no bundle of format=animl"),
        (tmp_path, "work/", "holds no bundle of format=animl"),
        (work, ".", "is the current folder or one above it"),
        (work, "..", "is the current folder or one above it"),
        (work, "photos/..", "is the current folder or one above it"),
        (work, str(added_to), "holds serving/deployment notes.txt, which format=animl did not write"),
    ]
    for cwd, output, reason in cases:
        monkeypatch.chdir(cwd)
        argv = ["animl_lightning.export", f"checkpoint={checkpoint}", "format=animl", f"output={output}"]
        monkeypatch.setattr(sys, "argv", argv)
        with pytest.raises(SystemExit) as stop:
            main()
        assert stop.value.code == 2, output
        captured = capsys.readouterr()
        assert "Traceback" not in captured.out + captured.err
        lines = [line for line in captured.err.splitlines() if line.startswith("export: ")]
        assert len(lines) == 1 and reason in lines[0] and "output: " in lines[0], (output, captured.err)
        assert _tree(tmp_path) == before, output
    empty = tmp_path / "empty"
    empty.mkdir()
    assert output_folder(empty) == empty  # an empty folder is fine to replace


@pytest.mark.slow
def test_export_animl_replaces_its_own_earlier_bundle(checkpoint: Path, bundle: Path, tmp_path: Path) -> None:
    earlier = tmp_path / "animl_model"
    shutil.copytree(bundle, earlier)
    # Running the bundle's own server sources leaves Python's bytecode caches: not the user's, replaced too.
    cache = earlier / "serving" / "animl_lightning" / "__pycache__"
    cache.mkdir()
    (cache / f"errors.cpython-{sys.version_info.major}{sys.version_info.minor}.pyc").write_bytes(b"\x00" * 16)

    args = [f"checkpoint={checkpoint}", "format=animl", f"output={earlier}/", "animl.version=v3"]
    result = run_command("export", args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((earlier / "mlmodel.json").read_text())["version"] == "v3"
    assert not cache.exists()
    manifest = json.loads((earlier / "bundle_files.json").read_text())
    on_disk = sorted(p.relative_to(earlier).as_posix() for p in earlier.rglob("*") if p.is_file())
    assert manifest["files"] == [name for name in on_disk if name != "bundle_files.json"]
    assert {"model.onnx", "test_efficientnet-best.mar", "serving/requirements.txt"} <= set(manifest["files"])
    assert [p.name for p in tmp_path.iterdir()] == ["animl_model"]  # no temporary folder left beside it


@pytest.mark.slow
def test_torchserve_loads_the_archive_and_answers_animl_requests(
    bundle: Path, photos: list[Path], tmp_path: Path
) -> None:
    if shutil.which("torchserve") is None or shutil.which("java") is None:
        pytest.skip("TorchServe or Java is not installed")
    store = tmp_path / "store"
    store.mkdir()
    mar = next(bundle.glob("*.mar"))
    shutil.copy2(mar, store / mar.name)
    ports = [free_port() for _ in range(3)]
    config = torchserve_config(
        mar.stem, f"127.0.0.1:{ports[0]}", f"127.0.0.1:{ports[1]}", f"127.0.0.1:{ports[2]}", str(store)
    )
    (tmp_path / "config.properties").write_text(config)
    command = [
        "torchserve",
        "--start",
        "--foreground",
        "--ncs",
        "--disable-token-auth",
        "--ts-config",
        str(tmp_path / "config.properties"),
        "--model-store",
        str(store),
        "--models",
        mar.name,
    ]
    url = f"http://127.0.0.1:{ports[0]}"
    env = command_env() | {"LOG_LOCATION": str(tmp_path / "logs"), "METRICS_LOCATION": str(tmp_path / "logs")}
    with running(command, f"http://127.0.0.1:{ports[1]}/models/{mar.stem}", tmp_path / "ts.log", cwd=tmp_path, env=env):
        status, body = call(f"{url}/ping")
        assert status == 200 and b"Healthy" in body
        expected = json.loads((bundle / "sample_response.json").read_text())
        for _ in range(60):  # the worker may still be loading the model
            status, body = call(f"{url}/invocations", (bundle / "sample_request.json").read_bytes())
            if status != 503:
                break
            __import__("time").sleep(1)
        assert status == 200, body
        assert json.loads(body) == pytest.approx(expected, abs=1e-4)
        bad = json.dumps(animl_request(photos[0].read_bytes(), [0.6, 0, 0.2, 1])).encode()
        status, body = call(f"{url}/invocations", bad)
        assert status == 400 and b"ymin < ymax" in body
        status, body = call(f"{url}/invocations", (bundle / "sample_request.json").read_bytes())
        assert status == 200
