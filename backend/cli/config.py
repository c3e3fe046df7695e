"""`serve --config FILE.toml`: the options of `serve` in a TOML file.

A key is an option's long name without its dashes, with the option's own
syntax for the value:

    socket-path = "/run/vhost-user-balloon/vm1.sock"
    discard = "punch-hole"
    delay = ["publish=const:5ms", "kick=exp:2ms"]   # a repeatable option: a list
    allow-unsealed-memory = true                     # a flag: true or false
    seed = 7                                         # numbers may be TOML numbers

The command line overrides the file: an option given there wins over the
same key (for a repeatable option, its values come after the file's, and the
last delay for a point wins). Where to serve (socket-path, fd, connect) is
one choice: one given on the command line replaces the file's.

Every key is checked with the same parser as its option before anything
starts; a mistake is one sentence that names the file, the line and the key.
"""

from __future__ import annotations

import argparse
import difflib
import functools
import os
import re
import stat
import tomllib
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from vhost_balloon.backend.cli.options import UsageError

CONFIG_OPTION = "--config"
# Options that are not settings: they are not keys.
NOT_KEYS = frozenset({"help", "config", "print-capabilities", "version", "verbose"})
WHERE_KEYS = ("socket_path", "fd", "connect")  # dests of the one "where to serve" choice
NUMBERS = frozenset({"seed", "stats-interval", "fd"})  # keys a TOML number may set
MAX_BYTES = 1 << 20  # a config file is a few lines; /dev/zero is not one


def add_config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        CONFIG_OPTION,
        type=Path,
        metavar="FILE.toml",
        help="read serve's options from a TOML file (keys: the option names without "
        "dashes); the command line overrides it; SIGHUP reads it again",
    )


def settable_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """{key: action} of every option a config file may set."""
    actions: dict[str, argparse.Action] = {}
    for action in parser._actions:  # argparse keeps no public list of them
        long_names = [o for o in action.option_strings if o.startswith("--")]
        if not long_names:
            continue
        key = long_names[0][2:]
        if key not in NOT_KEYS:
            actions[key] = action
    return actions


def load_config(path: Path, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """{dest: value} from the file, each value converted and checked as its
    option would be. UsageError names the file, line and key of the first
    mistake; nothing is applied then."""
    try:
        # O_NONBLOCK: a FIFO is refused below instead of waiting for a writer.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise UsageError(f"--config {path}: not a regular file")
            data = f.read(MAX_BYTES + 1)
    except OSError as error:
        raise UsageError(f"--config {path}: {error.strerror or error}") from None
    if len(data) > MAX_BYTES:
        raise UsageError(f"--config {path}: over {MAX_BYTES >> 20} MiB, not a config file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"--config {path}: not UTF-8 text") from None
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise UsageError(f"{path}: not valid TOML: {error}") from None
    except RecursionError:
        raise UsageError(f"{path}: values nested too deeply") from None
    actions = settable_actions(parser)
    lines = text.splitlines()
    values: dict[str, Any] = {}
    for key, raw in table.items():
        where = f"{path}:{_line_of(key, lines)}"
        action = actions.get(key)
        if action is None:
            if isinstance(raw, dict):
                raise UsageError(
                    f"{where}: [{key}]: serve's keys have no sections; write them at the top"
                )
            raise UsageError(f"{where}: unknown key {key!r}{_did_you_mean(key, actions)}")
        values[action.dest] = _converted(where, key, action, raw)
    return values


def parse_with_config(
    build: Callable[[dict[str, Any]], argparse.ArgumentParser],
    argv: Sequence[str],
    options: argparse.ArgumentParser,
) -> argparse.Namespace:
    """argv parsed by build({}); if it names --config FILE, parsed again by a
    parser whose defaults are the file's values (options: the parser whose
    actions check them). The result's `reload()` does it all again (SIGHUP)."""
    from_cli = build({}).parse_args(argv)
    from_cli.where_from_cli = _names_where(from_cli)
    path = getattr(from_cli, "config", None)
    if path is None:
        return from_cli
    merged = build(load_config(path, options)).parse_args(argv)
    merge_where(from_cli, merged)
    merged.where_from_cli = from_cli.where_from_cli
    merged.reload = functools.partial(parse_with_config, build, argv, options)
    return merged


def _names_where(args: argparse.Namespace) -> bool:
    return any(getattr(args, dest, None) is not None for dest in WHERE_KEYS)


def merge_where(from_cli: argparse.Namespace, merged: argparse.Namespace) -> None:
    """Where to serve is one choice: if the command line named one, the
    file's is dropped (argparse only sees the command line's conflicts)."""
    if _names_where(from_cli):
        for dest in (*WHERE_KEYS, "socket_mode"):  # the file's mode went with its socket
            setattr(merged, dest, getattr(from_cli, dest, None))
    elif sum(getattr(merged, dest, None) is not None for dest in WHERE_KEYS) > 1:
        given = [dest.replace("_", "-") for dest in WHERE_KEYS if getattr(merged, dest, None)]
        raise UsageError(f"the config file sets {' and '.join(given)}: choose one")


def _converted(where: str, key: str, action: argparse.Action, raw: Any) -> Any:
    if isinstance(action, argparse._StoreTrueAction):
        if not isinstance(raw, bool):
            raise UsageError(f"{where}: {key} is a flag: true or false, not {raw!r}")
        return raw
    if isinstance(action, argparse._AppendAction):
        items = raw if isinstance(raw, list) else [raw]
        return [_one(where, key, action, item) for item in items]
    if isinstance(raw, list):
        raise UsageError(f"{where}: {key} takes one value, not a list")
    return _one(where, key, action, raw)


def _one(where: str, key: str, action: argparse.Action, raw: Any) -> Any:
    if isinstance(raw, int | float) and not isinstance(raw, bool) and key not in NUMBERS:
        # e.g. socket-mode = 0o660 is the number 432: only a string says 0660.
        raise UsageError(f'{where}: {key} takes a string (such as "{raw}"), not a TOML number')
    if isinstance(raw, bool) or not isinstance(raw, str | int | float):
        raise UsageError(f"{where}: {key} takes a string, not {_toml_kind(raw)}")
    text = str(raw)
    try:
        value = action.type(text) if callable(action.type) else text
    except (ValueError, TypeError, argparse.ArgumentTypeError) as error:
        raise UsageError(f"{where}: {key} = {raw!r}: {error}") from None
    if action.choices is not None and value not in action.choices:
        choices = ", ".join(map(str, action.choices))
        raise UsageError(f"{where}: {key} = {raw!r}: not one of {choices}")
    return value


def _toml_kind(raw: Any) -> str:
    if isinstance(raw, bool):
        return "true/false"
    if isinstance(raw, dict):
        return "a table"
    if isinstance(raw, list):
        return "a list"
    return type(raw).__name__  # a date or time


def _line_of(key: str, lines: Iterable[str]) -> int | str:
    """The line where the top-level key is set (tomllib gives no positions)."""
    pattern = re.compile(rf"""^\s*(\[\s*)?(["']?){re.escape(key)}\2\s*(=|\])""")
    for number, line in enumerate(lines, 1):
        if pattern.match(line):
            return number
    return "?"


def _did_you_mean(key: str, actions: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(actions), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
