"""rasterize_polygons / rasterize_polygons_overlap on each device, bit for bit against the oracle (the reference on
the CPU, the CPU kernel on CUDA); opcheck, edge cases, bad values, the device error flag, polygon_masks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import (
    deterministic_algorithms,
    got_and_want,
    oracle_ops,
    pack_polygons,
    random_polygons,
    to_device,
    use_reference_fallback,
)

import pyseg.ops as ops
from pyseg.ops import reference

pytestmark = pytest.mark.skipif(not ops.has_ops(), reason="pyseg._C is not built")


def assert_bit_identical(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, got.shape, want.dtype, want.shape)
    assert torch.equal(got, want), f"{int((got != want).sum())} pixels differ"


def rasterize(num_masks: int, height: int, width: int):
    """compute(ops, vertices, poly_offsets, poly_to_mask) for got_and_want."""
    return lambda impl, *polygons: impl.rasterize_polygons(*polygons, num_masks, height, width)


def rasterize_overlap(num_images: int, height: int, width: int):
    """compute(ops, vertices, poly_offsets, poly_to_mask, image_index) for got_and_want."""
    return lambda impl, *polygons: impl.rasterize_polygons_overlap(*polygons, num_images, height, width)


def test_square_covers_exactly_the_pixels_whose_centres_are_inside(device):
    polygons = pack_polygons([np.array([[2, 1], [6, 1], [6, 4], [2, 4]], dtype=np.float32)])
    mask = ops.rasterize_polygons(*to_device(polygons, device), 1, 6, 8)[0].cpu()
    expected = torch.zeros((6, 8), dtype=torch.uint8)
    expected[1:4, 2:6] = 1
    assert torch.equal(mask, expected)


def test_centre_on_an_edge_follows_the_half_open_rule(device):
    # Left/top edges through pixel centres include them, right/bottom edges exclude them.
    polygons = pack_polygons([np.array([[0.5, 0.5], [3.5, 0.5], [3.5, 2.5], [0.5, 2.5]], dtype=np.float32)])
    mask = ops.rasterize_polygons(*to_device(polygons, device), 1, 4, 5)[0].cpu()
    expected = torch.zeros((4, 5), dtype=torch.uint8)
    expected[0:2, 0:3] = 1
    assert torch.equal(mask, expected)


def test_even_odd_rule_leaves_a_hole_in_a_self_overlapping_polygon(device):
    # Outer square then inner square traversed in one polygon: the inner region is covered twice.
    outer = [[0, 0], [10, 0], [10, 10], [0, 10], [0, 0]]
    inner = [[3, 3], [7, 3], [7, 7], [3, 7], [3, 3]]
    polygons = pack_polygons([np.array(outer + inner, dtype=np.float32)])
    mask = ops.rasterize_polygons(*to_device(polygons, device), 1, 10, 10)[0].cpu()
    assert mask[5, 5] == 0 and mask[1, 1] == 1 and mask[5, 1] == 1
    assert int(mask.sum()) == 100 - 16


def test_polygons_of_one_mask_are_united(device):
    a = np.array([[0, 0], [6, 0], [6, 6], [0, 6]], dtype=np.float32)
    b = np.array([[3, 3], [9, 3], [9, 9], [3, 9]], dtype=np.float32)
    polygons = pack_polygons([a, b], owners=[0, 0])
    mask = ops.rasterize_polygons(*to_device(polygons, device), 1, 10, 10)[0].cpu()
    assert mask[4, 4] == 1  # covered by both: union, not XOR
    assert int(mask.sum()) == 36 + 36 - 9


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("size", [(1, 1), (7, 13), (64, 48), (160, 160), (33, 1100), (640, 640)])
def test_kernel_matches_oracle_on_random_polygons(device, seed, size):
    height, width = size
    rng = np.random.default_rng(seed)
    polys = random_polygons(rng, height, width)
    owners = rng.integers(0, 5, len(polys)).tolist()
    got, want = got_and_want(device, rasterize(5, height, width), *pack_polygons(polys, owners))
    assert got.dtype == torch.uint8 and got.shape == (5, height, width)
    assert_bit_identical(got, want)


@pytest.mark.parametrize("size", [160, pytest.param(640, marks=pytest.mark.slow)])
def test_kernel_matches_oracle_on_every_coco128_polygon(device, coco128_labels, size):
    polys, owners = [], []
    for rows in coco128_labels:
        for _cls, xy in rows:
            polys.append(xy * size)
            owners.append(len(owners))
    assert len(owners) > 900
    got, want = got_and_want(device, rasterize(len(owners), size, size), *pack_polygons(polys, owners))
    assert torch.equal(got, want), f"{int((got != want).any(2).any(1).sum())} masks differ"


def star(num_vertices: int, centre: tuple[float, float], outer: float, inner: float) -> np.ndarray:
    """A star polygon [num_vertices, 2] whose vertices alternate between radii outer and inner (px)."""
    angles = np.linspace(0.0, 2 * math.pi, num_vertices, endpoint=False) + 0.1
    radii = np.where(np.arange(num_vertices) % 2 == 0, outer, inner)
    return np.stack([centre[0] + radii * np.cos(angles), centre[1] + radii * np.sin(angles)], 1).astype(np.float32)


def even_odd_by_rows(polygon: np.ndarray, height: int, width: int) -> np.ndarray:
    """bool [height, width]: the reference's rule (reference._polygon_interior) computed row by row with numpy, with
    the same float64 arithmetic in the same order, so bit-identical to it; fast for polygons of many vertices."""
    x0, y0 = polygon[:, 0].astype(np.float64), polygon[:, 1].astype(np.float64)
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    centres = np.arange(width, dtype=np.float64) + 0.5
    inside = np.zeros((height, width), dtype=bool)
    for row in range(height):
        yc = row + 0.5
        c = (y0 <= yc) != (y1 <= yc)
        crossings = np.sort(x0[c] + ((yc - y0[c]) * (x1[c] - x0[c])) / (y1[c] - y0[c]))
        inside[row] = np.searchsorted(crossings, centres, side="right") % 2 == 1  # crossings at or left of centre
    return inside


def test_polygons_of_1000_and_more_vertices_at_640px(device):
    # More edges than a CUDA block has threads, hundreds of crossings per row.
    polys = [star(1500, (320.0, 330.0), 300.0, 170.0), star(1200, (300.0, 290.0), 250.0, 250.0)]  # star, circle
    polygons = pack_polygons(polys)
    got = ops.rasterize_polygons(*to_device(polygons, device), 2, 640, 640).cpu()
    if device == "cpu":
        # The reference takes seconds here: compare with its rule computed by rows (every pixel), and with the
        # reference itself on the top rows (its output on rows [0, k) is the same at any height >= k).
        for mask, polygon in zip(got, polys, strict=True):
            assert torch.equal(mask, torch.from_numpy(even_odd_by_rows(polygon, 640, 640)).to(torch.uint8))
        assert_bit_identical(got[:, :72], reference.rasterize_polygons(*polygons, 2, 72, 640))
        assert int(got[:, :72].sum()) > 500  # the band holds the tops of both shapes
    else:
        assert_bit_identical(got, ops.rasterize_polygons(*polygons, 2, 640, 640))
    assert int(got[0].sum()) > 100_000 and int(got[1].sum()) > 150_000


def test_width_above_8192(device):
    polys = [
        np.array([[-3, 0.2], [9003, 1.7], [8990, 3.9], [2, 3.2]], dtype=np.float32),  # spans the whole width
        np.array([[8180.3, 0.4], [8200.6, 1.1], [8195.2, 3.8]], dtype=np.float32),  # around column 8192
        np.array([[8999.5, -1], [9000, 5], [8998.2, 5]], dtype=np.float32),  # at the last column
    ]
    got, want = got_and_want(device, rasterize(3, 4, 9000), *pack_polygons(polys))
    assert_bit_identical(got, want)
    assert int(got[0, :, 8500:].sum()) > 0 and int(got[1, :, 8192:].sum()) > 0 and int(got[2, :, -1].sum()) > 0


def test_vertices_at_plus_and_minus_1e19(device):
    polys = [
        np.array([[0, 0], [40, 3], [-1e19, 1e19]], dtype=np.float32),  # far below left: a slanted edge
        np.array([[5, 30], [30, 28], [20, -1e19]], dtype=np.float32),  # far above
        np.array([[1e19, 10], [3, 2], [3, 20]], dtype=np.float32),  # far right
        np.array([[-1e19, -1e19], [30, 5], [10, 25], [1e19, 1e19]], dtype=np.float32),  # both ways
    ]
    got, want = got_and_want(device, rasterize(4, 32, 48), *pack_polygons(polys))
    assert_bit_identical(got, want)
    rows_with_pixels = got.any(2).sum(1).tolist()  # none dropped: each covers most rows it crosses
    assert min(rows_with_pixels) >= 15, rows_with_pixels


def test_non_contiguous_inputs_give_the_same_masks(device):
    rng = np.random.default_rng(0)
    v, off, owner = to_device(pack_polygons(random_polygons(rng, 32, 32)), device)
    strided = torch.stack([v[:, 1], v[:, 0]], 0).t().flip(1)  # [V, 2] view with strides (1, V)
    assert not strided.is_contiguous() and torch.equal(strided, v)
    offsets = torch.stack([off, off], 1)[:, 0]
    assert not offsets.is_contiguous()
    assert torch.equal(
        ops.rasterize_polygons(strided, offsets, owner, len(owner), 32, 32),
        ops.rasterize_polygons(v, off, owner, len(owner), 32, 32),
    )


def test_empty_inputs(device):
    nothing = torch.zeros((0, 2)), torch.zeros(1, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)
    triangle = pack_polygons([np.array([[0, 0], [4, 0], [4, 4]], dtype=np.float32)])
    for impl in [ops, reference] if device == "cpu" else [ops]:
        assert impl.rasterize_polygons(*to_device(nothing, device), 0, 8, 8).shape == (0, 8, 8)
        assert int(impl.rasterize_polygons(*to_device(nothing, device), 3, 8, 8).sum()) == 0
        assert impl.rasterize_polygons(*to_device(triangle, device), 1, 0, 5).shape == (1, 0, 5)
        assert impl.rasterize_polygons(*to_device(triangle, device), 1, 5, 0).shape == (1, 5, 0)
        image_index = torch.zeros(1, dtype=torch.int64, device=device)
        index_map, areas = impl.rasterize_polygons_overlap(*to_device(triangle, device), image_index, 1, 0, 5)
        assert index_map.shape == (1, 0, 5) and areas.tolist() == [0]


def test_every_output_element_is_written(device):
    """Under deterministic algorithms new memory is filled with NaN / the largest integer: a byte that a kernel
    leaves unwritten differs from the oracle (computed outside that mode)."""
    rng = np.random.default_rng(5)
    polys = random_polygons(rng, 37, 45)
    polygons = pack_polygons(polys, rng.integers(0, 4, len(polys)).tolist())  # masks 4, 5 have no polygon
    image_index = torch.tensor([0, 2, 2, 0, 2, 0])  # image 1 without instances
    with deterministic_algorithms():
        masks = ops.rasterize_polygons(*to_device(polygons, device), 6, 37, 45).cpu()
        index_map, areas = to_device(
            ops.rasterize_polygons_overlap(*to_device((*polygons, image_index), device), 4, 37, 45), "cpu"
        )
    oracle = oracle_ops(device)
    assert_bit_identical(masks, oracle.rasterize_polygons(*polygons, 6, 37, 45))
    want_map, want_areas = oracle.rasterize_polygons_overlap(*polygons, image_index, 4, 37, 45)
    assert_bit_identical(index_map, want_map)
    assert_bit_identical(areas, want_areas)
    assert int(index_map[1].abs().sum()) == 0 and int(index_map[3].abs().sum()) == 0


def triangles(count: int = 2):
    return pack_polygons([np.array([[0, 0], [4, 0], [4, 4]], dtype=np.float32)] * count)


def with_row(t: torch.Tensor, index: int, value) -> torch.Tensor:
    t = t.clone()
    t[index] = value
    return t


BAD_INPUTS = [
    ("NaN", lambda v, o, m: (with_row(v, 1, float("nan")), o, m), "vertices must be finite"),
    ("inf", lambda v, o, m: (with_row(v, 0, float("inf")), o, m), "vertices must be finite"),
    ("shape", lambda v, o, m: (v.reshape(-1), o, m), "vertices must have shape"),
    ("dtype", lambda v, o, m: (v.double(), o, m), "float32"),
    ("offsets start", lambda v, o, m: (v, o - 1 + torch.arange(len(o)).clamp(max=1), m), "poly_offsets"),
    ("offsets short of V", lambda v, o, m: (v, with_row(o, -1, int(o[-1]) - 1), m), "poly_offsets.*vertices"),
    ("offsets order", lambda v, o, m: (v, o.flip(0).contiguous(), m), "poly_offsets"),
    ("mask index", lambda v, o, m: (v, o, m + 5), r"poly_to_mask values must lie in \[0, num_masks"),
    ("mask index negative", lambda v, o, m: (v, o, m - 1), r"poly_to_mask values must lie in \[0, num_masks"),
]


@pytest.mark.parametrize("backend", ["native", "fallback"])
@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_inputs_raise_value_error_naming_the_argument(device, case, backend, monkeypatch):
    if backend == "fallback":
        use_reference_fallback(monkeypatch)
    _, corrupt, message = case
    with pytest.raises(ValueError, match=message):
        ops.rasterize_polygons(*to_device(corrupt(*triangles()), device), 2, 8, 8)
    # The error is not left behind (on CUDA: the device error flag was read and cleared). 4 + 3 + 2 + 1 pixels each:
    assert int(ops.rasterize_polygons(*to_device(triangles(), device), 2, 8, 8).sum()) == 2 * 10


BAD_OVERLAP_INPUTS = [
    ("NaN", lambda v, o, m, i: (with_row(v, 4, float("nan")), o, m, i), "vertices must be finite"),
    ("offsets short of V", lambda v, o, m, i: (v, with_row(o, -1, int(o[-1]) - 2), m, i), "poly_offsets.*vertices"),
    ("mask index", lambda v, o, m, i: (v, o, m + 3, i), r"poly_to_mask values must lie in \[0, num_masks"),
    ("image index", lambda v, o, m, i: (v, o, m, i + 2), r"image_index values must lie in \[0, num"),
    ("image index negative", lambda v, o, m, i: (v, o, m, i - 1), r"image_index values must lie in \[0, num"),
]


@pytest.mark.parametrize("backend", ["native", "fallback"])
@pytest.mark.parametrize("case", BAD_OVERLAP_INPUTS, ids=[c[0] for c in BAD_OVERLAP_INPUTS])
def test_bad_overlap_inputs_raise_value_error_naming_the_argument(device, case, backend, monkeypatch):
    if backend == "fallback":
        use_reference_fallback(monkeypatch)
    _, corrupt, message = case
    image_index = torch.tensor([0, 1])
    with pytest.raises(ValueError, match=message):
        ops.rasterize_polygons_overlap(*to_device(corrupt(*triangles(), image_index), device), 2, 8, 8)
    index_map, areas = ops.rasterize_polygons_overlap(*to_device((*triangles(), image_index), device), 2, 8, 8)
    assert areas.tolist() == [10, 10] and int(index_map.sum()) == 20


def test_deferred_device_checks_report_bad_values_when_asked(device):
    v, off, owner = to_device(triangles(), device)
    v[1, 0] = float("nan")
    protos, coeffs = torch.randn((2, 3, 8, 8), device=device), torch.randn((1, 3), device=device)
    bad_image, box = torch.tensor([5], device=device), torch.tensor([[0.0, 0.0, 8.0, 8.0]], device=device)
    if device == "cuda":
        with ops.deferred_device_checks():  # no sync per op: the kernels set the flag, nothing raises
            assert ops.rasterize_polygons(v, off, owner, 2, 8, 8).shape == (2, 8, 8)
            assert ops.assemble_masks(protos, coeffs, bad_image, box).shape == (1, 8, 8)
        with pytest.raises(ValueError, match="vertices must be finite") as raised:
            ops.check_device_errors(device)
        assert "image_index values must lie in" in str(raised.value)  # every problem met is named
        ops.check_device_errors(device)  # the flag was cleared: nothing left to raise
    else:
        # The CPU kernels check values before they run: deferring changes nothing, and there is no flag.
        with ops.deferred_device_checks(), pytest.raises(ValueError, match="vertices must be finite"):
            ops.rasterize_polygons(v, off, owner, 2, 8, 8)
        with ops.deferred_device_checks(), pytest.raises(ValueError, match="image_index values must lie in"):
            ops.assemble_masks(protos, coeffs, bad_image, box)
        assert ops.check_device_errors(device) is None
    with pytest.raises(ValueError, match="vertices must be finite"):  # outside the block: checked at once again
        ops.rasterize_polygons(v, off, owner, 2, 8, 8)


def overlap_batch(seed: int, images: int = 3, instances: tuple[int, int] = (0, 6), height: int = 24, width: int = 20):
    """(vertices, poly_offsets, poly_to_mask, image_index): per image a random number of instances in
    [instances[0], instances[1]), each of one or two polygons of random_polygons' kinds."""
    rng = np.random.default_rng(seed)
    polys, owners, image_index = [], [], []
    for image in range(images):
        for _ in range(int(rng.integers(*instances))):
            pool = random_polygons(rng, height, width)
            polys.extend(pool[k] for k in rng.choice(len(pool), int(rng.integers(1, 3)), replace=False))
            owners.extend([len(image_index)] * (len(polys) - len(owners)))
            image_index.append(image)
    v, off, owner = pack_polygons(polys, owners)
    return v, off, owner, torch.tensor(image_index, dtype=torch.int64)


