"""Rich console output: the config tree at start, a table of results at the end."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import rich
from omegaconf import DictConfig, OmegaConf
from rich.syntax import Syntax
from rich.table import Table
from rich.tree import Tree

FIRST_GROUPS = ("data", "model", "callbacks", "logger", "trainer", "paths")


def print_config_tree(config: DictConfig) -> None:
    """Print the composed config, main groups first, one branch per group."""
    tree = Tree("config", guide_style="dim")
    keys = [k for k in FIRST_GROUPS if k in config] + [k for k in config if k not in FIRST_GROUPS]
    for key in keys:
        value = config[key]
        text = (
            OmegaConf.to_yaml(value, resolve=True) if isinstance(value, DictConfig) else str(value)
        )
        tree.add(str(key), guide_style="dim").add(Syntax(text, "yaml"))
    rich.print(tree)


def results_table(metrics: Mapping[str, float], files: Mapping[str, Path | str | None]) -> Table:
    """A two-part table: final metrics, then where the run's files are."""
    table = Table(title="vqzoo run summary", show_lines=False)
    table.add_column("what", no_wrap=True)
    table.add_column("value", overflow="fold")
    for name in sorted(metrics):
        table.add_row(name, f"{metrics[name]:.4f}")
    for name, path in files.items():
        if path:
            table.add_row(name, str(path))
    return table


def print_results(metrics: Mapping[str, float], files: Mapping[str, Path | str | None]) -> None:
    rich.print(results_table(metrics, files))
