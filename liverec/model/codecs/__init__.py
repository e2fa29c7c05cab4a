"""Per-user state codecs: a user's encoded history (`KVCache`) to stored bytes and back.

Six codecs behind one interface (`StateCodec`), from the uncompressed baseline to the learned
ones: `full`, `int8`, `window`, `pages` (LServe), `summary` (VISTA), `collective`
(CollectiveKV). `codec_from_config` builds one from a validated config; `record` wraps a
payload with its versions, offsets and a checksum. Plain torch only, like the rest of the model
package, so serving can load it anywhere.

What a decoded cache holds (`model.user_hidden` and `model.ranking_scores` read any of them):

| codec      | slots                                   | positions of the slots             | next_pos |
| ---------- | --------------------------------------- | ---------------------------------- | -------- |
| full, int8 | every stored event, oldest first        | contiguous, ending at next_pos - 1 | true     |
| window     | the last W events                       | contiguous, ending at next_pos - 1 | true     |
| pages      | the events of the kept pages            | in the keys only; gaps between pages | true   |
| summary    | S pooled tokens (0 without events)      | none (mixtures of rotated keys)    | true     |
| collective | every stored event (approximated)       | contiguous, re-rotated on decode   | true     |

Keys are always stored or rebuilt rotated (RoPE), so attention reads them as the encoder wrote
them; `next_pos` is where the query token and the candidates sit.

Trainer integration, per micro-batch and touched user (liverec/trainer/state.py, worker.py):
- incremental codecs without learned parts (`full`, `int8`, `window`): decode the stored payload,
  `model.encoder.extend(cache, emb, actions, valid, capacity=max_len)` in eval mode under
  no_grad, then `codec.append(payloads, last_events(extended, valid.sum(1)))` - only onto a
  state that holds the user's whole history before the batch and is recent enough in model
  version (`state.append_max_versions_behind`); appending to a lossy decode (`int8`) computes the
  new K/V over the approximated history. Otherwise:
- recompute: `codec.encode(model.encode(history...), model)`.
- write `record_for(codec, payload, model_version, last_offset, last_time_ms, params_version)`.
- learned codecs (`codec.module` is not None; liverec/trainer/codec_training.py): after the
  learner step, one step of `codec.auxiliary_loss(model, cache, item_rows)` on the refresh's
  caches with the model frozen, its own Adam; checkpointed, and published with the dense weights
  (keys under `PARAMS_PREFIX`, part of the model version). States are encoded with the
  parameters of the last published version, named in the record (`params_version`);
  `collective` starts with `codec.collective.init_from(caches)` once, before encoding anything.
  A payload of a codec with `decode_needs_params` is decoded with the parameters of the version
  in its record (serving keeps the last few versions, liverec/serving/states.py).
Serving: `decode_record(data, codec)`; `CorruptRecord` (incl. `ChecksumMismatch`) is a miss plus a
metric; `UnsupportedVersion` is a miss plus a metric and a log line (a deployment mismatch).
"""

from liverec.model.codecs.base import Cost, PayloadError, StateCodec, last_events
from liverec.model.codecs.collective import CollectiveCodec, CollectivePool
from liverec.model.codecs.dense import FullCodec, Int8Codec, WindowCodec
from liverec.model.codecs.distill import distillation_loss
from liverec.model.codecs.fit import fit_codec
from liverec.model.codecs.pages import PagesCodec
from liverec.model.codecs.record import (
    ChecksumMismatch,
    CorruptRecord,
    RecordError,
    StateRecord,
    UnsupportedVersion,
    decode_record,
    encode_record,
    record_for,
)
from liverec.model.codecs.registry import CONFIGS, codec_config, codec_from_config
from liverec.model.codecs.summary import SummaryCodec, SummaryTokens

__all__ = [
    "CONFIGS",
    "ChecksumMismatch",
    "CollectiveCodec",
    "CollectivePool",
    "CorruptRecord",
    "Cost",
    "FullCodec",
    "Int8Codec",
    "PagesCodec",
    "PayloadError",
    "RecordError",
    "StateCodec",
    "StateRecord",
    "SummaryCodec",
    "SummaryTokens",
    "UnsupportedVersion",
    "WindowCodec",
    "codec_config",
    "codec_from_config",
    "decode_record",
    "distillation_loss",
    "encode_record",
    "fit_codec",
    "last_events",
    "record_for",
]
