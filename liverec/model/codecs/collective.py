"""`collective`: a global K/V pool shared by all users plus a tiny user-specific part (CollectiveKV).

Each position's K and V of every layer and head form one vector `z` of `L * 2 * D` values,
taken with the keys *un-rotated* (RoPE undone), so that the same event at different positions
(or for different users) gives the same vector and a pool can hold it. After a fixed per-dim
standardisation, the router picks the pool entry nearest to `z` (a VQ router: the pool entries
are both routing keys and values, so the router learns as the pool does), and the residual is
projected to `rank` dims, the user-specific part, stored as int8 under a fixed per-dim scale:

    z  ~  pool[index] + up(int8(down(z - pool[index])))

Stored per position: the index (1 byte when `pool_size` <= 256, else 2) and `rank` int8 codes;
per user a 12-byte header (`next_pos i64`, `n u32`). With `groups` G > 1 the vector is cut into
G parts, each routed to its own pool of `pool_size` entries, and a position stores G indices
(product quantisation: `pool_size ** G` combinations for G small pools; G = 1 is the plain
single pool). The pool, projections and scales are
learned parameters of the model version (checkpointed and published once, never per user).
Decoded: the user's kept positions in order, keys rotated back to their positions
(`next_pos - n + j`), so the decoded cache has the same slots and positions as the full one.

Incremental: a position's code depends on its own K/V only, so `append` routes the new events
and concatenates their codes, the same bytes as re-encoding. Learned by distillation
(`auxiliary_loss`, with the model or after it) after a k-means / PCA start (`init_from`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from liverec.model.codecs.base import (
    HEAD,
    Cost,
    StateCodec,
    check_length,
    from_rows,
    read_head,
    rotate_keys,
    slot_positions,
    to_rows,
)
from liverec.model.codecs.distill import distillation_loss
from liverec.model.config import EncoderConfig
from liverec.model.encoder import KVCache

if TYPE_CHECKING:
    from liverec.model.recommender import SequentialRecommender

_ROUTE_CHUNK = 4096


class CollectivePool(nn.Module):
    """Pool `[G, P, Z/G]` (G groups of P entries), down `[Z, r]` / up `[r, Z]` projections, and
    fixed scales. With G > 1 each position stores one index per group (product quantisation:
    P**G combinations from G * P stored entries, at the routing cost of one pool of P)."""

    def __init__(self, encoder: EncoderConfig, pool_size: int, rank: int, groups: int = 1) -> None:
        super().__init__()
        self.encoder = encoder
        z = encoder.layers * 2 * encoder.dim
        if z % groups:
            raise ValueError(f"codecs.collective.groups: must divide layers * 2 * dim = {z}, got {groups}")
        self.groups = groups
        self.pool = nn.Parameter(torch.randn(groups, pool_size, z // groups) * 0.1)
        self.down = nn.Parameter(torch.linalg.qr(torch.randn(z, rank))[0])
        self.up = nn.Parameter(self.down.detach().T.clone())
        self.register_buffer("center", torch.zeros(z))
        self.register_buffer("scale", torch.ones(z))
        self.register_buffer("code_scale", torch.full((rank,), 1.0 / 127))

    # -- features ------------------------------------------------------------------------------

    def features(self, cache: KVCache) -> Tensor:
        """`[B, S, Z]` standardised, un-rotated K/V of every slot."""
        rows = to_rows(cache)
        rows = rotate_keys(rows, slot_positions(cache.valid, cache.next_pos), self.encoder.rope_base, inverse=True)
        return (rows.flatten(2) - self.center) / self.scale

    def rows(self, z: Tensor, positions: Tensor) -> Tensor:
        """Inverse of `features`: `[B, S, Z]` -> rotated rows `[B, S, L, 2, H, Dh]`."""
        e = self.encoder
        rows = (z * self.scale + self.center).unflatten(2, (e.layers, 2, e.heads, e.head_dim))
        return rotate_keys(rows, positions, e.rope_base)

    def route(self, z: Tensor) -> Tensor:
        """Nearest entry of each group's pool for `z [.., Z]` -> indices `[.., G]` (chunked)."""
        g = self.groups
        flat = z.detach().reshape(-1, g, z.shape[-1] // g)
        pool = self.pool.detach()
        norms = (pool * pool).sum(-1)  # [G, P]
        out = [
            (norms - 2 * torch.einsum("ngd,gpd->ngp", chunk, pool)).argmin(-1) for chunk in flat.split(_ROUTE_CHUNK)
        ]
        index = torch.cat(out) if out else flat.new_zeros(0, g, dtype=torch.long)
        return index.reshape(*z.shape[:-1], g)

    def lookup(self, index: Tensor) -> Tensor:
        """Pool vectors of indices `[.., G]` -> `[.., Z]`."""
        groups = torch.arange(self.groups, device=index.device)
        return self.pool[groups, index].flatten(-2)

    # -- codes ---------------------------------------------------------------------------------

    def codes(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """(pool indices `[.., G]`, int8 user codes `[.., r]`)."""
        index = self.route(z)
        u = (z - self.lookup(index)) @ self.down
        q = torch.round(u / self.code_scale).clamp(-127, 127)
        return index, q.to(torch.int8)

    def from_codes(self, index: Tensor, q: Tensor) -> Tensor:
        return self.lookup(index) + (q.float() * self.code_scale) @ self.up

    def approximate(self, z: Tensor) -> Tensor:
        """What decoding the codes of `z` gives, differentiably (straight-through int8 rounding)."""
        base = self.lookup(self.route(z))
        u = (z - base) @ self.down
        q = torch.round(u / self.code_scale).clamp(-127, 127) * self.code_scale
        return base + (u + (q - u).detach()) @ self.up

    def reconstruct(self, cache: KVCache) -> KVCache:
        """The decoded cache, differentiably: `approximate` of the cache's features, re-rotated."""
        rows = self.rows(self.approximate(self.features(cache)), slot_positions(cache.valid, cache.next_pos))
        return from_rows(rows, cache.valid, cache.next_pos)

    # -- fitting start -------------------------------------------------------------------------

    @torch.no_grad()
    def init_from(self, caches: Sequence[KVCache], iters: int = 6, seed: int = 0, max_rows: int = 16384) -> None:
        """Start from data: standardisation, k-means pools (per group), PCA projections, code scales."""
        gen = torch.Generator().manual_seed(seed)
        raw = []
        for cache in caches:
            positions = slot_positions(cache.valid, cache.next_pos)
            rows = rotate_keys(to_rows(cache), positions, self.encoder.rope_base, inverse=True)
            raw.append(rows.flatten(2)[cache.valid].float())
        x = torch.cat(raw)
        if x.shape[0] > max_rows:
            x = x[torch.randperm(x.shape[0], generator=gen)[:max_rows]]
        self.center.copy_(x.mean(0))
        self.scale.copy_(x.std(0).clamp(min=1e-6))
        z = (x - self.center) / self.scale
        g, p, d = self.pool.shape
        if z.shape[0] < p:
            pick = torch.randint(z.shape[0], (p,), generator=gen)
        else:
            pick = torch.randperm(z.shape[0], generator=gen)[:p]
        centers = z[pick].reshape(p, g, d).transpose(0, 1).clone()  # [G, P, d]
        if z.shape[0] < p:  # fewer rows than entries: repeats, jittered apart
            centers += 0.01 * torch.randn(centers.shape, generator=gen)
        self.pool.copy_(centers)
        parts = z.reshape(-1, g, d)
        slot = torch.arange(g)[None, :] * p  # flat index of each group's first entry
        for _ in range(iters):
            flat = (self.route(z) + slot).reshape(-1)
            sums = torch.zeros(g * p, d).index_add_(0, flat, parts.reshape(-1, d))
            counts = torch.bincount(flat, minlength=g * p).float()
            used = counts > 0
            merged = centers.reshape(g * p, d)
            merged[used] = sums[used] / counts[used, None]
            self.pool.copy_(merged.reshape(g, p, d))
        residual = z - self.lookup(self.route(z))
        _, _, vh = torch.linalg.svd(residual, full_matrices=False)
        rank = self.down.shape[1]
        self.down.copy_(vh[:rank].T)
        self.up.copy_(vh[:rank])
        self.calibrate(z)

    @torch.no_grad()
    def calibrate(self, z: Tensor, quantile: float = 0.999, momentum: float = 0.0) -> None:
        """Set the int8 scale of each user dim from standardised features `z [N, Z]`; with
        `momentum` m, move it to `m * old + (1 - m) * new` (online training calibrates on each
        micro-batch's few rows, so it averages)."""
        u = (z - self.lookup(self.route(z))) @ self.down
        top = torch.quantile(u.abs()[: 1 << 16].float(), quantile, dim=0)
        fresh = (top / 127.0).clamp(min=1e-8)
        self.code_scale.copy_(momentum * self.code_scale + (1 - momentum) * fresh)


class CollectiveCodec(StateCodec):
    codec_id = "collective"
    incremental = True
    decode_needs_params = True
    fit_lr = 3e-3

    def __init__(self, encoder: EncoderConfig, pool_size: int, rank: int, groups: int = 1) -> None:
        super().__init__(encoder)
        self.pool_size, self.rank, self.groups = pool_size, rank, groups
        self.index_bytes = 1 if pool_size <= 256 else 2
        self.index_dtype = np.uint8 if self.index_bytes == 1 else np.dtype("<u2")
        self.pos_bytes = groups * self.index_bytes + rank
        self.collective = CollectivePool(encoder, pool_size, rank, groups)

    @property
    def module(self) -> nn.Module:
        return self.collective

    def _code_bytes(self, index: Tensor, q: Tensor) -> bytes:
        n = index.shape[0]
        idx = index.cpu().numpy().astype(self.index_dtype).view(np.uint8).reshape(n, self.groups * self.index_bytes)
        return np.concatenate((idx, q.cpu().numpy().view(np.uint8).reshape(n, self.rank)), 1).tobytes()

    def encode(self, cache: KVCache, model: SequentialRecommender | None = None) -> list[bytes]:
        with torch.no_grad():
            index, q = self.collective.codes(self.collective.features(cache))
        valid = cache.valid
        return [
            HEAD.pack(int(cache.next_pos[b]), int(valid[b].sum()))
            + self._code_bytes(index[b][valid[b]], q[b][valid[b]])
            for b in range(valid.shape[0])
        ]

    def _parse(self, payload: bytes) -> tuple[int, int, np.ndarray]:
        next_pos, n = read_head(payload, self.codec_id)
        check_length(payload, HEAD.size + n * self.pos_bytes, self.codec_id)
        return next_pos, n, np.frombuffer(payload, dtype=np.uint8, offset=HEAD.size).reshape(n, self.pos_bytes)

    def decode(self, payloads: Sequence[bytes], device: torch.device | str = "cpu") -> KVCache:
        parsed = [self._parse(p) for p in payloads]
        counts = torch.tensor([n for _, n, _ in parsed], dtype=torch.long)
        width = int(counts.max()) if parsed else 0
        valid = torch.arange(width)[None, :] >= (width - counts)[:, None]
        index = torch.zeros(len(parsed), width, self.groups, dtype=torch.long)
        q = torch.zeros(len(parsed), width, self.rank, dtype=torch.int8)
        if width:
            codes = np.concatenate([c for _, _, c in parsed])
            cut = self.groups * self.index_bytes
            idx = np.ascontiguousarray(codes[:, :cut]).view(self.index_dtype).reshape(-1, self.groups)
            index[valid] = torch.from_numpy(idx.astype(np.int64))
            q[valid] = torch.from_numpy(np.ascontiguousarray(codes[:, cut:]).view(np.int8))
        next_pos = torch.tensor([p for p, _, _ in parsed], dtype=torch.long)
        pool = self.collective
        on = pool.pool.device  # decode where the pool lives, hand the cache over on `device`
        index, q, valid, next_pos = index.to(on), q.to(on), valid.to(on), next_pos.to(on)
        with torch.no_grad():
            rows = pool.rows(pool.from_codes(index, q), slot_positions(valid, next_pos))
        return from_rows(rows.to(device), valid.to(device), next_pos.to(device))

    def append(self, payloads: Sequence[bytes], new: KVCache) -> list[bytes]:
        with torch.no_grad():
            index, q = self.collective.codes(self.collective.features(new))
        out = []
        for b, payload in enumerate(payloads):
            pos, n, _ = self._parse(payload)
            added = int(new.valid[b].sum())
            if pos + added != int(new.next_pos[b]):
                raise ValueError(
                    f"append: user {b} was at position {pos}, {added} new events must end at {pos + added}, "
                    f"but new.next_pos is {int(new.next_pos[b])}"
                )
            fresh = self._code_bytes(index[b][new.valid[b]], q[b][new.valid[b]])
            out.append(HEAD.pack(pos + added, n + added) + payload[HEAD.size:] + fresh)
        return out

    def auxiliary_loss(
        self,
        model: SequentialRecommender,
        cache: KVCache,
        item_rows: Tensor | None = None,
        rank_rows: Tensor | None = None,
        reconstruction: float = 0.01,
    ) -> Tensor:
        """Distillation (see `distill.distillation_loss`) plus a small reconstruction term on the
        standardised K/V, which keeps pool entries the scores barely see from drifting."""
        pool = self.collective
        z = pool.features(cache).detach()
        approx = pool.approximate(z)
        rows = pool.rows(approx, slot_positions(cache.valid, cache.next_pos))
        loss = distillation_loss(model, cache, from_rows(rows, cache.valid, cache.next_pos), item_rows, rank_rows)
        if reconstruction:
            loss = loss + reconstruction * F.mse_loss(approx[cache.valid], z[cache.valid])
        return loss

    def bytes_per_user(self, history_len: int) -> int:
        return HEAD.size + history_len * self.pos_bytes

    @property
    def cost(self) -> Cost:
        return Cost(
            refresh=(
                f"append: route one position over {self.groups} x {self.pool_size} pool entries, "
                f"project to {self.rank} dims"
            ),
            serve="gather pool rows, add the rank-r part, rotate keys; attention over all positions",
        )
