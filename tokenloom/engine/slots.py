"""The serving engine's key/value cache: one row per running sequence, each with its own length.

Row r holds its sequence's keys/values in columns ``[0, length[r])`` (column = position for a
decoder; an encoder-decoder's decoder also starts at position 0), so sequences join and leave
without moving anyone else. The models see this cache through views with the `KVCache`
protocol (begin / update / commit / cross_k / cross_v / memory_mask): `row_view` for one row's
prefill chunk, `step_view` for one token of rows ``[0, n)``.

Batch invariance: a sequence's numbers must not depend on its neighbours. On CPU in float32 a
step's products run in our kernels, whose rows' numbers do not depend on the row count
(models/base.py `linear`, and the packed ones of models/quant.py), and one-token attention is one
small matmul per row; attention over a width that is a multiple of the block gives the same sums
whatever the width, because the extra columns are masked (on CPU any multiple of 8 columns did,
for widths up to 2,000, one and four rows: 16 leaves room for 16-lane vectors; other devices
keep 128). So a step covers just its live rows and a block-rounded width. Where products run in
a BLAS (other devices and dtypes, or no kernels built), a row's numbers are the same only in
batches of a multiple of some row count (MKL with AVX2: 4 rows; with AVX-512 it depends on the
shape), so such a step covers a multiple of MIN_ROWS rows (free rows run as padding): the best
that can be done there, not a promise. A model may say otherwise with `row_multiple`.

Memory: rows and width grow separately, each only when needed (rows double, width by a quarter),
and an idle engine releases everything.
"""

from __future__ import annotations

import torch

from tokenloom.heap import trim_heap
from tokenloom.models.base import rows_independent

BLOCK = 128  # attention widths (self and cross) are rounded up to this ...
CPU_BLOCK = 16  # ... or this on CPU: the KV cache is not allocated past what a workload needs
GROW_TRIM = 8 << 20  # while the cache grows, the heap is trimmed once RSS grew this much
MIN_ROWS = 4  # a decode step covers a multiple of this many rows (free rows run as padding)


