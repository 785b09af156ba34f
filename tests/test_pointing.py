"""Pointing game and energy pointing against hand computations, and evaluate.pointing in a run."""
import math

import h5py
import numpy as np
import torch

from pipeline.metrics.pointing import energy_pointing, pointing_game
from pipeline.runner import run
from tests.conftest import tiny_overrides


def peak_map(size, row, col, value=1.0):
    m = torch.zeros(1, 1, size, size)
    m[0, 0, row, col] = value
    return m


def box(*xywh):
    return np.asarray([xywh], np.float32)


def test_pointing_hits_inside_misses_outside_and_is_nan_without_a_box():
    m = torch.cat([peak_map(32, 10, 20), peak_map(32, 10, 20), peak_map(32, 10, 20)], 1)  # [1, 3, 32, 32]
    boxes = [[box(18, 8, 4, 4), box(0, 20, 5, 5), np.zeros((0, 4), np.float32)]]
    out = pointing_game(m, boxes, 32, tolerance=0)
    assert out[0, :2].tolist() == [1.0, 0.0] and math.isnan(out[0, 2])


def test_pointing_tolerance_edge_is_strict_as_in_torchray():
    m = peak_map(32, 10, 20)  # the point (x 20, y 10)
    right = box(25, 10, 3, 1)  # nearest box pixel (25, 10): distance 5
    assert pointing_game(m, [[right]], 32, tolerance=5).item() == 0.0  # < 5 needed
    assert pointing_game(m, [[right]], 32, tolerance=6).item() == 1.0
    diagonal = box(23, 14, 2, 2)  # nearest pixel (23, 14): 3-4-5
    assert pointing_game(m, [[diagonal]], 32, tolerance=5).item() == 0.0
    assert pointing_game(m, [[diagonal]], 32, tolerance=5.01).item() == 1.0
    assert pointing_game(m, [[np.concatenate([box(0, 0, 2, 2), diagonal])]], 32, tolerance=6).item() == 1.0


def test_pointing_upsamples_the_map_to_the_input():
    m = torch.zeros(1, 1, 4, 4)
    m[0, 0, 3, 0] = 1.0  # bottom-left cell of a 4x4 map: input pixels x 0..7, y 24..31
    assert pointing_game(m, [[box(0, 24, 8, 8)]], 32, tolerance=0).item() == 1.0
    assert pointing_game(m, [[box(8, 0, 24, 24)]], 32, tolerance=1).item() == 0.0


def test_energy_pointing_is_the_share_of_positive_energy_inside_the_union_of_boxes():
    m = torch.zeros(1, 1, 8, 8)
    m[0, 0, 0, 0], m[0, 0, 0, 1], m[0, 0, 7, 7], m[0, 0, 4, 4] = 3.0, 1.0, 4.0, -5.0  # negatives do not count
    two = np.concatenate([box(0, 0, 1, 1), box(0.5, 0, 1, 1)])  # overlapping: pixels (0,0), (0,1) counted once
    out = energy_pointing(torch.cat([m, m, m], 1), [[box(0, 0, 1, 1), two, np.zeros((0, 4))]], 8)
    assert out[0, 0].item() == 3 / 8 and out[0, 1].item() == 4 / 8 and math.isnan(out[0, 2])
    assert energy_pointing(torch.zeros(1, 1, 8, 8), [[box(0, 0, 4, 4)]], 8).item() == 0.0


def test_run_with_pointing_writes_the_columns(make_cfg, image_folder, tiny_checkpoint, tmp_path):
    # every image is 48x40 -> 38x32 at input 32 (scale 0.8 rounded: 38/48, left 3): the source box
    # (0, 0, 24, 40) is the input box x 0 .. 24 * 38 / 48 - 3 = 16, the left half
    rows = "".join(f"img00{i}.png,{i},0,0,24,40\n" for i in range(5))
    path = tmp_path / "boxes.csv"
    path.write_text("id,class,x,y,w,h\n" + rows + "sub/deep000.png,1,,,,\n")
    cfg = make_cfg(*tiny_overrides(tiny_checkpoint, image_folder, "technique=[gradcam,saliency]", "layers=[relu2]",
                                   "target=label", f"data.annotations={path}", "evaluate.pointing=true",
                                   "evaluate.pointing_tolerance=0", "render.png=false"))
    run(cfg, tmp_path / "run")
    with h5py.File(tmp_path / "run" / "maps.h5", "r", locking=False) as f:
        ids = [i.decode() for i in f["id"][:]]
        boxed = [ids.index(f"img00{i}.png") for i in range(5)]
        half = [[box(0, 0, 16, 32)] for _ in boxed]
        for output in ("gradcam/relu2/cam", "saliency/input/maxabs"):
            hit, energy = f[f"{output}.pointing"][:], f[f"{output}.energy_pointing"][:]
            assert hit.shape == energy.shape == (6, 1)
            maps = torch.from_numpy(f[output][:][boxed].astype(np.float32))
            np.testing.assert_array_equal(hit[boxed], pointing_game(maps, half, 32, tolerance=0).numpy())
            np.testing.assert_allclose(energy[boxed], energy_pointing(maps, half, 32).numpy(), rtol=1e-5)
            assert 0 < energy[boxed].min() and energy[boxed].max() < 1  # a half box: neither all nor none
            assert np.isnan(hit[ids.index("sub/deep000.png")]).all()  # a label without a box
            assert np.isnan(energy[ids.index("sub/deep000.png")]).all()
