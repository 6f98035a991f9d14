import numpy as np
import pytest

from quantize.stages.histogram import StreamingHistogram


def _assert_close_to_quantiles(histogram, values, percentile):
    """Each end must lie within two bins of the order statistics around its exact rank (at a sparse tail,
    neighbouring samples can be further apart than a bin)."""
    ordered = np.sort(values)
    tail = (100.0 - percentile) / 200.0
    got = histogram.percentile_range(percentile)
    for q, value in ((tail, got[0]), (1.0 - tail, got[1])):
        rank = q * (ordered.size - 1)
        below = ordered[max(int(np.floor(rank)) - 1, 0)]
        above = ordered[min(int(np.ceil(rank)) + 1, ordered.size - 1)]
        assert below - 2 * histogram.width <= value <= above + 2 * histogram.width


@pytest.mark.parametrize("percentile", [99.0, 99.9, 99.999])
def test_chunked_percentile_matches_exact_within_two_bins(percentile):
    rng = np.random.default_rng(0)
    # Chunks with growing spread force the histogram to extend its range and coarsen its bins.
    chunks = [rng.normal(0.5, 0.1 * (i + 1), size=20_000).astype(np.float32) for i in range(20)]
    everything = np.concatenate(chunks)
    chunked = StreamingHistogram(num_bins=512)
    for chunk in chunks:
        chunked.add(chunk)
    single = StreamingHistogram(num_bins=512)
    single.add(everything)
    for histogram in (chunked, single):
        _assert_close_to_quantiles(histogram, everything, percentile)
    assert chunked.total == single.total == everything.size
    assert chunked.min == everything.min() and chunked.max == everything.max()


def test_memory_is_bounded_whatever_the_range():
    histogram = StreamingHistogram(num_bins=256)
    histogram.add(np.array([0.0, 1e-6], dtype=np.float32))
    histogram.add(np.array([-1e4, 1e4], dtype=np.float32))
    assert histogram.counts.size <= 2 * 256
    assert histogram.total == 4


def test_merge_keeps_quantiles_of_both_inputs():
    rng = np.random.default_rng(1)
    a_values = rng.exponential(1.0, 50_000).astype(np.float32)
    b_values = -rng.exponential(3.0, 50_000).astype(np.float32)
    a, b = StreamingHistogram(1024), StreamingHistogram(1024)
    a.add(a_values)
    b.add(b_values)
    a.merge(b)
    both = np.concatenate([a_values, b_values])
    assert a.total == both.size
    _assert_close_to_quantiles(a, both, 99.9)


def test_percentile_100_is_minmax_and_relu_range_starts_at_zero():
    values = np.abs(np.random.default_rng(2).normal(size=10_000)).astype(np.float32)
    histogram = StreamingHistogram()
    histogram.add(values)
    assert histogram.percentile_range(100.0) == (pytest.approx(values.min()), pytest.approx(values.max()))
    assert histogram.percentile_range(99.0)[0] >= 0.0


def test_entropy_clips_long_tails_but_keeps_the_bulk():
    rng = np.random.default_rng(3)
    values = np.concatenate([rng.normal(0, 1, 200_000), [80.0, -80.0]]).astype(np.float32)
    histogram = StreamingHistogram()
    histogram.add(values)
    lo, hi = histogram.entropy_range()
    assert 2.0 < hi < 40.0 and -40.0 < lo < -2.0


def test_entropy_ignores_exact_zeros_of_a_relu_output():
    """Half the values exactly zero (a ReLU output) must not pull the threshold into the bulk of the rest."""
    rng = np.random.default_rng(4)
    positive = rng.exponential(1.0, 100_000)
    values = np.concatenate([np.zeros(150_000), positive]).astype(np.float32)
    rng.shuffle(values)
    whole = StreamingHistogram(count_zeros=True)
    for chunk in np.array_split(values, 7):  # the zero count survives chunking and merging
        part = StreamingHistogram(count_zeros=True)
        part.add(chunk)
        whole.merge(part)
    assert whole.zeros == 150_000
    lo, hi = whole.entropy_range()
    assert lo == 0.0 and np.quantile(positive, 0.99) < hi <= values.max()
    naive = StreamingHistogram()  # what the search does with the zeros in: most of the tail clipped away
    naive.add(values)
    assert naive.entropy_range(num_quantized_bins=128)[1] < np.quantile(positive, 0.9)


def test_nan_is_refused():
    with pytest.raises(ValueError, match="NaN"):
        StreamingHistogram().add(np.array([1.0, np.nan], dtype=np.float32))
