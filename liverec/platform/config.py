"""Configuration: typed dataclasses loaded from YAML/TOML plus `LIVEREC_*` environment overrides.

Every process validates its whole configuration at start-up, so a typo or a wrong type fails
immediately with the dotted name of the field (`kafka.session_timeout_ms: expected int, got
'abc'`) instead of surfacing minutes later inside a Kafka client.

Environment overrides use `__` between levels: `LIVEREC_KAFKA__BOOTSTRAP_SERVERS=host:9092`
sets `kafka.bootstrap_servers`. Values are parsed by the field's type (ints, floats, bools as
true/false/1/0/yes/no, lists as JSON or comma-separated, `none`/empty for optional fields).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from liverec.embedding_store.config import OPTIMIZERS
from liverec.model.config import ModelConfig

ENV_PREFIX = "LIVEREC_"
ENV_SEPARATOR = "__"

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value is missing, unknown or of the wrong type; names the field."""

    def __init__(self, field_path: str, message: str) -> None:
        super().__init__(f"{field_path}: {message}")
        self.field_path = field_path


def _require(cond: bool, field_path: str, message: str) -> None:
    if not cond:
        raise ConfigError(field_path, message)


@dataclass(frozen=True)
class KafkaConfig:
    """Connection settings shared by every Kafka client; security settings pass straight through."""

    bootstrap_servers: str = "127.0.0.1:9092"
    client_id: str = "liverec"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"] | None = None
    sasl_username: str | None = None
    sasl_password: str | None = None
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    # Short group timeouts: group joins against small clusters (and the local broker) take
    # about session_timeout_ms when a member left without saying so.
    session_timeout_ms: int = 6000
    heartbeat_interval_ms: int = 2000
    request_timeout_ms: int = 30000
    producer_linger_ms: int = 5
    producer_batch_size: int = 262144
    consumer_max_poll_records: int = 2000
    # How long the broker may hold a fetch waiting for data. The local Tansu broker holds every
    # fetch for the full wait even when records arrive, so the trainer's and the replica's waits
    # add up in event-to-served freshness (each adds up to this); an idle consumer then sends ~100
    # small fetches a second. On the H200 host 10 and 50 ms measured within run-to-run noise.
    consumer_fetch_max_wait_ms: int = 10

    def __post_init__(self) -> None:
        _require(bool(self.bootstrap_servers.strip()), "kafka.bootstrap_servers", "must not be empty")
        _require(self.session_timeout_ms > 0, "kafka.session_timeout_ms", "must be > 0")
        _require(
            0 < self.heartbeat_interval_ms < self.session_timeout_ms,
            "kafka.heartbeat_interval_ms",
            "must be > 0 and below session_timeout_ms",
        )
        _require(self.request_timeout_ms > 0, "kafka.request_timeout_ms", "must be > 0")
        _require(self.producer_linger_ms >= 0, "kafka.producer_linger_ms", "must be >= 0")
        _require(self.producer_batch_size > 0, "kafka.producer_batch_size", "must be > 0")
        _require(self.consumer_max_poll_records > 0, "kafka.consumer_max_poll_records", "must be > 0")
        _require(self.consumer_fetch_max_wait_ms >= 0, "kafka.consumer_fetch_max_wait_ms", "must be >= 0")
        if self.security_protocol.startswith("SASL"):
            _require(self.sasl_mechanism is not None, "kafka.sasl_mechanism", "required with SASL")


@dataclass(frozen=True)
class TopicsConfig:
    """Topic names and layout. Partitions of `events` bound the trainer's parallelism."""

    events: str = "liverec.events"
    dlq: str = "liverec.events.dlq"
    user_state: str = "liverec.user-state"
    params: str = "liverec.params"
    partitions: int = 4
    replication_factor: int = 1

    def __post_init__(self) -> None:
        for name in ("events", "dlq", "user_state", "params"):
            value = getattr(self, name)
            _require(
                bool(value) and all(c.isalnum() or c in "._-" for c in value) and len(value) <= 249,
                f"topics.{name}",
                f"invalid Kafka topic name {value!r}",
            )
        _require(self.partitions >= 1, "topics.partitions", "must be >= 1")
        _require(self.replication_factor >= 1, "topics.replication_factor", "must be >= 1")


@dataclass(frozen=True)
class LoggingConfig:
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["json", "text"] = "json"


