"""The images stage against a real S3 server on loopback (moto), and without S3."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from botocore.exceptions import ClientError, ReadTimeoutError

from animl_lightning.core.cct import load_cct
from animl_lightning.core.issues import PrepareReport
from animl_lightning.prepare.config import S3Settings
from animl_lightning.prepare.images import ImagesError, RetryPolicy, _with_retries, ensure_images, is_transient
from tests.fixtures.cct import write_cct
from tests.fixtures.files import solid_jpeg
from tests.fixtures.s3 import S3Server

BUCKET = "animl-images-serving-test"
FAST_RETRY = RetryPolicy(attempts=2, base_delay=0.01, max_delay=0.02, budget_s=5)


def _project(tmp_path: Path, images: list[dict[str, Any]]) -> pd.DataFrame:
    path = write_cct(tmp_path / "export.json", images, categories=[{"id": 0, "name": "empty"}])
    return load_cct(path, PrepareReport()).images


def _settings(server: S3Server, **overrides: Any) -> S3Settings:
    return S3Settings(
        **{"bucket": BUCKET, "endpoint_url": server.endpoint_url, "region": server.region, "workers": 4, **overrides}
    )


def test_downloads_missing_images_and_reports_permanent_failures(tmp_path: Path, s3_server: S3Server) -> None:
    a, b, e = solid_jpeg((64, 48), (255, 0, 0)), solid_jpeg((30, 20), (0, 255, 0)), solid_jpeg((16, 16), (0, 0, 255))
    s3_server.create_bucket(BUCKET, {"pre/original/a.jpg": a, "pre/original/b.jpg": b, "pre/cam/e é.jpg": e})
    images = _project(
        tmp_path,
        [
            {"id": "a", "file_name": "cam/a.jpg", "serving_bucket_key": "original/a.jpg", "width": 64, "height": 48},
            {"id": "b", "file_name": "cam/sub/b.jpg", "serving_bucket_key": "original/b.jpg"},
            {"id": "c", "file_name": "cam/c.jpg", "serving_bucket_key": "original/missing.jpg"},
            {"id": "d", "file_name": "cam/d.jpg", "serving_bucket_key": "original/../../secret.jpg"},
            {"id": "e", "file_name": "cam/e é.jpg"},  # no serving_bucket_key: the key is the file_name
        ],
    )
    images_dir = tmp_path / "images"
    report = PrepareReport()
    result = ensure_images(images, images_dir, _settings(s3_server, prefix="pre/"), report, retry=FAST_RETRY)

    assert result["available"].tolist() == [True, True, False, False, True]
    assert (images_dir / "cam/a.jpg").read_bytes() == a
    assert (images_dir / "cam/sub/b.jpg").read_bytes() == b
    assert (images_dir / "cam/e é.jpg").read_bytes() == e
    assert not (images_dir / "cam/c.jpg").exists() and not (tmp_path / "secret.jpg").exists()
    assert sorted(p.name for p in images_dir.rglob(".*")) == []  # no temporary files left
    counts = report.counts["images"]
    assert (counts["downloaded"], counts["failed"], counts["refused"], counts["present"]) == (3, 1, 1, 0)
    [failed] = report.issues_of("images", "download_failed")
    assert failed.record == "c" and failed.field == "s3_key" and "NoSuchKey" in failed.message
    [refused] = report.issues_of("images", "unsafe_s3_key")
    assert refused.record == "d" and refused.field == "s3_key"
    # sizes missing from the CCT file are read from the downloaded files
    assert result.loc[result["image_id"] == "b", ["width", "height"]].values.tolist() == [[30, 20]]
    assert {i.record for i in report.issues_of("images", "missing_size")} == {"b", "e"}


def test_present_files_of_the_right_size_are_kept_and_wrong_sizes_redownloaded(
    tmp_path: Path, s3_server: S3Server
) -> None:
    a, b = solid_jpeg((64, 48), (255, 0, 0)), solid_jpeg((64, 48), (0, 0, 255))
    s3_server.create_bucket(BUCKET, {"a.jpg": a, "b.jpg": b})
    images = _project(
        tmp_path,
        [
            {"id": "a", "file_name": "a.jpg", "width": 64, "height": 48},
            {"id": "b", "file_name": "b.jpg", "width": 64, "height": 48},
        ],
    )
    images_dir = tmp_path / "images"
    images_dir.mkdir()
    same_size = b"\0" * len(a)  # same size as the object: trusted, not fetched again
    (images_dir / "a.jpg").write_bytes(same_size)
    (images_dir / "b.jpg").write_bytes(b[: len(b) // 2])  # a half download from an older tool
    report = PrepareReport()
    result = ensure_images(images, images_dir, _settings(s3_server), report, retry=FAST_RETRY)
    assert result["available"].all()
    assert (images_dir / "a.jpg").read_bytes() == same_size
    assert (images_dir / "b.jpg").read_bytes() == b
    assert report.counts["images"]["present"] == 1 and report.counts["images"]["downloaded"] == 1

    again = PrepareReport()
    ensure_images(images, images_dir, _settings(s3_server), again, retry=FAST_RETRY)
    assert again.counts["images"]["present"] == 2 and again.counts["images"]["downloaded"] == 0


def test_unsafe_file_names_are_refused_before_any_request(tmp_path: Path, s3_server: S3Server) -> None:
    s3_server.create_bucket(BUCKET, {"x.jpg": b"data"})
    images = pd.DataFrame(
        {"image_id": ["u", "v"], "file_name": ["../x.jpg", "/etc/x.jpg"], "s3_key": ["x.jpg", "x.jpg"]}
    ).assign(width=pd.array([1, 1], dtype="Int64"), height=pd.array([1, 1], dtype="Int64"))
    report = PrepareReport()
    result = ensure_images(images, tmp_path / "images", _settings(s3_server), report)
    assert not result["available"].any()
    assert [(i.kind, i.record, i.field) for i in report.issues_of("images")] == [
        ("unsafe_file_name", "u", "file_name"),
        ("unsafe_file_name", "v", "file_name"),
    ]
    assert not (tmp_path / "x.jpg").exists()


def test_missing_bucket_stops_the_stage_with_a_clear_error(tmp_path: Path, s3_server: S3Server) -> None:
    images = _project(tmp_path, [{"id": "a", "file_name": "a.jpg"}, {"id": "b", "file_name": "b.jpg"}])
    with pytest.raises(ImagesError, match="NoSuchBucket"):
        ensure_images(images, tmp_path / "images", _settings(s3_server, bucket="no-such-bucket"), PrepareReport())


def test_credentials_never_reach_logs_or_report(
    tmp_path: Path, s3_server: S3Server, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "SECRETxSECRETxSECRET"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    s3_server.create_bucket(BUCKET, {"a.jpg": solid_jpeg((8, 8), (1, 2, 3))})
    images = _project(tmp_path, [{"id": "a", "file_name": "a.jpg"}, {"id": "m", "file_name": "missing.jpg"}])
    report = PrepareReport()
    with caplog.at_level(logging.DEBUG, logger="animl_lightning"):
        ensure_images(images, tmp_path / "images", _settings(s3_server), report, retry=FAST_RETRY)
    assert report.counts["images"]["downloaded"] == 1
    assert secret not in caplog.text and "testing" not in caplog.text
    assert secret not in json.dumps(report.to_dict())


def test_without_s3_missing_files_are_reported(tmp_path: Path) -> None:
    images_dir = tmp_path / "images"
    images_dir.mkdir()
    (images_dir / "a.jpg").write_bytes(solid_jpeg((20, 10), (9, 9, 9)))
    images = _project(tmp_path, [{"id": "a", "file_name": "a.jpg"}, {"id": "b", "file_name": "b.jpg"}])
    report = PrepareReport()
    result = ensure_images(images, images_dir, None, report)
    assert result["available"].tolist() == [True, False]
    [missing] = report.issues_of("images", "missing_image")
    assert missing.record == "b" and missing.field == "file_name"
    assert result["width"].tolist()[0] == 20


def _client_error(code: str, status: int) -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "Get"
    )


def test_transient_and_permanent_errors_are_told_apart() -> None:
    assert is_transient(_client_error("SlowDown", 503))
    assert is_transient(_client_error("InternalError", 500))
    assert is_transient(_client_error("Whatever", 502))
    assert is_transient(ReadTimeoutError(endpoint_url="http://x"))
    assert is_transient(ConnectionResetError())
    assert not is_transient(_client_error("NoSuchKey", 404))
    assert not is_transient(_client_error("AccessDenied", 403))
    assert not is_transient(_client_error("InvalidObjectState", 403))


def test_retries_are_bounded_by_attempts_and_budget() -> None:
    calls: list[float] = []

    def flaky() -> str:
        calls.append(time.monotonic())
        if len(calls) < 3:
            raise _client_error("SlowDown", 503)
        return "ok"

    policy = RetryPolicy(attempts=3, base_delay=0.001, max_delay=0.002, budget_s=10)
    assert _with_retries(flaky, policy, time.monotonic()) == "ok" and len(calls) == 3

    calls.clear()
    with pytest.raises(ClientError):
        _with_retries(flaky, RetryPolicy(attempts=2, base_delay=0.001, max_delay=0.002), time.monotonic())
    assert len(calls) == 2

    calls.clear()
    with pytest.raises(ClientError):  # the budget is already spent: no retry at all
        _with_retries(flaky, RetryPolicy(attempts=5, base_delay=0.001, budget_s=0), time.monotonic() - 1)
    assert len(calls) == 1

    def missing() -> str:
        calls.append(0.0)
        raise _client_error("NoSuchKey", 404)

    calls.clear()
    with pytest.raises(ClientError):
        _with_retries(missing, policy, time.monotonic())
    assert len(calls) == 1  # permanent errors are not retried
