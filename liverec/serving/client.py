"""A small Python client for liverec.v1.Recommender, and the `liverec recommend` command.

Errors stay gRPC's own (`grpc.RpcError` with the server's status code and message), so a caller
can tell a bad request (INVALID_ARGUMENT) from a busy replica (RESOURCE_EXHAUSTED, UNAVAILABLE).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from liverec.platform.config import LiverecConfig
from liverec.v1 import recommender_pb2, recommender_pb2_grpc

DEFAULT_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class ScoredItem:
    item_id: int
    score: float


@dataclass(frozen=True)
class Recommendation:
    """One Recommend response (fields as documented in recommender.proto)."""

    items: list[ScoredItem]
    model_version: int
    state_version: int
    staleness_ms: int
    cold_start: bool

    @property
    def item_ids(self) -> list[int]:
        return [i.item_id for i in self.items]


class RecommenderClient:
    """A channel to one replica (or a load balancer in front of several); close it, or use `with`."""

    def __init__(self, target: str) -> None:
        self.target = target
        self._channel = grpc.insecure_channel(target)
        self._stub = recommender_pb2_grpc.RecommenderStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def recommend(self, user_id: int, k: int = 10, candidates: Iterable[int] | None = None,
                  exclude: Iterable[int] | None = None, exclude_seen: bool = False,
                  timeout: float = DEFAULT_TIMEOUT_S) -> Recommendation:
        """Top-k items for a user (over `candidates` only, when given); raises grpc.RpcError."""
        request = recommender_pb2.RecommendRequest(user_id=user_id, k=k, candidate_item_ids=list(candidates or ()),
                                                   exclude_item_ids=list(exclude or ()), exclude_seen=exclude_seen)
        response = self._stub.Recommend(request, timeout=timeout)
        return Recommendation([ScoredItem(i.item_id, i.score) for i in response.items], response.model_version,
                              response.state_version, response.staleness_ms, response.cold_start)

    def health(self, service: str = "", timeout: float = DEFAULT_TIMEOUT_S) -> str:
        """The grpc.health.v1 status name of `service` ("" = the whole server), e.g. "SERVING"."""
        response = self._health.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> RecommenderClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _ids(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated item ids, got {text!r}") from None


def build_parser(default_target: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="liverec recommend", description="Ask a serving replica for a user's top-k.")
    parser.add_argument("user", type=int, help="user id (> 0)")
    parser.add_argument("--k", type=int, default=10, help="how many items (default 10)")
    parser.add_argument("--target", default=default_target, help=f"HOST:PORT of the replica (default {default_target})")
    parser.add_argument("--candidates", type=_ids, help="rank only these items: comma-separated ids")
    parser.add_argument("--exclude", type=_ids, help="items never to return: comma-separated ids")
    parser.add_argument("--exclude-seen", action="store_true", help="also exclude the user's history")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="deadline in seconds")
    parser.add_argument("--json", action="store_true", help="print the response as JSON")
    return parser


def format_table(user: int, rec: Recommendation) -> str:
    kind = "cold start (popular items)" if rec.cold_start else f"state version {rec.state_version}, " \
        f"staleness {rec.staleness_ms} ms"
    lines = [f"user {user}: model version {rec.model_version}, {kind}", f"{'rank':>4}  {'item':>12}  {'score':>10}"]
    lines += [f"{rank:>4}  {item.item_id:>12}  {item.score:>10.4f}" for rank, item in enumerate(rec.items, 1)]
    return "\n".join(lines)


def main(argv: Sequence[str] | None, config: LiverecConfig) -> int:
    """`liverec recommend USER [--k N] [--target HOST:PORT] ...`: 0 on an answer, 1 on a gRPC error."""
    args = build_parser(f"{config.serving.host}:{config.serving.port}").parse_args(
        list(sys.argv[1:] if argv is None else argv))
    with RecommenderClient(args.target) as client:
        try:
            rec = client.recommend(args.user, args.k, args.candidates, args.exclude, args.exclude_seen, args.timeout)
        except grpc.RpcError as err:
            print(f"liverec recommend: {err.code().name}: {err.details()}", file=sys.stderr)
            return 1
    print(json.dumps({"user_id": args.user, **asdict(rec)}) if args.json else format_table(args.user, rec))
    return 0