def _round(n: int, to: int) -> int:
    return max(to, -(-n // to) * to)


class SlotCache:
    def __init__(self, model, dtype: torch.dtype, device):
        self.dtype, self.device = dtype, torch.device(device)
        self.encoder_decoder = getattr(model, "is_encoder_decoder", False)
        self.min_rows = getattr(model, "row_multiple", 1 if rows_independent(dtype, device) else MIN_ROWS)
        self.block = CPU_BLOCK if self.device.type == "cpu" else BLOCK
        probe = model.make_cache(1, 1, dtype, device)
        self.kshapes = [(k.shape[1], k.shape[3]) for k in probe.k]
        self.vshapes = [(v.shape[1], v.shape[3]) for v in probe.v]
        self.cross_shapes: list[tuple[int, int]] = []  # learnt from the first memory stored
        self.release()

    def release(self) -> None:
        """Drop all memory (the engine calls this when idle, so memory returns to its baseline)."""
        self.rows = self.width = self.mem_width = 0
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.positions = torch.empty(0, 0, dtype=torch.long, device=self.device)
        self.lengths: list[int] = []
        self.cross_k: list[torch.Tensor] = []
        self.cross_v: list[torch.Tensor] = []
        self.memory_mask = torch.empty(0, 0, dtype=torch.bool, device=self.device)
        self.mem_lengths: list[int] = []

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v + self.cross_k + self.cross_v)

    # ------------------------------------------------------------------ capacity

    def reserve(self, rows: int, width: int, mem_width: int = 0) -> None:
        """Make room for `rows` rows of `width` columns (and `mem_width` source columns)."""
        rows, width = _round(rows, self.min_rows), _round(width, self.block)
        mem_width = _round(mem_width, self.block) if self.encoder_decoder else 0
        if rows <= self.rows and width <= self.width and mem_width <= self.mem_width \
                and (self.cross_k or not self.cross_shapes):
            return
        # grow geometrically, so that growing is rare, but each axis only when it must
        new_rows = self.rows if rows <= self.rows else max(rows, min(2 * self.rows, rows + self.rows))
        new_width = self.width if width <= self.width else max(width, _round(self.width * 5 // 4, self.block))
        new_mem = max(mem_width, self.mem_width)

        def grow(old: list[torch.Tensor], shapes, cols: int) -> list[torch.Tensor]:
            # a layer at a time, in place: the old cache is freed as the new one fills, so
            # growing costs one layer of extra memory, not a second copy of the whole cache.
            # The freed layers are smaller than the new ones, so glibc cannot reuse them: the
            # heap is trimmed every few MB on the way, or RSS would briefly hold both caches
            for i, (h, d) in enumerate(shapes):
                t = torch.zeros(new_rows, h, cols, d, dtype=self.dtype, device=self.device)
                if i < len(old):
                    o = old[i]
                    t[:o.shape[0], :, :o.shape[2]] = o
                    old[i] = t
                    del o
                    trim_heap(GROW_TRIM)
                else:
                    old.append(t)
            return old

        self.k, self.v = grow(self.k, self.kshapes, new_width), grow(self.v, self.vshapes, new_width)
        pos = torch.full((new_rows, new_width), -1, dtype=torch.long, device=self.device)
        pos[:self.rows, :self.width] = self.positions
        self.positions = pos
        self.lengths += [0] * (new_rows - self.rows)
        if self.encoder_decoder and self.cross_shapes:
            self.cross_k = grow(self.cross_k, self.cross_shapes, new_mem)
            self.cross_v = grow(self.cross_v, self.cross_shapes, new_mem)
        mask = torch.zeros(new_rows, new_mem, dtype=torch.bool, device=self.device)
        mask[:self.rows, :self.mem_width] = self.memory_mask
        if new_mem:  # free rows attend to one zero key: a fully masked row would give NaN
            mask[torch.tensor([m == 0 for m in self.mem_lengths + [0] * (new_rows - self.rows)]), 0] = True
        self.memory_mask = mask
        self.mem_lengths += [0] * (new_rows - self.rows)
        self.rows, self.width, self.mem_width = new_rows, new_width, new_mem
        # measured at 32 rows, 48 -> 64 columns (+23 MB of cache): RSS +62 MB without the trims,
        # +7 MB with them (benchmarks/peak_memory.py: batch-32 peak 514 -> 490 MB)
        trim_heap()

    # ------------------------------------------------------------------ rows

    def set_memory(self, row: int, cross_k: list[torch.Tensor], cross_v: list[torch.Tensor], length: int) -> None:
        """Store one source's cross-attention keys/values (each (1, H, S, d)) in `row`."""
        if not self.cross_shapes:
            self.cross_shapes = [(k.shape[1], k.shape[3]) for k in cross_k]
        self.reserve(self.rows, self.width, length)
        for dst, src in zip(self.cross_k + self.cross_v, list(cross_k) + list(cross_v)):
            dst[row].zero_()
            dst[row, :, :length] = src[0, :, :length]
        self.memory_mask[row] = False
        self.memory_mask[row, :length] = True
        self.mem_lengths[row] = length

    def copy_rows(self, src: list[int], dst: list[int]) -> None:
        """Row dst[i] becomes a copy of row src[i] (all copies read before any write)."""
        # a row copied onto itself stays as it is (a beam that kept its own history): skipping it
        # is safe, since no other pair writes to that row, and halves a beam step's copying
        pairs = [(s, d) for s, d in zip(src, dst) if s != d]
        if not pairs:
            return
        src, dst = [s for s, _ in pairs], [d for _, d in pairs]
        cols = max(self.lengths[r] for r in src)
        s = torch.tensor(src, device=self.device)
        d = torch.tensor(dst, device=self.device)
        for t in self.k + self.v:
            t[d, :, :cols] = t[s, :, :cols]
        self.positions[d] = self.positions[s]
        if self.cross_k:
            mw = max(self.mem_lengths[r] for r in src)
            for t in self.cross_k + self.cross_v:
                t[d, :, :mw] = t[s, :, :mw]
            self.memory_mask[d] = self.memory_mask[s]
        lengths, mem = [self.lengths[r] for r in src], [self.mem_lengths[r] for r in src]
        for r, n, m in zip(dst, lengths, mem):
            self.lengths[r], self.mem_lengths[r] = n, m

    def clear(self, row: int, scrub: bool = False) -> None:
        """Free a row. `scrub` zeroes its keys/values too: a failed sequence may have left NaN,
        and a masked NaN still poisons attention (0 * NaN)."""
        if scrub:
            for t in self.k + self.v:
                t[row].zero_()
        self.positions[row] = -1
        self.lengths[row] = 0
        if self.cross_k:
            for t in self.cross_k + self.cross_v:
                t[row].zero_()
            self.memory_mask[row] = False
            self.memory_mask[row, 0] = True
            self.mem_lengths[row] = 0

    # ------------------------------------------------------------------ views for the model

    def row_view(self, row: int) -> "_RowView":
        return _RowView(self, row)

    def step_view(self, n: int) -> "_StepView":
        """Rows [0, n) advance by one token; free rows up to a multiple of `min_rows` run along."""
        return _StepView(self, n)


class _CrossMixin:
    cache: SlotCache

    def _cross(self, rows: slice):
        c = self.cache
        if not c.cross_k:
            return [], [], None
        mw = _round(max(c.mem_lengths[rows]), c.block)
        return ([t[rows, :, :mw] for t in c.cross_k], [t[rows, :, :mw] for t in c.cross_v],
                c.memory_mask[rows, :mw])


class _RowView(_CrossMixin):
    """One row, a chunk of T tokens written after its `length` columns (prefill)."""

    def __init__(self, cache: SlotCache, row: int):
        self.cache, self.row = cache, row
        self.cross_k, self.cross_v, self.memory_mask = self._cross(slice(row, row + 1))

    def begin(self, position_ids: torch.Tensor) -> torch.Tensor:
        c, t = self.cache, position_ids.shape[1]
        self.start, self.end = c.lengths[self.row], c.lengths[self.row] + t
        c.positions[self.row, self.start:self.end] = position_ids[0]
        self._slots = None
        return c.positions[self.row:self.row + 1, :self.end]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        c, r = self.cache, self.row
        c.k[layer][r, :, self.start:self.end] = k[0]
        c.v[layer][r, :, self.start:self.end] = v[0]
        return c.k[layer][r:r + 1, :, :self.end], c.v[layer][r:r + 1, :, :self.end]

    def slot_write(self, layer: int):
        """As _StepView's: this chunk's tokens go to columns [start, end) of the row."""
        c = self.cache
        assert self.end <= c.width  # fused kernels write there unchecked
        if self._slots is None:
            self._slots = (torch.full((self.end - self.start,), self.row, dtype=torch.long, device=c.device),
                           torch.arange(self.start, self.end, device=c.device))
        return c.k[layer], c.v[layer], *self._slots, self.end

    def commit(self) -> None:
        self.cache.lengths[self.row] = self.end


class _StepView(_CrossMixin):
    """Rows [0, n), one token each, written at each row's own length."""

    def __init__(self, cache: SlotCache, live: int):
        n = _round(live, cache.min_rows)
        self.cache, self.n, self.live = cache, n, live
        # every row's new column lies inside the cache (fused kernels write there unchecked)
        assert max(cache.lengths[:n]) < cache.width and n <= cache.rows
        self.cols = torch.tensor(cache.lengths[:n], device=cache.device)
        self.ar = torch.arange(n, device=cache.device)
        self.end = _round(max(cache.lengths[:n]) + 1, cache.block)
        self.cross_k, self.cross_v, self.memory_mask = self._cross(slice(0, n))
        self._slots: dict[int, torch.Tensor] = {}

    def _flat_slots(self, heads: int) -> torch.Tensor:
        """Where this step's token goes in a (rows * heads * width, d) view of a layer's cache:
        one index_copy_ per layer instead of an advanced-index write (fewer, cheaper calls)."""
        if heads not in self._slots:
            c = self.cache
            h = torch.arange(heads, device=c.device)
            self._slots[heads] = ((self.ar[:, None] * heads + h) * c.width + self.cols[:, None]).reshape(-1)
        return self._slots[heads]

    def begin(self, position_ids: torch.Tensor) -> torch.Tensor:
        c = self.cache
        c.positions[self.ar, self.cols] = position_ids[:, 0]
        return c.positions[:self.n, :self.end]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        c = self.cache
        for dst, src in ((c.k[layer], k), (c.v[layer], v)):
            d = dst.shape[-1]
            dst.view(-1, d).index_copy_(0, self._flat_slots(dst.shape[1]), src.reshape(-1, d))
        return c.k[layer][:self.n, :, :self.end], c.v[layer][:self.n, :, :self.end]

    def slot_write(self, layer: int):
        """For a fused kernel (kernels.rope_attention): the layer's whole key and value tensors,
        the row and column each token goes to, and the attention width."""
        c = self.cache
        return c.k[layer], c.v[layer], self.ar, self.cols, self.end

    def commit(self) -> None:
        for r in range(self.live):  # padding rows stay empty (they rewrite column 0)
            self.cache.lengths[r] += 1
