"""GPU hash-index throughput: find and find-or-insert on the H200, against torch.searchsorted.

`python -m benchmarks.store_gpu` (needs CUDA and Triton; run through the device tool). Writes
benchmarks/results/store_gpu.json and prints a table.

Setup (issue 3): a table of 2^27 slots filled to load 0.5 and 0.75 (67M and 101M random
64-bit keys), batches of 1M keys, rows of dim 64 (for the find + gather column).
- find: 1M keys drawn from the table (all hits), through `kernels.cuda.find`.
- find-or-insert: 1M keys, a fraction `hit` from the table and the rest new distinct keys,
  on the full path the store would use: find -> dedup misses (first occurrence) -> allocate -> insert.
  Three ways: `HashIndex.find_or_insert` (the store's index, with its input checks), the
  literal kernel composition (`fused=False`) and the fused path (`fused=True`). The table is
  restored before every repeat, so each one inserts into the same state.
- torch.searchsorted over the same keys, sorted, in the same run: what torchrec's managed
  collision module does per lookup (index only: no value gather, no hit check).
- NVIDIA HierarchicalKV's published A100 figures, quoted as constants (not measured here).
- bandwidth: a device-to-device copy measured in the same run (bytes read + written). Each
  op's fraction counts 28 bytes per key (read the key, its int32 slot and its row's key, write
  the row): the least a lookup in this layout must move; random reads really cost a 32-byte
  sector each, so `sector_fraction` counts 80 bytes (2 sectors + the streamed key and result).
- Layout (format 2): int32 slots of row ids, keys per row (`row_keys`); see kernels/__init__.py.
Times are CUDA-event medians over repeats after warm-up.
"""

from __future__ import annotations

import argparse
import copy
import gc
import datetime as dt
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.report import write_result

RESULTS = Path(__file__).resolve().parent / "results" / "store_gpu.json"
HKV_A100 = {"find": (2.0, 2.5), "find_or_insert": (0.6, 1.1)}  # G keys/s, published, A100
TARGETS = {"find": 5.0, "find_or_insert": 2.0}  # G keys/s, issue 3
LOGICAL_BYTES = 28
_DEVICE = "cuda"
_LAST_SAMPLES: list[float] = []
SECTOR_BYTES = 80


def _time(fn: Callable[[], object], repeats: int, warmup: int = 3,
          setup: Callable[[], object] | None = None) -> float:
    """Median milliseconds of fn() by CUDA events; setup() runs untimed before each call.

    On the CPU (a smoke test under TRITON_INTERPRET=1) a host clock stands in.
    """
    for _ in range(warmup):
        if setup:
            setup()
        fn()
    times = _LAST_SAMPLES
    times.clear()
    gc.collect()
    gc.disable()  # as timeit does: a collection inside a timed call costs milliseconds
    try:
        _timed_repeats(fn, repeats, setup, times)
    finally:
        gc.enable()
    return statistics.median(times)


def _timed_repeats(fn: Callable[[], object], repeats: int, setup: Callable[[], object] | None,
                   times: list[float]) -> None:
    for _ in range(repeats):
        if setup:
            setup()
        if not torch.cuda.is_available():
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
            continue
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))


def _spread() -> list[float]:
    """10th and 90th percentile (ms) of the last timing's repeats."""
    q = statistics.quantiles(_LAST_SAMPLES, n=10) if len(_LAST_SAMPLES) > 1 else _LAST_SAMPLES * 9
    return [round(q[0], 4), round(q[-1], 4)]


def _random_keys(n: int, device: torch.device, gen: torch.Generator) -> torch.Tensor:
    """n distinct valid keys over the whole int64 range, in random order."""
    from liverec.embedding_store.kernels import TOMBSTONE_KEY

    hi = torch.randint(0, 2**32, (int(n * 1.01) + 1024,), device=device, generator=gen)
    lo = torch.randint(0, 2**32, hi.shape, device=device, generator=gen)
    keys = torch.unique((hi << 32) | lo)
    keys = keys[keys > TOMBSTONE_KEY]
    assert keys.numel() >= n
    return keys[torch.randperm(keys.numel(), device=device, generator=gen)[:n]]