@dataclass(frozen=True)
class TrainerConfig:
    """The online trainer. Micro-batches close at `batch_events` events or `batch_max_ms`, whichever first.

    In `deterministic` mode batches are cut by offsets instead (`batch_events` per partition,
    partitions merged in a fixed order), so replaying the same log gives bit-identical state.

    Each micro-batch is one dense Adam step (`dense_lr`) plus the item table's sparse step
    (`item_optimizer`, `item_lr`) on next-item prediction:
    - `full_softmax_items`: a catalog of at most this many items is scored whole (exact
      softmax, the cost grows with targets × catalog); a larger one uses `negatives` uniform
      negatives plus in-batch ones with logQ correction. On ml-100k (1,682 items) the exact
      softmax gives both the online and the offline model a higher NDCG@10.
    - `history_loss`: the loss covers every position of the touched users' windows (stored
      history and new events), not only the new events, so an event is learned from again
      each time its user is active while it is within the last `model.encoder.max_len`.
    - `replay_users`: users drawn uniformly from those with a stored history (excluding the
      batch's) whose stored windows join the step, every position trained. One pass over the
      stream then trains on mixed batches instead of a burst of a few users (experience replay);
      it reads only histories the trainer already keeps. With `model.encoder.dropout` 0.1, 64
      users beat 32 (ml-100k full-catalog NDCG@10 of the online pass over five seeds: mean 0.103,
      96: no better); without dropout more replay overfits (64: 0.091, 128: 0.075 at seed 1).
    - `serving_ema`: serving gets (and states are encoded with) an exponential moving average
      of the dense weights, `ema = serving_ema * ema + (1 - serving_ema) * weights` after every
      step; 0 serves the raw weights. Averaging the last ~10 steps smooths out the noise of
      single micro-batch updates (on ml-100k, NDCG@10 0.097 -> 0.106 at 0.9). Prequential
      scores use these served weights too: they rank what a replica would have answered.
    - `dense_warmup_steps`: the dense learning rate ramps linearly from `dense_lr / N` to
      `dense_lr` over the first N micro-batches of a fresh model (a restored one continues where
      its checkpoint was), the usual guard against full Adam steps on a randomly initialised
      transformer fed the first batches of a stream, which come from a handful of users. On
      ml-100k (online pass, full-catalog NDCG@10) 50 steps are neutral on quality: seeds 0-9 give
      a mean of 0.1000 (sd 0.0054) against 0.0995 (sd 0.0066) without; seeds 0-4 alone had
      suggested a narrower spread (sd 0.0020 vs 0.0049) that seeds 5-9 did not repeat. 20 steps
      lowered the mean (CUDA, seeds 0-4: 0.0972 vs 0.0993); 100 and 200 were no better.
    - `item_optimizer` / `item_lr`: the item table's sparse optimizer (`sgd`, `adagrad`, `adam`,
      per-row state in the store) and its learning rate. Adam at 2e-3 is the default: on ml-100k
      (online pass, full-catalog NDCG@10, CPU) seeds 0-9 give a mean of 0.1042 (sd 0.0042)
      against Adagrad at 0.15's 0.1002 (sd 0.0055), and seeds 10-19, not used to choose it,
      0.1006; Adam at 1e-3 / 3e-3 gave 0.1009 / 0.1019 on seeds 0-9. The likely reason: Adagrad's
      accumulator only grows, so a popular item's step keeps shrinking while the dense weights it
      must match keep moving; Adam's moments decay, so its rows keep pace. (The offline twin of
      `liverec evaluate` keeps Adagrad, which trains it better: 0.1064 against 0.1056 with Adam.)
      A trainer restored from a checkpoint keeps the checkpoint's item-table settings and logs
      each one that differs from these.
    - `heap_trim_growth_mb`: when resident memory has grown by more than this since the last
      trim, the trainer hands the heap's free pages back to the OS (glibc's `malloc_trim`; 0:
      never). Under glibc's malloc a step's 17-34 MB temporaries (logits over the catalog,
      attention) fragment the heap: resident memory reached 3.5 GB in one pass over ml-100k and
      a ten-seed evaluate settled at 6.8 GB, all but ~0.5 GB of it free. The container image
      preloads tcmalloc instead, which held that pass at 0.9 GB and ran it 17% faster; this
      bound is glibc's fallback (liverec/platform/heap.py).
    """

    group_id: str = "liverec-trainer"
    state_dir: str = "runs/trainer"
    batch_events: int = 256
    batch_max_ms: int = 200
    negatives: int = 256
    full_softmax_items: int = 4096
    history_loss: bool = True
    replay_users: int = 64
    serving_ema: float = 0.9
    dense_lr: float = 5e-4
    dense_warmup_steps: int = 50
    item_optimizer: str = "adam"
    item_lr: float = 2e-3
    min_count: int = 1
    item_ttl_s: int | None = None
    checkpoint_every_events: int = 20_000
    checkpoint_every_s: float = 60.0
    publish_every_s: float = 1.0
    checkpoints_kept: int = 3
    expire_every_events: int = 10_000
    heap_trim_growth_mb: int = 1024
    deterministic: bool = False
    seed: int = 0
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9400

    def __post_init__(self) -> None:
        for name in ("batch_events", "batch_max_ms", "negatives", "checkpoint_every_events",
                     "checkpoints_kept", "expire_every_events", "min_count"):
            _require(getattr(self, name) >= 1, f"trainer.{name}", "must be >= 1")
        _require(self.dense_lr > 0, "trainer.dense_lr", "must be > 0")
        _require(isinstance(self.dense_warmup_steps, int) and self.dense_warmup_steps >= 0,
                 "trainer.dense_warmup_steps", f"must be an integer >= 0, got {self.dense_warmup_steps!r}")
        _require(self.full_softmax_items >= 0, "trainer.full_softmax_items", "must be >= 0")
        _require(self.replay_users >= 0, "trainer.replay_users", "must be >= 0")
        _require(0 <= self.serving_ema < 1, "trainer.serving_ema", "must be in [0, 1)")
        _require(self.item_optimizer in OPTIMIZERS, "trainer.item_optimizer",
                 f"must be one of {OPTIMIZERS}, got {self.item_optimizer!r}")
        _require(self.item_lr > 0, "trainer.item_lr", "must be > 0")
        _require(self.checkpoint_every_s > 0, "trainer.checkpoint_every_s", "must be > 0")
        _require(self.publish_every_s > 0, "trainer.publish_every_s", "must be > 0")
        _require(self.heap_trim_growth_mb >= 0, "trainer.heap_trim_growth_mb", "must be >= 0 (0: never)")
        _require(self.item_ttl_s is None or self.item_ttl_s > 0, "trainer.item_ttl_s", "must be > 0 or null")
        _require(-1 <= self.metrics_port < 65536, "trainer.metrics_port", "must be a port (0: any free, -1: no endpoint)")


