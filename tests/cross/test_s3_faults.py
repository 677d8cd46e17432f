"""S3 downloads under faults: a real moto server on loopback behind :mod:`tests.fixtures.fault_proxy`.

Transient faults (503 SlowDown, 500 InternalError, a connection reset in the middle of the body, a response slower
than ``s3.read_timeout``) on the first requests for a key are retried with backoff and the download succeeds with
the right bytes in bounded time. A key that always fails (NoSuchKey, AccessDenied, a permanent 500) is reported
and the other images still arrive. Credentials never appear in logs, the report, stdout or stderr.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pandas as pd
import pytest

import animl_lightning.prepare.images as images_module
from animl_lightning.core.issues import PrepareReport
from animl_lightning.prepare.config import S3Settings
from animl_lightning.prepare.images import RetryPolicy, ensure_images
from tests.fixtures.cct import keyed_images_cct
from tests.fixtures.fault_proxy import FaultProxy, FaultRule, fault_proxy, moto_server
from tests.fixtures.files import noise_jpeg, write_json
from tests.fixtures.hydra import REPO_ROOT
from tests.fixtures.s3 import aws_environment

ROOT = REPO_ROOT
ACCESS_KEY_ID = "AKIARELIABILITYTEST7"
SECRET = "reliability/Secret+Value=Never-Log-Me-42"
SESSION_TOKEN = "reliability-session-token-must-stay-hidden"
FAST_RETRY = RetryPolicy(attempts=4, base_delay=0.05, max_delay=0.4, budget_s=20.0)


def aws_env() -> dict[str, str]:
    """Credentials of a throwaway identity, and no shared config files from the host."""
    return aws_environment(ACCESS_KEY_ID, SECRET, SESSION_TOKEN)


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    with moto_server() as url:
        yield url


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in aws_env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)


@pytest.fixture
def proxy(endpoint: str) -> Iterator[FaultProxy]:
    with fault_proxy(endpoint) as started:
        yield started


def make_bucket(endpoint: str, objects: dict[str, bytes]) -> str:
    """A fresh bucket on the moto server (not through the proxy) holding ``objects``."""
    bucket = f"faults-{uuid.uuid4().hex[:12]}"
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    client.create_bucket(Bucket=bucket)
    for key, body in objects.items():
        client.put_object(Bucket=bucket, Key=key, Body=body)
    return bucket


def images_table(keys: list[str]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "image_id": [f"img{i}" for i in range(len(keys))],
            "file_name": [f"cam/{Path(k).name}" for k in keys],
            "location": "loc",
            "datetime": "",
            "seq_id": "",
            "width": pd.array([48] * len(keys), dtype="Int64"),
            "height": pd.array([32] * len(keys), dtype="Int64"),
            "s3_key": keys,
        }
    )


def settings(bucket: str, proxy: FaultProxy, **overrides: Any) -> S3Settings:
    values: dict[str, Any] = {
        "bucket": bucket,
        "endpoint_url": proxy.url,
        "region": "us-east-1",
        "workers": 4,
        "max_attempts": 2,
        "connect_timeout": 2.0,
        "read_timeout": 2.0,
    }
    values.update(overrides)
    return S3Settings(**values)


class SleepSpy:
    """Stands in for the ``time`` module inside ``animl_lightning.prepare.images`` and records every backoff."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.delays.append(seconds)
        time.sleep(seconds)

    def monotonic(self) -> float:
        return time.monotonic()


FAULT_CASES = [
    pytest.param(FaultRule("serving/a.jpg", "slowdown", count=3, methods=("GET",)), {}, id="503-slowdown"),
    pytest.param(FaultRule("serving/a.jpg", "internal", count=3, methods=("GET",)), {}, id="500-internal-error"),
    pytest.param(FaultRule("serving/a.jpg", "reset", count=3, methods=("GET",)), {}, id="connection-reset"),
    pytest.param(
        FaultRule("serving/a.jpg", "delay", count=2, methods=("GET",), delay_s=1.5),
        {"read_timeout": 0.5},
        id="slow-response",
    ),
]