@pytest.mark.parametrize("seed", range(6))
def test_overlap_kernel_matches_oracle(device, seed):
    (index_map, areas), (ref_map, ref_areas) = got_and_want(device, rasterize_overlap(4, 24, 20), *overlap_batch(seed))
    assert index_map.dtype == torch.int32 and areas.dtype == torch.int64
    assert_bit_identical(index_map, ref_map)
    assert_bit_identical(areas, ref_areas)
    assert int(index_map[3].abs().sum()) == 0  # image without instances


def crowded_batch(seed: int, images: int = 16, instances: int = 50, size: int = 160):
    """(vertices, poly_offsets, poly_to_mask, image_index): per image `instances` instances of one or two random
    star-shaped polygons, most a few to 40 px across, some up to 100 px, some partly outside; about one in ten
    repeats the previous instance of its image (equal areas)."""
    rng = np.random.default_rng(seed)
    polys, owners, image_index = [], [], []
    for image in range(images):
        previous: list[np.ndarray] = []
        for _ in range(instances):
            if previous and rng.random() < 0.1:
                parts = previous
            else:
                parts = []
                for _ in range(int(rng.integers(1, 3))):
                    n = int(rng.integers(3, 12))
                    angles = np.sort(rng.uniform(0, 2 * math.pi, n))
                    radii = rng.uniform(0.3, 1.0, n) * rng.uniform(2, 40 if rng.random() < 0.9 else 100)
                    centre = rng.uniform(-0.1 * size, 1.1 * size, 2)
                    parts.append(np.stack([centre[0] + radii * np.cos(angles), centre[1] + radii * np.sin(angles)], 1))
            polys.extend(parts)
            owners.extend([len(image_index)] * len(parts))
            image_index.append(image)
            previous = parts
    v, off, owner = pack_polygons(polys, owners)
    return v, off, owner, torch.tensor(image_index, dtype=torch.int64)


