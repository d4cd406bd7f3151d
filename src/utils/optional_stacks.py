"""Config groups that need an optional install (a pyproject extra): checked on the command line
before Hydra composes, so a missing plugin is named with its install command instead of Hydra's
"Could not find 'hydra/sweeper/optuna'"."""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from typing import NamedTuple


class OptionalStack(NamedTuple):
    option: str  # the command-line override that selects it (prefix)
    module: str  # what must be importable
    extra: str  # the pyproject extra that installs it
    what: str


OPTIONAL_STACKS = (
    OptionalStack(
        "hparams_search=", "hydra_plugins.hydra_optuna_sweeper", "sweep", "the Optuna sweeper"
    ),
    OptionalStack(
        "hydra/launcher=slurm",
        "hydra_plugins.hydra_submitit_launcher",
        "slurm",
        "Hydra's submitit (SLURM) launcher",
    ),
)


class MissingOptionalStack(SystemExit):
    """Exits with the message (code 1 when printed by the interpreter)."""


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


def check_optional_stacks(argv: Sequence[str]) -> None:
    """Exit naming the extra to install when an override selects a stack that is missing."""
    for stack in OPTIONAL_STACKS:
        chosen = [arg for arg in argv if arg.lstrip("+~").startswith(stack.option)]
        if chosen and not _installed(stack.module):
            raise MissingOptionalStack(
                f"{chosen[0]} needs {stack.what}, which is not installed: install the "
                f"'{stack.extra}' extra with `pip install -e '.[{stack.extra}]'` "
                "(`make test` installs every extra)"
            )
