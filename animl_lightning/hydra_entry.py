"""How every command starts: ``@command_main`` is ``@hydra.main`` with this project's configs and error policy.

It registers the settings schemas the command's config names (:mod:`animl_lightning.config_schemas`), composes the
config from :data:`animl_lightning.cli.CONFIG_DIR`, and reports Hydra's own errors while composing (a misspelt key,
a value of the wrong type, a config group option that does not exist, an override it cannot parse) as one line with
exit status 2, like every other bad setting, instead of Hydra's several lines and status 1. ``HYDRA_FULL_ERROR=1``
set by the user keeps Hydra's full report.
"""

from __future__ import annotations

import functools
import os
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import hydra
from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from animl_lightning.cli import CONFIG_DIR, EXIT_ERROR, command_name, unknown_key_message
from animl_lightning.config_schemas import register_schemas

T = TypeVar("T")
FULL_ERROR_VARIABLE = "HYDRA_FULL_ERROR"
COMPOSITION_ERRORS = (ConfigCompositionException, MissingConfigException, OverrideParseException)


def command_main(config_name: str, command: str) -> Callable[[Callable[[DictConfig], T]], Callable[[], T | None]]:
    """Decorate a command's task function (``cfg -> result``) into its entry point ``main()``.

    Args:
        config_name: the config it composes (``configs/<config_name>.yaml``).
        command: the first word of its error lines (``train.py``, ``classify``, ...) unless it was started as a
            console command.
    """

    def decorate(task: Callable[[DictConfig], T]) -> Callable[[], T | None]:
        register_schemas(config_name)

        @functools.wraps(task)
        def task_with_hydras_own_report(cfg: DictConfig) -> T:
            # The switch is for composing only: the work itself (and every process it starts: DDP ranks, review
            # folds, the detector) runs without it, so a bug keeps Hydra's trimmed traceback. Set again after a job
            # that returned, for the next job of a sweep; left off after one that raised, for Hydra's report of it.
            switched = os.environ.pop(FULL_ERROR_VARIABLE, None)
            result = task(cfg)
            if switched is not None:
                os.environ[FULL_ERROR_VARIABLE] = switched
            return result

        composed_main = hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name=config_name)(
            task_with_hydras_own_report
        )

        @functools.wraps(task)
        def main() -> T | None:
            with one_line_composition_errors(config_name, command):
                result: T | None = composed_main()
            return result

        return main

    return decorate


@contextmanager
def one_line_composition_errors(config_name: str, command: str) -> Iterator[None]:
    """Hydra's composition errors inside this block as ``<command>: error: <message>`` and exit status 2; a key it
    refused to set is named with the nearest known one, as :func:`animl_lightning.cli.refuse_unknown_keys` does."""
    if os.environ.get(FULL_ERROR_VARIABLE) == "1":  # the user's own choice, as Hydra reads it
        yield
        return
    # Hydra prints its own report and exits unless this is set; then it raises, and the error can be put in one line.
    before = os.environ.get(FULL_ERROR_VARIABLE)
    os.environ[FULL_ERROR_VARIABLE] = "1"
    try:
        yield
    except COMPOSITION_ERRORS as err:
        refused = re.match(r"Could not override '([^']+)'", str(err))
        message = refused and unknown_key_message(config_name, refused.group(1), sys.argv[1:])
        print(f"{command_name(command)}: error: {message or composition_message(err)}", file=sys.stderr)
        raise SystemExit(EXIT_ERROR) from None
    finally:
        if before is None:
            os.environ.pop(FULL_ERROR_VARIABLE, None)
        else:
            os.environ[FULL_ERROR_VARIABLE] = before


def composition_message(err: Exception) -> str:
    """Hydra's message and its OmegaConf cause (the reason, without the key lines) on one line."""
    # A missing config option's report ends with Hydra's search path, which says nothing about the mistake.
    text = str(err).split("Config search path:")[0]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if isinstance(err, MissingConfigException) and len(lines) > 2 and lines[1].startswith("Available options"):
        lines = [lines[0], f"{lines[1]} {', '.join(lines[2:])}"]
    message = " ".join(lines)
    cause = err.__cause__
    if isinstance(cause, OmegaConfBaseException):
        reason = str(cause).strip().splitlines()
        if reason and reason[0].strip():
            message = f"{message}: {reason[0].strip()}"
    return message
