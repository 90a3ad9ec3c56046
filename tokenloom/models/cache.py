"""Preallocated key/value cache, written by slot.

All rows of a batch share one write index (prompts are left-padded to the same length), so a
step writes slots ``[length, length + T)`` of every row. ``positions`` remembers the position id
stored in each slot (-1 for empty or padding), from which the models build their masks.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, head_dim: int, max_len: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 v_head_dim: int | None = None):
        shape = (batch, n_kv_heads, max_len, head_dim)
        vshape = (batch, n_kv_heads, max_len, v_head_dim or head_dim)
        # zeros, not empty: padding queries may read unwritten slots and must not see NaN
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(vshape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.positions = torch.full((batch, max_len), -1, dtype=torch.long, device=device)
        self.length = 0
        self.max_len = max_len
        self._pending = 0
        self._cols: torch.Tensor | None = None  # slot_write's columns, made once per step
        # encoder-decoder models: per-layer cross-attention keys/values (B, Hkv, S, hd), computed
        # once from the encoder output, and which source positions are real (B, S) bool
        self.cross_k: list[torch.Tensor] = []
        self.cross_v: list[torch.Tensor] = []
        self.memory_mask: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.positions.shape[0]

    def begin(self, position_ids: torch.Tensor) -> torch.Tensor:
        """Reserve slots for a step of T tokens; returns the positions of all live slots (B, S)."""
        t = position_ids.shape[1]
        if self.length + t > self.max_len:
            raise RuntimeError(f"KV cache is full ({self.length} + {t} > {self.max_len} slots)")
        self.positions[:, self.length:self.length + t] = position_ids
        self._pending = t
        self._cols = None
        return self.positions[:, :self.length + t]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v (B, Hkv, T, hd) of this step; return all keys and values so far."""
        end = self.length + self._pending
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def slot_write(self, layer: int):
        """As SlotCache's views: (keys, values, each token's row and column, width) of this
        step's B x T tokens (row-major), for a fused kernel."""
        if self._cols is None:
            dev, b, t = self.positions.device, self.batch_size, self._pending
            self._cols = (torch.arange(b, device=dev).repeat_interleave(t),
                          torch.arange(self.length, self.length + t, device=dev).repeat(b))
        return self.k[layer], self.v[layer], *self._cols, self.length + self._pending

    def commit(self) -> None:
        self.length += self._pending
        self._pending = 0

    def select(self, rows: torch.Tensor) -> None:
        """Keep (and reorder or repeat) batch rows, e.g. to drop finished sequences."""
        self.k = [k.index_select(0, rows) for k in self.k]
        self.v = [v.index_select(0, rows) for v in self.v]
        self.positions = self.positions.index_select(0, rows)
        self.cross_k = [k.index_select(0, rows) for k in self.cross_k]
        self.cross_v = [v.index_select(0, rows) for v in self.cross_v]
        if self.memory_mask is not None:
            self.memory_mask = self.memory_mask.index_select(0, rows)