def test_overlap_on_16_images_of_50_instances_at_160px(device):
    polygons = crowded_batch(seed=7)
    assert polygons[3].shape == (800,)
    (index_map, areas), (ref_map, ref_areas) = got_and_want(device, rasterize_overlap(16, 160, 160), *polygons)
    assert_bit_identical(index_map, ref_map)
    assert_bit_identical(areas, ref_areas)
    visible = [len(index_map[b].unique()) - 1 for b in range(16)]  # ids shown per image, background aside
    assert min(visible) >= 30 and max(visible) <= 50, visible


def test_overlap_keeps_the_smaller_instance_visible(device):
    big = np.array([[0, 0], [10, 0], [10, 10], [0, 10]], dtype=np.float32)
    small = np.array([[2, 2], [5, 2], [5, 5], [2, 5]], dtype=np.float32)
    for order in ([small, big], [big, small]):
        polygons = to_device((*pack_polygons(order), torch.tensor([0, 0])), device)
        index_map, areas = ops.rasterize_polygons_overlap(*polygons, 1, 12, 12)
        small_id = 1 if order[0] is small else 2
        assert int(index_map[0, 3, 3]) == small_id
        assert int(index_map[0, 8, 8]) == 3 - small_id
        assert sorted(areas.tolist()) == [9, 100]


