"""The images stage: make sure every image is on disk at ``images_dir/<file_name>``, downloading from S3 if asked.

Without S3 the stage only checks which files exist. With ``s3.bucket`` set, missing images are downloaded
concurrently (``s3.workers`` threads sharing one boto3 client) from ``s3.prefix + s3_key``:

* a file already present with the size S3 reports (HEAD ``ContentLength``) is kept, not downloaded again;
* each download streams into a temporary file in the destination folder that is renamed into place only once the
  byte count matches ``ContentLength`` (:func:`~animl_lightning.core.files.atomic_write`);
* transient errors (throttling, 5xx, connection resets, timeouts, short reads) are retried with exponential backoff
  and full jitter, on top of botocore's own adaptive retries, within a bounded number of attempts and total time;
* permanent errors (``NoSuchKey``/404, ``AccessDenied``/403, ``InvalidObjectState``, ...) are reported and the run
  goes on; errors that would fail every object (no credentials, no such bucket, unknown profile) stop the stage
  with :class:`ImagesError` instead of producing one report line per image;
* a ``file_name`` or key with ``..``, an absolute path, a backslash or an empty component is refused before any
  request is made.

Credentials come from the standard AWS chain (``s3.profile`` selects a profile); neither they nor the client
configuration are ever logged.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import sys
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pandas as pd
from tqdm import tqdm

from animl_lightning.core.errors import ConfigError, DataError
from animl_lightning.core.files import UnsafePathError, atomic_write, remove_stale_temporaries, safe_join, safe_relative
from animl_lightning.core.image_boxes import fill_image_sizes
from animl_lightning.core.issues import PrepareReport
from animl_lightning.prepare.config import S3Settings
from animl_lightning.prepare.stage import RAN, SKIPPED, PrepareRun, Stage, StageOutcome, fingerprint_of, need

log = logging.getLogger(__name__)

STAGE = "images"
# Downloads whose outcome decides an early stop: when all of them fail for one network reason, the rest would too.
EARLY_STOP_AFTER = 8
# Without a terminal for the progress bar, a progress line this often (seconds).
PROGRESS_EVERY_S = 10.0
_CHUNK = 1 << 20
_T = TypeVar("_T")

# S3 error codes worth retrying: throttling and server-side trouble.
TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "RequestThrottledException",
        "TooManyRequestsException",
        "ProvisionedThroughputExceededException",
        "RequestLimitExceeded",
        "BandwidthLimitExceeded",
        "RequestTimeout",
        "RequestTimeoutException",
        "InternalError",
        "ServiceUnavailable",
        "ServiceUnavailableException",
        "500",
        "502",
        "503",
        "504",
    }
)
# Errors that every object of the run would hit: stop instead of reporting each image.
FATAL_CODES = frozenset(
    {
        "NoSuchBucket",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "InvalidToken",
        "AuthorizationHeaderMalformed",
    }
)


class ImagesError(ConfigError):
    """The images stage cannot run at all (S3 settings or credentials); the message names the setting."""


@dataclass(frozen=True)
class RetryPolicy:
    """Our retries around each S3 request (botocore retries inside each attempt as well).

    Attributes:
        attempts: tries per object for transient errors, the first included.
        base_delay: backoff before the second try, seconds; doubles each time, with full jitter.
        max_delay: longest single backoff, seconds.
        budget_s: no retry starts after this many seconds spent on one object.
    """

    attempts: int = 4
    base_delay: float = 0.5
    max_delay: float = 20.0
    budget_s: float = 300.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise DataError(f"RetryPolicy.attempts must be >= 1, got {self.attempts}")
        if self.base_delay < 0 or self.max_delay < 0 or self.budget_s < 0:
            raise DataError("RetryPolicy delays and budget must be >= 0")


class _ShortReadError(Exception):
    """The body ended before ``ContentLength`` bytes (a dropped connection); retried."""


class _FatalError(Exception):
    """An error every remaining object would hit too; ends the stage."""


def _error_code(err: BaseException) -> tuple[str, int]:
    from botocore.exceptions import ClientError

    if isinstance(err, ClientError):
        response: Any = err.response or {}
        code = str(response.get("Error", {}).get("Code", ""))
        status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        return code, status
    return "", 0


def is_transient(err: BaseException) -> bool:
    """Whether an S3 request error is worth retrying (throttling, 5xx, connection trouble, timeouts)."""
    from botocore.exceptions import (
        ClientError,
        ConnectionClosedError,
        ConnectTimeoutError,
        EndpointConnectionError,
        IncompleteReadError,
        ReadTimeoutError,
        ResponseStreamingError,
    )
    from urllib3.exceptions import HTTPError as Urllib3Error

    if isinstance(err, ClientError):
        code, status = _error_code(err)
        return code in TRANSIENT_CODES or status == 429 or status >= 500
    return isinstance(
        err,
        (
            _ShortReadError,
            ConnectionClosedError,
            ConnectTimeoutError,
            EndpointConnectionError,
            IncompleteReadError,
            ReadTimeoutError,
            ResponseStreamingError,
            Urllib3Error,
            ConnectionError,
            TimeoutError,
        ),
    )


def network_failure(err: BaseException) -> str | None:
    """The network reason an S3 request failed (refused, DNS, connect or read timeout, dropped), else None."""
    from botocore.exceptions import (
        ConnectionClosedError,
        ConnectTimeoutError,
        EndpointConnectionError,
        ProxyConnectionError,
        ReadTimeoutError,
    )

    if isinstance(err, ConnectTimeoutError):
        return "connect timeout"
    if isinstance(err, ReadTimeoutError):
        return "read timeout (the endpoint accepted the connection but never answered)"
    if isinstance(err, ProxyConnectionError):
        return "cannot reach the proxy"
    if isinstance(err, EndpointConnectionError):
        return "cannot connect (refused, or the host name does not resolve)"
    if isinstance(err, ConnectionClosedError):
        return "connection closed by the endpoint"
    return None


def _is_fatal(err: BaseException) -> bool:
    from botocore.exceptions import NoCredentialsError, PartialCredentialsError

    if isinstance(err, (NoCredentialsError, PartialCredentialsError)):
        return True
    return _error_code(err)[0] in FATAL_CODES


def _with_retries(call: Callable[[], _T], policy: RetryPolicy, start: float) -> _T:
    attempt = 1
    while True:
        try:
            return call()
        except Exception as err:
            if not is_transient(err) or attempt >= policy.attempts:
                raise
            delay = random.uniform(0.0, min(policy.max_delay, policy.base_delay * 2 ** (attempt - 1)))
            if time.monotonic() + delay - start > policy.budget_s:
                raise
            log.debug("transient S3 error (attempt %d of %d): %s", attempt, policy.attempts, err)
            time.sleep(delay)
            attempt += 1


def _download(client: Any, bucket: str, key: str, path: Path) -> int:
    response = client.get_object(Bucket=bucket, Key=key)
    expected = int(response["ContentLength"])
    body = response["Body"]
    received = 0
    try:
        with atomic_write(path, "wb") as handle:
            for chunk in body.iter_chunks(_CHUNK):
                handle.write(chunk)
                received += len(chunk)
            if received != expected:
                raise _ShortReadError(f"received {received} of {expected} bytes")
    finally:
        body.close()
    return received


def _fetch(client: Any, bucket: str, key: str, path: Path, policy: RetryPolicy) -> str:
    """Make ``path`` hold object ``key``; returns ``present``, ``present_unverified`` or ``downloaded``."""
    start = time.monotonic()
    if path.is_file():
        local = path.stat().st_size
        try:
            head = _with_retries(lambda: client.head_object(Bucket=bucket, Key=key), policy, start)
        except Exception as err:
            if _is_fatal(err):
                raise
            # The file is there but S3 cannot confirm its size; keep it rather than lose a usable image.
            log.debug("cannot verify %s against s3://%s/%s: %s", path, bucket, key, err)
            return "present_unverified"
        if int(head["ContentLength"]) == local:
            return "present"
    _with_retries(lambda: _download(client, bucket, key, path), policy, start)
    return "downloaded"


def _client(s3: S3Settings, attempts: int | None = None) -> Any:
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError

    try:
        session = boto3.session.Session(profile_name=s3.profile, region_name=s3.region)
        return session.client(
            "s3",
            endpoint_url=s3.endpoint_url,
            config=Config(
                # total_max_attempts counts the first request too, so s3.max_attempts is tries per request.
                retries={"total_max_attempts": attempts or s3.max_attempts, "mode": "adaptive"},
                connect_timeout=s3.connect_timeout,
                read_timeout=s3.read_timeout,
                max_pool_connections=max(10, s3.workers),
            ),
        )
    except BotoCoreError as err:  # e.g. ProfileNotFound; the message names the profile, never a secret
        raise ImagesError(f"s3: cannot create the S3 client: {err}") from err


def _where(s3: S3Settings) -> str:
    """The endpoint and the timeouts in force, for messages (never credentials)."""
    endpoint = s3.endpoint_url or f"AWS S3 ({s3.region or 'default region'})"
    return (
        f"{endpoint} (s3.connect_timeout={s3.connect_timeout:g}s, s3.read_timeout={s3.read_timeout:g}s, "
        f"s3.max_attempts={s3.max_attempts})"
    )


def probe_endpoint(s3: S3Settings) -> None:
    """One request to the bucket, tried once, before hundreds of downloads wait on an endpoint that is not there.

    Raises:
        ImagesError: the endpoint cannot be reached (refused, DNS, timeouts), naming it, the reason and the timeouts.
            Any answer, an access error included, means the endpoint is there and the downloads go ahead.
    """
    try:
        _client(s3, attempts=1).head_bucket(Bucket=s3.bucket)
    except Exception as err:
        reason = network_failure(err)
        if reason is not None:
            raise ImagesError(
                f"s3: cannot reach {_where(s3)}: {reason}; check s3.endpoint_url and the network"
            ) from err


def _paths(images: pd.DataFrame, images_dir: Path, report: PrepareReport) -> list[Path | None]:
    paths: list[Path | None] = []
    for image_id, file_name in zip(
        images["image_id"].to_numpy(dtype=object), images["file_name"].to_numpy(dtype=object), strict=True
    ):
        try:
            paths.append(safe_join(images_dir, str(file_name)))
        except UnsafePathError as err:
            report.add(STAGE, "unsafe_file_name", f"refused: {err}", record=str(image_id), field="file_name")
            paths.append(None)
    return paths


def ensure_images(
    images: pd.DataFrame,
    images_dir: Path,
    s3: S3Settings | None,
    report: PrepareReport,
    *,
    retry: RetryPolicy | None = None,
) -> pd.DataFrame:
    """Check (and with ``s3``, download) every image; return ``images`` with an ``available`` column.

    Missing ``width``/``height`` of available images are then read from the files
    (:func:`animl_lightning.core.image_boxes.fill_image_sizes`), so later stages see every available image's size.

    Args:
        images: the images table (``image_id``, ``file_name``, ``s3_key``, ``width``, ``height``).
        images_dir: folder holding (or receiving) ``<file_name>``.
        s3: where to download missing images from; ``None`` to only check the folder.
        report: receives the issues and the counts ``present``, ``downloaded``, ``failed``, ``refused``, ``missing``.
        retry: our retry policy for transient S3 errors (tests shorten it).

    Raises:
        ImagesError: the S3 client cannot be created, there are no credentials, or the bucket does not exist.
    """
    images_dir = Path(images_dir)
    paths = _paths(images, images_dir, report)
    available = np.zeros(len(images), dtype=bool)
    refused = sum(p is None for p in paths)
    report.count(STAGE, "refused", refused)
    if s3 is None or s3.bucket is None:
        image_ids = images["image_id"].to_numpy(dtype=object)
        for row, path in enumerate(paths):
            if path is None:
                continue
            if path.is_file():
                available[row] = True
            else:
                report.add(
                    STAGE, "missing_image", f"{path} does not exist", record=str(image_ids[row]), field="file_name"
                )
        report.count(STAGE, "present", int(available.sum()))
        report.count(STAGE, "missing", len(paths) - refused - int(available.sum()))
    else:
        available = _download_all(images, paths, s3, report, retry or RetryPolicy())
    result = images.assign(available=available)
    return fill_image_sizes(result, images_dir, report)


def _download_all(
    images: pd.DataFrame, paths: list[Path | None], s3: S3Settings, report: PrepareReport, policy: RetryPolicy
) -> np.ndarray:
    assert s3.bucket is not None
    bucket = s3.bucket
    image_ids = images["image_id"].to_numpy(dtype=object)
    keys = (
        images["s3_key"].to_numpy(dtype=object)
        if "s3_key" in images.columns
        else images["file_name"].to_numpy(dtype=object)
    )
    available = np.zeros(len(images), dtype=bool)
    tasks: list[tuple[int, str, Path]] = []
    for row, path in enumerate(paths):
        if path is None:
            continue
        key = str(keys[row]) or str(images["file_name"].iat[row])
        try:
            safe_relative(key)
        except UnsafePathError as err:
            report.add(STAGE, "unsafe_s3_key", f"refused: {err}", record=str(image_ids[row]), field="s3_key")
            report.count(STAGE, "refused")
            continue
        tasks.append((row, s3.prefix + key, path))
    if not tasks:
        return available

    log.info("images: %d images to check or download from s3://%s at %s", len(tasks), bucket, _where(s3))
    probe_endpoint(s3)
    client = _client(s3)
    counts = {"downloaded": 0, "present": 0, "present_unverified": 0, "failed": 0}
    window = max(1, s3.workers) * 4
    progress = tqdm(total=len(tasks), unit="img", desc="images", disable=not sys.stderr.isatty())
    first_reasons: list[str | None] = []
    last_log = [time.monotonic()]

    def settle(future: Future[str], row: int, key: str) -> None:
        try:
            status = future.result()
        except Exception as err:
            if _is_fatal(err):
                raise _FatalError(f"s3://{bucket}: {err}") from err
            if len(first_reasons) < EARLY_STOP_AFTER:
                first_reasons.append(network_failure(err))
                decided = len(first_reasons) == min(EARLY_STOP_AFTER, len(tasks))
                if decided and len(set(first_reasons)) == 1 and first_reasons[0] is not None:
                    raise _FatalError(
                        f"the first {len(first_reasons)} downloads from {_where(s3)} all failed: {first_reasons[0]}"
                    ) from err
            code, status_code = _error_code(err)
            reason = code or type(err).__name__
            report.add(
                STAGE,
                "download_failed",
                f"s3://{bucket}/{key}: {reason}" + (f" (HTTP {status_code})" if status_code else "") + f": {err}",
                file=f"s3://{bucket}/{key}",
                record=str(image_ids[row]),
                field="s3_key",
                action="failed",
            )
            counts["failed"] += 1
        else:
            counts[status] += 1
            available[row] = True
            if len(first_reasons) < EARLY_STOP_AFTER:
                first_reasons.append("ok")
        progress.update(1)
        if progress.disable and time.monotonic() - last_log[0] >= PROGRESS_EVERY_S:
            last_log[0] = time.monotonic()
            done = sum(counts.values())
            log.info("images: %d/%d done (%d failed so far)", done, len(tasks), counts["failed"])

    pending: dict[Future[str], tuple[int, str]] = {}
    try:
        with ThreadPoolExecutor(max_workers=s3.workers, thread_name_prefix="s3-download") as pool:
            try:
                for row, key, path in tasks:
                    pending[pool.submit(_fetch, client, bucket, key, path, policy)] = (row, key)
                    if len(pending) >= window:
                        done, _ = wait(pending, return_when=FIRST_COMPLETED)
                        for future in done:
                            settle(future, *pending.pop(future))
                for future in list(pending):
                    wait([future])
                    settle(future, *pending.pop(future))
            except _FatalError:
                for future in pending:
                    future.cancel()
                raise
    except _FatalError as err:
        raise ImagesError(f"s3: {err} (check s3.endpoint_url, s3.bucket, s3.profile and the credentials)") from err
    finally:
        progress.close()
    for name, value in counts.items():
        report.count(STAGE, name, value)
    log.info(
        "images: %d downloaded, %d already present, %d failed",
        counts["downloaded"],
        counts["present"] + counts["present_unverified"],
        counts["failed"],
    )
    return available


class ImagesStage(Stage):
    """Make every image available; after a finished download of the same export, only check that they still are."""

    name = STAGE

    def fingerprint(self, run: PrepareRun) -> str | None:
        """The CCT file, the images folder and the S3 settings."""
        return fingerprint_of(run.coco_digest(), str(run.images_dir), dataclasses.asdict(run.settings.s3))

    def run(self, run: PrepareRun) -> StageOutcome:
        """Leave the images table (with ``available``) on ``run.images``."""
        project = need(run.project, "the ingested project")
        s3 = run.settings.s3 if run.settings.s3.bucket else None
        status = RAN
        if s3 is not None:
            # A download killed mid-transfer leaves its temporary file in images_dir; nothing else removes it.
            stale = remove_stale_temporaries(run.images_dir)
            if stale:
                run.report.count(STAGE, "stale_temporaries_removed", stale)
        if s3 is not None and run.is_current(self.name, self.fingerprint(run)):
            # A finished download of the same export: only confirm the files are still there (no S3 requests).
            images = ensure_images(project.images, run.images_dir, None, run.report)
            if not bool(images["available"].all()):
                images = ensure_images(project.images, run.images_dir, s3, run.report)
            else:
                status = SKIPPED
        else:
            images = ensure_images(project.images, run.images_dir, s3, run.report)
        run.images = images
        counts = {"available": int(images["available"].sum()), "images": len(images)}
        return StageOutcome(status, f"{counts['available']}/{counts['images']} available", counts)