@dataclass(frozen=True)
class StateConfig:
    """Per-user serving state: which codec compresses it (see liverec.model.codecs) and its params.

    Refresh (liverec/trainer/state.py). As events arrive, before they are learned, the trainer
    rewrites the state of each of their users with the serving model of the moment; for each
    micro-batch learned it re-encodes, from the history store, at most `reencode_per_batch` users
    whose state is from an older model version, oldest first, a few per turn of its receive loop
    (also while idle);
    `liverec_trainer_state_versions_behind` reports how far behind the oldest stored state is.
    Codecs without learned parts that can append (`full`, `int8`, `window`) append the new events
    to a stored state at most `append_max_versions_behind` model versions old instead of
    re-encoding the history; 0 appends only onto a state of the current version, which is exact
    but never happens while the model learns every micro-batch. An appended state keeps the
    oldest version among its parts, so it is re-encoded once that falls too far behind.

    Learned codecs (`summary`, `collective`) are trained online with the model and their
    parameters published with each version; a serving replica keeps the parameters of the last
    `codec_generations_kept` versions, because a `collective` state decodes only with the pool
    it was encoded with (a state older than that is a miss until it is re-encoded).
    """

    codec: str = "int8"
    params: dict[str, Any] = field(default_factory=dict)
    # 8, not 32: re-encodes share the trainer's receive thread (and the state topic) with the
    # events whose freshness they delay. H200 host, ml-100k, bench freshness p50/p99: 68/331 ms at
    # 8, 112-138/365-463 ms at 32, 75/392 ms at 0. At ~3 micro-batches a second, 8 re-encode
    # ml-100k's 943 users' states in ~40 s (32: ~10 s); active users are re-encoded on arrival.
    reencode_per_batch: int = 8
    append_max_versions_behind: int = 0
    codec_generations_kept: int = 16

    def __post_init__(self) -> None:
        from liverec.model.codecs.registry import codec_config

        try:
            codec_config(self.codec, **self.params)
        except (TypeError, ValueError) as exc:
            raise ConfigError("state.codec", str(exc)) from None
        for name in ("reencode_per_batch", "append_max_versions_behind"):
            value = getattr(self, name)
            _require(isinstance(value, int) and value >= 0, f"state.{name}", f"must be an integer >= 0, got {value!r}")
        _require(isinstance(self.codec_generations_kept, int) and self.codec_generations_kept >= 1,
                 "state.codec_generations_kept", f"must be an integer >= 1, got {self.codec_generations_kept!r}")


