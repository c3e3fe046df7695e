"""`serve --config FILE.toml`: keys are serve's options, the command line
overrides them, and every mistake names the file, the line and the key."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vhost_balloon.backend.cli import serve, vhost_user
from vhost_balloon.backend.cli.config import load_config, parse_with_config, settable_actions
from vhost_balloon.backend.cli.options import UsageError, server_settings
from vhost_balloon.backend.cli.parser import build_parser
from vhost_balloon.backend.latency.injection import Point


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "vb.toml"
    path.write_text(text)
    return path


def parse(argv: list[str]) -> object:
    return parse_with_config(build_parser, argv, serve.options_parser())


def test_every_serve_option_is_a_key_and_nothing_else() -> None:
    keys = set(settable_actions(serve.options_parser()))
    assert {"socket-path", "fd", "discard", "delay", "allow-unsealed-memory", "metrics"} <= keys
    assert not keys & {"config", "print-capabilities", "help"}


def test_values_are_parsed_as_their_options(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        # a comment
        socket-path = "/run/vb/vm1.sock"
        discard = "madv-remove"
        delay = ["publish=const:5ms", "kick=exp:2ms"]
        seed = 7
        stats-interval = 2.5
        allow-unsealed-memory = true
        """,
    )
    args = parse(["serve", "--config", str(path)])
    settings = server_settings(args)  # type: ignore[arg-type]
    assert str(args.socket_path) == "/run/vb/vm1.sock"  # type: ignore[attr-defined]
    assert settings.balloon.discard.value == "madv-remove"
    assert set(settings.latency.delays) == {Point.PUBLISH, Point.KICK}
    assert settings.latency.seed == 7
    assert settings.balloon.stats_interval_s == 2.5
    assert settings.allow_unsealed_memory is True


def test_the_command_line_overrides_the_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        'discard = "none"\ndelay = ["publish=const:5ms", "kick=const:1ms"]\n'
        'socket-path = "/run/vb/file.sock"\n',
    )
    args = parse(
        [
            "serve",
            "--config",
            str(path),
            "--discard",
            "punch-hole",  # the default, given explicitly: still wins
            "--delay",
            "publish=const:2ms",
            "--fd",
            "3",
        ]
    )
    settings = server_settings(args)  # type: ignore[arg-type]
    assert settings.balloon.discard.value == "punch-hole"
    assert settings.latency.delays[Point.PUBLISH].spec == "const:2ms"
    assert settings.latency.delays[Point.KICK].spec == "const:1ms"  # the file's
    assert args.fd == 3 and args.socket_path is None  # type: ignore[attr-defined]


def test_vhost_user_balloon_reads_the_same_file(tmp_path: Path) -> None:
    path = write(tmp_path, 'discard = "none"\n')
    args = parse_with_config(
        vhost_user.build_parser, ["--config", str(path)], serve.options_parser()
    )
    assert args.discard == "none"
    assert args.command == "serve"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            'discard = "none"\ndicard = "none"\n',
            "vb.toml:2: unknown key 'dicard' (did you mean 'discard'?)",
        ),
        ('\n\ndiscard = "sometimes"\n', "vb.toml:3: discard = 'sometimes': not one of punch-hole"),
        ('delay = ["publish=const:-5ms"]\n', "vb.toml:1: delay = 'publish=const:-5ms':"),
        ('delay = ["nowhere=const:5ms"]\n', "vb.toml:1: delay = 'nowhere=const:5ms':"),
        (
            "allow-unsealed-memory = 1\n",
            "vb.toml:1: allow-unsealed-memory is a flag: true or false",
        ),
        ("discard = true\n", "vb.toml:1: discard takes a string, not true/false"),
        ('discard = ["none"]\n', "vb.toml:1: discard takes one value, not a list"),
        ("seed = 1979-05-27\n", "vb.toml:1: seed takes a string, not date"),
        ('[serve]\ndiscard = "none"\n', "vb.toml:1: [serve]: serve's keys have no sections"),
        (
            'stats-interval = "-1"\n',
            "vb.toml:1: stats-interval = '-1': --stats-interval -1: not between",
        ),
        ('metrics = "nosuch:99999"\n', "vb.toml:1: metrics = 'nosuch:99999':"),
        ('discard = "none\n', "vb.toml: not valid TOML: "),
        ('socket-path = "/a"\nfd = 3\n', "the config file sets socket-path and fd: choose one"),
        # 0o660 is the TOML number 432: only a string can say 0660.
        ("socket-mode = 0o660\n", 'vb.toml:1: socket-mode takes a string (such as "432")'),
        ("mmap-contention = 4\n", "vb.toml:1: mmap-contention takes a string"),
        ("seed = " + "[" * 5000 + "]" * 5000 + "\n", "vb.toml: values nested too deeply"),
    ],
)
def test_mistakes_name_the_file_line_and_key(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(UsageError) as caught:
        parse(["serve", "--config", str(path)])
    assert message in str(caught.value)


def test_a_missing_or_binary_file_is_one_sentence(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"--config .*nothere\.toml: No such file"):
        load_config(tmp_path / "nothere.toml", serve.options_parser())
    binary = tmp_path / "b.toml"
    binary.write_bytes(b"\xff\xfe discard")
    with pytest.raises(UsageError, match="not UTF-8"):
        load_config(binary, serve.options_parser())


def test_what_is_not_a_small_regular_file_is_refused(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)  # opened without waiting for a writer
    for path, message in (
        (fifo, "not a regular file"),
        (Path("/dev/zero"), "not a regular file"),
        (tmp_path, "Is a directory"),
    ):
        with pytest.raises(UsageError, match=message):
            load_config(path, serve.options_parser())
    big = tmp_path / "big.toml"
    big.write_text("# x\n" * 300_000)
    with pytest.raises(UsageError, match="over 1 MiB"):
        load_config(big, serve.options_parser())


def test_the_files_socket_mode_goes_with_its_socket(tmp_path: Path) -> None:
    path = write(tmp_path, 'socket-path = "/run/vb/a.sock"\nsocket-mode = "0660"\n')
    from_file = parse(["serve", "--config", str(path)])
    assert from_file.socket_mode == 0o660  # type: ignore[attr-defined]
    replaced = parse(["serve", "--config", str(path), "--fd", "3"])
    assert replaced.socket_path is None and replaced.socket_mode is None  # type: ignore[attr-defined]
    assert replaced.where_from_cli and not from_file.where_from_cli  # type: ignore[attr-defined]


def test_an_empty_file_keeps_every_default(tmp_path: Path) -> None:
    path = write(tmp_path, "")
    with_file = parse(["serve", "--config", str(path), "--fd", "3"])
    without = parse(["serve", "--fd", "3"])
    assert server_settings(with_file) == server_settings(without)  # type: ignore[arg-type]


def test_reload_reads_the_file_again(tmp_path: Path) -> None:
    path = write(tmp_path, 'delay = ["publish=const:5ms"]\n')
    args = parse(["serve", "--config", str(path), "--fd", "3"])
    path.write_text('delay = ["publish=const:7ms"]\n')
    again = args.reload()  # type: ignore[attr-defined]
    assert server_settings(again).latency.delays[Point.PUBLISH].spec == "const:7ms"
    path.write_text("delay = 5\n")
    with pytest.raises(UsageError, match=r"vb\.toml:1: delay takes a string"):
        args.reload()  # type: ignore[attr-defined]
