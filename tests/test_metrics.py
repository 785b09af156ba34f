"""ROAD, average drop / increase in confidence and sparseness (pipeline/metrics), each against an
independent computation, and a run writing their columns."""
import h5py
import numpy as np
import pytest
import scipy.sparse as sp  # a dev dependency: the exact solve ROAD's imputation is checked against
import scipy.sparse.linalg as spla
import torch

from pipeline.config import ConfigError, validate
from pipeline.metrics.confidence import confidence
from pipeline.metrics.road import impute, ranks, removal_masks, road, row_noise
from pipeline.metrics.sparseness import gini
from pipeline.runner import run
from tests.conftest import tiny_overrides
from tests.tinymodels import tiny_net


def exact_imputation(img: np.ndarray, removed: np.ndarray) -> np.ndarray:
    """One channel [H, W]: each removed pixel the weighted mean of its in-image neighbours, one
    sparse system over all removed pixels, solved exactly."""
    H, W = img.shape
    where = np.argwhere(removed)
    index = -np.ones((H, W), int)
    index[removed] = np.arange(len(where))
    rows, cols, vals, b = [], [], [], np.zeros(len(where))
    for e, (i, j) in enumerate(where):
        total = 0.0
        for di in (-1, 0, 1):
            for dj in (-1, 0, 1):
                a, c = i + di, j + dj
                if (di, dj) == (0, 0) or not (0 <= a < H and 0 <= c < W):
                    continue
                w = 1 / 6 if di == 0 or dj == 0 else 1 / 12
                total += w
                if removed[a, c]:
                    rows.append(e), cols.append(index[a, c]), vals.append(-w)
                else:
                    b[e] += w * img[a, c]
        rows.append(e), cols.append(e), vals.append(total)
    out = img.astype(np.float64).copy()
    out[removed] = spla.spsolve(sp.csc_matrix((vals, (rows, cols)), shape=(len(where),) * 2), b)
    return out


