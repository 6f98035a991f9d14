"""A streaming histogram whose memory does not grow with the number of values it has seen.

Bins sit on a grid anchored at zero: bin ``i`` covers ``[i * width, (i + 1) * width)``. Because every histogram of
a tensor shares that anchoring, histograms built batch by batch merge exactly: growing the range only appends
bins, and when the bin count passes ``2 * num_bins`` the width doubles and neighbouring bins are summed pairwise
(an exact operation on an anchored grid). A percentile read from it is therefore within two bins of the exact
percentile of all values, however the values were split into batches.
"""

from __future__ import annotations

import math
import threading

import numpy as np


MIN_BINS = 16  # fewer bins cannot place a percentile or an entropy threshold anywhere useful
_SLICE = 1 << 18  # values binned per pass: a slice and its indices stay in the core's cache


_local = threading.local()


def _scratch(size: int) -> np.ndarray:
    """A float32 work buffer of at least ``size`` values, reused by the calling thread."""
    buffer = getattr(_local, "buffer", None)
    if buffer is None or buffer.size < size:
        buffer = _local.buffer = np.empty(max(size, 1024), dtype=np.float32)
    return buffer[:size]


class StreamingHistogram:
    def __init__(self, num_bins: int = 2048, count_zeros: bool = False):
        """``count_zeros`` also counts the values that are exactly zero (one more pass over every batch), which
        ``entropy_range`` leaves out of its search."""
        if num_bins < MIN_BINS:
            raise ValueError(f"num_bins must be at least {MIN_BINS}")
        self.num_bins = num_bins
        self.count_zeros = count_zeros
        self.zeros = 0
        self.width: float | None = None
        self.start = 0  # grid index of counts[0]
        self.counts = np.zeros(0, dtype=np.float64)
        self.min = math.inf
        self.max = -math.inf

    @property
    def total(self) -> float:
        return float(self.counts.sum())

    def add(self, values: np.ndarray, lo: float | None = None, hi: float | None = None) -> None:
        """Count ``values``. ``lo``/``hi``, when given, must be their exact minimum and maximum (computed elsewhere,
        for example by ONNX Runtime inside the calibration graph); they save two passes over the values."""
        values = np.asarray(values, dtype=np.float32).reshape(-1)
        if values.size == 0:
            return
        if lo is None or hi is None:
            lo, hi = float(values.min()), float(values.max())
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError("values contain NaN or infinity")
        if self.count_zeros and lo <= 0 <= hi:
            self.zeros += values.size - int(np.count_nonzero(values))
        self._insert(values, lo, hi)

    def merge(self, other: "StreamingHistogram") -> None:
        """Add another histogram of the same quantity (for example one built by another worker). Its bins are
        re-binned at their centres, so a merged percentile is within two bins of the wider of the two grids."""
        if other.width is None:
            return
        self.zeros += other.zeros
        occupied = other.counts > 0
        centres = (np.arange(other.start, other.start + other.counts.size)[occupied] + 0.5) * other.width
        # a centre stays inside its bin when moved to the seen extremes, and then inside [min, max]
        centres = np.clip(centres.astype(np.float32), np.float32(other.min), np.float32(other.max))
        self._insert(centres, other.min, other.max, weights=other.counts[occupied])

    def _insert(self, values: np.ndarray, lo: float, hi: float, weights: np.ndarray | None = None) -> None:
        self.min, self.max = min(self.min, lo), max(self.max, hi)
        if self.width is None:
            span = hi - lo
            self.width = span / self.num_bins if span > 0 else max(abs(hi), 1e-12) / self.num_bins
        self._cover(lo, hi)
        # Bin of x: floor(x * (1 / width)) on the zero-anchored grid. Float rounding is monotonic, so every value
        # of [lo, hi] lands in a bin between those of lo and hi, which _cover made room for: no clipping pass.
        # Work in cache-sized slices: four cheap passes over a slice that stays in cache.
        scale = np.float32(1.0 / self.width)
        start = np.float32(self.start)
        size = self.counts.size
        step = _SLICE
        scratch = _scratch(min(step, values.size))
        for begin in range(0, values.size, step):
            part = values[begin:begin + step]
            index = scratch[:part.size]
            np.multiply(part, scale, out=index)
            np.floor(index, out=index)
            index -= start
            with np.errstate(invalid="ignore"):  # NaN casts to a negative index, which bincount refuses
                bins = index.astype(np.intp)
            counted = np.bincount(bins, weights=None if weights is None else weights[begin:begin + step],
                                  minlength=size)
            if counted.size > size:  # cannot happen with a monotonic rounding; never count outside the grid
                counted[size - 1] += counted[size:].sum()
                counted = counted[:size]
            self.counts += counted

    def percentile_range(self, percentile: float) -> tuple[float, float]:
        """The range keeping ``percentile`` percent of values, cutting the rest equally from both tails."""
        if self.width is None:
            raise ValueError("empty histogram")
        tail = (100.0 - percentile) / 200.0
        cdf = np.cumsum(self.counts) / self.counts.sum()
        lo_bin = int(np.searchsorted(cdf, tail, side="right"))
        hi_bin = int(np.searchsorted(cdf, 1.0 - tail, side="left"))
        hi_bin = min(hi_bin, self.counts.size - 1)
        lo = (self.start + lo_bin) * self.width
        hi = (self.start + hi_bin + 1) * self.width
        return max(lo, self.min), min(hi, self.max)

    def mse_range(self, levels: int = 255, steps: int = 200, min_fraction: float = 0.2) -> tuple[float, float]:
        """The range ``[a * lo, a * hi]`` (``lo``/``hi``: the seen extremes, widened to include 0) whose ``levels``-step
        uniform quantization of the counted values has the least expected squared error: rounding error
        ``step^2 / 12`` for every value inside, the squared distance to the nearest end for every value clipped.
        ``a`` is searched on ``steps`` points of ``[min_fraction, 1]``; bins count at their centres.

        A global percentile clips every tensor the same share, whatever its shape: long-tailed tensors keep a range
        their bulk uses a few levels of, short-tailed ones lose values that matter. The error itself decides here."""
        if self.width is None:
            raise ValueError("empty histogram")
        lo, hi = min(self.min, 0.0), max(self.max, 0.0)
        if hi - lo <= 0:
            return self.min, self.max
        occupied = self.counts > 0
        counts = self.counts[occupied]
        centres = (np.arange(self.start, self.start + self.counts.size)[occupied] + 0.5) * self.width
        centres = np.clip(centres, self.min, self.max)
        fractions = np.linspace(min_fraction, 1.0, steps)
        a_lo, a_hi = fractions[:, None] * lo, fractions[:, None] * hi          # (steps, 1)
        step = (a_hi - a_lo) / levels
        below = np.maximum(a_lo - centres[None, :], 0.0)
        above = np.maximum(centres[None, :] - a_hi, 0.0)
        clipped = below + above                                                  # one of the two is zero
        inside = clipped == 0
        error = (inside * counts).sum(axis=1) * step[:, 0] ** 2 / 12 + (clipped ** 2 * counts).sum(axis=1)
        best = int(np.argmin(error))
        return max(float(a_lo[best, 0]), self.min), min(float(a_hi[best, 0]), self.max)

    def entropy_range(self, num_quantized_bins: int | None = None) -> tuple[float, float]:
        """Symmetric clipping threshold minimising the KL divergence between the |x| distribution and its
        ``num_quantized_bins``-level quantization (the TensorRT calibration idea), clamped to the seen range.

        Two choices keep it from clipping whole layers away (measured on EfficientNet-Lite0, where the plain method
        cut the pooled features to 11% of their range and top-1 fell to 0): values that are exactly zero (ReLU
        outputs, often half of a tensor) are left out when ``count_zeros`` is on, since zero is exact at any scale
        while its spike, spread over a coarse first level, makes every wide threshold look bad; and a tensor that
        is never negative is searched with 256 levels (default), as an asymmetric 8-bit range [0, T] has 256 steps,
        otherwise 128 (one side of a signed range)."""
        if self.width is None:
            raise ValueError("empty histogram")
        levels = num_quantized_bins or (256 if self.min >= 0 else 128)
        magnitude = self._magnitude_counts()
        magnitude[0] = max(magnitude[0] - self.zeros, 0.0)
        if magnitude.sum() == 0:  # nothing but zeros
            return self.min, self.max
        threshold = _min_kl_threshold(magnitude, levels) * self.width
        return max(-threshold, self.min), min(threshold, self.max)

    def _magnitude_counts(self) -> np.ndarray:
        """Counts of |x| on the same grid: grid bin i >= 0 maps to i, bin i < 0 to -i - 1."""
        grid = np.arange(self.start, self.start + self.counts.size)
        magnitude_bin = np.where(grid >= 0, grid, -grid - 1)
        return np.bincount(magnitude_bin, weights=self.counts)

    def _cover(self, lo: float, hi: float) -> None:
        while True:
            first, last = self._bin(lo), self._bin(hi)
            if self.counts.size:
                first = min(first, self.start)
                last = max(last, self.start + self.counts.size - 1)
            if last - first + 1 <= 2 * self.num_bins:
                break
            self._coarsen()
        if self.counts.size == 0:
            self.start, self.counts = first, np.zeros(last - first + 1)
            return
        before = self.start - first
        after = last - (self.start + self.counts.size - 1)
        if before or after:
            self.counts = np.concatenate([np.zeros(before), self.counts, np.zeros(after)])
            self.start = first

    def _bin(self, value: float) -> int:
        """Grid index of ``value``, computed exactly as ``_insert`` bins (float32 multiply, then floor)."""
        return int(np.floor(np.float32(value) * np.float32(1.0 / self.width)))

    def _coarsen(self) -> None:
        grid = np.arange(self.start, self.start + self.counts.size)
        new_start = self.start // 2
        self.counts = np.bincount(grid // 2 - new_start, weights=self.counts)
        self.start = new_start
        self.width *= 2


def _min_kl_threshold(counts: np.ndarray, levels: int) -> int:
    """Number of magnitude bins to keep so that quantizing them to ``levels`` levels loses the least information."""
    size = counts.size
    if size <= levels:
        return size
    step = max(1, (size - levels) // 256)
    best_bins, best_kl = size, math.inf
    for keep in range(levels, size + 1, step):
        reference = counts[:keep].copy()
        reference[-1] += counts[keep:].sum()
        kept = counts[:keep]
        edges = np.linspace(0, keep, levels + 1).astype(np.int64)
        group = np.repeat(np.arange(levels), np.diff(edges))
        nonzero = kept > 0
        group_sum = np.bincount(group, weights=kept, minlength=levels)
        group_nonzero = np.bincount(group, weights=nonzero, minlength=levels)
        spread = np.where(nonzero, group_sum[group] / np.maximum(group_nonzero[group], 1), 0.0)
        p = reference / reference.sum()
        q_total = spread.sum()
        if q_total == 0:
            continue
        q = spread / q_total
        mask = p > 0
        kl = float(np.sum(p[mask] * np.log(p[mask] / np.maximum(q[mask], 1e-12))))
        if kl < best_kl:
            best_bins, best_kl = keep, kl
    return best_bins
