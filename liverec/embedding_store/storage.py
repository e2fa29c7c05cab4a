"""Per-row columns that grow in place on the CPU: large columns live in reserved address space.

A table grows from its initial capacity with the live vocabulary, and every per-row column
(weights, optimizer state, key, last update, count, change flags) grows with it. Growing a
torch tensor means a new allocation and a copy of every row so far; on this VM, where each
first touch of a 4 KiB page costs about a microsecond, a table growing to 300 MB of weights paid
the copies and page faults of about three times its final size (growth by half), a quarter of
its training time.

So on the CPU a column of at least `RESERVE_MIN_BYTES` is a view of the start of an anonymous,
unreserved (MAP_NORESERVE) mapping `RESERVE_FACTOR` times its size: growing it again is a
longer view of the same memory, no copy, and only pages actually written ever get memory. Rows
stay where they are, so a view taken before the growth still sees the column's contents. The
byte counts the table reports are those of the column (rows times row size), not of the
reservation, whose untouched pages cost nothing. When a reservation is full the column moves
to a new one (one copy). Smaller columns, and every column on other devices, are grown by
allocation and copy as before.

A reservation whose columns are all gone is not unmapped at once: up to `POOL_SIZE` of them are
kept and handed to the next column that needs one, pages and all. The first write to a fresh
page costs a page fault, 1 to 18 µs each on this VM (the most when the host has not backed that
memory yet), and a table growing by ~8,000 rows a step wrote ~1,000 fresh pages a step: up to
half of its training time went to faults. A process that builds a store again (a restore, a
rebuilt trainer, a benchmark's second pass) reuses the memory of the one it dropped, as an
allocator's free lists would. Reused memory is not cleared: a grown column's new rows are
uninitialised either way.

Reservations ask for transparent huge pages (MADV_HUGEPAGE; this VM's kernel gives them only on
request): the row-walking kernels hit rows at random across hundreds of MB, and with 4 KiB pages
nearly every row is a TLB miss as well as a cache miss. In the bench's train loop the gradient
step and the gather took ~15% less CPU time in 2 MiB pages (a page fault then zeroes 2 MiB, but
there are 512 times fewer of them; untouched 2 MiB ranges still cost nothing).
"""

from __future__ import annotations

import math
import mmap
import weakref

import numpy as np
import torch

RESERVE_MIN_BYTES = 1 << 20
RESERVE_FACTOR = 16
POOL_SIZE = 8
_MAP_NORESERVE = 0x4000  # Linux; the mmap module does not export it on every Python version
# data_ptr -> the mapping reserved there; an entry whose mapping was unmapped is dead (and any
# new allocation that reuses the address is not mistaken for a reservation).
_RESERVED: dict[int, weakref.ref[mmap.mmap]] = {}
# Released reservations, oldest first, whose pages are kept for the next column that needs one.
_POOL: list[mmap.mmap] = []


def grown(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """`tensor` (rows along dim 0) with `rows` rows; the first rows kept, the new ones
    uninitialised (the caller writes what it needs)."""
    shape = (rows, *tensor.shape[1:])
    needed = math.prod(shape) * tensor.element_size()
    if tensor.device.type != "cpu" or needed < RESERVE_MIN_BYTES:
        return _copied(tensor, tensor.new_empty(shape))
    storage = tensor.untyped_storage()
    if (tensor.storage_offset() == 0 and tensor.is_contiguous() and storage.nbytes() >= needed
            and _is_reserved(storage.data_ptr())):
        return torch.empty(0, dtype=tensor.dtype).set_(storage, 0, shape)
    return _copied(tensor, _reserved(shape, tensor.dtype, RESERVE_FACTOR * needed))


def _copied(tensor: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    target[: tensor.shape[0]] = tensor
    return target


def _is_reserved(address: int) -> bool:
    reference = _RESERVED.get(address)
    return reference is not None and reference() is not None


def _reserved(shape: tuple[int, ...], dtype: torch.dtype, nbytes: int) -> torch.Tensor:
    """A tensor of `shape` at the start of a fresh reservation of `nbytes`."""
    for address in [address for address, reference in _RESERVED.items() if reference() is None]:
        del _RESERVED[address]
    mapping = _pooled(nbytes) or _mapped(nbytes)
    array = np.frombuffer(mapping, dtype=np.uint8)
    weakref.finalize(array, _release, mapping)  # the last view of the mapping is gone: pool it
    whole = torch.from_numpy(array).view(dtype)
    _RESERVED[whole.data_ptr()] = weakref.ref(mapping)
    count = math.prod(shape)
    return whole[:count].view(shape)


def _mapped(nbytes: int) -> mmap.mmap:
    """A fresh anonymous reservation, in transparent huge pages where the kernel allows them."""
    mapping = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        mapping.madvise(mmap.MADV_HUGEPAGE)
    return mapping


def _pooled(nbytes: int) -> mmap.mmap | None:
    """The smallest pooled reservation of at least `nbytes`, taken out of the pool; None if none.

    A finaliser run by the garbage collector (in this thread, during an allocation, or in
    another) may change the pool meanwhile: a mapping already gone from it is skipped."""
    for mapping in sorted((mapping for mapping in list(_POOL) if len(mapping) >= nbytes), key=len):
        try:
            _POOL.remove(mapping)
        except ValueError:
            continue
        return mapping
    return None


def _release(mapping: mmap.mmap) -> None:
    """Keep a reservation nobody views any more; past POOL_SIZE the oldest is dropped (unmapped)."""
    _POOL.append(mapping)
    del _POOL[:-POOL_SIZE]