@dataclass(frozen=True)
class ServingConfig:
    """A serving replica. Requests queue for at most `max_wait_ms` to form batches of up to
    `max_batch`; beyond `max_queue` waiting requests new ones are refused (RESOURCE_EXHAUSTED).

    `workers` > 1 runs that many replica processes behind one port (SO_REUSEPORT; the kernel
    spreads connections over them), each with its own state copy under `state_dir/worker-N`
    and /metrics on `metrics_port + N`: one Python process tops out near 3,400 requests/s
    (H200, full-catalog top-10 over 100k items, CUDA graphs) on its event loop whatever the
    device does, so a GPU host scales out in processes."""

    host: str = "127.0.0.1"
    port: int = 50051
    device: str = "auto"  # "auto": cuda when available, else cpu
    max_batch: int = 64
    max_wait_ms: float = 0.5  # H200, one process, 2,000 req/s: server p99 11 ms at 0.5, 28 ms at 2.0 (serve_cuda*.json)
    max_queue: int = 1024
    max_k: int = 1000
    max_candidates: int = 10_000
    ready_max_lag: int = 1000  # records behind the changelog ends before health reports SERVING
    state_dir: str = "runs/serving"
    group_id: str = "liverec-serving"
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9401
    drain_s: float = 10.0
    workers: int = 1

    def __post_init__(self) -> None:
        _require(self.workers >= 1, "serving.workers", "must be >= 1")
        _require(self.workers == 1 or self.port != 0, "serving.workers",
                 "several workers share one port: give serving.port (not 0)")
        _require(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
                 "serving.device", f"must be auto, cpu or cuda[:N], got {self.device!r}")
        for name in ("max_batch", "max_queue", "max_k", "max_candidates"):
            _require(getattr(self, name) >= 1, f"serving.{name}", "must be >= 1")
        _require(self.max_wait_ms >= 0, "serving.max_wait_ms", "must be >= 0")
        _require(self.ready_max_lag >= 0, "serving.ready_max_lag", "must be >= 0")
        _require(0 <= self.port < 65536, "serving.port", "must be a port (0: any free)")
        _require(-1 <= self.metrics_port < 65536, "serving.metrics_port", "must be a port (0: any free, -1: none)")
        _require(self.drain_s >= 0, "serving.drain_s", "must be >= 0")