def smooth_image(n, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.avg_pool2d(torch.randn(n, 3, h, w, generator=g), 3, 1, 1) * 2


@pytest.mark.parametrize("solver", ["c", "torch"])
@pytest.mark.parametrize("kind", ["blob", "scattered"])
def test_imputation_matches_an_exact_sparse_solve(kind, solver):
    H, W = 40, 37  # odd side: the multigrid's padding
    x = smooth_image(3, H, W)
    yy, xx = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    relevance = -((yy - 12.0) ** 2 + (xx - 25.0) ** 2) if kind == "blob" else torch.rand(H, W)
    removed = removal_masks(ranks(relevance[None, None], (H, W))[0], [10, 50, 90], "morf")[0].reshape(3, H, W)
    out = impute(x, removed, solver=solver)
    for r in range(3):
        for c in range(3):
            want = exact_imputation(x[r, c].double().numpy(), removed[r].numpy())
            np.testing.assert_allclose(out[r, c].double().numpy(), want, atol=2e-4)
    torch.testing.assert_close(out[~removed[:, None].expand_as(x)], x[~removed[:, None].expand_as(x)])
    noise = torch.randn(x.shape)
    noisy = impute(x, removed, noise, solver=solver)
    torch.testing.assert_close(noisy - out, noise * removed[:, None], atol=1e-5, rtol=0)


@pytest.mark.parametrize("solver", ["c", "torch"])
def test_a_plane_imputes_alike_alone_or_beside_others(solver):
    """Per-plane stopping and elementwise grid transfers: a row's imputation does not depend on the
    rows solved with it (max_batch, batch and resume boundaries), to the bit."""
    H, W = 45, 52
    x = smooth_image(6, H, W, seed=1)
    g = torch.Generator().manual_seed(2)
    relevance = torch.nn.functional.interpolate(torch.rand(6, 1, 5, 5, generator=g), (H, W), mode="bilinear")
    removed = torch.stack([removal_masks(ranks(relevance[i:i + 1], (H, W))[0], [p], "morf")[0, 0].reshape(H, W)
                           for i, p in enumerate([10, 30, 50, 70, 90, 95])])
    together = impute(x, removed, solver=solver)
    for i in range(6):
        assert torch.equal(impute(x[i:i + 1], removed[i:i + 1], solver=solver)[0], together[i])
    assert torch.equal(impute(x[2:5], removed[2:5], solver=solver), together[2:5])


@pytest.mark.parametrize("solver", ["c", "torch"])
def test_imputation_matches_pytorch_grad_cam(solver):
    gradcam_road = pytest.importorskip("pytorch_grad_cam.metrics.road")
    x = smooth_image(1, 24, 24)[0]
    removed = torch.rand(24, 24, generator=torch.Generator().manual_seed(3)) < 0.6
    theirs = gradcam_road.NoisyLinearImputer(noise=0.0)(x, (~removed).float())  # their mask: 1 = kept
    torch.testing.assert_close(impute(x[None], removed[None], solver=solver)[0], theirs, atol=2e-4, rtol=0)


def test_removal_masks_take_the_most_or_least_relevant_pixels():
    m = torch.tensor([[0.9, 0.1], [0.5, 0.3]])[None, None]  # order: 0, 2, 3, 1
    rank = ranks(m, (2, 2))[0]
    morf = removal_masks(rank, [25, 50, 75], "morf")[0]
    lerf = removal_masks(rank, [25, 50, 75], "lerf")[0]
    assert morf.tolist() == [[True, False, False, False], [True, False, True, False], [True, False, True, True]]
    assert lerf.tolist() == [[False, True, False, False], [False, True, False, True], [False, True, True, True]]


def loop_road(model, x, maps, targets, percentages, seed, ids):
    """ROAD one input, target, order and percentage at a time, with the exact sparse imputation."""
    N, K = targets.shape
    H, W = x.shape[2:]
    up = torch.nn.functional.interpolate(maps.float(), size=(H, W), mode="bilinear", align_corners=False)
    out = {o: torch.zeros(N, K, len(percentages)) for o in ("morf", "lerf")}
    for n in range(N):
        for k in range(K):
            flat = up[n, k].flatten()
            order = sorted(range(H * W), key=lambda i: (-float(flat[i]), i))
            for j, p in enumerate(percentages):
                count = round(p * H * W / 100)
                for name, chosen in (("morf", order[:count]), ("lerf", order[H * W - count:])):
                    removed = np.zeros(H * W, bool)
                    removed[chosen] = True
                    removed = removed.reshape(H, W)
                    img = np.stack([exact_imputation(x[n, c].double().numpy(), removed) for c in range(x.shape[1])])
                    noise = row_noise(seed, ids[n], name, int(targets[n, k]), p, x.shape[1:], "cpu")
                    img = torch.from_numpy(img).float() + noise * torch.from_numpy(removed)
                    prob = model(img[None]).softmax(1)[0, targets[n, k]]
                    out[name][n, k, j] = prob
    return out


def test_road_curves_match_a_straightforward_loop():
    model = tiny_net()
    x = smooth_image(2, 16, 16, seed=1)
    maps = torch.rand(2, 2, 4, 4, generator=torch.Generator().manual_seed(2))
    targets = torch.tensor([[1, 4], [7, 0]])
    pct = [20, 50, 80]
    got = road(model, x, maps, targets, pct, max_batch=5, seed=3, ids=["a", "b"])
    with torch.no_grad():
        want = loop_road(model, x, maps, targets, pct, 3, ["a", "b"])
    for name in ("morf", "lerf"):
        torch.testing.assert_close(got[f"road_{name}"], want[name], atol=1e-4, rtol=0)
        torch.testing.assert_close(got[f"road_{name}_auc"], want[name].mean(-1), atol=1e-4, rtol=0)
    torch.testing.assert_close(got["road_combined"], got["road_lerf_auc"] - got["road_morf_auc"])
    again = road(model, x[1:], maps[1:], targets[1:], pct, max_batch=16, seed=3, ids=["b"])  # batch-independent
    torch.testing.assert_close(again["road_morf"], got["road_morf"][1:], atol=1e-5, rtol=0)


def test_average_drop_and_increase_against_a_hand_computation():
    model = tiny_net()
    x = smooth_image(3, 16, 16, seed=4)
    maps = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(5)) * 3 - 1
    targets = torch.tensor([[2], [5], [9]])
    got = confidence(model, x, maps, targets, max_batch=2)
    with torch.no_grad():
        for n in range(3):
            e = torch.nn.functional.interpolate(maps[n:n + 1], size=(16, 16), mode="bilinear", align_corners=False)[0, 0]
            e = (e - e.min()) / (e.max() - e.min())
            y = model(x[n:n + 1]).softmax(1)[0, targets[n, 0]].item()
            o = model(x[n:n + 1] * e).softmax(1)[0, targets[n, 0]].item()
            assert got["avg_drop"][n, 0].item() == pytest.approx(100 * max(0.0, y - o) / y, abs=1e-4)
            assert got["increase"][n, 0].item() == float(o > y)
    ones = confidence(model, x, torch.ones(3, 1, 2, 2), targets, max_batch=4)  # constant map: all masked out
    assert (ones["avg_drop"] >= 0).all()


