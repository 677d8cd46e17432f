"""The Hydra edge shared by every command: where the configs are, one-line errors, and Hydra-specific plumbing.

``prepare.py``, ``train.py``, ``python -m animl_lightning.{classify,export,serve,report,review}`` and the
``animl-*`` console commands compose their config from :data:`CONFIG_DIR` and run their work through
:func:`run_command`, which turns the project's errors (:class:`~animl_lightning.core.errors.AnimlError`),
configuration mistakes Hydra reports while instantiating, and environment failures (a full disk, a folder that is a
file, no permission) into one line on stderr with exit status 2, and Ctrl-C into ``interrupted; run the same command
to resume`` (or the stage's own count of what was done, :class:`~animl_lightning.core.errors.InterruptedWork`) with
status 130. Anything else is a bug and keeps its traceback.

In a sweep (``-m``) a failed job must not end the sweep: :func:`run_command` then logs the error, records the job
as failed in its ``results.json`` and returns None, so Hydra runs the next job; the sweep summary lists the job as
``FAILED`` and the process exits non-zero at the end (:mod:`animl_lightning.hydra_callbacks`).

This module, :mod:`animl_lightning.hydra_callbacks` and the command modules are the only package modules that
import Hydra or OmegaConf.
"""

from __future__ import annotations

import difflib
import errno
import functools
import importlib
import inspect
import logging
import os
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar, cast

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, OmegaConf, read_write
from omegaconf.errors import MissingMandatoryValue

from animl_lightning.core.errors import AnimlError, ConfigError, InterruptedWork, ResourceError
from animl_lightning.core.files import atomic_write_text
from animl_lightning.train.sweeps import write_failed_run

log = logging.getLogger(__name__)


def find_config_dir(package_dir: Path) -> Path:
    """The folder of configs every command composes, for the package at ``package_dir``.

    A checkout keeps ``configs/`` at its top, next to the package, and the wheel ships the same files inside the
    package as ``animl_lightning.configs`` (pyproject.toml's ``package-dir``). An installed wheel therefore finds
    them in the package, and a checkout (an editable install, or run with ``PYTHONPATH``) next to it. These two
    folders are looked at rather than ``import animl_lightning.configs``: with a checkout on ``PYTHONPATH``, an
    editable install of another checkout would answer that import with the other checkout's configs.
    """
    shipped = package_dir / "configs"
    if (shipped / "train.yaml").is_file():
        return shipped
    return package_dir.parent / "configs"


CONFIG_DIR = find_config_dir(Path(__file__).resolve().parent)
INTERRUPTED_MESSAGE = "interrupted; run the same command to resume"
EXIT_ERROR = 2
# Where a run folder keeps the config it ran with (Hydra's default hydra.output_subdir; report.html reads it).
JOB_CONFIG_SUBDIR = ".hydra"
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

# The optional dependencies (pyproject.toml's extras) by the module a command imports from them.
EXTRA_OF_MODULE: dict[str, str] = {
    "onnx": "export",
    "onnxscript": "export",
    "onnxruntime": "export",
    "fastapi": "deploy",
    "uvicorn": "deploy",
    "model_archiver": "deploy",
    "optuna": "sweeps",
    "submitit": "sweeps",
}

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
    if isinstance(err, MissingMandatoryValue):
        return f"{err.full_key}: must be set (the config leaves it ???)"
    if isinstance(err, ModuleNotFoundError) and (extra := EXTRA_OF_MODULE.get(str(err.name).split(".")[0])):
        return missing_extra_message(str(err.name).split(".")[0], extra)
    if isinstance(err, OSError) and err.errno in ENVIRONMENT_ERRNOS:
        where = f"{os.fsdecode(err.filename)}: " if err.filename else ""
        return f"{where}{err.strerror or err}"
    return None


def missing_extra_message(module: str, extra: str) -> str:
    """What to install when ``module`` of pyproject.toml's ``extra`` is missing."""
    return f'{module} is not installed; install the {extra} extra: pip install "animl-lightning[{extra}]"'


def require_extra(extra: str, modules: Sequence[str]) -> None:
    """Import ``modules`` (of pyproject.toml's ``extra``) now, so a missing one is named before any work.

    Raises:
        ResourceError: naming the first missing module and the ``pip install`` that brings it.
    """
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise ResourceError(missing_extra_message(module, extra)) from err