@dataclass(frozen=True)
class LiverecConfig:
    """The whole configuration of a liverec process; sections are validated independently."""

    kafka: KafkaConfig = field(default_factory=KafkaConfig)
    topics: TopicsConfig = field(default_factory=TopicsConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    serving: ServingConfig = field(default_factory=ServingConfig)
    state: StateConfig = field(default_factory=StateConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data_dir: str = "../shared/data"


# --------------------------------------------------------------------------------------------
# Generic, type-driven building and validation of dataclasses from plain mappings.


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, path: str, *, from_env: bool) -> Any:
    """Check (and, for environment strings, parse) `value` against the annotation `tp`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (from_env and isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
            _require(type(None) in args, path, "must not be null")
            return None
        options = [a for a in args if a is not type(None)]
        for option in options:
            try:
                return _coerce(value, option, path, from_env=from_env)
            except ConfigError:
                continue
        raise ConfigError(path, f"expected {' or '.join(_type_name(o) for o in options)}, got {value!r}")
    if origin is Literal:
        _require(value in args, path, f"expected one of {list(args)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        _require(isinstance(value, Mapping), path, f"expected a table/mapping, got {type(value).__name__}")
        return build(tp, value, path)
    if origin in (list, tuple):
        if from_env and isinstance(value, str):
            value = json.loads(value) if value.strip().startswith("[") else [v.strip() for v in value.split(",") if v.strip()]
        _require(isinstance(value, (list, tuple)), path, f"expected a list, got {type(value).__name__}")
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{path}[{i}]", from_env=from_env) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if from_env and isinstance(value, str):
            value = json.loads(value)
        _require(isinstance(value, Mapping), path, f"expected a mapping, got {type(value).__name__}")
        val_tp = args[1] if len(args) == 2 else Any
        return {str(k): _coerce(v, val_tp, f"{path}.{k}", from_env=from_env) for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if from_env and isinstance(value, str):
            lowered = value.strip().lower()
            _require(lowered in ("true", "false", "1", "0", "yes", "no"), path, f"expected a bool, got {value!r}")
            return lowered in ("true", "1", "yes")
        _require(isinstance(value, bool), path, f"expected bool, got {value!r}")
        return value
    if tp is int:
        if from_env and isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                raise ConfigError(path, f"expected int, got {value!r}") from None
        _require(isinstance(value, int) and not isinstance(value, bool), path, f"expected int, got {value!r}")
        return value
    if tp is float:
        if from_env and isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                raise ConfigError(path, f"expected float, got {value!r}") from None
        _require(isinstance(value, (int, float)) and not isinstance(value, bool), path, f"expected float, got {value!r}")
        return float(value)
    if tp is str:
        _require(isinstance(value, str), path, f"expected str, got {value!r}")
        return value
    raise TypeError(f"{path}: unsupported config annotation {tp!r}")


def build(cls: type[T], data: Mapping[str, Any], path: str = "", *, from_env: bool = False) -> T:
    """Build dataclass `cls` from `data`, refusing unknown keys and wrong types by field name."""
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for key in data:
        _require(key in known, f"{path}{key}" if not path else f"{path}.{key}", f"unknown field (known: {', '.join(known)})")
    kwargs = {}
    for name, value in data.items():
        field_path = f"{path}.{name}" if path else name
        kwargs[name] = _coerce(value, hints[name], field_path, from_env=from_env)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(path or cls.__name__, str(exc)) from None


def _read_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError("--config", f"no such file: {path}")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text) or {}
        else:
            raise ConfigError("--config", f"unsupported extension {path.suffix!r} (use .yaml, .yml or .toml)")
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise ConfigError("--config", f"cannot parse {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError("--config", f"{path} must hold a mapping at the top level")
    return data


def _env_overrides(env: Mapping[str, str]) -> dict[str, Any]:
    """Nest `LIVEREC_A__B=v` into {'a': {'b': 'v'}} (keys lower-cased)."""
    nested: dict[str, Any] = {}
    for key, value in env.items():
        if not key.startswith(ENV_PREFIX):
            continue
        parts = key[len(ENV_PREFIX):].lower().split(ENV_SEPARATOR)
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(".".join(parts), f"environment variable {key} conflicts with another override")
        node[parts[-1]] = value
    return nested


def load_config(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> LiverecConfig:
    """Load the configuration: defaults, then the file (if any), then `LIVEREC_*` overrides."""
    env = os.environ if env is None else env
    file_data = _read_file(Path(path)) if path else {}
    base = build(LiverecConfig, file_data)
    overrides = _env_overrides(env)
    if not overrides:
        return base
    return _apply_env(base, overrides)


def _apply_env(base: Any, overrides: Mapping[str, Any], path: str = "") -> Any:
    """Apply string overrides to a built dataclass, parsing each by its field's type."""
    hints = typing.get_type_hints(type(base))
    names = {f.name for f in dataclasses.fields(base)}
    changes = {}
    for key, value in overrides.items():
        field_path = f"{path}.{key}" if path else key
        _require(key in names, field_path, f"unknown field (from environment {ENV_PREFIX}{field_path.upper().replace('.', ENV_SEPARATOR)})")
        current = getattr(base, key)
        if isinstance(value, Mapping):
            _require(dataclasses.is_dataclass(current), field_path, "is not a section")
            changes[key] = _apply_env(current, value, field_path)
        else:
            changes[key] = _coerce(value, hints[key], field_path, from_env=True)
    try:
        return dataclasses.replace(base, **changes)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(path or type(base).__name__, str(exc)) from None


def to_dict(config: Any) -> dict[str, Any]:
    """A plain mapping of a config (for logging the effective configuration at start-up)."""
    data = dataclasses.asdict(config)
    if isinstance(data.get("kafka"), dict) and data["kafka"].get("sasl_password"):
        data["kafka"]["sasl_password"] = "***"
    return data
