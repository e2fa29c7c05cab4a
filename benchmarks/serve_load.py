"""The serving benchmark's load generator: a separate process sending Recommend over real gRPC.

Started by `benchmarks.serve` (one or more at a time) and driven by JSON lines on stdin; it
imports grpc and the generated stubs only (no torch). Answers are lines starting with "@@ ".

- {"cmd": "connect", "target": "HOST:PORT"}: open a grpc.aio channel and send a few untimed
  requests, so that connection set-up is never measured.
- {"cmd": "run", "mode": "closed"|"open", "level": L, "duration": S, "start_at": T, "k": K}:
  wait until wall-clock time T (so that several generators start together), then load for S
  seconds and answer with the results.
  closed: L coroutines, each sending the next request when its previous one returned.
  open: Poisson arrivals at L requests/s, each request sent at its scheduled time without
  waiting for earlier ones. Latency counts from the scheduled time, so a generator or server
  that falls behind shows in the latency (no coordinated omission); `send_lag_ms` says how late
  the generator itself sent (it should stay near zero).
- {"cmd": "quit"}.

Latencies are client-side, in ms, for requests that returned OK; other outcomes are counted by
gRPC status code. `cpu_s` is this process's CPU time during the run: near `elapsed_s`, the
generator itself would be the bottleneck. Users are drawn uniformly from --users-file or --users-range.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections import Counter
from pathlib import Path

import grpc
import grpc.aio

from liverec.v1 import recommender_pb2, recommender_pb2_grpc

PREFIX = "@@ "
MAX_IN_FLIGHT = 8192  # open loop: beyond this many outstanding requests, arrivals are counted as dropped


def reply(obj: object) -> None:
    print(PREFIX + json.dumps(obj), flush=True)


class Run:
    def __init__(self, users: list[int], rng: random.Random, k: int, timeout: float) -> None:
        self.users = users
        self.rng = rng
        self.k = k
        self.timeout = timeout
        self.latencies: list[float] = []
        self.send_lag: list[float] = []
        self.errors: Counter[str] = Counter()
        self.cold = 0
        self.sent = 0
        self.dropped = 0
        self.in_flight = 0

    async def one(self, stub: recommender_pb2_grpc.RecommenderStub, start: float) -> None:
        request = recommender_pb2.RecommendRequest(user_id=self.rng.choice(self.users), k=self.k)
        self.sent += 1
        self.in_flight += 1
        try:
            response = await stub.Recommend(request, timeout=self.timeout)
            self.latencies.append((time.perf_counter() - start) * 1000.0)
            self.cold += response.cold_start
        except grpc.aio.AioRpcError as err:
            self.errors[err.code().name] += 1
        finally:
            self.in_flight -= 1

    async def closed(self, stubs: list[recommender_pb2_grpc.RecommenderStub], concurrency: int,
                     until: float) -> None:
        async def client(stub: recommender_pb2_grpc.RecommenderStub) -> None:
            while time.perf_counter() < until:
                await self.one(stub, time.perf_counter())

        await asyncio.gather(*(client(stubs[i % len(stubs)]) for i in range(concurrency)))

    async def open(self, stubs: list[recommender_pb2_grpc.RecommenderStub], rate: float, start: float,
                   until: float) -> None:
        tasks: set[asyncio.Task] = set()
        t = start
        sent = 0
        while True:
            t += self.rng.expovariate(rate)
            if t >= until:
                break
            delay = t - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if self.in_flight >= MAX_IN_FLIGHT:
                self.dropped += 1
                continue
            self.send_lag.append((time.perf_counter() - t) * 1000.0)
            task = asyncio.create_task(self.one(stubs[sent % len(stubs)], t))
            sent += 1
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.wait(tasks, timeout=self.timeout + 1.0)


async def worker(args: argparse.Namespace, users: list[int]) -> None:
    loop = asyncio.get_running_loop()
    rng = random.Random(args.seed)
    channels: list[grpc.aio.Channel] = []
    stubs: list[recommender_pb2_grpc.RecommenderStub] = []
    reply({"ready": True, "users": len(users)})
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            break
        msg = json.loads(line)
        cmd = msg.get("cmd")
        try:
            if cmd == "quit":
                break
            if cmd == "connect":
                for channel in channels:
                    await channel.close()
                # Several connections when the server is several processes behind one port (the
                # kernel spreads connections, not requests); a channel option makes each its own.
                channels = [grpc.aio.insecure_channel(msg["target"], options=[("grpc.use_local_subchannel_pool", 1),
                                                                              ("liverec.bench.channel", i)])
                            for i in range(int(msg.get("channels", 1)))]
                stubs = [recommender_pb2_grpc.RecommenderStub(channel) for channel in channels]
                for channel, stub in zip(channels, stubs):
                    await asyncio.wait_for(channel.channel_ready(), timeout=30)
                    for _ in range(3):
                        await stub.Recommend(recommender_pb2.RecommendRequest(user_id=rng.choice(users), k=10),
                                             timeout=30)
                reply({"connected": msg["target"]})
            elif cmd == "run":
                if not stubs:
                    raise RuntimeError("run before connect")
                run = Run(users, rng, int(msg.get("k", 10)), args.timeout)
                wait = msg.get("start_at", 0) - time.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                start, cpu0 = time.perf_counter(), time.process_time()
                until = start + float(msg["duration"])
                if msg["mode"] == "closed":
                    await run.closed(stubs, int(msg["level"]), until)
                else:
                    await run.open(stubs, float(msg["level"]), start, until)
                reply({"mode": msg["mode"], "level": msg["level"], "elapsed_s": time.perf_counter() - start,
                       "cpu_s": time.process_time() - cpu0,
                       "sent": run.sent, "ok": len(run.latencies), "errors": dict(run.errors), "dropped": run.dropped,
                       "cold_start": run.cold, "latencies_ms": [round(x, 4) for x in run.latencies],
                       "send_lag_ms": [round(x, 3) for x in run.send_lag]})
            else:
                reply({"error": f"unknown command {msg!r}"})
        except Exception as exc:  # answer on the protocol; the orchestrator decides what to do
            reply({"error": f"{type(exc).__name__}: {exc}"})
    for channel in channels:
        await channel.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.serve_load", description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help="(the only mode) take commands on stdin")
    parser.add_argument("--timeout", type=float, default=2.0, help="each request's deadline, seconds")
    parser.add_argument("--users-file", help="whitespace-separated user ids to draw from (uniformly)")
    parser.add_argument("--users-range", type=int, nargs=2, default=None, metavar=("FIRST", "LAST"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.users_file:
        users = [int(x) for x in Path(args.users_file).read_text().split()]
    elif args.users_range:
        users = list(range(args.users_range[0], args.users_range[1] + 1))
    else:
        parser.error("give --users-file or --users-range")
    if not users:
        parser.error("no users to draw from")
    asyncio.run(worker(args, users))
    return 0


if __name__ == "__main__":
    sys.exit(main())