def test_overlap_equal_areas_show_the_later_instance(device):
    square = np.array([[2, 2], [8, 2], [8, 8], [2, 8]], dtype=np.float32)  # 36 px
    rectangle = np.array([[2, 1], [9, 1], [9, 10], [2, 10]], dtype=np.float32)  # 7 x 9 = 63 px
    part_a = np.array([[0, 0], [6, 0], [6, 6], [0, 6]], dtype=np.float32)
    part_b = np.array([[3, 3], [9, 3], [9, 9], [3, 9]], dtype=np.float32)  # with part_a: 63 px (72 if summed)
    # Image 0: the same square twice. Image 1: the rectangle, then one instance of two overlapping parts.
    v, off, owner = pack_polygons([square, square, rectangle, part_a, part_b], owners=[0, 1, 2, 3, 3])
    image_index = torch.tensor([0, 0, 1, 1])
    got, want = got_and_want(device, rasterize_overlap(2, 12, 12), v, off, owner, image_index)
    assert_bit_identical(got[0], want[0])
    assert_bit_identical(got[1], want[1])
    index_map, areas = got
    assert areas.tolist() == [36, 36, 63, 63]
    assert bool((index_map[0, 2:8, 2:8] == 2).all()) and int(index_map[0].count_nonzero()) == 36
    assert int((index_map[1] == 2).sum()) == 63  # the two-part instance, drawn last, shows whole
    assert int((index_map[1] == 1).sum()) == 63 - 47  # the rectangle where the parts do not cover it


