"""`python -m vhost_balloon.guest`: run the mocked guest against a vhost-user back-end.

    python -m vhost_balloon.guest --socket-path /tmp/vb.sock --memory 1G --reports 20 --json

Prints the summary as JSON (--json) or as a table. Errors a user can cause
(bad flags, an unreachable socket, a back-end that misbehaves) end with one
sentence on stderr and a non-zero exit status.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from vhost_balloon.guest.contig import ContigConfig
from vhost_balloon.guest.driver import DriverConfig
from vhost_balloon.guest.errors import ConfigError, GuestError
from vhost_balloon.guest.model_guest import ChurnConfig, ModelConfig, format_model, run_model
from vhost_balloon.guest.page_reporting import ReportingConfig
from vhost_balloon.guest.runner import GuestOptions, run_guest
from vhost_balloon.guest.summary import format_table
from vhost_balloon.protocol import units
from vhost_balloon.protocol.errors import ProtocolError
from vhost_balloon.protocol.units import argument_type
from vhost_balloon.protocol.virtio import PAGE_REPORTING_CAPACITY

EXIT_USAGE = 2
EXIT_FAILURE = 1


class UsageError(Exception):
    """A bad command line, reported in one sentence."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


parse_size = argument_type(units.parse_size)
parse_memory = argument_type(units.parse_guest_memory)
_positive_int = argument_type(units.parse_positive_int)
MAX_SECONDS = 86_400.0  # a day: every time the guest takes, so nothing overflows later
MAX_COUNT = 10_000_000  # reports, retries: beyond this a run never ends
MAX_RATE = 100_000.0  # attempts per second


def _non_negative_float(text: str, *, limit: float = MAX_SECONDS) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text} must not be negative")
    if not value <= limit:  # also refuses inf
        raise argparse.ArgumentTypeError(f"{text} is above the limit of {limit:g}")
    return value


def _positive_float(text: str) -> float:
    value = _non_negative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"{text} must be positive")
    return value


def _rate(text: str) -> float:
    value = _non_negative_float(text, limit=MAX_RATE)
    if value == 0:
        raise argparse.ArgumentTypeError(f"{text} must be positive")
    return value


def _milliseconds(text: str) -> float:
    return _non_negative_float(text, limit=MAX_SECONDS * 1000)


