"""Per-user state codecs: a user's encoded history (`KVCache`) to stored bytes and back.

Six codecs behind one interface (`StateCodec`), from the uncompressed baseline to the learned
ones: `full`, `int8`, `window`, `pages` (LServe), `summary` (VISTA), `collective`
(CollectiveKV). `codec_from_config` builds one from a validated config; `record` wraps a
payload with its versions, offsets and a checksum. Plain torch only, like the rest of the model
package, so serving can load it anywhere.
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