def in_sweep() -> bool:
    """Whether this process runs a job of a Hydra multirun."""
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def command_name(script: str) -> str:
    """The name the user typed for this command: the console command (``animl-train``, ...) this process was
    started as, else ``script`` (``train.py``, ``classify``). Error lines and lock refusals begin with it."""
    started_as = Path(sys.argv[0]).name if sys.argv else ""
    return started_as if started_as.startswith("animl-") else script


def run_command(
    task: Callable[[], T],
    command: str,
    output_dir: str | Path | None = None,
    resume_hint: Callable[[], str] | None = None,
) -> T | None:
    """Run a command's work with the error policy of the module docstring.

    Args:
        task: the work.
        command: the command's name, first word of every error line (``train.py``, ``classify``, ...), unless the
            process was started as a console command (:func:`command_name`).
        output_dir: the job's folder, where a failed sweep job records its failure.
        resume_hint: what to say after Ctrl-C when running the same command again is not how to resume.
    """
    quiet_library_noise()
    command = command_name(command)
    try:
        return task()
    except InterruptedWork as err:
        print(f"{command}: {err}", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
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


def checked_partial(factory: Any, key: str, first_argument: str, stand_in: Any = None) -> Any:
    """A ``_partial_`` factory whose stored keywords its target accepts; else :class:`ConfigError` naming them.

    Hydra only calls a partial later (the optimizer once the model's parameters exist), so a misspelt key such as
    ``+optimizer.learning_rate`` would otherwise fail as a traceback in the middle of ``trainer.fit``. With
    ``stand_in`` (what the factory will be called with, e.g. one parameter for an optimizer) it is also called once
    on that, so a value its target refuses (``optimizer.lr=-1``, ``optimizer.lr=abc``) is named before any work.
    """
    if factory is None:
        return None
    if not isinstance(factory, functools.partial):
        raise ConfigError(f"{key}: expected a _partial_: true config, got {type(factory).__name__}")
    target = factory.func
    name = getattr(target, "__name__", str(target))
    try:
        signature: inspect.Signature | None = inspect.signature(target)
    except (TypeError, ValueError):
        signature = None  # a builtin without a signature: only the stand-in call can tell
    if signature is not None:
        try:
            signature.bind(first_argument, *factory.args, **factory.keywords)
        except TypeError as err:
            accepted = [p for p in signature.parameters if p not in {first_argument, "self"}]
            raise ConfigError(f"{key}: {name} does not take these settings ({err}); it takes {accepted}") from err
    if stand_in is not None:
        try:
            factory(stand_in)
        except (TypeError, ValueError) as err:
            settings = ", ".join(f"{k}={v!r}" for k, v in factory.keywords.items())
            raise ConfigError(f"{key}: {name}({settings}) refuses these settings: {err}") from err
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


# Keys Hydra itself reads in a ``_target_`` config (not arguments of the target).
HYDRA_INSTANTIATE_KEYS = frozenset({"_target_", "_partial_", "_convert_", "_recursive_", "_args_"})


def refuse_unknown_keys(cfg: DictConfig) -> None:
    """Refuse a key added on the command line (``+key=value``, ``++key=value``) that the command's settings lack.

    Hydra adds such a key to the config without asking whether anything reads it, so ``+calibrat=true`` or
    ``+split.val_fracc=0.3`` used to run with the setting silently ignored. A key is known when the command's config
    (with this command line's group choices) has it, when it is an argument of the ``_target_`` class or function
    it configures (``+trainer.limit_train_batches=1``; that call checks the value), or when it lands in a dict the
    config leaves empty for free keys (``model.model_kwargs``). Anything else is a :class:`ConfigError` naming the
    nearest known key. Outside ``@hydra.main`` there is no command line and nothing to check.
    """
    hydra_cfg = hydra_config()
    if hydra_cfg is None:
        return
    overrides = OverridesParser.create().parse_overrides([str(o) for o in hydra_cfg.overrides.task])
    groups = set(hydra_cfg.runtime.choices.keys())
    added = [o for o in overrides if (o.is_add() or o.is_force_add()) and not _is_group_override(o, groups)]
    composed = _plain(cfg)
    doubtful = [o for o in added if not o.key_or_group.startswith("hydra.") and not _target_takes(composed, o)]
    if not doubtful:
        return
    # What the settings know without the keys this command line added: the same composition minus those keys.
    # Only then, as it costs a second composition (a key that already existed may be set again with ++).
    base = _plain(_compose_without_keys(str(hydra_cfg.job.config_name), overrides, groups))
    for override in doubtful:
        if not _known(base, override):
            raise ConfigError(_unknown_key_message(base, override.key_or_group, groups))


def unknown_key_message(config_name: str, key: str, arguments: Sequence[str]) -> str | None:
    """``<key>: unknown key; did you mean <nearest>?`` for a key Hydra refused to set (``split.val_fracc=0.3``), from
    ``config_name`` composed with the group choices among the command line's ``arguments``; None when that cannot
    be composed either (the choices themselves are wrong)."""
    try:
        overrides = OverridesParser.create().parse_overrides([a for a in arguments if not a.startswith("-")])
        # What failed to compose may have left Hydra set up; nothing else needs it once the command is refused.
        GlobalHydra.instance().clear()
        with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
            groups = set(compose(config_name, return_hydra_config=True).hydra.runtime.choices.keys())
            base = _compose_without_keys(config_name, overrides, groups)
    except Exception:
        return None
    return _unknown_key_message(_plain(base), key, groups)


def _is_group_override(override: Override, groups: set[str]) -> bool:
    """Whether an override picks a config group option (``model=tiny``, ``+experiment=demo``), not a key."""
    key = override.key_or_group
    return override.package is not None or "/" in key or key in groups


def _plain(cfg: DictConfig) -> dict[str, Any]:
    """The config as plain dicts, interpolations unresolved (``${hydra:...}`` needs no running job here)."""
    return cast(dict[str, Any], OmegaConf.to_container(cfg, resolve=False))


def _compose_without_keys(config_name: str, overrides: Sequence[Override], groups: set[str]) -> DictConfig:
    """``config_name`` composed with only the group choices of ``overrides`` (key overrides never add keys)."""
    choices = [o.input_line or "" for o in overrides if _is_group_override(o, groups)]
    if GlobalHydra.instance().is_initialized():
        return compose(config_name, overrides=choices)
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        return compose(config_name, overrides=choices)


def _target_takes(config: dict[str, Any], override: Override) -> bool:
    """Whether the key lies inside a ``_target_`` config whose target takes it as an argument."""
    node: Any = config
    for part in override.key_or_group.split("."):
        if not isinstance(node, dict):
            return False
        if "_target_" in node and (part in HYDRA_INSTANTIATE_KEYS or _accepts(str(node["_target_"]), part)):
            return True
        node = node.get(part)
    return False


def _accepts(target: str, argument: str) -> bool:
    """Whether ``target`` (a dotted import path) takes a keyword ``argument``; True when that cannot be told."""
    parameters = _parameters(target)
    if parameters is None:
        return True
    return argument in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


def _parameters(target: str) -> Mapping[str, inspect.Parameter] | None:
    """The parameters of a ``_target_``, or None when it cannot be imported or inspected (its call will say why)."""
    try:
        return inspect.signature(get_object(target)).parameters
    except Exception:  # an unimportable target fails with its own message when it is instantiated
        return None


def _known(base: dict[str, Any], override: Override) -> bool:
    """Whether the key added by ``override`` is one the settings (``base``, composed without it) know."""
    if _target_takes(base, override):
        return True
    value = override.value()
    if isinstance(value, dict) and "_target_" in value:
        return True  # a whole new object config (+callbacks.swa={_target_: ...}): its target checks its keys
    node: Any = base
    for part in override.key_or_group.split("."):
        if not isinstance(node, dict):
            return False
        if part not in node:
            return not node and node is not base  # an empty dict is where free keys go
        node = node[part]
    return True


def _dotted_keys(node: dict[str, Any], prefix: str = "") -> list[str]:
    """Every key of a plain config, nested ones as ``a.b.c`` (Hydra's own ``hydra`` node left out)."""
    keys = []
    for name, value in node.items():
        if not prefix and name == "hydra":
            continue
        key = f"{prefix}{name}"
        keys.append(key)
        if isinstance(value, dict):
            keys += _dotted_keys(value, f"{key}.")
    return keys


def _unknown_key_message(base: dict[str, Any], key: str, groups: set[str]) -> str:
    """``<key>: unknown key; did you mean <nearest>?``: the nearest key next to it, else anywhere, else a group."""
    parent, node = "", base
    for part in key.split(".")[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            break
        parent, node = f"{parent}{part}.", child
    names = [str(name) for name in node if not (parent == "" and name == "hydra")]
    if "_target_" in node and (parameters := _parameters(str(node["_target_"]))) is not None:
        names += [name for name, p in parameters.items() if p.kind is not inspect.Parameter.VAR_POSITIONAL]
    names = sorted(set(names) - HYDRA_INSTANTIATE_KEYS - {"self"})
    # Compared by the last part (a shared "optimizer." prefix would make every sibling look close): next to it, and
    # for a top-level key anywhere (+max_epochs=3 meant trainer.max_epochs); else the keys next to it are listed.
    name = key.rsplit(".", 1)[-1]
    if nearest := difflib.get_close_matches(name, names, n=1):
        return f"{key}: unknown key; did you mean {parent}{nearest[0]}?"
    if not parent:
        elsewhere: dict[str, str] = {}
        for other in sorted(_dotted_keys(base), key=len):
            elsewhere.setdefault(other.rsplit(".", 1)[-1], other)
        if nearest := difflib.get_close_matches(name, list(elsewhere), n=1):
            return f"{key}: unknown key; did you mean {elsewhere[nearest[0]]}?"
        config_groups = [g for g in groups if "/" not in g]
        if nearest := difflib.get_close_matches(name, config_groups, n=1):
            return f"{key}: unknown key; did you mean the config group {nearest[0]} ({nearest[0]}=NAME, no +)?"
    return f"{key}: unknown key; {parent.rstrip('.') or 'the top level'} has {', '.join(names)}"


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


def save_job_config(cfg: DictConfig, hydra_cfg: DictConfig | None, output_dir: str | Path) -> None:
    """Write ``<output_dir>/.hydra/`` (``config.yaml``, ``hydra.yaml``, ``overrides.yaml``) as Hydra would.

    ``train.py`` turns Hydra's own copy off (``hydra.output_subdir: null``) and calls this once it holds the run
    folder's lock: Hydra writes before the job starts, so a second ``train.py`` refused on a running run's folder
    used to replace that run's config and command line first. The files are Hydra's (unresolved, atomic here).
    """
    if hydra_cfg is None:
        return
    folder = Path(output_dir) / JOB_CONFIG_SUBDIR
    task_keys = [str(key) for key in cfg if key != "hydra"]
    atomic_write_text(folder / "config.yaml", OmegaConf.to_yaml(OmegaConf.masked_copy(cfg, task_keys)))
    atomic_write_text(folder / "hydra.yaml", OmegaConf.to_yaml(OmegaConf.create({"hydra": hydra_cfg})))
    atomic_write_text(folder / "overrides.yaml", OmegaConf.to_yaml(hydra_cfg.overrides.task))


def run_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved run config as plain containers, for loggers (without Hydra's own ``hydra`` node)."""
    config: dict[str, Any] = {}
    for key in cfg:
        if key == "hydra":
            continue
        value = cfg[key]
        config[str(key)] = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
    return config


# configs/model/base.yaml: the keys every model config shares (its model_name is ???), not a model of its own.
BASE_MODEL_CONFIG = "base"


def refuse_base_model(hydra_cfg: DictConfig | None) -> None:
    """``model=base`` is what every model config extends, not a model: one line listing the models instead."""
    if hydra_cfg is None or hydra_cfg.runtime.choices.get("model") != BASE_MODEL_CONFIG:
        return
    models = sorted(p.stem for p in (CONFIG_DIR / "model").glob("*.yaml") if p.stem != BASE_MODEL_CONFIG)
    raise ConfigError(f"model=base: base is what every model config extends, not a model; choose one of {models}")
