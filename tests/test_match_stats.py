"""Streaming correlation statistics against a float64 reference, on every cross-product path.

The statistics see activations in their own layout ``[before, channels, after]``; the reference
moves channels last in float64 and applies ``cov / (std_a std_b)`` to all samples at once.
Inputs are float32 with means 50x their standard deviation, so a naive ``E[ab] - E[a]E[b]`` in
float32 would lose the covariance: the per-channel shift must keep it.
"""

import pytest
import torch

from permask.match import activation
from permask.match.activation import CorrelationStats
from permask.match.points import Plan, Point, Unit


def reference(xs_a, xs_b, axis, index):
    """float64 correlations over all batches; a unit's replicas count as samples."""

    def samples(xs):
        x = torch.cat([t.double().movedim(axis, -1).reshape(-1, t.shape[axis]) for t in xs])
        return torch.cat([x[:, row] for row in index])

    a, b = samples(xs_a), samples(xs_b)
    a, b = a - a.mean(0), b - b.mean(0)
    cov = a.T @ b / len(a)
    std_a, std_b = a.square().mean(0).sqrt(), b.square().mean(0).sqrt()
    return cov / torch.outer(std_a, std_b)


@pytest.mark.parametrize(
    "shape, axis, index",
    [
        ((4, 16, 8, 8), 1, None),  # many positions after the channels: batched GEMM
        ((4, 32, 2, 2), 1, None),  # few positions: GEMM on a channels-last copy
        ((4, 7, 24), 2, None),  # channels last (tokens): one GEMM
        ((4, 12, 3, 3), 1, torch.randperm(12, generator=torch.Generator().manual_seed(0))),
    ],
    ids=["bmm", "transposed", "last", "replicas"],
)
@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "under-bf16-autocast"])
@pytest.mark.parametrize("fused", [False, True], ids=["sums", "var_mean"])
@pytest.mark.parametrize("chunk", [None, 40], ids=["whole", "in-slices"])
def test_correlations_match_float64_reference(shape, axis, index, amp, fused, chunk, monkeypatch):
    """Also inside a caller's ``torch.autocast``: the products must stay float32; with the
    moments from one Welford pass (CUDA's default), forced here on the CPU; and with each batch
    observed in slices of rows and the cross sums made in blocks of rows (what bounds an LLM
    batch's copies), forced here by a tiny bound."""
    monkeypatch.setitem(activation.FUSED_MOMENTS, "cpu", fused)
    if chunk is not None:
        monkeypatch.setattr(activation, "_CHUNK_ELEMENTS", chunk)
    got, want = _stats_and_reference(shape, axis, index, amp, torch.float32, "cpu", None)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)


@pytest.mark.parametrize("chunk", [None, 40], ids=["whole", "in-slices"])
def test_float32_statistics_add_products_in_place(chunk, monkeypatch):
    """float32 sums take the products straight into their buffer (no C x C temporary): the
    correlations still match the float64 reference, to float32 sums' accuracy."""
    if chunk is not None:
        monkeypatch.setattr(activation, "_CHUNK_ELEMENTS", chunk)
    for shape, axis in (((4, 7, 24), 2), ((4, 32, 2, 2), 1)):
        got, want = _stats_and_reference(shape, axis, None, False, torch.float32, "cpu", None,
                                         stats_dtype=torch.float32)  # fmt: skip
        torch.testing.assert_close(got, want.float(), atol=1e-4, rtol=0)


def test_half_precision_activations_are_promoted_not_rounded():
    """Activations a model returns in bfloat16 (its own AMP): shifted in float32, so the
    statistics are those of the bfloat16 values exactly as float64 sees them."""
    got, want = _stats_and_reference((4, 16, 8, 8), 1, None, False, torch.bfloat16, "cpu", None)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)