def test_overlap_images_without_instances_stay_background(device):
    squares = [np.array([[x, 1], [x + 4, 1], [x + 4, 5], [x, 5]], dtype=np.float32) for x in (1, 3, 6)]
    v, off, owner = pack_polygons(squares)
    image_index = torch.tensor([0, 2, 2])  # images 1, 3 and 4 have none
    got, want = got_and_want(device, rasterize_overlap(5, 8, 12), v, off, owner, image_index)
    assert_bit_identical(got[0], want[0])
    assert_bit_identical(got[1], want[1])
    assert int(got[0][[1, 3, 4]].abs().sum()) == 0
    assert int(got[0][0].amax()) == 1 and set(got[0][2].unique().tolist()) == {0, 1, 2}
    # No instance at all in a batch of three images.
    nothing = torch.zeros((0, 2)), torch.zeros(1, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)
    got, want = got_and_want(device, rasterize_overlap(3, 8, 12), *nothing, torch.zeros(0, dtype=torch.int64))
    assert_bit_identical(got[0], want[0])
    assert got[0].shape == (3, 8, 12) and int(got[0].abs().sum()) == 0 and got[1].shape == (0,)


def test_opcheck(device):
    rng = np.random.default_rng(1)
    polygons = to_device(pack_polygons(random_polygons(rng, 16, 16)), device)
    torch.library.opcheck(torch.ops.pyseg.rasterize_polygons, (*polygons, len(polygons[2]), 16, 16))
    polygons = to_device(overlap_batch(2), device)
    torch.library.opcheck(torch.ops.pyseg.rasterize_polygons_overlap, (*polygons, 3, 24, 20))


