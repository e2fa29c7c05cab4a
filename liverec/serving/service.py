"""The gRPC face of a serving replica: `liverec.v1.Recommender`, health, reflection, batching.

The server is grpc.aio on an event loop of its own thread: a Recommend call is a coroutine that
validates the request, queues it and awaits its answer until the deadline, so thousands of
calls in flight cost no thread each. One worker thread takes batches of up to `max_batch`
requests (waiting at most `max_wait_ms` after the oldest one arrived to fill a batch; with 0,
whatever queued while the previous batch was scored) and scores each batch with one backend
call against one model snapshot, read once per batch so that no response mixes two parameter
versions; a whole batch's answers go back to the event loop in one hand-over. Two threads in
all, rather than one per call: under load, Python threads that each wake for one request would
fight the scorer for the interpreter lock. Beyond `max_queue` waiting requests a call is refused
at once with RESOURCE_EXHAUSTED: queueing it would only add latency the caller cannot see coming.

Health (grpc.health.v1) reports NOT_SERVING for "" and "liverec.v1.Recommender" until the
backend says it is ready (it has a model and is caught up), and again from the start of a drain.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from collections import deque
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar
from wsgiref.simple_server import WSGIServer

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)

from liverec.platform.config import ServingConfig
from liverec.serving.backend import Answer, ModelSnapshot, Query
from liverec.v1 import recommender_pb2, recommender_pb2_grpc

log = logging.getLogger(__name__)

T = TypeVar("T")
SERVICE_NAME = recommender_pb2.DESCRIPTOR.services_by_name["Recommender"].full_name
DEADLINE_SLACK_S = 0.25  # see RecommenderService.Recommend
READY_POLL_S = 0.1  # how often health re-reads backend.ready()
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.015, 0.025, 0.05, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Backend(Protocol):
    """What the service needs from a replica: the current model, scoring, and readiness."""

    def snapshot(self) -> ModelSnapshot | None: ...

    def recommend(self, snapshot: ModelSnapshot, queries: list[Query]) -> list[Answer]: ...

    def ready(self) -> bool: ...


class RpcFailure(Exception):
    """A request's outcome other than OK: the status code and message its caller gets."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


