"""M3 nested average pooling: the authors' reference outputs (tests/data/parity), shapes, positions, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from parity import DATA, parity_cases

from vtprune.strategies.pooling import M3_SCALES, nearest_scale, pool_grid, valid_scales

CASES = parity_cases("matryoshka")

fast = settings(max_examples=25, deadline=None)


def square_grid(num_tokens: int) -> tuple[int, int]:
    side = int(round(num_tokens**0.5))
    assert side * side == num_tokens, f"{num_tokens} tokens are not a square grid"
    return side, side


def coordinates(grid: tuple[int, int]) -> torch.Tensor:
    """(h*w, 2) float (row, col) of every token of a raster grid."""
    rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    return torch.stack([rows.flatten(), cols.flatten()], dim=1).float()


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_pooling_matches_reference(case: dict, arrays: np.lib.npyio.NpzFile) -> None:
    batch = torch.from_numpy(arrays[case["input"]])
    expected = torch.from_numpy(arrays[case["output"]])
    grid = square_grid(batch.shape[1])
    pooled = torch.stack([pool_grid(x, grid, case["scale"])[0] for x in batch])
    assert pooled.shape == expected.shape
    torch.testing.assert_close(pooled, expected, rtol=0, atol=1e-6)


def test_pooling_cases_exist() -> None:
    assert CASES, f"no matryoshka cases in {DATA / 'parity.json'}"


def test_m3_scales_on_llava_grid() -> None:
    features = torch.randn(576, 5)
    for scale, window in zip(M3_SCALES, (1, 2, 4, 8, 24), strict=True):
        pooled, positions = pool_grid(features, (24, 24), scale)
        assert pooled.shape == (scale, 5) and positions.shape == (scale, 2)
        assert pooled.dtype == features.dtype and positions.dtype == torch.float32
        # The first pooled token is the mean of the top-left window.
        top_left = features.view(24, 24, 5)[:window, :window].reshape(-1, 5).mean(dim=0)
        torch.testing.assert_close(pooled[0], top_left)
        torch.testing.assert_close(positions[0], torch.full((2,), (window - 1) / 2))


def test_full_scale_returns_the_input() -> None:
    features = torch.randn(36, 7)
    pooled, positions = pool_grid(features, (6, 6), 36)
    assert torch.equal(pooled, features)
    assert torch.equal(positions, coordinates((6, 6)))


@fast
@given(side=st.sampled_from([1, 2, 3, 4, 6, 8, 12]), channels=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_positions_are_window_centres_and_means_are_kept(side: int, channels: int, seed: int) -> None:
    grid = (side, side)
    features = torch.randn(side * side, channels, generator=torch.Generator().manual_seed(seed))
    for scale in valid_scales(grid):
        pooled, positions = pool_grid(features, grid, scale)
        # A pooled token sits at the mean of its source tokens' coordinates: pool the coordinates.
        torch.testing.assert_close(positions, pool_grid(coordinates(grid), grid, scale)[0])
        # Equal windows tiling the grid: the overall mean survives every scale.
        torch.testing.assert_close(pooled.mean(dim=0), features.mean(dim=0), rtol=1e-5, atol=1e-5)


def test_scales_nest() -> None:
    # Matryoshka: pooling 576 -> 144 -> 36 -> 9 equals pooling 576 -> 9 directly.
    features = torch.randn(576, 4)
    coarse = features
    for fine_side, scale in ((24, 144), (12, 36), (6, 9)):
        coarse, _ = pool_grid(coarse, (fine_side, fine_side), scale)
    torch.testing.assert_close(coarse, pool_grid(features, (24, 24), 9)[0])


@pytest.mark.parametrize(
    "shape, grid, scale, message",
    [
        ((24, 3), (4, 6), 6, "square grid"),
        ((576, 3), (24, 24), 72, "square whose side divides 24"),
        ((576, 3), (24, 24), 25, "square whose side divides 24"),
        ((576, 3), (24, 24), 0, "does not tile"),
        ((576, 3), (24, 24), 2304, "does not tile"),
        ((575, 3), (24, 24), 144, r"\(h\*w, C\)"),
        ((576,), (24, 24), 144, r"\(h\*w, C\)"),
    ],
)
def test_invalid_requests_are_refused(shape: tuple[int, ...], grid: tuple[int, int], scale: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        pool_grid(torch.randn(*shape), grid, scale)


def test_valid_scales() -> None:
    assert valid_scales((24, 24)) == [1, 4, 9, 16, 36, 64, 144, 576]
    assert valid_scales((27, 27)) == [1, 9, 81, 729]
    assert valid_scales((4, 6)) == []


def test_nearest_scale() -> None:
    assert nearest_scale((24, 24), 576) == 576
    assert nearest_scale((24, 24), 100) == 64  # |64 - 100| < |144 - 100|
    assert nearest_scale((24, 24), 110) == 144
    assert nearest_scale((24, 24), 50) == 64  # tie with 36: the larger keeps more
    assert nearest_scale((24, 24), 50, scales=M3_SCALES) == 36
    assert nearest_scale((24, 24), 90, scales=M3_SCALES) == 144  # tie with 36: the larger keeps more
    assert nearest_scale((24, 24), 10_000) == 576
    assert nearest_scale((27, 27), 64) == 81
    with pytest.raises(ValueError, match="no M3 pooling scale"):
        nearest_scale((24, 32), 64)
    with pytest.raises(ValueError, match="among"):
        nearest_scale((27, 27), 64, scales=(144, 576))
    with pytest.raises(ValueError, match="count"):
        nearest_scale((24, 24), 0)
