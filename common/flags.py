"""Command-line flags whose defaults come from environment variables named after them, for both processes.

`--shutdown-grace` reads CHATSERVE_SHUTDOWN_GRACE, `--grpc-port` CHATSERVE_GRPC_PORT: the variable is the flag's
long name in capitals with the CHATSERVE_ prefix. Every flag's --help line ends with its default and its variable.
A variable renamed to follow this rule still works for one release under its old name, with a warning.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable
from typing import Any

PREFIX = "CHATSERVE_"
log = logging.getLogger(__name__)


class Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's own line breaks; help lines say the default unless they already do."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" in text or action.default in (None, argparse.SUPPRESS, [], False):
            return text
        if action.nargs == 0:  # an on/off flag: "on" or off by default
            return text if not isinstance(action, argparse.BooleanOptionalAction) else f"{text} (default: on)"
        return f"{text} (default: %(default)s)"


def env_name(flag: str) -> str:
    return PREFIX + flag.removeprefix("--").replace("-", "_").upper()


def read_env(name: str, old: str | None = None) -> str | None:
    """The variable's value ('' counts as unset); an old name still works, with a warning."""
    value = os.environ.get(name)
    if value not in (None, ""):
        return value
    if old is not None and os.environ.get(old) not in (None, ""):
        log.warning("%s is deprecated and will be removed in the next release; set %s instead", old, name)
        return os.environ[old]
    return None


def add(
    group: argparse._ActionsContainer,
    *flags: str,
    type: Callable[[str], Any] = str,
    default: Any = None,
    help: str = "",
    old_env: str | None = None,
    env: bool = True,
    **kwargs: Any,
) -> argparse.Action:
    """A flag whose default is its environment variable's value, else `default`; `help` gets both appended.

    The first flag names the variable; further ones are aliases (an older spelling of the flag).
    """
    if env:
        name = env_name(flags[0])
        raw = read_env(name, old_env and PREFIX + old_env)
        if _boolean(kwargs.get("action")):
            default = raw.lower() in ("1", "true", "yes", "on") if raw is not None else default
        elif raw is not None:
            default = type(raw)
        help = f"{help} [{name}]" if help else f"[{name}]"
    if not _boolean(kwargs.get("action")):
        kwargs["type"] = type
    return group.add_argument(*flags, default=default, help=help, **kwargs)


def _boolean(action: Any) -> bool:
    """Flags that take no value: on/off from their environment variable's 1/true/yes/on."""
    return action == "store_true" or action is argparse.BooleanOptionalAction
