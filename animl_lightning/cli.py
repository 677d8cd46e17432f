"""The Hydra edge shared by every command: where the configs are, one-line errors, and Hydra-specific plumbing.

``prepare.py``, ``train.py`` and ``python -m animl_lightning.{classify,export,serve,report,review}`` compose their config
from :data:`CONFIG_DIR` and run their work through :func:`run_command`, which turns the project's errors
(:class:`~animl_lightning.core.errors.AnimlError`), configuration mistakes Hydra reports while instantiating, and
environment failures (a full disk, a folder that is a file, no permission) into one line on stderr with exit status
2, and Ctrl-C into ``interrupted; run the same command to resume`` with status 130. Anything else is a bug and keeps
its traceback.

In a sweep (``-m``) a failed job must not end the sweep: :func:`run_command` then logs the error, records the job
as failed in its ``results.json`` and returns None, so Hydra runs the next job; the sweep summary lists the job as
``FAILED`` and the process exits non-zero at the end (:mod:`animl_lightning.hydra_callbacks`).

This module, :mod:`animl_lightning.hydra_callbacks` and the command modules are the only package modules that
import Hydra or OmegaConf.
"""

from __future__ import annotations

import errno
import functools
import inspect
import logging
import os
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar, cast

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, read_write

from animl_lightning.core.errors import AnimlError, ConfigError
from animl_lightning.train.sweeps import write_failed_run

log = logging.getLogger(__name__)

# The repository's configs/ folder: every command composes from here (the package is installed editable from the
# checkout, which is how the README installs it).
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
INTERRUPTED_MESSAGE = "interrupted; run the same command to resume"
EXIT_ERROR = 2
EXIT_INTERRUPTED = 130
# Failures of the machine or the file system, not of the code: reported in one line like bad input.
ENVIRONMENT_ERRNOS = frozenset(
    {
        errno.ENOSPC,
        errno.EDQUOT,
        errno.EACCES,
        errno.EPERM,
        errno.EROFS,
        errno.ENOENT,
        errno.EISDIR,
        errno.ENOTDIR,
        errno.EEXIST,
        errno.ENAMETOOLONG,
    }
)
# Set by Lightning's DDP launcher in the launching process (see ddp_children_rerun_this_job).
DDP_ENV_VARIABLES: tuple[str, ...] = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")

T = TypeVar("T")