def _count(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None
    if not minimum <= value <= MAX_COUNT:
        raise argparse.ArgumentTypeError(f"{value} is not between {minimum} and {MAX_COUNT}")
    return value


def _reports(text: str) -> int:
    return _count(text, 1)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m vhost_balloon.guest",
        description=(
            "Mocked guest: a vhost-user front-end plus a model of Linux's virtio-balloon "
            "free page reporting driver."
        ),
    )
    parser.add_argument("--socket-path", required=True, help="the back-end's unix socket")
    parser.add_argument("--memory", type=parse_memory, default=1 << 30, help="guest RAM (1G)")
    parser.add_argument("--reports", type=_reports, default=10, help="reports to send")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument(
        "--capacity",
        type=int,
        choices=(16, 32),
        default=PAGE_REPORTING_CAPACITY,
        help="entries per report (32: Linux >= 5.7, 16: the 2019 series)",
    )
    parser.add_argument(
        "--order", type=int, choices=(9, 10), default=9, help="entry size 4 KiB << order"
    )
    parser.add_argument("--regions", type=_positive_int, default=1, help="memory regions (1-8)")
    parser.add_argument("--queue-size", type=_positive_int, default=64, help="virtqueue size")
    parser.add_argument("--no-indirect", action="store_true", help="do not use INDIRECT_DESC")
    parser.add_argument("--no-event-idx", action="store_true", help="do not use EVENT_IDX")
    parser.add_argument(
        "--no-populate",
        action="store_true",
        help="do not write the pages before reporting them, nor read them back after "
        "(nothing for the discard to free: the report path without the guest's memset)",
    )
    parser.add_argument(
        "--page-poison", action="store_true", help="accept PAGE_POISON (poison_val 0)"
    )
    parser.add_argument(
        "--no-seal",
        action="store_true",
        help="leave RAM unsealed, as hugetlbfs or tmpfs RAM is (the backend then needs "
        "--allow-unsealed-memory and reaches it through copies that cannot fault)",
    )
    parser.add_argument("--pause-ms", type=_milliseconds, default=0.0, help="pause between reports")
    parser.add_argument(
        "--discard-label", default=None, help="discard strategy name to record in the summary"
    )
    parser.add_argument(
        "--control-socket",
        type=Path,
        metavar="PATH",
        help="the backend's control socket: record its latency settings as 'injected'",
    )
    parser.add_argument(
        "--report-log",
        type=Path,
        metavar="FILE",
        help="write each report as the guest saw it (hold_ns, gpas, ...) as JSON lines",
    )
    parser.add_argument(
        "--connect-timeout",
        type=_non_negative_float,
        default=5.0,
        help="seconds to wait for the socket",
    )
    parser.add_argument(
        "--report-timeout",
        type=_positive_float,
        default=30.0,
        help="seconds to wait for one report to come back",
    )
    balloon = parser.add_argument_group(
        "classic balloon (what Linux's driver does beside reporting)"
    )
    balloon.add_argument(
        "--balloon",
        action="store_true",
        help="follow the device's target (num_pages): inflate and deflate in chains of "
        "256 PFNs, writing actual back (needs MUST_TELL_HOST offered; `ctl balloon SIZE` "
        "sets the target)",
    )
    balloon.add_argument(
        "--deflate-on-oom", action="store_true", help="accept DEFLATE_ON_OOM (with --balloon)"
    )
    balloon.add_argument(
        "--stats",
        action="store_true",
        help="use the stats queue (the backend must offer stats-vq: serve --features +stats-vq)",
    )
    balloon.add_argument(
        "--linger",
        type=_non_negative_float,
        default=0.0,
        metavar="S",
        help="after the reports, stay connected S seconds (following the target, sending stats)",
    )
    _add_model_options(parser)
    return parser


def _churn(text: str) -> ChurnConfig:
    """`SIZE,EVERY_S,HOLD_S`, e.g. `64M,0.5,1`."""
    parts = text.split(",")
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"'{text}' is not SIZE,EVERY_S,HOLD_S (e.g. 64M,0.5,1)")
    size = parse_size(parts[0])
    every, hold = _positive_float(parts[1]), _non_negative_float(parts[2])
    churn = ChurnConfig(size, every, hold)
    try:
        churn.validate()
    except ConfigError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return churn


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    model = parser.add_argument_group(
        "free-list model (--model)",
        "Model the guest's free lists, reporting passes and contiguous allocations "
        "instead of sending --reports fixed reports.",
    )
    model.add_argument("--model", action="store_true", help="run the free-list model")
    model.add_argument("--duration", type=_positive_float, default=20.0, help="seconds (20)")
    model.add_argument(
        "--pass-delay", type=_non_negative_float, default=2.0, help="PAGE_REPORTING_DELAY (2 s)"
    )
    model.add_argument("--attempt-rate", type=_rate, default=2.0, help="contiguous attempts/s (2)")
    model.add_argument("--contig-size", type=parse_size, default=1 << 30, help="1G")
    model.add_argument("--contig-align", type=parse_size, default=1 << 30, help="1G")
    model.add_argument("--retries", type=int, default=0, help="retries after a failure (0)")
    model.add_argument(
        "--backoff", type=_non_negative_float, default=0.01, help="first retry delay, s"
    )
    model.add_argument(
        "--contig-hold", type=_non_negative_float, default=0.05, help="keep a success, s"
    )
    model.add_argument(
        "--attempt-cost", type=_non_negative_float, default=0.0, help="a failed attempt's time, s"
    )
    model.add_argument("--touch", action="store_true", help="write an allocated range")
    model.add_argument("--churn", type=_churn, metavar="SIZE,EVERY_S,HOLD_S")
    model.add_argument("--reserved", type=parse_size, default=64 << 20, help="unmovable at 0")
    model.add_argument("--seed", type=int, default=0, help="seed of the attempt arrivals")
    model.add_argument("--out-dir", type=Path, help="write reports/attempts/held JSONL here")