def _stats_and_reference(shape, axis, index, amp, dtype, device, precision,
                         stats_dtype=torch.float64):  # fmt: skip
    channels = shape[axis]
    index = torch.arange(channels)[None] if index is None else index.reshape(2, channels // 2)
    point = Point("x", axis, "x", channels, (Unit(("g",), index),))
    stats = CorrelationStats(Plan((point,), ()), torch.device(device), precision, stats_dtype)
    g = torch.Generator().manual_seed(1)
    xs_a, xs_b = [], []
    for _ in range(3):
        a = 50 + torch.randn(shape, generator=g)
        b = 50 + 0.5 * a.roll(1, axis) + torch.randn(shape, generator=g)  # correlated, shifted
        a, b = a.to(device, dtype), b.to(device, dtype)
        xs_a.append(a.clone())
        xs_b.append(b.clone())
        with torch.autocast(device, dtype=torch.bfloat16, enabled=amp):
            stats.observe(0, a, b)
        assert torch.equal(a, xs_a[-1]) and torch.equal(b, xs_b[-1])  # only copies are shifted
    got = stats.scores()[("g",)].cpu()
    want = reference([x.cpu() for x in xs_a], [x.cpu() for x in xs_b], axis, index)
    assert got.shape == want.shape == (index.shape[1], index.shape[1])
    assert want.abs().max() > 0.3  # the test data does correlate
    return got, want


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision, atol", [("highest", 2e-5), ("high", 5e-3)])
def test_cuda_statistics_match_float64_reference(precision, atol):
    """On CUDA (moments by var_mean): float32 products to float32 accuracy, TF32 to ~1e-3."""
    for shape, axis in (((4, 16, 8, 8), 1), ((4, 32, 2, 2), 1), ((4, 7, 24), 2)):
        got, want = _stats_and_reference(shape, axis, None, False, torch.float32, "cuda", precision)
        torch.testing.assert_close(got, want, atol=atol, rtol=0)
    assert torch.get_float32_matmul_precision() == "highest"  # restored


def test_an_unknown_precision_is_refused():
    point = Point("x", 1, "x", 4, (Unit(("g",), torch.arange(4)[None]),))
    with pytest.raises(ValueError, match="unknown precision 'medium'; choose 'highest'"):
        CorrelationStats(Plan((point,), ()), torch.device("cpu"), "medium")


def test_dead_channel_gives_zero_not_nan():
    point = Point("x", 1, "x", 3, (Unit(("g",), torch.arange(3)[None]),))
    stats = CorrelationStats(Plan((point,), ()), torch.device("cpu"))
    a = torch.randn(8, 3, 4)
    a[:, 1] = 0.0
    stats.observe(0, a, torch.randn(8, 3, 4))
    got = stats.scores()[("g",)]
    assert torch.isfinite(got).all() and torch.equal(got[1], torch.zeros(3, dtype=got.dtype))


def test_correlations_do_not_depend_on_the_activations_scale():
    """Activations of std ~1e-3 (a random init's deep layers) give the same correlations as at
    unit scale: the paper's absolute eps (``std_a std_b + 1e-4``) turned them into covariances,
    which pick high-variance channels over the true partner."""
    point = Point("x", 1, "x", 6, (Unit(("g",), torch.arange(6)[None]),))
    g = torch.Generator().manual_seed(0)
    a = torch.randn(64, 6, 4, generator=g, dtype=torch.float64) * torch.logspace(0, 1, 6)[:, None]
    b = a[:, torch.tensor([3, 0, 5, 1, 4, 2])] + 0.01 * torch.randn(64, 6, 4, generator=g)
    got = []
    for scale in (1.0, 1e-3):
        stats = CorrelationStats(Plan((point,), ()), torch.device("cpu"))
        stats.observe(0, scale * a, scale * b)
        got.append(stats.scores()[("g",)])
    torch.testing.assert_close(got[0], got[1], rtol=1e-9, atol=1e-12)
    assert got[1].argmax(0).tolist() == [3, 0, 5, 1, 4, 2]


def test_a_quiet_channel_correlates_fully_with_its_copy():
    """A channel 1e4 times quieter than the rest of its unit (ConvMixer: a channel whose only
    variation is zero padding around a constant map) is still matched by its correlation: a
    regulariser relative to the unit's mean std (1e-8, once) cut its true score to ~0.6, below
    the 0.9 of a look-alike, and ConvMixer lost 20 of 33 groups to such swaps."""
    point = Point("x", 1, "x", 4, (Unit(("g",), torch.arange(4)[None]),))
    g = torch.Generator().manual_seed(0)
    a = torch.randn(64, 4, 4, generator=g, dtype=torch.float64)
    a[:, 0] *= 1e-4
    perm = torch.tensor([2, 0, 3, 1])  # B's channel j is A's channel perm[j]
    stats = CorrelationStats(Plan((point,), ()), torch.device("cpu"))
    stats.observe(0, a, a[:, perm])
    got = stats.scores()[("g",)]
    torch.testing.assert_close(got[perm, torch.arange(4)], torch.ones(4, dtype=got.dtype))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_cross_sum_is_named(bad):
    """The cross sums are checked through their total (one pass): any NaN or inf entry shows."""
    point = Point("x", 1, "conv", 3, (Unit(("g",), torch.arange(3)[None]),))
    stats = CorrelationStats(Plan((point,), ()), torch.device("cpu"))
    stats.observe(0, torch.randn(8, 3, 4), torch.randn(8, 3, 4))
    stats.check_finite()
    stats.sums[0][0][4][2, 1] = bad
    with pytest.raises(FloatingPointError, match="cross products at node 'x' \\(conv\\)"):
        stats.check_finite()


def test_spent_statistics_give_the_same_correlations_in_their_own_buffers():
    """``scores(spend=True)`` (activation matching's budget counts the statistics only) makes
    the correlations in the cross-sum buffers, summed over two points into one key, equal to
    the ones made in fresh matrices; then the statistics refuse to be read again."""
    unit = Unit(("g",), torch.arange(5)[None])
    plan = Plan((Point("x", 1, "x", 5, (unit,)), Point("y", 1, "y", 5, (unit,))), ())
    stats = CorrelationStats(plan, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        for point in (0, 1):
            stats.observe(
                point, torch.randn(16, 5, 3, generator=g), torch.randn(16, 5, 3, generator=g)
            )
    want = stats.scores()[("g",)]
    got = stats.scores(spend=True)[("g",)]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-15)
    with pytest.raises(RuntimeError, match="spent"):
        stats.scores()
