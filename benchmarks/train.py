"""`liverec bench train`: end-to-end training events/s from the local broker, with per-stage shares.

A dataset is replayed into a fresh local broker first; then the real `TrainerWorker` (default
model, default batching, checkpoints on) consumes it, and the wall time is split into the stages
it records: consume (Kafka polls), decode, history (RocksDB reads/writes, window building),
prequential (test-then-train scoring), store (embedding lookups, admission, sparse updates),
forward_backward (dense model and Adam), state refresh, checkpoint, publish. The trainer's
kernel warm-up (up to ~15 s with numba's cache cold) runs before the timing starts: `liverec bench
startup` measures it; `run()` then finds the kernels compiled. The worker receives
(consume, decode, state refresh) on its main thread while the learner (history, prequential,
store, forward_backward) runs on its own, so the two threads' shares of the wall time overlap
and may add up to more than 100%; each thread's own total says how busy it was.

`--in-memory` measures the learner's step alone over in-memory micro-batches (no Kafka) on the
chosen `--device`, which is how the H200 row is produced through the device tool.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.report import machine, report
from liverec.platform.broker import LocalBroker
from liverec.platform.config import LiverecConfig, load_config
from liverec.platform.datasets import EventTable, load_dataset
from liverec.platform.kafka import native_crc32c
from liverec.platform.replay import rebase_times, replay_into

RESULTS = Path(__file__).resolve().parent / "results"
STAGES = ("consume", "decode", "history", "prequential", "store", "forward_backward", "state_refresh", "checkpoint",
          "publish")
LEARNER_STAGES = ("history", "prequential", "store", "forward_backward")  # on the learner's thread; the rest on the main one


def end_to_end(config: LiverecConfig, table: EventTable, events: int) -> dict:
    from liverec.trainer.worker import TrainerWorker

    with LocalBroker() as broker, tempfile.TemporaryDirectory(prefix="liverec-bench-train-") as state_dir:
        kafka = dataclasses.replace(config.kafka, bootstrap_servers=broker.bootstrap)
        trainer = dataclasses.replace(config.trainer, state_dir=state_dir, metrics_port=-1)
        config = dataclasses.replace(config, kafka=kafka, trainer=trainer)
        replay_into(config, table, limit=events)
        worker = TrainerWorker(config)
        worker.warm_up()  # compiling the kernels is start-up (`bench startup`), not training: outside the timing
        start = time.perf_counter()
        counters = worker.run(max_events=events)
        wall = time.perf_counter() - start
    stages = {s: worker.stage_seconds.get(s, 0.0) for s in STAGES}
    learner = sum(stages[s] for s in LEARNER_STAGES)
    main_thread = sum(v for s, v in stages.items() if s not in LEARNER_STAGES)
    return {
        "mode": "end_to_end", "events": counters.applied, "seconds": wall, "events_per_s": counters.applied / wall,
        "stage_seconds": stages, "stage_share": {k: v / wall for k, v in stages.items()},
        "thread_busy_share": {"main": main_thread / wall, "learner": learner / wall},
        "online": worker.online_metrics(),
    }


def in_memory(config: LiverecConfig, table: EventTable, events: int, device: str) -> dict:
    import numpy as np

    from liverec.embedding_store.store import EmbeddingStore
    from liverec.trainer.decode import EventBatch
    from liverec.trainer.history import HistoryStore
    from liverec.trainer.items import StoreItemTable
    from liverec.trainer.learner import OnlineLearner
    from liverec.trainer.worker import item_table_config

    tc = config.trainer
    with tempfile.TemporaryDirectory(prefix="liverec-bench-step-") as tmp:
        store = EmbeddingStore([item_table_config(config)], seed=tc.seed, device=device)
        history = HistoryStore(Path(tmp) / "history", config.model.encoder.max_len)
        learner = OnlineLearner.from_config(config, StoreItemTable(store), history, device=device)
        n = min(events, len(table))
        stages: dict[str, float] = {}
        start = time.perf_counter()
        for s in range(0, n, tc.batch_events):
            sl = table.slice(s, min(n, s + tc.batch_events))
            batch = EventBatch(sl.user_id.copy(), sl.item_id.copy(), sl.action.copy(), sl.value.copy(),
                               sl.event_time_ms.copy(), np.zeros(len(sl), np.int32), np.arange(s, s + len(sl)))
            result = learner.step(batch)
            for stage, sec in result.seconds.items():
                stages[stage] = stages.get(stage, 0.0) + sec
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
        history.close()
    return {"mode": "in_memory", "device": device, "events": n, "seconds": wall, "events_per_s": n / wall,
            "stage_seconds": stages, "stage_share": {k: v / wall for k, v in stages.items()}}


def print_table(result: dict) -> None:
    print(f"train benchmark — {result['mode']}, {result['events']:,} events of {result['dataset']}, "
          f"{result['machine']}, {result['kafka_crc32c']} CRC-32C, {result['date']}")
    print(f"  events/s: {result['events_per_s']:,.0f}   wall: {result['seconds']:.1f} s")
    threaded = "thread_busy_share" in result
    print(f"  {'stage':<18}{'thread' if threaded else '':<9}{'seconds':>10}{'share':>8}")
    for stage, sec in result["stage_seconds"].items():
        thread = ("learner" if stage in LEARNER_STAGES else "main") if threaded else ""
        print(f"  {stage:<18}{thread:<9}{sec:>10.2f}{result['stage_share'][stage]:>8.1%}")
    if threaded:
        busy = result["thread_busy_share"]
        print(f"  busy: main thread {busy['main']:.0%} of the wall time, learner thread {busy['learner']:.0%} "
              "(they overlap)")
    if "online" in result:
        o = result["online"]
        print(f"  prequential HR@10 {o['HR@10']:.4f} (popularity {o['popularity_HR@10']:.4f}), "
              f"NDCG@10 {o['NDCG@10']:.4f} (popularity {o['popularity_NDCG@10']:.4f})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="liverec bench train", description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default=str(Path(__file__).resolve().parents[2] / "shared/data/ml-100k"))
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--quick", action="store_true", help="3,000 events")
    parser.add_argument("--in-memory", action="store_true", help="learner steps only, no Kafka")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    events = 3_000 if args.quick else args.events
    config = load_config(None)
    table, _ = rebase_times(load_dataset(args.dataset).table)
    if args.in_memory:
        result = in_memory(config, table, events, args.device)
    else:
        result = end_to_end(config, table, events)
    result.update({"benchmark": "train", "dataset": Path(args.dataset).name, "date": time.strftime("%Y-%m-%d"),
                   "machine": machine(), "threads": torch.get_num_threads(),
                   "kafka_crc32c": "native" if native_crc32c() else "pure-python",
                   "model": dataclasses.asdict(config.model), "batch_events": config.trainer.batch_events})
    out = args.out or RESULTS / ("train.json" if not args.in_memory else f"train_step_{args.device.split(':')[0]}.json")
    report(result, out, print_table, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
