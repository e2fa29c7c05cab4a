"""`python -m benchmarks.model_step`: the online trainer's model step on CPU, in ms/step and events/s.

Synthetic micro-batches shaped like the trainer's on ml-100k at 256 events per batch: 16 user
rows of 51 slots (left-padded windows of max_len + 1), the newest 8-25 slots of each row new
(the targets, about 260 per step; one row holds a full chunk of 25, as in the trainer), 256
uniform negatives, a catalog of 1,682 items, the default model config. Timed separately:

- train: forward + backward of `SequentialRecommender` (losses on the new events only);
- adam, adam fused: the dense optimizer step as the learner builds it, and with `fused=True`;
- score all-q: the prequential pass as `OnlineLearner._prequential` runs it (eval mode, a query
  token after every slot, retrieval scores over the catalog, target ranks);
- score target-q: the same with query tokens only after the target slots and no event outputs.

The item table's sparse update belongs to the store and is not included. Each round runs in a
fresh subprocess; the medians over rounds are reported. `--baseline REV` times liverec/model as
of git revision REV in the same run, rounds alternating, so before/after share the machine's load.
Events/s are targets per wall second; the CPU milliseconds (all of this process's threads) are
the steadier number on a machine that other processes share.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

from benchmarks.report import machine, report

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PHASES = ("train", "adam", "adam_fused", "score_all_q", "score_target_q")
ROWS, CATALOG, NEGATIVES = 16, 1682, 256


def _median_ms(fn, iters: int) -> tuple[float, float]:
    """Median wall and CPU (this process, all threads) milliseconds of `fn`. Under load from other
    processes the wall time is what the trainer gets; the CPU time is the steadier measure of
    the work itself."""
    for _ in range(3):
        fn()
    wall, cpu = [], []
    for _ in range(iters):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall) * 1000.0, statistics.median(cpu) * 1000.0


def measure(threads: int, iters: int, seed: int) -> dict:
    """One round in this process: median (wall, cpu) ms of each phase, and the step's shape."""
    import torch

    from liverec.model import ModelConfig, SequentialRecommender, TrainBatch
    from liverec.model.metrics import target_ranks

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    config = ModelConfig()
    model = SequentialRecommender(config)
    g = torch.Generator().manual_seed(seed)
    width = config.encoder.max_len + 1
    new = torch.randint(8, 26, (ROWS,), generator=g)
    new[0] = 25
    length = (new + torch.randint(0, width, (ROWS,), generator=g)).clamp(max=width)
    slot = torch.arange(width)
    valid = slot[None] >= (width - length)[:, None]
    mask = (slot[None] >= (width - new)[:, None])[:, 1:] & valid[:, :-1]
    ids = torch.randint(0, CATALOG, (ROWS, width), generator=g)
    actions = torch.randint(0, config.encoder.num_actions, (ROWS, width), generator=g)
    table = torch.nn.Parameter(torch.randn(CATALOG, config.encoder.dim, generator=g) * 0.1)
    neg_ids = torch.randint(0, CATALOG, (NEGATIVES,), generator=g)
    log_q = -math.log(CATALOG)

    def train() -> None:
        batch = TrainBatch(
            item_emb=table[ids], item_ids=ids, actions=actions, valid=valid, log_q=torch.full(ids.shape, log_q),
            neg_emb=table[neg_ids], neg_ids=neg_ids, log_q_neg=torch.full((NEGATIVES,), log_q), loss_mask=mask,
        )
        model.zero_grad(set_to_none=True)
        model(batch).total.backward()

    result = {"train": _median_ms(train, iters)}
    for name, kwargs in (("adam", {}), ("adam_fused", {"fused": True})):
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, **kwargs)
        result[name] = _median_ms(optimizer.step, iters)

    slots = mask.any(0).nonzero().squeeze(1)
    lean = {"hidden": False} if "hidden" in inspect.signature(model.encoder.forward).parameters else {}
    targets = ids[:, 1:][mask]

    def score(queries: bool) -> None:
        emb = table.detach()[ids]
        if queries:
            out = model.encoder(emb[:, :-1], actions[:, :-1], valid[:, :-1], None)
            user = out.query_hidden[mask]
        else:
            out = model.encoder(emb[:, :-1], actions[:, :-1], valid[:, :-1], None, slots, **lean)
            user = out.query_hidden[mask[:, slots]]
        scores = model.retrieval_scores(user, model.item_side(table.detach()).retrieval)
        target_ranks(scores, targets)

    model.eval()
    with torch.no_grad():
        result["score_all_q"] = _median_ms(lambda: score(True), iters)
        result["score_target_q"] = _median_ms(lambda: score(False), iters)
    result["targets"] = int(mask.sum())
    result["query_slots"] = len(slots)
    return result