@pytest.mark.parametrize(("rule", "overrides"), FAULT_CASES)
def test_transient_faults_are_retried_until_the_download_succeeds(
    aws: None,
    endpoint: str,
    proxy: FaultProxy,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    rule: FaultRule,
    overrides: dict[str, Any],
) -> None:
    objects = {"serving/a.jpg": noise_jpeg(1), "serving/b.jpg": noise_jpeg(2)}
    bucket = make_bucket(endpoint, objects)
    proxy.add(rule)
    spy = SleepSpy()
    monkeypatch.setattr(images_module, "time", spy)
    report = PrepareReport()

    start = time.monotonic()
    result = ensure_images(
        images_table(list(objects)), tmp_path, settings(bucket, proxy, **overrides), report, retry=FAST_RETRY
    )
    elapsed = time.monotonic() - start

    assert result["available"].all(), report.issues
    assert not report.issues_of("images", "download_failed")
    for key, body in objects.items():
        assert (tmp_path / "cam" / Path(key).name).read_bytes() == body
    assert not list(tmp_path.rglob("*.tmp-*")), "a temporary download file was left behind"
    gets = [r for r in proxy.requests_for("serving/a.jpg") if r.method == "GET"]
    assert [r.fault for r in gets] == [rule.fault] * rule.count + [None]  # every fault retried, then success
    # our backoff: exponential with full jitter, each wait within its cap, the whole download bounded
    for attempt, delay in enumerate(spy.delays, start=1):
        assert 0 <= delay <= min(FAST_RETRY.max_delay, FAST_RETRY.base_delay * 2 ** (attempt - 1)) + 1e-9
    assert elapsed < 30


def test_permanently_failing_keys_are_reported_and_the_run_goes_on(
    aws: None, endpoint: str, proxy: FaultProxy, tmp_path: Path
) -> None:
    objects = {f"serving/{name}.jpg": noise_jpeg(i) for i, name in enumerate(["ok1", "denied", "broken", "ok2"])}
    bucket = make_bucket(endpoint, objects)
    proxy.add(FaultRule("serving/denied.jpg", "denied", count=None))
    proxy.add(FaultRule("serving/broken.jpg", "internal", count=None))
    keys = [*objects, "serving/missing.jpg"]
    report = PrepareReport()
    s3 = settings(bucket, proxy, max_attempts=2)

    start = time.monotonic()
    result = ensure_images(images_table(keys), tmp_path, s3, report, retry=FAST_RETRY)
    elapsed = time.monotonic() - start

    available = dict(zip(result["s3_key"], result["available"], strict=True))
    assert available == {
        "serving/ok1.jpg": True,
        "serving/denied.jpg": False,
        "serving/broken.jpg": False,
        "serving/ok2.jpg": True,
        "serving/missing.jpg": False,
    }
    failed = {i.record: i for i in report.issues_of("images", "download_failed")}
    assert set(failed) == {"img1", "img2", "img4"}
    assert "AccessDenied" in failed["img1"].message and "serving/denied.jpg" in failed["img1"].message
    assert "InternalError" in failed["img2"].message or "500" in failed["img2"].message
    assert "NoSuchKey" in failed["img4"].message or "404" in failed["img4"].message
    assert all(i.field == "s3_key" for i in failed.values())
    # retried, but boundedly: botocore's attempts (1 + s3.max_attempts) inside each of our attempts
    broken = proxy.requests_for("serving/broken.jpg")
    assert 2 <= len(broken) <= (1 + s3.max_attempts) * FAST_RETRY.attempts
    # permanent errors are not retried
    assert len(proxy.requests_for("serving/denied.jpg")) == 1
    assert elapsed < 60
    assert not (tmp_path / "cam" / "denied.jpg").exists() and not (tmp_path / "cam" / "broken.jpg").exists()
    assert not list(tmp_path.rglob("*.tmp-*"))


def test_retry_time_is_bounded_by_the_budget(aws: None, endpoint: str, proxy: FaultProxy, tmp_path: Path) -> None:
    bucket = make_bucket(endpoint, {"serving/slow.jpg": noise_jpeg(5)})
    proxy.add(FaultRule("serving/slow.jpg", "slowdown", count=None))
    report = PrepareReport()
    policy = RetryPolicy(attempts=100, base_delay=0.2, max_delay=0.2, budget_s=1.5)
    start = time.monotonic()
    result = ensure_images(
        images_table(["serving/slow.jpg"]), tmp_path, settings(bucket, proxy, max_attempts=1), report, retry=policy
    )
    elapsed = time.monotonic() - start
    assert not result["available"].any()
    assert report.issues_of("images", "download_failed")
    # no retry starts after the budget; botocore's own backoff (< 2 s per attempt here) may finish one
    assert elapsed < policy.budget_s + 6