def test_gini_against_a_hand_computation_and_known_values():
    assert gini(torch.full((1, 1, 4, 4), 0.3)).item() == pytest.approx(0.0, abs=1e-7)
    one_hot = torch.zeros(1, 1, 5, 5)
    one_hot[0, 0, 2, 3] = -2.0
    assert gini(one_hot).item() == pytest.approx(24 / 25, abs=1e-6)
    assert gini(torch.zeros(1, 1, 3, 3)).item() == 0.0
    a = torch.tensor([3.0, -1.0, 0.0, 2.0, 5.0, -4.0])
    s = np.sort(np.abs(a.numpy())).astype(float)  # mean absolute difference / (2 * mean)
    want = np.abs(s[:, None] - s[None, :]).sum() / (2 * len(s) ** 2 * s.mean())
    assert gini(a.view(1, 1, 2, 3)).item() == pytest.approx(want, abs=1e-6)


def test_gini_equals_quantus_sparseness_where_it_is_installed():
    """Quantus (not a dependency: skipped without it) on the same maps; it adds 1e-7 to every value."""
    quantus = pytest.importorskip("quantus")
    maps = torch.rand(3, 1, 6, 6, generator=torch.Generator().manual_seed(0)) ** 3
    x = np.zeros((3, 1, 6, 6), np.float32)
    theirs = quantus.Sparseness(display_progressbar=False, disable_warnings=True)(
        model=None, x_batch=x, y_batch=np.zeros(3, int), a_batch=maps.numpy(), device="cpu")
    np.testing.assert_allclose(gini(maps).numpy()[:, 0], np.asarray(theirs), atol=1e-5)


def test_road_percentages_are_checked_before_any_work(make_cfg, image_folder, tiny_checkpoint):
    for bad in ("[0,50]", "[50,10]", "[10,10]", "[100]"):
        cfg = make_cfg(*tiny_overrides(tiny_checkpoint, image_folder, "technique=gradcam",
                                       f"evaluate.road_percentages={bad}"))
        with pytest.raises(ConfigError, match="road_percentages"):
            validate(cfg)


def test_run_writes_the_metric_columns_and_a_resumed_run_equals_a_clean_one(make_cfg, image_folder,
                                                                            tiny_checkpoint, tmp_path):
    extra = ("technique=[gradcam,saliency]", "layers=[relu2]", "evaluate.road=true", "evaluate.confidence=true",
             "evaluate.sparseness=true", "evaluate.road_percentages=[25,50,75]", "render.png=false")
    clean = tmp_path / "clean"
    run(make_cfg(*tiny_overrides(tiny_checkpoint, image_folder, *extra)), clean)
    resumed = tmp_path / "resumed"
    run(make_cfg(*tiny_overrides(tiny_checkpoint, image_folder, *extra, "data.limit=4")), resumed)
    run(make_cfg(*tiny_overrides(tiny_checkpoint, image_folder, *extra)), resumed)
    with h5py.File(clean / "maps.h5", "r") as a, h5py.File(resumed / "maps.h5", "r") as b:
        n = int(a.attrs["rows"])
        assert n == 7 and int(b.attrs["rows"]) == 7
        assert a["gradcam/relu2/cam.road_morf"][:n].shape == (7, 1, 3)
        for col in ("road_morf_auc", "road_lerf_auc", "road_combined", "avg_drop", "increase", "gini"):
            assert a[f"saliency/input/maxabs.{col}"][:n].shape == (7, 1), col
        g = a["gradcam/relu2/cam.gini"][:n]
        assert ((g >= 0) & (g <= 1)).all()
        order_a, order_b = list(a["id"][:n]), list(b["id"][:n])
        rows = [order_b.index(i) for i in order_a]
        for col in ("gradcam/relu2/cam.road_lerf", "saliency/input/maxabs.road_morf"):
            np.testing.assert_allclose(b[col][:n][rows], a[col][:n], atol=1e-5)
    assert (clean / "plots" / "road_morf.png").is_file()


def test_confidence_in_a_run_reuses_the_batch_forward_for_y(make_cfg, image_folder, tiny_checkpoint, tmp_path,
                                                            monkeypatch):
    """Y (the target's probability on the input) is the run's own forward: no second forward of x."""
    def second_forward(*args, **kwargs):
        raise AssertionError("confidence recomputed Y with another forward of the batch")

    monkeypatch.setattr("pipeline.metrics.confidence.target_probs", second_forward)
    out = tmp_path / "run"
    run(make_cfg(*tiny_overrides(tiny_checkpoint, image_folder, "technique=gradcam", "layers=[relu2]",
                                 "evaluate.confidence=true", "render.png=false")), out)
    with h5py.File(out / "maps.h5", "r") as f:
        drop, y = f["gradcam/relu2/cam.avg_drop"][:], f["score"][:]
    assert drop.shape == y.shape == (7, 1) and ((drop >= 0) & (drop <= 100)).all()
