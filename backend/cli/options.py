"""What several commands share: the user's mistakes (UsageError), the option
groups of the backend, its latency injection and its services, and the
ServerSettings they make."""

from __future__ import annotations

import argparse
from pathlib import Path

from vhost_balloon.backend.balloon.device import BalloonSettings, NotifyPolicy
from vhost_balloon.backend.balloon.discard import DiscardStrategy
from vhost_balloon.backend.balloon.features import CHOICES as FEATURE_CHOICES
from vhost_balloon.backend.balloon.features import OFFERED_FEATURES, parse_features
from vhost_balloon.backend.latency.contention import parse_bql, parse_mmap_contention
from vhost_balloon.backend.latency.injection import (
    ALL_BQL_PHASES,
    LatencySettings,
    Point,
    parse_bql_phases,
    parse_delay_option,
)
from vhost_balloon.backend.observe.metrics_http import parse_listen_address
from vhost_balloon.backend.server import ServerSettings
from vhost_balloon.protocol import units
from vhost_balloon.protocol.units import argument_type


class UsageError(Exception):
    """A mistake on the command line or in the environment: one sentence, exit 2."""


size = argument_type(units.parse_size)
count = argument_type(units.parse_positive_int)


def parse_stats_interval(text: str) -> float:
    """Seconds, 0 (never) up to a day; QEMU refuses negative intervals too."""
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"--stats-interval takes seconds, not {text!r}") from None
    if not 0 <= value <= 86400:  # also refuses nan and inf
        raise ValueError(f"--stats-interval {text}: not between 0 and 86400 seconds")
    return value


def add_backend_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--discard",
        choices=DiscardStrategy.names(),
        default="punch-hole",
        help="how reported pages are given back (default: punch-hole)",
    )
    parser.add_argument(
        "--notify",
        choices=[p.value for p in NotifyPolicy],
        default="always",
        help="signal the call eventfd after every report (default) or only "
        "when the driver's EVENT_IDX asks",
    )
    parser.add_argument(
        "--trace", type=Path, metavar="FILE", help="append one JSON line per report to FILE"
    )
    add_features_option(parser)
    parser.add_argument(
        "--stats-interval",
        type=argument_type(parse_stats_interval),
        default=0.0,
        metavar="S",
        help="with stats-vq: ask the guest for fresh stats every S seconds, as QEMU's "
        "guest-stats-polling-interval (default 0: only the sample the driver sends at probe)",
    )
    parser.add_argument(
        "--allow-unsealed-memory",
        action="store_true",
        help="accept guest RAM memfds not sealed against shrinking (reached through "
        "copies that fail: a front-end that truncates one ends only its own session)",
    )


def add_features_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--features",
        type=argument_type(parse_features),
        default=OFFERED_FEATURES,
        metavar="LIST",
        help="the features offered: a list (stats-vq,reporting,...) or changes to the "
        f"default (+stats-vq,-deflate-on-oom); known: {', '.join(FEATURE_CHOICES)}. "
        "The stats queue adds a queue: QEMU's num_vqs must follow (serve prints it)",
    )


def add_latency_options(parser: argparse.ArgumentParser) -> None:
    points = ", ".join(p.value for p in Point)
    parser.add_argument(
        "--delay",
        type=argument_type(parse_delay_option),
        action="append",
        default=[],
        metavar="POINT=MODEL",
        help=f"inject a delay (repeatable); POINT: {points}; MODEL: const:5ms, "
        "uniform:1ms..3ms, exp:2ms, lognormal:median=2ms,sigma=0.5, "
        "normal:mean=2ms,sd=0.5ms, replay:FILE",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of every delay sequence")
    parser.add_argument(
        "--bql",
        type=argument_type(parse_bql),
        metavar="HOLD_MODEL@RATE[,threads=N]",
        help="a big lock taken RATE times/s by N threads, held for HOLD_MODEL "
        "(mean hold x RATE at most 0.9)",
    )
    parser.add_argument(
        "--bql-phases",
        type=argument_type(parse_bql_phases),
        default=ALL_BQL_PHASES,
        metavar="pop,publish,notify",
        help="report phases that take the big lock (default: all three)",
    )
    parser.add_argument(
        "--mmap-contention",
        type=argument_type(parse_mmap_contention),
        metavar="THREADS[,size=64M]",
        help="threads that map, protect and unmap memory in the backend "
        "(THREADS x size at most half of MemAvailable)",
    )


def add_service_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--control-socket",
        type=Path,
        metavar="PATH",
        help="JSON-lines control socket (see `vhost-balloon ctl`)",
    )
    parser.add_argument(
        "--metrics",
        type=argument_type(parse_listen_address),
        metavar="ADDR:PORT",
        help="serve Prometheus metrics at http://ADDR:PORT/metrics",
    )


def server_settings(args: argparse.Namespace) -> ServerSettings:
    """The backend, latency and service options as ServerSettings."""
    latency = LatencySettings(
        delays=dict(args.delay),
        bql=args.bql,
        bql_phases=args.bql_phases,
        mmap=args.mmap_contention,
        seed=args.seed,
    )
    return ServerSettings(
        balloon=BalloonSettings(
            discard=DiscardStrategy(args.discard),
            notify=NotifyPolicy(args.notify),
            features=args.features,
            stats_interval_s=args.stats_interval,
        ),
        trace_path=args.trace,
        latency=latency,
        control_socket=args.control_socket,
        metrics_address=args.metrics,
        allow_unsealed_memory=args.allow_unsealed_memory,
    )