def test_present_files_of_the_right_size_are_not_downloaded_again(
    aws: None, endpoint: str, proxy: FaultProxy, tmp_path: Path
) -> None:
    objects = {"serving/a.jpg": noise_jpeg(1), "serving/b.jpg": noise_jpeg(2)}
    bucket = make_bucket(endpoint, objects)
    (tmp_path / "cam").mkdir()
    (tmp_path / "cam" / "a.jpg").write_bytes(objects["serving/a.jpg"])
    (tmp_path / "cam" / "b.jpg").write_bytes(objects["serving/b.jpg"][:100])  # a partial file from elsewhere
    report = PrepareReport()
    result = ensure_images(images_table(list(objects)), tmp_path, settings(bucket, proxy), report, retry=FAST_RETRY)
    assert result["available"].all()
    assert [r.method for r in proxy.requests_for("serving/a.jpg")] == ["HEAD"]
    assert (tmp_path / "cam" / "b.jpg").read_bytes() == objects["serving/b.jpg"]


def _secrets_in(text: str) -> list[str]:
    return [s for s in (ACCESS_KEY_ID, SECRET, SESSION_TOKEN) if s in text]


def test_credentials_never_appear_in_logs_or_the_report(
    aws: None,
    endpoint: str,
    proxy: FaultProxy,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    objects = {"serving/ok.jpg": noise_jpeg(1), "serving/denied.jpg": noise_jpeg(2), "serving/flaky.jpg": noise_jpeg(3)}
    bucket = make_bucket(endpoint, objects)
    proxy.add(FaultRule("serving/denied.jpg", "denied", count=None))
    proxy.add(FaultRule("serving/flaky.jpg", "reset", count=1))
    caplog.set_level(logging.INFO)
    caplog.set_level(logging.DEBUG, logger="animl_lightning")
    report = PrepareReport()
    ensure_images(
        images_table([*objects, "serving/missing.jpg"]), tmp_path, settings(bucket, proxy), report, retry=FAST_RETRY
    )
    report.write(tmp_path / "prepare_report.json")
    captured = capsys.readouterr()

    assert report.issues_of("images", "download_failed")  # there were errors to leak through
    assert not _secrets_in(caplog.text)
    assert not _secrets_in((tmp_path / "prepare_report.json").read_text(encoding="utf-8"))
    assert not _secrets_in(captured.out + captured.err)


def test_prepare_command_line_keeps_credentials_out_of_output_and_logs(
    aws: None, endpoint: str, proxy: FaultProxy, tmp_path: Path
) -> None:
    keys = [f"serving/img{i}.jpg" for i in range(12)]
    objects = {k: noise_jpeg(i) for i, k in enumerate(keys)}
    bucket = make_bucket(endpoint, objects)
    proxy.add(FaultRule("serving/img3.jpg", "denied", count=None))
    proxy.add(FaultRule("serving/img5.jpg", "slowdown", count=2, methods=("GET",)))
    write_json(tmp_path / "export.json", keyed_images_cct([*keys, "serving/missing.jpg"]))
    out = tmp_path / "out"
    result = subprocess.run(
        [
            sys.executable,
            "prepare.py",
            f"coco_file={tmp_path / 'export.json'}",
            f"images_dir={tmp_path / 'images'}",
            f"output_dir={out}",
            f"s3.bucket={bucket}",
            f"s3.endpoint_url={proxy.url}",
            "s3.region=us-east-1",
            "s3.max_attempts=2",
            "crops.workers=1",
            "split.min_locs=1",
            "split.trials=50",
        ],
        cwd=ROOT,
        env={**os.environ, **aws_env(), "HYDRA_FULL_ERROR": "1"},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "prepare_report.json").read_text(encoding="utf-8"))
    failed = {i["record"] for i in report["issues"] if i["kind"] == "download_failed"}
    assert failed == {"img3", "img12"}
    assert (tmp_path / "images" / "cam" / "img5.jpg").read_bytes() == objects["serving/img5.jpg"]
    texts = [result.stdout, result.stderr]
    texts += [
        p.read_text(encoding="utf-8", errors="replace")
        for p in out.rglob("*")
        if p.is_file() and p.suffix in {".json", ".log", ".yaml", ".csv"}
    ]
    for text in texts:
        assert not _secrets_in(text)


def test_s3_max_attempts_is_the_number_of_tries_per_object(
    aws: None, endpoint: str, proxy: FaultProxy, tmp_path: Path
) -> None:
    bucket = make_bucket(endpoint, {"serving/down.jpg": noise_jpeg(7)})
    proxy.add(FaultRule("serving/down.jpg", "internal", count=None))
    report = PrepareReport()
    ensure_images(
        images_table(["serving/down.jpg"]),
        tmp_path,
        settings(bucket, proxy, max_attempts=2),
        report,
        retry=RetryPolicy(attempts=1),
    )
    assert report.issues_of("images", "download_failed")
    assert len(proxy.requests_for("serving/down.jpg")) == 2