class ServingMetrics:
    """The service's Prometheus metrics; the replica adds its own to the same registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.request_seconds = Histogram("liverec_serving_request_seconds",
                                         "Server-side latency of an RPC, by method and status code.",
                                         ["method", "code"], buckets=LATENCY_BUCKETS, registry=r)
        self.requests = Counter("liverec_serving_requests", "RPCs finished, by method and status code.",
                                ["method", "code"], registry=r)
        self.batch_size = Histogram("liverec_serving_batch_size", "Requests scored together in one backend call.",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.queue_depth = Gauge("liverec_serving_queue_depth", "Requests waiting to be batched.", registry=r)
        self.cold_start = Counter("liverec_serving_cold_start", "Recommend answers for users without state.",
                                  registry=r)
        self._children: dict[tuple[str, grpc.StatusCode], tuple[Any, Any]] = {}

    def finished(self, method: str, code: grpc.StatusCode, seconds: float) -> None:
        # Children looked up once per (method, code): `labels()` costs more than the observation,
        # and this runs on the event loop for every call.
        children = self._children.get((method, code))
        if children is None:
            children = self._children[(method, code)] = (self.request_seconds.labels(method, code.name),
                                                         self.requests.labels(method, code.name))
        children[0].observe(seconds)
        children[1].inc()


@dataclass(eq=False, slots=True)
class Pending:
    """One queued request. Its future belongs to the event loop: only the loop settles it."""

    query: Query
    deadline: float  # time.monotonic() at which the caller's deadline passes
    future: asyncio.Future[Answer]
    enqueued: float = field(default_factory=time.monotonic)
    abandoned: bool = False  # the call ended unanswered (deadline, cancellation): never score it


Outcome = tuple[Pending, "Answer | RpcFailure"]


def _settle(outcomes: list[Outcome]) -> None:
    """On the event loop: hand each waiting call its answer or failure (first outcome wins)."""
    for pending, outcome in outcomes:
        if not pending.future.done():
            if isinstance(outcome, RpcFailure):
                pending.future.set_exception(outcome)
            else:
                pending.future.set_result(outcome)


def _deliver(outcomes: list[Outcome]) -> None:
    """From any thread: settle outcomes on their loop in one hand-over (a closed loop: the calls
    are gone, nobody waits for them)."""
    if outcomes:
        try:
            outcomes[0][0].future.get_loop().call_soon_threadsafe(_settle, outcomes)
        except RuntimeError:
            pass


class Batcher:
    """A bounded queue of requests and the single worker thread that scores them in batches."""

    def __init__(self, backend: Backend, config: ServingConfig, metrics: ServingMetrics) -> None:
        self._backend = backend
        self._max_batch = config.max_batch
        self._max_wait_s = config.max_wait_ms / 1000.0
        self._max_queue = config.max_queue
        self._metrics = metrics
        self._queue: deque[Pending] = deque()
        self._cond = threading.Condition()
        self._draining = False
        self._stopping = False
        self._busy = False  # a batch is being scored
        self._worker = threading.Thread(target=self._run, name="liverec-batcher", daemon=True)

    def start(self) -> None:
        self._worker.start()

    def submit(self, query: Query, deadline: float, future: asyncio.Future[Answer]) -> Pending:
        """Queue a request, or refuse it now (queue full, or draining)."""
        pending = Pending(query, deadline, future)
        with self._cond:
            if self._draining:
                raise RpcFailure(grpc.StatusCode.UNAVAILABLE, "replica is draining; retry on another replica")
            if len(self._queue) >= self._max_queue:
                raise RpcFailure(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                 f"request queue full ({self._max_queue} waiting); retry later")
            self._queue.append(pending)
            self._metrics.queue_depth.set(len(self._queue))
            self._cond.notify()
        return pending

    def drain(self) -> None:
        """Refuse new requests; those already queued are still scored."""
        with self._cond:
            self._draining = True

    def wait_idle(self, timeout: float) -> bool:
        """Wait until nothing is queued or being scored; False if `timeout` passed first."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._queue and not self._busy, timeout)

    def stop(self) -> None:
        """End the worker after its current batch. Called once gRPC has ended every RPC, so
        whatever is still queued belongs to a call that is gone: it is failed, never scored."""
        with self._cond:
            self._draining = self._stopping = True
            left = [(self._queue.popleft(), RpcFailure(grpc.StatusCode.UNAVAILABLE, "server stopped"))
                    for _ in range(len(self._queue))]
            self._metrics.queue_depth.set(0)
            self._cond.notify()
        _deliver(left)  # type: ignore[arg-type]
        if self._worker.is_alive():
            self._worker.join()

    def _run(self) -> None:
        while (batch := self._take()) is not None:
            try:
                _deliver(self._score(batch))
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _take(self) -> list[Pending] | None:
        """The next batch: wait for a first request, then up to max_wait after it arrived for more."""
        with self._cond:
            while not self._queue:
                if self._stopping:
                    return None
                self._cond.wait()
            fill_by = self._queue[0].enqueued + self._max_wait_s
            while len(self._queue) < self._max_batch and not self._stopping:
                left = fill_by - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            batch = [self._queue.popleft() for _ in range(min(self._max_batch, len(self._queue)))]
            self._busy = True
            self._metrics.queue_depth.set(len(self._queue))
        return batch

    def _score(self, batch: list[Pending]) -> list[Outcome]:
        """Outcomes of a batch: its live requests scored against one snapshot; expired or
        abandoned ones never are."""
        now = time.monotonic()
        outcomes: list[Outcome] = [(p, RpcFailure(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed while queued"))
                                   for p in batch if now >= p.deadline and not p.abandoned]
        live = [p for p in batch if now < p.deadline and not p.abandoned]
        if not live:
            return outcomes
        self._metrics.batch_size.observe(len(live))
        try:
            snapshot = self._backend.snapshot()  # once per batch: one version for every answer in it
            if snapshot is None:
                failure = RpcFailure(grpc.StatusCode.UNAVAILABLE, "no model version loaded yet")
                return outcomes + [(p, failure) for p in live]
            answers = self._backend.recommend(snapshot, [p.query for p in live])
            if len(answers) != len(live):
                raise RuntimeError(f"backend returned {len(answers)} answers for {len(live)} queries")
        except Exception as exc:
            log.exception("scoring a batch of %d requests failed", len(live))
            failure = RpcFailure(grpc.StatusCode.INTERNAL, f"scoring failed: {type(exc).__name__}: {exc}")
            return outcomes + [(p, failure) for p in live]
        return outcomes + list(zip(live, answers))


def _ids(values: object, name: str, limit: int) -> np.ndarray:
    """A repeated id field as int64, refused when too long or not all positive."""
    ids = np.asarray(values, dtype=np.int64)
    if len(ids) > limit:
        raise RpcFailure(grpc.StatusCode.INVALID_ARGUMENT, f"at most {limit} {name} allowed, got {len(ids)}")
    bad = ids[ids <= 0]
    if len(bad):
        raise RpcFailure(grpc.StatusCode.INVALID_ARGUMENT, f"{name} must be > 0, got {int(bad[0])}")
    return ids


def query_from_request(request: recommender_pb2.RecommendRequest, config: ServingConfig) -> Query:
    """Validate a request against the documented rules (INVALID_ARGUMENT) and build its Query."""
    user_id, k = request.user_id, request.k
    if user_id <= 0:
        raise RpcFailure(grpc.StatusCode.INVALID_ARGUMENT, f"user_id must be > 0, got {user_id}")
    if not 1 <= k <= config.max_k:
        raise RpcFailure(grpc.StatusCode.INVALID_ARGUMENT, f"k must be in 1..{config.max_k}, got {k}")
    if not request.candidate_item_ids and not request.exclude_item_ids:  # the common case, without numpy
        return Query(user_id, k, None, None, request.exclude_seen)
    candidates = _ids(request.candidate_item_ids, "candidate_item_ids", config.max_candidates)
    unique, counts = np.unique(candidates, return_counts=True)
    if len(unique) < len(candidates):
        raise RpcFailure(grpc.StatusCode.INVALID_ARGUMENT,
                         f"candidate_item_ids must be distinct; {int(unique[counts > 1][0])} repeats")
    exclude = _ids(request.exclude_item_ids, "exclude_item_ids", config.max_candidates)
    return Query(request.user_id, request.k, candidates if len(candidates) else None,
                 exclude if len(exclude) else None, request.exclude_seen)


def response_from_answer(answer: Answer) -> recommender_pb2.RecommendResponse:
    items = [recommender_pb2.ScoredItem(item_id=i, score=s)
             for i, s in zip(answer.items.tolist(), answer.scores.tolist())]
    return recommender_pb2.RecommendResponse(items=items, model_version=answer.model_version,
                                             state_version=answer.state_version,
                                             staleness_ms=answer.staleness_ms, cold_start=answer.cold_start)


class RecommenderService(recommender_pb2_grpc.RecommenderServicer):
    """liverec.v1.Recommender: validate, queue for the batcher, await the answer until the deadline."""

    def __init__(self, batcher: Batcher, config: ServingConfig, metrics: ServingMetrics) -> None:
        self._batcher = batcher
        self._config = config
        self._metrics = metrics

    async def Recommend(self, request: recommender_pb2.RecommendRequest,  # noqa: N802 (gRPC method name)
                        context: grpc.aio.ServicerContext) -> recommender_pb2.RecommendResponse:
        started = time.perf_counter()
        remaining = context.time_remaining()
        deadline = time.monotonic() + (remaining if remaining is not None else threading.TIMEOUT_MAX)
        try:
            response = await self._recommend(request, deadline)
        except RpcFailure as failure:
            self._metrics.finished("Recommend", failure.code, time.perf_counter() - started)
            await context.abort(failure.code, failure.message)
        except asyncio.CancelledError:
            # The call ended under us. The caller's deadline fires on its side first (by the
            # request's transit time) and reaches us as a cancellation: one that leaves less
            # than DEADLINE_SLACK_S of our deadline counts as DEADLINE_EXCEEDED.
            code = (grpc.StatusCode.DEADLINE_EXCEEDED if deadline - time.monotonic() <= DEADLINE_SLACK_S
                    else grpc.StatusCode.CANCELLED)
            self._metrics.finished("Recommend", code, time.perf_counter() - started)
            raise
        self._metrics.finished("Recommend", grpc.StatusCode.OK, time.perf_counter() - started)
        if response.cold_start:
            self._metrics.cold_start.inc()
        return response

    async def _recommend(self, request: recommender_pb2.RecommendRequest,
                         deadline: float) -> recommender_pb2.RecommendResponse:
        query = query_from_request(request, self._config)
        pending = self._batcher.submit(query, deadline, asyncio.get_running_loop().create_future())
        try:
            # No timer of our own: gRPC cancels this coroutine when the deadline passes, and the
            # batcher drops requests whose deadline passed while queued.
            answer = await pending.future
        except BaseException:
            pending.abandoned = True
            raise
        try:
            return response_from_answer(answer)
        except Exception as exc:
            log.exception("Recommend failed")
            raise RpcFailure(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}") from exc


class RecommenderServer:
    """The grpc.aio server on its event-loop thread, and what shares its lifetime: the batcher,
    the health updater, /metrics. Its methods are called from ordinary threads.

    `stop(grace)` drains: new Recommend calls are refused (UNAVAILABLE) and health turns
    NOT_SERVING at once, while calls already queued or being scored get up to `grace` seconds
    to finish; then gRPC, the batcher and the metrics endpoint stop. `grace=None` keeps gRPC's
    meaning (abort in-flight calls now).
    """

    def __init__(self, config: ServingConfig, backend: Backend, metrics: ServingMetrics) -> None:
        self._backend = backend
        self.metrics = metrics
        self.registry = metrics.registry
        self.drain_s = config.drain_s
        self._batcher = Batcher(backend, config, metrics)
        self._loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(target=self._loop.run_forever, name="liverec-grpc", daemon=True)
        self._loop_thread.start()
        self._stopping = threading.Event()
        self._terminated = threading.Event()
        self._watch_task: asyncio.Task[None] | None = None
        self._metrics_http: WSGIServer | None = None
        self.metrics_port: int | None = None
        try:
            self.port = self._call(self._build(config))
            if config.metrics_port >= 0:
                self._metrics_http = start_http_server(config.metrics_port, addr=config.metrics_host,
                                                       registry=metrics.registry)[0]
                self.metrics_port = self._metrics_http.server_address[1]
        except BaseException:
            self._call(self._close(None))
            self._loop.call_soon_threadsafe(self._loop.stop)
            raise

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    async def _build(self, config: ServingConfig) -> int:
        # A port in use is an error, unless this is one of several workers meant to share it.
        self._server = grpc.aio.server(options=[("grpc.so_reuseport", int(config.workers > 1))])
        recommender_pb2_grpc.add_RecommenderServicer_to_server(
            RecommenderService(self._batcher, config, self.metrics), self._server)
        self._health = health_aio.HealthServicer()
        await _set_health(self._health, False)
        # Kubernetes' liveness probe asks "liveness": a replica catching up is alive, just not ready.
        await self._health.set("liveness", health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME),
                                            self._server)
        return self._server.add_insecure_port(f"{config.host}:{config.port}")  # RuntimeError: cannot bind

    def start(self) -> None:
        self._batcher.start()
        self._call(self._start())

    async def _start(self) -> None:
        await self._server.start()
        self._watch_task = asyncio.create_task(self._watch_ready())

    async def _close(self, grace: float | None) -> None:
        """Stop gRPC (in-flight calls get `grace`), the health updater and the loop's helpers."""
        if hasattr(self, "_server"):
            await self._server.stop(grace)
        if self._watch_task is not None:
            self._watch_task.cancel()
            await asyncio.gather(self._watch_task, return_exceptions=True)
        await asyncio.get_running_loop().shutdown_default_executor()

    def stop(self, grace: float | None) -> threading.Event:
        """Drain (see the class docstring); the returned event is set once everything has stopped.

        The gRPC server keeps accepting calls until the batcher is idle, so that a call arriving
        mid-drain gets a clean UNAVAILABLE (retryable elsewhere) from the service, and health
        checks keep answering NOT_SERVING, rather than racing the transport's shutdown.
        """
        if self._stopping.is_set():  # a second stop joins the first
            return self._terminated
        self._batcher.drain()
        self._stopping.set()
        self._call(self._health.enter_graceful_shutdown())
        until = None if grace is None else time.monotonic() + grace

        def finish() -> None:
            if until is not None:
                self._batcher.wait_idle(max(0.0, until - time.monotonic()))
            left = None if until is None else max(0.0, until - time.monotonic())
            self._call(self._close(left))  # in-flight calls (responses being sent) get what is left
            self._batcher.stop()
            if self._metrics_http is not None:
                self._metrics_http.shutdown()
                self._metrics_http.server_close()
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._loop_thread.join()
            self._terminated.set()

        threading.Thread(target=finish, name="liverec-drain", daemon=True).start()
        return self._terminated

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        """grpc.Server's contract: False once terminated, True if `timeout` passed first."""
        return not self._terminated.wait(timeout)

    async def _watch_ready(self) -> None:
        """Mirror backend.ready() into health until the drain starts (which fixes NOT_SERVING)."""
        serving = False
        loop = asyncio.get_running_loop()
        while not self._stopping.is_set():
            try:
                ready = bool(await loop.run_in_executor(None, self._backend.ready))
            except Exception:
                log.exception("backend.ready() failed; reporting NOT_SERVING")
                ready = False
            if ready != serving and not self._stopping.is_set():
                serving = ready
                await _set_health(self._health, ready)
                log.info("health: %s", "SERVING" if ready else "NOT_SERVING")
            await asyncio.sleep(READY_POLL_S)


async def _set_health(servicer: health_aio.HealthServicer, serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", SERVICE_NAME):  # "" is the whole server, by the health-checking convention
        await servicer.set(name, status)


def build_server(config: ServingConfig, backend: Backend,
                 registry: CollectorRegistry | None = None) -> tuple[RecommenderServer, int]:
    """A server bound to config.host:config.port (port 0: a free one), not yet started.

    `registry`: where the service's metrics go (a fresh one when None); the replica registers
    its own metrics there too, so one /metrics serves both.

    Health starts NOT_SERVING; /metrics is served on config.metrics_host:metrics_port from now
    on unless metrics_port is -1.
    """
    server = RecommenderServer(config, backend, ServingMetrics(registry))
    return server, server.port


def serve_until_signalled(server: RecommenderServer) -> None:
    """Block until SIGTERM or SIGINT, then drain for up to server.drain_s (main thread only).

    The previous signal handlers are restored on return, so a caller can go on shutting down
    the rest of the replica with its usual handling.
    """
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda signum, _frame: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        stop.wait()
        log.info("draining for up to %.1f s", server.drain_s)
        server.stop(server.drain_s).wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