def test_runs_under_torch_compile(device):
    rng = np.random.default_rng(3)
    v, off, owner = to_device(pack_polygons(random_polygons(rng, 16, 16)), device)

    def fn(vertices):
        return ops.rasterize_polygons(vertices * 1.0, off, owner, len(owner), 16, 16).sum(0)

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    with ops.deferred_device_checks():  # as the trainer runs ops: no host sync inside the graph
        got = compiled(v)
    ops.check_device_errors(device)
    assert torch.equal(got, fn(v))


def collated_batch(seed: int, images: int = 3, size: int = 96) -> dict:
    """The fields of a SegCollate batch that polygon_masks reads: one polygon per instance, about a quarter of the
    instances box-only (has_mask False: polygon_masks drops their polygons), image 1 without instances."""
    rng = np.random.default_rng(seed)
    polys, image_index = [], []
    for image in range(images):
        if image == 1:
            continue
        pool = random_polygons(rng, size, size)
        polys.extend(pool[k] for k in rng.choice(len(pool), 8, replace=False))
        image_index.extend([image] * 8)
    vertices, offsets, _ = pack_polygons(polys)
    has_mask = torch.from_numpy(rng.random(len(polys)) > 0.25)
    has_mask[0] = False
    return {
        "images": torch.zeros((images, 3, size, size), dtype=torch.uint8),
        "vertices": vertices,
        "poly_offsets": offsets,
        "classes": torch.zeros(len(polys), dtype=torch.int64),
        "has_mask": has_mask,
        "image_index": torch.tensor(image_index),
    }