def model_config(args: argparse.Namespace) -> ModelConfig:
    return ModelConfig(
        duration_s=args.duration,
        reporting=ReportingConfig(
            capacity=args.capacity, order=args.order, delay_s=args.pass_delay
        ),
        contig=ContigConfig(
            size=args.contig_size,
            align=args.contig_align,
            rate=args.attempt_rate,
            retries=args.retries,
            backoff_s=args.backoff,
            hold_s=args.contig_hold,
            touch=args.touch,
            cost_s=args.attempt_cost,
        ),
        churn=args.churn,
        reserved_bytes=args.reserved,
        seed=args.seed,
    )


def options_from_args(args: argparse.Namespace) -> GuestOptions:
    driver = DriverConfig(
        capacity=args.capacity,
        order=args.order,
        queue_size=args.queue_size,
        indirect=not args.no_indirect,
        event_idx=not args.no_event_idx,
        page_poison=args.page_poison,
        report_timeout=args.report_timeout,
        populate=not args.no_populate,
        balloon=args.balloon,
        must_tell_host=args.balloon,
        deflate_on_oom=args.deflate_on_oom,
        stats=args.stats,
    )
    return GuestOptions(
        socket_path=args.socket_path,
        memory_bytes=args.memory,
        regions=args.regions,
        driver=driver,
        connect_timeout=args.connect_timeout,
        discard_label=args.discard_label,
        seal=not args.no_seal,
    )


def backend_settings(path: Path, timeout: float = 5.0) -> dict[str, Any]:
    """The backend's latency settings, asked over its JSON-lines control socket.

    The guest speaks the socket's tiny protocol itself: it never imports the
    backend.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(timeout)
        conn.connect(str(path))
        conn.sendall(b'{"cmd": "get"}\n')
        reply = b""
        while not reply.endswith(b"\n"):
            chunk = conn.recv(65536)
            if not chunk:
                break
            reply += chunk
    try:
        decoded = json.loads(reply)
    except ValueError:
        raise OSError(f"{path} sent something that is not JSON") from None
    if not isinstance(decoded, dict) or not decoded.get("ok"):
        raise OSError(f"{path} refused: {decoded!r}")
    settings: dict[str, Any] = decoded["settings"]
    return settings


def _progress_printer() -> Callable[[int, int], None] | None:
    if not sys.stderr.isatty():
        return None

    def show(done: int, total: int) -> None:
        step = max(1, total // 10)
        if done % step == 0 or done == total:
            print(f"guest: {done}/{total} reports ({100 * done // total}%)", file=sys.stderr)

    return show


def _fail(message: str, status: int) -> int:
    message = message.rstrip(".")
    print(f"guest: error: {message}.", file=sys.stderr)
    return status


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except UsageError as error:
        return _fail(str(error), EXIT_USAGE)
    if args.deflate_on_oom and not args.balloon:
        return _fail("--deflate-on-oom needs --balloon", EXIT_USAGE)
    try:
        options = options_from_args(args)
        options.driver.validate()
        if args.model:
            config = model_config(args)
            config.validate()
            summary = asyncio.run(run_model(options, config, out_dir=args.out_dir))
        else:
            summary = asyncio.run(
                run_guest(
                    options,
                    args.reports,
                    pause_s=args.pause_ms / 1000,
                    progress=_progress_printer(),
                    report_log=args.report_log,
                    linger_s=args.linger,
                )
            )
    except (GuestError, ProtocolError) as error:
        return _fail(str(error), EXIT_FAILURE)
    except OSError as error:
        return _fail(f"system error: {error.strerror or error}", EXIT_FAILURE)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    if args.control_socket is not None:
        try:
            summary["injected"] = backend_settings(args.control_socket)
        except OSError as error:
            return _fail(f"cannot read the backend's settings: {error}", EXIT_FAILURE)
    if args.model:
        print(json.dumps(summary, indent=2) if args.json else format_model(summary))
        return 0
    print(json.dumps(summary, indent=2) if args.json else format_table(summary))
    if not summary["integrity_ok"]:
        return _fail(
            f"memory the guest did not report changed: {summary['integrity_errors']} "
            "page(s) corrupted",
            EXIT_FAILURE,
        )
    return 0