def _snapshot(obj: object) -> dict[str, object]:
    """A copy of an object's attributes, tensors cloned (to reset a HashIndex between repeats)."""
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in vars(obj).items()}


def _restore_state(obj: object, state: dict[str, object]) -> None:
    for k, v in state.items():
        current = getattr(obj, k)
        if isinstance(v, torch.Tensor) and isinstance(current, torch.Tensor) and current.shape == v.shape:
            current.copy_(v)
        else:
            setattr(obj, k, v.clone() if isinstance(v, torch.Tensor) else v)


def copy_bandwidth(repeats: int) -> float:
    """Device-to-device copy bandwidth in GB/s, bytes read plus bytes written."""
    src = torch.randn(2**29 if torch.cuda.is_available() else 2**20, device=_DEVICE)  # 2 GiB ≫ L2
    dst = torch.empty_like(src)
    ms = _time(lambda: dst.copy_(src), repeats)
    return 2 * src.numel() * src.element_size() / ms / 1e6


def _row(op: str, variant: str, load: float, batch: int, ms: float, base: float | None,
         bandwidth: float, **extra: object) -> dict[str, object]:
    rate = batch / ms / 1e6  # G keys/s
    out: dict[str, object] = {"op": op, "variant": variant, "load_factor": load, "batch": batch,
                              "median_ms": round(ms, 4), "p10_p90_ms": _spread(),
                              "G_keys_per_s": round(rate, 3)}
    if base is not None:
        out["vs_searchsorted"] = round(rate / base, 2)
    hkv = HKV_A100.get(op)
    if hkv:
        out["vs_hkv_a100_published"] = [round(rate / hkv[1], 2), round(rate / hkv[0], 2)]
    if op in TARGETS:
        out["target_G_keys_per_s"] = TARGETS[op]
        out["meets_target"] = rate >= TARGETS[op]
    out["bandwidth_fraction"] = round(rate * 1e9 * LOGICAL_BYTES / (bandwidth * 1e9), 4)
    out["sector_fraction"] = round(rate * 1e9 * SECTOR_BYTES / (bandwidth * 1e9), 4)
    out.update(extra)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--log2-capacity", type=int, default=27)
    parser.add_argument("--batch", type=int, default=1 << 20)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--loads", default="0.5,0.75")
    parser.add_argument("--hits", default="0.5,0.9,1.0", help="hit fractions for find-or-insert")
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--blocks", default="32:1:4,32:1:8,64:1:4,64:1:8,64:2:4,128:4:4",
                        help="BLOCK:num_warps:GROUP configurations swept on find; the best is used for all")
    parser.add_argument("--foi-blocks", default="32:1:4,64:2:4,128:4:4,32:1:8,64:2:8",
                        help="BLOCK:num_warps:GROUP configurations swept on the fused find_or_insert")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--profile", action="store_true",
                        help="also print per-kernel CUDA times of one find_or_insert per variant")
    args = parser.parse_args(argv)
    global _DEVICE
    if not torch.cuda.is_available():
        if os.environ.get("TRITON_INTERPRET") != "1":
            print("store_gpu needs a CUDA device (run it through the device tool)", file=sys.stderr)
            return 2
        _DEVICE = "cpu"  # smoke test of this script through Triton's interpreter; numbers mean nothing

    import triton

    from liverec.embedding_store.hash_index import HashIndex
    from liverec.embedding_store.kernels import EMPTY_KEY, EMPTY_SLOT, SLOT_DTYPE, distinct_in_first_seen_order
    from liverec.embedding_store.kernels import cuda as K

    dev = torch.device(_DEVICE, torch.cuda.current_device()) if _DEVICE == "cuda" else torch.device("cpu")
    gen = torch.Generator(device=dev)
    gen.manual_seed(0)
    capacity, batch, reps = 1 << args.log2_capacity, args.batch, args.repeats
    loads = [float(x) for x in args.loads.split(",")]
    hits = [float(x) for x in args.hits.split(",")]
    configs = [tuple(int(v) for v in c.split(":")) for c in args.blocks.split(",")]
    foi_configs = [tuple(int(v) for v in c.split(":")) for c in args.foi_blocks.split(",")]
    default_cfg = (K.BLOCK, K.NUM_WARPS, K.GROUP)

    bandwidth = copy_bandwidth(reps)
    n_max = int(max(loads) * capacity)
    keys = _random_keys(n_max + batch, dev, gen)
    pool, fresh = keys[:n_max], keys[n_max:]  # fresh keys are never in the table
    weights = torch.randn(n_max, args.dim, device=dev, generator=gen)
    slots = torch.full((capacity,), EMPTY_SLOT, dtype=SLOT_DTYPE, device=dev)
    row_keys = torch.full((n_max + batch,), EMPTY_KEY, dtype=torch.int64, device=dev)

    rows: list[dict[str, object]] = []
    sweep: list[dict[str, object]] = []
    filled = 0
    for load in loads:
        n = int(load * capacity)
        # Bulk insert of the chunk that brings the table to this load (row = position in pool).
        chunk, chunk_rows = pool[filled:n], torch.arange(filled, n, device=dev)
        spare_keys, spare_vals = slots.clone(), row_keys.clone()  # warm-up (compile) on a copy
        K.insert(spare_keys, spare_vals, chunk, chunk_rows)
        del spare_keys, spare_vals
        bulk_ms = _time(lambda: K.insert(slots, row_keys, chunk, chunk_rows), 1, warmup=0)
        filled = n
        live = pool[:n]
        sorted_keys, order = torch.sort(live)

        query_sets = [live[torch.randint(0, n, (batch,), device=dev, generator=gen)] for _ in range(4)]
        expect = torch.searchsorted(sorted_keys, query_sets[0])
        assert torch.equal(K.find(slots, row_keys, query_sets[0]), order[expect]), "find is wrong"

        it = iter(range(1 << 30))

        def rotating(fn: Callable[[torch.Tensor], object]) -> Callable[[], object]:
            return lambda: fn(query_sets[next(it) % len(query_sets)])

        ss_ms = _time(rotating(lambda q: torch.searchsorted(sorted_keys, q)), reps)
        ss_rate = batch / ss_ms / 1e6
        rows.append(_row("searchsorted", "torch.searchsorted (index only)", load, batch, ss_ms, None,
                         bandwidth, keys_in_table=n))

        def ss_lookup(q: torch.Tensor) -> torch.Tensor:
            i = torch.searchsorted(sorted_keys, q).clamp_(max=n - 1)
            return torch.where(sorted_keys[i] == q, order[i], -1)

        rows.append(_row("searchsorted", "torch.searchsorted + hit check + row gather", load, batch,
                         _time(rotating(ss_lookup), reps), ss_rate, bandwidth, keys_in_table=n))

        best = None
        for blk, warps, group in configs:
            K.BLOCK, K.NUM_WARPS, K.GROUP = blk, warps, group
            ms = _time(rotating(lambda q: K.find(slots, row_keys, q)), reps)
            sweep.append({"op": "find", "load_factor": load, "BLOCK": blk, "num_warps": warps,
                          "GROUP": group, "G_keys_per_s": round(batch / ms / 1e6, 3)})
            if best is None or ms < best[0]:
                best = (ms, blk, warps, group)
        assert best is not None
        K.BLOCK, K.NUM_WARPS, K.GROUP = best[1:]
        ms = _time(rotating(lambda q: K.find(slots, row_keys, q)), reps)  # the winner, again
        rows.append(_row("find", "kernels.cuda.find", load, batch, ms, ss_rate, bandwidth,
                         keys_in_table=n, BLOCK=best[1], num_warps=best[2], GROUP=best[3]))
        ms = _time(rotating(lambda q: weights[K.find(slots, row_keys, q)]), reps)
        row_bytes = 2 * args.dim * weights.element_size() + LOGICAL_BYTES  # row read + written
        rows.append(_row("find+gather", f"find + weights[rows] (dim {args.dim}, fp32)", load, batch, ms,
                         ss_rate, bandwidth, keys_in_table=n,
                         row_bandwidth_fraction=round(batch * row_bytes / (ms * 1e6) / bandwidth, 4)))

        snap_keys, snap_vals = slots.clone(), row_keys.clone()
        index = HashIndex.from_items(live, torch.arange(n, device=dev), high_water=n, capacity=capacity,
                                     max_load=0.9, device=dev)
        index.reserve_rows(n + batch)  # steady state: row_keys grows rarely, not in every timed call
        state = _snapshot(index)
        no_free = torch.empty(0, dtype=torch.int64, device=dev)

        def restore() -> None:
            slots.copy_(snap_keys)
            row_keys.copy_(snap_vals)

        find_cfg = (K.BLOCK, K.NUM_WARPS, K.GROUP)
        for hit in hits:
            n_hit = int(hit * batch)
            mixed = torch.cat([live[torch.randint(0, n, (n_hit,), device=dev, generator=gen)],
                               fresh[: batch - n_hit]])
            mixed = mixed[torch.randperm(batch, device=dev, generator=gen)]
            restore()
            ref, ref_new, _ = K.find_or_insert(slots, row_keys, mixed, no_free, n, fused=False)
            restore()
            got, got_new, _ = K.find_or_insert(slots, row_keys, mixed, no_free, n, fused=True)
            assert torch.equal(ref, got) and torch.equal(ref_new, got_new), "fused path disagrees"
            is_new = ref >= n
            first_seen, new_rank = distinct_in_first_seen_order(mixed[is_new])
            assert torch.equal(ref_new, first_seen) and torch.equal(ref[is_new], n + new_rank), \
                "new rows not in order of first occurrence"

            if hit == hits[0]:  # launch configuration for the fused path, swept once per load
                best_foi = None
                for blk, warps, group in foi_configs:
                    K.BLOCK, K.NUM_WARPS, K.GROUP = blk, warps, group
                    ms = _time(lambda: K.find_or_insert(slots, row_keys, mixed, no_free, n), reps,
                               setup=restore)
                    sweep.append({"op": "find_or_insert", "load_factor": load, "hit_fraction": hit,
                                  "BLOCK": blk, "num_warps": warps, "GROUP": group,
                                  "G_keys_per_s": round(batch / ms / 1e6, 3)})
                    if best_foi is None or ms < best_foi[0]:
                        best_foi = (ms, blk, warps, group)
                assert best_foi is not None
            for fused in (True, False):
                K.BLOCK, K.NUM_WARPS, K.GROUP = best_foi[1:] if fused else find_cfg
                ms = _time(lambda f=fused: K.find_or_insert(slots, row_keys, mixed, no_free, n, fused=f),
                           reps, setup=restore)
                rows.append(_row("find_or_insert", f"kernels.cuda.find_or_insert(fused={fused})", load,
                                 batch, ms, ss_rate, bandwidth, keys_in_table=n, hit_fraction=hit,
                                 new_keys=int(ref_new.numel()), BLOCK=K.BLOCK, num_warps=K.NUM_WARPS,
                                 GROUP=K.GROUP))
            K.BLOCK, K.NUM_WARPS, K.GROUP = find_cfg
            ms = _time(lambda: index.find_or_insert(mixed), max(reps // 3, 5), warmup=1,
                       setup=lambda: _restore_state(index, state))
            _restore_state(index, state)
            assert torch.equal(index.find_or_insert(mixed)[0], ref), "HashIndex path disagrees"
            _restore_state(index, state)
            rows.append(_row("find_or_insert", "HashIndex.find_or_insert (store path)", load, batch, ms,
                             ss_rate, bandwidth, keys_in_table=n, hit_fraction=hit,
                             new_keys=int(ref_new.numel())))
            reset = lambda: (restore(), _restore_state(index, state))  # noqa: E731
            K.BLOCK, K.NUM_WARPS, K.GROUP = best_foi[1:]
            busy = _profile({"fused": lambda: K.find_or_insert(slots, row_keys, mixed, no_free, n)},
                            reset, f"load {load} hit {hit}", args.profile)
            K.BLOCK, K.NUM_WARPS, K.GROUP = find_cfg
            busy.update(_profile({
                "unfused": lambda: K.find_or_insert(slots, row_keys, mixed, no_free, n, fused=False),
                "HashIndex": lambda: index.find_or_insert(mixed),
            }, reset, f"load {load} hit {hit}", args.profile))
            for row, name in zip(rows[-3:], ("fused", "unfused", "HashIndex")):
                row["gpu_busy_us"] = round(busy[name], 1)
                if busy[name] > 0:
                    row["G_keys_per_s_gpu_busy_only"] = round(batch / busy[name] / 1e3, 3)
        restore()
        del index, state, snap_keys, snap_vals
        rows.append({"op": "bulk_insert", "variant": "kernels.cuda.insert", "load_factor": load,
                     "batch": int(chunk.numel()), "median_ms": round(bulk_ms, 3),
                     "G_keys_per_s": round(chunk.numel() / bulk_ms / 1e6, 3),
                     "note": "one timed call (after a warm-up on a copy), filling the table from the previous load"})
        K.BLOCK, K.NUM_WARPS, K.GROUP = default_cfg

    result = {
        "benchmark": "store_gpu",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if _DEVICE == "cuda" else "cpu (interpreter smoke test)",
        "torch": torch.__version__, "triton": triton.__version__,
        "capacity": capacity, "batch": batch, "dim": args.dim, "repeats": reps,
        "copy_bandwidth_GB_per_s": round(bandwidth, 1),
        "bytes_per_key": {"logical": LOGICAL_BYTES, "sector": SECTOR_BYTES},
        "hierarchicalkv_a100_published_G_keys_per_s": {
            k: list(v) for k, v in HKV_A100.items()},
        "hierarchicalkv_note": "NVIDIA HierarchicalKV's published A100 figures, as quoted in issue 3; "
                               "not measured here (other GPU, other library)",
        "targets_G_keys_per_s": TARGETS,
        "results": rows,
        "block_sweep": sweep,
    }
    out = Path(args.out)
    write_result(result, out)
    _print_table(result)
    return 0


def _profile(fns: dict[str, Callable[[], object]], reset: Callable[[], object], label: str,
             show: bool = True) -> dict[str, float]:
    """GPU busy time (us, kernels + memsets + copies) of one call of each variant, by
    torch.profiler; with show, print where it goes. The gap to the CUDA-event time is host
    time the GPU waited for (Python, launches, the sync)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    busy: dict[str, float] = {}
    gpu = torch.cuda.is_available()
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    for name, fn in fns.items():
        reset()
        sync()
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])) as prof:
            fn()
            sync()
        events = prof.key_averages()
        # Device-side events only (kernels, memsets, copies), as the profiler's own total:
        # an operator's row repeats the time of the kernels it launched.
        busy[name] = sum(e.self_device_time_total for e in events
                         if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False))
        if show:
            print(f"--- profile {name}, {label}: GPU busy {busy[name]:.1f} us")
            print(events.table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))
    reset()
    return busy


def _print_table(result: dict[str, object]) -> None:
    print(f"{result['device']}  torch {result['torch']}  triton {result['triton']}  "
          f"copy {result['copy_bandwidth_GB_per_s']} GB/s  capacity {result['capacity']}  "
          f"batch {result['batch']}")
    head = (f"{'op':15} {'variant':52} {'load':>5} {'hit':>4} {'Gkeys/s':>8} {'vs ss':>6} {'%bw':>6} "
            f"{'%sect':>6} {'GPU-only':>8}")
    print(head)
    print("-" * len(head))
    for r in result["results"]:  # type: ignore[union-attr]
        print(f"{r['op']:15} {r['variant'][:52]:52} {r['load_factor']:>5} {str(r.get('hit_fraction', '')):>4} "
              f"{r['G_keys_per_s']:>8} {str(r.get('vs_searchsorted', '')):>6} "
              f"{100 * r.get('bandwidth_fraction', 0):>5.1f}% {100 * r.get('sector_fraction', 0):>5.1f}% "
              f"{str(r.get('G_keys_per_s_gpu_busy_only', '')):>8}")


if __name__ == "__main__":
    raise SystemExit(main())