@pytest.mark.parametrize("overlap", [True, False], ids=["overlap", "per-instance"])
def test_polygon_masks_match_the_oracle(device, overlap, monkeypatch):
    """The masks the trainer makes on the device equal those of the collate on the CPU (CPU kernel; on the CPU,
    the reference)."""
    from pyseg.data.loader import polygon_masks

    batch = collated_batch(seed=4)
    got = to_device(polygon_masks(to_device(batch, device), 4, overlap), "cpu")
    if device == "cpu":
        use_reference_fallback(monkeypatch)
    want = polygon_masks(batch, 4, overlap)
    assert got.keys() == want.keys() == ({"masks", "mask_areas"} if overlap else {"masks"})
    for key in got:
        assert_bit_identical(got[key], want[key])
    box_only = ~batch["has_mask"]
    if overlap:
        assert got["masks"].shape == (3, 24, 24) and int(got["masks"][1].abs().sum()) == 0
        assert int(got["mask_areas"][box_only].sum()) == 0 and int(got["mask_areas"][~box_only].sum()) > 0
    else:
        assert got["masks"].shape == (len(box_only), 24, 24)
        assert not bool(got["masks"][box_only].any()) and bool(got["masks"][~box_only].any())


def chebyshev_distance_to_outline(points: np.ndarray, polygon: np.ndarray) -> np.ndarray:
    """Exact L-inf distance of each point [P, 2] to the closed outline of polygon [n, 2] (float64 px)."""
    a = polygon[None, :, :]
    d = np.roll(polygon, -1, 0)[None, :, :] - a  # edge vectors (1, E, 2)
    u, v = (a - points[:, None, :])[..., 0], (a - points[:, None, :])[..., 1]  # (P, E)
    dx, dy = d[..., 0], d[..., 1]
    # max(|u + t dx|, |v + t dy|) is convex and piecewise linear in t: its minimum over [0, 1] is at an end or
    # where one term vanishes or the two are equal.
    with np.errstate(divide="ignore", invalid="ignore"):
        candidates = [
            np.zeros_like(u),
            np.ones_like(u),
            -u / dx,
            -v / dy,
            (v - u) / (dx - dy),
            -(u + v) / (dx + dy),
        ]
    t = np.clip(np.nan_to_num(np.stack(candidates), nan=0.0, posinf=0.0, neginf=0.0), 0.0, 1.0)  # (6, P, E)
    distance = np.maximum(np.abs(u + t * dx), np.abs(v + t * dy))
    return distance.min(axis=(0, 2))


