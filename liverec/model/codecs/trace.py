"""The query token's per-layer attention queries, which `pages` selects pages with.

The encoder computes them inside `SequenceEncoder.query` and does not return them; rather than
copying the block's arithmetic here, a forward hook reads each block's fused `qkv` projection
while `query` runs. The query token is the only token of that call, so its row of the
projection is the query. If the encoder's internals change shape (no `blocks[i].qkv`, or a
different projection layout), `query_vectors` raises instead of guessing; a public hook on the
encoder (`query(cache, return_queries=True)`) would remove this dependency.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from liverec.model.encoder import KVCache, rope, rope_tables

if TYPE_CHECKING:
    from liverec.model.recommender import SequentialRecommender


def query_vectors(model: SequentialRecommender, cache: KVCache) -> tuple[Tensor, list[Tensor]]:
    """(user hidden `[B, D]`, per layer the query token's rotated query `[B, H, D/H]`)."""
    encoder = model.encoder
    cfg = encoder.config
    captured: list[Tensor] = []
    try:
        blocks = list(encoder.blocks)
        hooks = [blk.qkv.register_forward_hook(lambda _m, _i, out: captured.append(out)) for blk in blocks]
    except AttributeError as err:
        raise RuntimeError("pages: the encoder no longer exposes blocks[i].qkv; query_vectors needs a hook") from err
    try:
        hidden = encoder.query(cache)
    finally:
        for hook in hooks:
            hook.remove()
    b = cache.valid.shape[0]
    if len(captured) != len(blocks) or any(o.shape != (b, 1, 3 * cfg.dim) for o in captured):
        raise RuntimeError(
            f"pages: expected one [B, 1, 3D] qkv output per block, got {[tuple(o.shape) for o in captured]}"
        )
    cos, sin = rope_tables(cache.next_pos, cfg.head_dim, cfg.rope_base, captured[0].dtype)
    cos, sin = cos[:, None], sin[:, None]  # over heads
    queries = [rope(o[:, 0, : cfg.dim].reshape(b, cfg.heads, cfg.head_dim), cos, sin) for o in captured]
    return hidden, queries
