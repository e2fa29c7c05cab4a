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

Trainer integration, per micro-batch and touched user:
- incremental codecs (`full`, `int8`, `window`, `collective`): decode the stored payloads (or use
  the trainer's own cache), `model.encoder.extend(cache, emb, actions, valid, capacity=...)` in
  eval mode under no_grad, then `codec.append(payloads, last_events(extended, valid.sum(1)))`;
  the extension must keep every new event (capacity >= new events). Appending to a lossy
  decode computes the new K/V over the approximated history; re-encode from the raw history
  in the background to bound that drift. Give `full` `capacity=max_len` to keep exactly what
  the trainer's cache keeps.
- recompute codecs (`pages`, `summary`): `codec.encode(model.encode(history...), model)`.
- write `record_for(codec, payload, model_version, last_offset, last_time_ms)`.
- learned codecs (`codec.module` is not None): add `codec.auxiliary_loss(model, cache, item_rows)`
  to the loss, step the module's parameters with the dense ones, checkpoint and publish its
  state_dict with the dense weights (it is part of the model version); `collective` starts with
  `codec.collective.init_from(caches)` once. A payload is decoded with the codec parameters of
  the model version in its record.
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