@pytest.mark.parametrize(
    "variant, tolerance_px, ours_only_px",
    [
        # cv2 gets our vertices in 1/16 px (shift=4) moved by half a pixel, so that its pixel (x, y) is ours. It
        # samples pixel centres as we do and adds the pixels its 8-connected outline drawing passes through, whose
        # centres lie within one pixel of the outline. Its fixed-point edge stepping can also miss a centre we
        # include, but only a fraction of a pixel inside the outline: measured at most 0.144 px (L-inf) over
        # COCO128 at 160 px, checked at 0.2 px. A bug that moves our masks by a quarter pixel puts such pixels
        # 0.25 px inside and fails this (checked by shifting our vertices by 0.25 px: 0.2499 px, 869 pixels).
        ("subpixel, centre-aligned", 1.0, 0.2),
        # Whole-pixel vertices: rounding moves a vertex by up to 0.5 px per axis, and cv2's vertex k is the centre
        # of pixel k (our k + 0.5): one more pixel on top of the outline drawing's one, both ways.
        ("integer vertices", 2.0, 2.0),
    ],
)
def test_cv2_fillpoly_agrees_with_us_except_next_to_the_outline(coco128_labels, variant, tolerance_px, ours_only_px):
    """Both rasterizers sample pixel centres; cv2 also fills its outline pixels. So every pixel where the two
    disagree must lie next to the polygon's outline, and all pixels farther from it must agree. (The CPU kernel
    only: the kernels of other devices are checked bit for bit against it.)"""
    cv2 = pytest.importorskip("cv2")
    size = 160
    instances = disagreeing = ours_only = agreeing_inside = 0
    worst = worst_ours_only = 0.0
    for rows in coco128_labels:
        for _cls, xy in rows:
            polygon = xy * size
            v, off, owner = pack_polygons([polygon])
            ours = ops.rasterize_polygons(v, off, owner, 1, size, size)[0].numpy().astype(bool)
            if variant == "integer vertices":
                points, shift = np.round(polygon).astype(np.int32), 0
            else:
                points, shift = np.round((polygon - 0.5) * 16).astype(np.int32), 4
            theirs = np.zeros((size, size), np.uint8)
            cv2.fillPoly(theirs, [points], 1, shift=shift)
            theirs = theirs.astype(bool)
            instances += 1
            agreeing_inside += int((ours & theirs).sum())
            rows_, cols = np.nonzero(ours != theirs)
            if len(rows_):
                centres = np.stack([cols + 0.5, rows_ + 0.5], 1).astype(np.float64)
                distance = chebyshev_distance_to_outline(centres, polygon.astype(np.float64))
                worst = max(worst, float(distance.max()))
                only = ours[rows_, cols]
                disagreeing += len(rows_)
                ours_only += int(only.sum())
                worst_ours_only = max(worst_ours_only, float(distance[only].max(initial=0.0)))
    assert instances > 900
    assert worst <= tolerance_px, f"a pixel {worst:.3f} px from the outline differs from cv2.fillPoly"
    assert worst_ours_only <= ours_only_px, (
        f"we set a pixel {worst_ours_only:.3f} px from the outline that cv2 does not"
    )
    # not vacuous: the two disagree on some outline pixels, and agree on far more pixels inside
    assert 0 < disagreeing < agreeing_inside / 5, (disagreeing, agreeing_inside)
    if variant != "integer vertices":  # cv2 fills a superset of ours but for a few pixels at vertices
        assert ours_only < 2e-4 * agreeing_inside, (ours_only, agreeing_inside)