def _baseline_tree(rev: str, into: Path) -> Path:
    """liverec/model as of `rev` (plus the package's __init__), unpacked under `into`."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", rev, "liverec/__init__.py", "liverec/model"],
        check=True, capture_output=True,
    ).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into


def _round(pythonpath: Path, threads: int, iters: int, seed: int) -> dict:
    # Run as a script, not `-m`: `-m` would put the working tree ahead of PYTHONPATH. OpenMP
    # threads sleep when idle, as in every liverec process (liverec/platform/cli.py).
    env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ, "PYTHONPATH": str(pythonpath)}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--threads", str(threads),
           "--iters", str(iters), "--seed", str(seed)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def run(threads: list[int], rounds: int, iters: int, seed: int, baseline: str | None) -> dict:
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        trees = {"current": ROOT}
        if baseline:
            trees[f"baseline {baseline}"] = _baseline_tree(baseline, Path(tmp))
        samples: dict[str, dict[str, list[dict]]] = {c: {str(t): [] for t in threads} for c in trees}
        for r in range(rounds):
            # Alternate which code goes first, so drift in the machine's load hits both alike.
            order = list(trees) if r % 2 == 0 else list(reversed(trees))
            for code in order:
                for t in threads:
                    samples[code][str(t)].append(_round(trees[code], t, iters, seed))
    results = {
        code: {t: {**{p: [statistics.median(s[p][i] for s in runs) for i in (0, 1)] for p in PHASES},
                   "targets": runs[0]["targets"], "query_slots": runs[0]["query_slots"]}
               for t, runs in per_thread.items()}
        for code, per_thread in samples.items()
    }
    return {
        "benchmark": "model_step",
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "load_avg": {"start": load_start, "end": os.getloadavg()},
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
        "workload": {"rows": ROWS, "slots": 51, "catalog": CATALOG, "negatives": NEGATIVES, "config": "ModelConfig()"},
        "rounds": rounds,
        "iters": iters,
        "ms_per_step": results,  # [wall, cpu] per phase
        "samples": samples,
    }


def print_table(result: dict) -> None:
    first = next(iter(next(iter(result["ms_per_step"].values())).values()))
    load = result["load_avg"]
    print(f"model step benchmark — {result['workload']['rows']} rows × 51 slots, {first['targets']:.0f} "
          f"targets/step, {first['query_slots']:.0f} query slots, default config ({result['date']}, "
          f"{result['machine']}, load avg {load['start'][0]:.2f} → {load['end'][0]:.2f})")
    print(f"{'code':<28}{'threads':>8}  {'phase':<34}{'wall ms':>9}{'cpu ms':>9}{'events/s':>10}")
    for code, per_thread in result["ms_per_step"].items():
        for threads, ms in per_thread.items():
            rows = [(p, ms[p]) for p in PHASES]
            for name, parts in (("step as learner.py (all-q, adam)", ("score_all_q", "train", "adam")),
                                ("step lean (target-q, fused adam)", ("score_target_q", "train", "adam_fused"))):
                rows.append((name, [sum(ms[p][i] for p in parts) for i in (0, 1)]))
            for phase, (wall, cpu) in rows:
                print(f"{code:<28}{threads:>8}  {phase:<34}{wall:>9.2f}{cpu:>9.2f}{ms['targets'] / wall * 1000:>10,.0f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.model_step", description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="1,2", help="comma-separated torch thread counts (default 1,2)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iters", type=int, default=30, help="timed iterations per phase and round")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--baseline", metavar="REV", help="also time liverec/model at git revision REV")
    parser.add_argument("--quick", action="store_true", help="1 thread, 2 rounds of 10 iterations")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--out", type=Path, default=RESULTS / "model_step.json")
    args = parser.parse_args(argv)
    threads = [int(t) for t in args.threads.split(",")]
    if args.worker:
        print(json.dumps(measure(threads[0], args.iters, args.seed)))
        return 0
    if args.quick:
        threads, args.rounds, args.iters = [1], 2, 10
    result = run(threads, args.rounds, args.iters, args.seed, args.baseline)
    report(result, args.out, print_table, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