class _NoAdverts(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


def quiet_library_noise() -> None:
    """Drop the library messages that tell a user nothing about their run (each checked against the installed one).

    Lightning's advert for its cloud logger on every run, and the ``LeafSpec`` deprecation that Lightning's own
    ``_pytree`` triggers on every evaluation (torch 2.10 and later).
    """
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        target = logging.getLogger(name)
        if not any(isinstance(f, _NoAdverts) for f in target.filters):
            target.addFilter(_NoAdverts())


def user_error(err: BaseException) -> str | None:
    """The one-line message of an error that is the user's or the machine's, else None (a bug)."""
    if isinstance(err, InstantiationException):
        cause = err.__cause__
        if cause is not None and (message := user_error(cause)) is not None:
            return message
        # Hydra's own message names the target and the config key; its first and last lines say it all.
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        return " ".join(lines)
    if isinstance(err, AnimlError):
        return str(err)
    if isinstance(err, OSError) and err.errno in ENVIRONMENT_ERRNOS:
        where = f"{os.fsdecode(err.filename)}: " if err.filename else ""
        return f"{where}{err.strerror or err}"
    return None


def in_sweep() -> bool:
    """Whether this process runs a job of a Hydra multirun."""
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def run_command(
    task: Callable[[], T],
    command: str,
    output_dir: str | Path | None = None,
    resume_hint: Callable[[], str] | None = None,
) -> T | None:
    """Run a command's work with the error policy of the module docstring.

    Args:
        task: the work.
        command: the command's name, first word of every error line (``train.py``, ``classify``, ...).
        output_dir: the job's folder, where a failed sweep job records its failure.
        resume_hint: what to say after Ctrl-C when running the same command again is not how to resume.
    """
    quiet_library_noise()
    try:
        return task()
    except KeyboardInterrupt:
        print(f"{command}: {resume_hint() if resume_hint else INTERRUPTED_MESSAGE}", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except Exception as err:
        message = user_error(err)
        if in_sweep():
            # The sweep goes on: this job is a FAILED row, and the sweep's end says that jobs failed.
            reason = message or f"{type(err).__name__}: {err}"
            log.error("%s: job failed: %s", command, reason, exc_info=message is None)
            if output_dir is not None:
                write_failed_run(output_dir, reason)
            return None
        if message is None:
            raise
        log.debug("%s failed", command, exc_info=True)
        print(f"{command}: error: {message}", file=sys.stderr)
        sys.exit(EXIT_ERROR)


def instantiate_named(section: DictConfig | None, group: str) -> list[Any]:
    """Instantiate every entry of a named dict of configs (``callbacks``, ``logger``); null entries are skipped."""
    if not section:
        return []
    objects = []
    for key, entry in section.items():
        if entry is None:
            continue
        if not isinstance(entry, DictConfig) or "_target_" not in entry:
            name = str(key)
            raise ConfigError(f"{group}.{name}: expected a config with a _target_, got {entry!r}")
        objects.append(instantiate(entry))
    return objects


def checked_partial(factory: Any, key: str, first_argument: str) -> Any:
    """A ``_partial_`` factory whose stored keywords its target accepts; else :class:`ConfigError` naming them.

    Hydra only calls a partial later (the optimizer once the model's parameters exist), so a misspelt key such as
    ``+optimizer.learning_rate`` would otherwise fail as a traceback in the middle of ``trainer.fit``.
    """
    if factory is None:
        return None
    if not isinstance(factory, functools.partial):
        raise ConfigError(f"{key}: expected a _partial_: true config, got {type(factory).__name__}")
    target = factory.func
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):
        return factory
    try:
        signature.bind(first_argument, *factory.args, **factory.keywords)
    except TypeError as err:
        accepted = [name for name in signature.parameters if name not in {first_argument, "self"}]
        name = getattr(target, "__name__", str(target))
        raise ConfigError(f"{key}: {name} does not take these settings ({err}); it takes {accepted}") from err
    return factory


def hydra_config() -> DictConfig | None:
    """The running job's Hydra config, or None outside ``@hydra.main`` (a notebook, a test without it)."""
    # HydraConfig.get() is typed as the HydraConf dataclass but returns its DictConfig.
    return cast(DictConfig, HydraConfig.get()) if HydraConfig.initialized() else None


def overridden(key: str) -> bool:
    """Whether ``key`` was set on the command line of this run."""
    hydra_cfg = hydra_config()
    if hydra_cfg is None:
        return False
    return any(str(o).lstrip("+~").split("=", 1)[0] == key for o in hydra_cfg.overrides.task)


def wandb_run_identity(hydra_cfg: DictConfig | None) -> tuple[str | None, str | None]:
    """The wandb ``(group, name)`` of a run: a sweep's jobs share the sweep folder as group, named by overrides.

    ``name`` is ``hydra.job.override_dirname`` (the job's overrides, without the keys excluded in
    ``configs/hydra/default.yaml``), falling back to ``job<N>`` in a sweep and to None (wandb's generated name)
    for a single run without overrides; a single run has no group.
    """
    if hydra_cfg is None:
        return None, None
    name = str(hydra_cfg.job.get("override_dirname") or "") or None
    if hydra_cfg.get("mode") != RunMode.MULTIRUN:
        return None, name
    # wandb limits group names to 128 characters; the end of the path (task, date, time) is what tells sweeps apart.
    group = str(hydra_cfg.sweep.dir)[-128:]
    return group, name or f"job{hydra_cfg.job.num}"


def apply_wandb_run_identity(cfg: DictConfig, hydra_cfg: DictConfig | None) -> None:
    """Fill in ``group``/``name`` of WandbLogger configs where they are null (see :func:`wandb_run_identity`)."""
    group, name = wandb_run_identity(hydra_cfg)
    for entry in (cfg.get("logger") or {}).values():
        if isinstance(entry, DictConfig) and str(entry.get("_target_", "")).endswith("WandbLogger"):
            if entry.get("group") is None and group is not None:
                entry.group = group
            if entry.get("name") is None and name is not None:
                entry.name = name


def single_run_argv(argv0: str, task_overrides: Sequence[str]) -> list[str]:
    """The command line that reruns one sweep job on its own (what Lightning gives its DDP child processes).

    Lightning starts DDP ranks 1..N-1 by re-running ``sys.argv`` with ``hydra.run.dir`` appended. In a sweep job
    ``sys.argv`` is the whole sweep (``-m``, comma lists, ``hparams_search=optuna``), so each child would start a
    sweep of its own; this job's own overrides with ``hydra.mode=RUN`` run exactly this job.
    """
    return [argv0, *task_overrides, "hydra.mode=RUN"]


@contextmanager
def ddp_children_rerun_this_job(hydra_cfg: DictConfig | None, output_dir: str) -> Iterator[None]:
    """In a sweep job, make Lightning's DDP children rerun this job into its folder (not the whole sweep).

    Sets ``sys.argv`` (see :func:`single_run_argv`) and ``hydra.run.dir`` (which Lightning passes to the
    children) for the duration of the job; outside a sweep it does nothing.
    """
    if hydra_cfg is None or hydra_cfg.get("mode") != RunMode.MULTIRUN:
        yield
        return
    saved_argv, saved_run_dir = list(sys.argv), hydra_cfg.run.dir
    saved_env = {name: os.environ.get(name) for name in DDP_ENV_VARIABLES}
    sys.argv = single_run_argv(sys.argv[0], list(hydra_cfg.overrides.task))
    with read_write(hydra_cfg):
        hydra_cfg.run.dir = output_dir
    try:
        yield
    finally:
        sys.argv = saved_argv
        with read_write(hydra_cfg):
            hydra_cfg.run.dir = saved_run_dir
        # The next job of this process starts new DDP children: it needs a new process group, and Lightning must
        # not find this job's LOCAL_RANK (it would think the ranks are launched externally and wait for them).
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def run_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved run config as plain containers, for loggers (without Hydra's own ``hydra`` node)."""
    config: dict[str, Any] = {}
    for key in cfg:
        if key == "hydra":
            continue
        value = cfg[key]
        config[str(key)] = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
    return config
