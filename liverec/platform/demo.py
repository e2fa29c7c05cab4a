"""`liverec demo`: the whole platform on this machine, end to end, with a live view and a report.

What runs:
- a local Kafka-protocol broker (Tansu, `LocalBroker`) on 127.0.0.1, and the liverec topics;
- the online trainer (`liverec train`) and one serving replica (`liverec serve`) as separate
  processes, configured through `LIVEREC_*` environment variables, their metrics on free ports;
- in this process: a producer replaying the stream at a paced rate (event times are the moment
  each event is produced), a gRPC client calling `Recommend` for users the stream just touched,
  and freshness probes (an event for a user, then `Recommend` until the answer's state includes
  it).

While it runs it shows one view, read from the processes' `/metrics` over HTTP (see
`demo_view`); at the end it prints a summary table and writes a report directory (`demo_report`).

Every process it starts stops on success, on failure, on Ctrl-C (SIGINT) and on SIGTERM: the
children are terminated in `finally` blocks (SIGTERM, then SIGKILL after a grace period), and
they carry PR_SET_PDEATHSIG, as the broker does, so even a `kill -9` of the demo takes them down.
Afterwards the demo checks that none of their ports is still listening.
"""

from __future__ import annotations

import argparse

from liverec.platform.config import LiverecConfig
from liverec.platform.replay import parse_rate

DEFAULT_EVENTS = 20_000
DEFAULT_RATE = 100.0
DEFAULT_USERS = 1_000
DEFAULT_ITEMS = 1_000

def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    """The `liverec demo` flags (cli.py calls this on the demo subparser)."""
    parser.add_argument("--dataset", default="synthetic",
                        help="'synthetic' (default: the seeded generator) or a dataset file/directory, "
                             "e.g. ../shared/data/ml-100k")
    parser.add_argument("--format", choices=("recbole", "movielens", "sequence"), default=None,
                        help="dataset file format (default: detected)")
    parser.add_argument("--events", "--limit", dest="events", type=_positive, default=DEFAULT_EVENTS,
                        help=f"events to replay (default {DEFAULT_EVENTS:,}; a dataset file is cut to its first N)")
    parser.add_argument("--rate", type=parse_rate, default=DEFAULT_RATE,
                        help=f"events per second, or 'max' (default {DEFAULT_RATE:g}: slow enough to watch it learn)")
    parser.add_argument("--users", type=_positive, default=DEFAULT_USERS,
                        help=f"synthetic stream: number of users (default {DEFAULT_USERS:,})")
    parser.add_argument("--items", type=_positive, default=DEFAULT_ITEMS,
                        help=f"synthetic stream: number of items (default {DEFAULT_ITEMS:,})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic stream and of the demo's choices")
    parser.add_argument("--codec", default=None,
                        help="per-user state codec the trainer writes and serving reads: full, int8, window or pages "
                             "(default: state.codec of the configuration)")
    parser.add_argument("--device", default="auto", help="serving device: auto, cpu or cuda[:N] (default auto)")
    parser.add_argument("--recommend-rate", type=float, default=20.0,
                        help="Recommend calls per second from the demo's gRPC client (default 20)")
    parser.add_argument("--probes", type=int, default=20,
                        help="freshness probe events spread over the run (default 20; 0: none)")
    parser.add_argument("--report-dir", default=None,
                        help="where the report goes (default runs/demo-<timestamp>/)")
    parser.add_argument("--view", choices=("auto", "tty", "plain", "off"), default="auto",
                        help="live view: redrawn in place (tty), one line per second (plain), none (off); "
                             "auto: tty when stdout is a terminal")




def run_demo(config: LiverecConfig, args: argparse.Namespace) -> int:
    """`liverec demo` (see the module docstring): 0 when every event was learned and every probe
    seen, 1 on failure, 130 when interrupted. The work lives in `demo_run` (heavy imports)."""
    from liverec.platform.demo_run import run

    return run(config, args)
