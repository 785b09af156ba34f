"""ROAD: RemOve And Debias (Rong et al. 2022, https://arxiv.org/abs/2202.00449).

For each percentage p, the p% most relevant pixels (MoRF) or the p% least relevant (LeRF) by the
map (upsampled to the input, ranked per input and target; ties in pixel order) are removed and
filled in by *noisy linear imputation*: each removed pixel is the weighted mean of its 8
neighbours inside the image (1/6 for the 4 direct, 1/12 for the diagonal ones, renormalised at
the border), all removed pixels of an image solved jointly, per channel, then Gaussian noise of
std `NOISE` is added to them. The curve is the target's softmax probability at each p; its AUC is
the mean over the percentages; `road_combined` = lerf_auc - morf_auc (higher is better;
pytorch-grad-cam's ROADCombined reports half of it). Unlike pytorch-grad-cam, whose
`percentile=p` keeps p% and removes the rest, p here is the share removed, as in the paper.

Imputation happens in the model's normalised input space (the tensor the model is fed, as in
pytorch-grad-cam) and the noise std 0.01 is absolute in that space. The linear system of an image
is symmetric positive definite (restricted to its removed pixels); it is solved by conjugate
gradients preconditioned with a multigrid V-cycle. Two implementations of the same algorithm:
road_kernel.c (CPU tensors: built on first use by pipeline.native, one image per call, images
spread over torch's threads, a plane's arrays staying in the core's cache; 6-8x faster than the
torch one here) and `_solve` (any device, the fallback where no C compiler is found: vectorised
over rows x channels, the stencil and the grid transfers depthwise convolutions, each plane its
own channel). They agree to float32 rounding (~1e-4 on 224 x 224 photos, where the stopping
iteration differs). Each plane stops at a relative residual of `TOL`: on a 224 x 224 photo 4e-5 /
1.2e-4 / 3.8e-4 from an exact sparse solve at 10 / 50 / 90% removed, float32's floor at 90%, far
below the noise. Every step is elementwise, a per-plane sum or a per-plane convolution, so a
plane's result is the same to the bit whichever planes are solved beside it (tested), and the
noise of a row is drawn from a generator keyed by the run's seed, the input's id, the order, the
target class and p (pipeline.seeds): ROAD values do not depend on the batch, on max_batch or on
resume boundaries. Only image inputs [N, C, H, W] are supported.
"""
from __future__ import annotations

import ctypes
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pipeline import native
from pipeline.maps import resize_maps
from pipeline.progress import NO_PROGRESS, Progress
from pipeline.seeds import keyed_generator
from pipeline.techniques.base import rows_logits

NOISE = 0.01  # std of the noise added to imputed pixels, in the model's input space
TOL = 1e-5  # a plane stops once its residual norm is below TOL times its right-hand side's
MAX_ITER = 500
COARSEST = 8  # the multigrid stops halving below this side
SWEEPS = 2  # Jacobi sweeps before and after each coarse correction
COARSE_SWEEPS = 8  # on the coarsest grid (more did not lower the iterations)
ORDERS = ("morf", "lerf")
SOLVERS = ("auto", "c", "torch")
KERNEL = Path(__file__).with_name("road_kernel.c")


_STENCIL = torch.tensor([[1.0, 2.0, 1.0], [2.0, 0.0, 2.0], [1.0, 2.0, 1.0]]) / 12  # the 8 neighbours' weights
_TRANSFER = torch.outer(torch.tensor([1.0, 3.0, 3.0, 1.0]), torch.tensor([1.0, 3.0, 3.0, 1.0])) / 16


def _depthwise(kernel: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """kernel [k, k] as the weight of a depthwise convolution over the planes of u [B, H, W]."""
    return kernel.to(u.device, u.dtype).expand(u.shape[0], 1, *kernel.shape)


def _neighbours(u: torch.Tensor) -> torch.Tensor:
    """Weighted sum of each pixel's in-image neighbours (zero outside): [B, H, W] -> [B, H, W]. A
    depthwise convolution, each plane its own channel (2x faster than shifted in-place sums here,
    and a plane's numbers do not depend on the planes beside it)."""
    return F.conv2d(u[None], _depthwise(_STENCIL, u), padding=1, groups=u.shape[0])[0]


def _operator(e: torch.Tensor, m: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The system on the removed pixels m: s*e - W(e) there, 0 elsewhere, for e that is 0 off m;
    [B, H, W] -> same."""
    return torch.addcmul(_neighbours(e), s, e, value=-1).mul_(-1).mul_(m)


def _residual(r: torch.Tensor, e: torch.Tensor, m: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """r - A e on the removed pixels m (r and e 0 off m): [B, H, W] -> same."""
    return torch.addcmul(r, m, torch.addcmul(_neighbours(e), s, e, value=-1))


def _restrict(r: torch.Tensor) -> torch.Tensor:
    """Full weighting, (1, 3, 3, 1) / 4 along each axis: [B, H, W] -> [B, ceil(H/2), ceil(W/2)] (an odd
    side gets a zero pad)."""
    H, W = r.shape[1:]
    v = F.pad(r[None], (0, W % 2, 0, H % 2)) if H % 2 or W % 2 else r[None]
    return F.conv2d(v, _depthwise(_TRANSFER, r), stride=2, padding=1, groups=r.shape[0])[0]


def _prolong(e: torch.Tensor, size) -> torch.Tensor:
    """Bilinear interpolation, the transpose of _restrict: [B, h, w] -> [B, *size]."""
    out = F.conv_transpose2d(e[None], _depthwise(_TRANSFER, e), stride=2, padding=1, groups=e.shape[0])[0]
    return out[:, :size[0], :size[1]]


def _levels(m: torch.Tensor):
    """[(removed mask, neighbour weight sums, mask / sums)] from the full resolution down to a side
    < 2 * COARSEST."""
    levels = []
    while True:
        s = _neighbours(torch.ones_like(m[:1]))
        levels.append((m, s, m / s))
        if min(m.shape[1:]) < 2 * COARSEST:
            return levels
        H, W = m.shape[1:]
        known = F.max_pool2d(F.pad(1 - m, (0, W % 2, 0, H % 2))[:, None], 2)[:, 0]
        m = 1 - known  # a coarse pixel is removed when its 2 x 2 fine pixels all are


def _jacobi(e: Optional[torch.Tensor], r: torch.Tensor, inv: torch.Tensor, sweeps: int) -> torch.Tensor:
    """Jacobi sweeps for A e = r (r and e 0 off the removed pixels, inv = m / s): e <- (r + W e) / s
    on the removed pixels, which is e + (r - A e) / s there; e None: starting from 0."""
    scaled = inv * r
    if e is None:
        e, sweeps = scaled, sweeps - 1
    for _ in range(sweeps):
        e = torch.addcmul(scaled, inv, _neighbours(e))
    return e


def _vcycle(r: torch.Tensor, levels, depth: int = 0) -> torch.Tensor:
    """One symmetric multigrid V-cycle for A e = r (Jacobi smoothing, linear transfers, the same
    stencil re-discretized on each coarser grid): a symmetric positive definite preconditioner."""
    m, s, inv = levels[depth]
    if depth == len(levels) - 1:
        return _jacobi(None, r, inv, COARSE_SWEEPS)
    e = _jacobi(None, r, inv, SWEEPS)
    mc = levels[depth + 1][0]
    coarse = _vcycle(mc * _restrict(_residual(r, e, m, s)), levels, depth + 1)
    e = torch.addcmul(e, m, _prolong(coarse, r.shape[1:]))
    return _jacobi(e, r, inv, SWEEPS)


def _solve(v: torch.Tensor, m: torch.Tensor, tol: float, max_iter: int) -> torch.Tensor:
    """The imputed values z [B, H, W] (0 off the removed pixels) of planes v [B, H, W] with removed
    pixels m [B, H, W] (float 0/1): multigrid-preconditioned conjugate gradients, every plane at
    once. A plane stops once its residual is below tol times its right-hand side: its z is taken
    out, and the planes still running are packed together once a quarter of them have stopped, so
    a plane's result does not depend on the planes solved beside it."""
    levels = _levels(m)
    dims = (1, 2)
    b = m * _neighbours((1 - m) * v)
    out = torch.zeros_like(v)
    rows = torch.arange(len(v), device=v.device)  # which plane of v each running plane is
    z = torch.zeros_like(v)
    r = b.clone()
    y = _vcycle(r, levels)
    p = y.clone()
    ry = (r * y).sum(dims)
    limit = (tol * tol) * (b * b).sum(dims)
    for _ in range(max_iter):
        active = (r * r).sum(dims) > limit
        if not bool(active.all()):
            out[rows[~active]] = z[~active]
            if not bool(active.any()):
                return out
            if int(active.sum()) <= 0.75 * len(rows):  # pack the running planes together
                keep = active.nonzero()[:, 0]
                rows, z, r, p, ry, limit, active = (t[keep] for t in (rows, z, r, p, ry, limit, active))
                levels = [(lm[keep], ls, inv[keep]) for lm, ls, inv in levels]  # ls: [1, h, w], shared
        m, s = levels[0][0], levels[0][1]
        ap = _operator(p, m, s)
        pap = (p * ap).sum(dims)
        alpha = torch.where(active & (pap > 0), ry / pap.clamp_min(1e-30), torch.zeros_like(ry))[:, None, None]
        z = torch.addcmul(z, alpha, p)
        r = torch.addcmul(r, alpha, ap, value=-1)
        y = _vcycle(r, levels)
        ry_new = (r * y).sum(dims)
        beta = torch.where(ry > 0, ry_new / ry.clamp_min(1e-30), torch.zeros_like(ry))[:, None, None]
        p = torch.addcmul(y, beta, p)
        ry = ry_new
    out[rows] = z
    return out


def kernel() -> Optional[ctypes.CDLL]:
    """road_kernel.c built for this machine (pipeline.native), or None where it cannot be."""
    library = native.load(KERNEL)
    if library is not None:
        f = library.road_impute
        f.restype = ctypes.c_int
        f.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int] * 3 + [ctypes.c_float] + [ctypes.c_int] * 4
    return library


def auto_solver(device: torch.device) -> str:
    """What solver="auto" runs on device: "c" on the CPU where road_kernel.c builds (built here on
    first use, or the fallback announced), else "torch"."""
    return "c" if device.type == "cpu" and kernel() is not None else "torch"


def _solve_native(library: ctypes.CDLL, v: torch.Tensor, removed: torch.Tensor, tol: float,
                  max_iter: int) -> torch.Tensor:
    """_solve's algorithm in C, one image at a time (its channels share the removed pixels), images
    spread over torch's number of threads (ctypes lets go of the GIL): v [R, C, H, W] float32,
    removed [R, H, W] -> z [R, C, H, W]."""
    R, C, H, W = v.shape
    v = v.contiguous()
    mask = removed.to(torch.uint8).contiguous()
    z = torch.empty_like(v)

    def one(i: int) -> None:
        if library.road_impute(v[i].data_ptr(), mask[i].data_ptr(), z[i].data_ptr(), C, H, W, tol, max_iter,
                               SWEEPS, COARSE_SWEEPS, COARSEST) < 0:
            raise MemoryError(f"ROAD imputation: no memory for a {H} x {W} image")

    threads = min(torch.get_num_threads(), R)
    if threads <= 1:
        for i in range(R):
            one(i)
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(one, range(R)))
    return z


def impute(x: torch.Tensor, removed: torch.Tensor, noise: Optional[torch.Tensor] = None,
           tol: float = TOL, max_iter: int = MAX_ITER, solver: str = "auto") -> torch.Tensor:
    """Linear imputation: x [R, C, H, W], removed [R, H, W] (bool) -> [R, C, H, W] with each removed
    pixel the weighted mean of its neighbours (all removed pixels of a plane solved jointly), plus
    `noise` [R, C, H, W] there when given. An image with every pixel removed has no solution.
    solver: "c" (road_kernel.c; CPU tensors), "torch" (_solve, any device) or "auto" (C on the CPU
    where it builds, else torch); both the same algorithm, equal to float32 rounding."""
    if solver not in SOLVERS:
        raise ValueError(f"unknown ROAD solver {solver!r}; known: {', '.join(SOLVERS)}")
    R, C, H, W = x.shape
    planes = x.reshape(R * C, H, W).float()
    m = removed[:, None].expand(R, C, H, W).reshape(R * C, H, W).to(planes.dtype)
    if solver == "auto":
        solver = auto_solver(x.device)
    if solver == "c":
        library = kernel() if x.device.type == "cpu" else None
        if library is None:
            raise RuntimeError("ROAD's C solver is not available here (CPU tensors and a C compiler needed; "
                               "see pipeline.native)")
        z = _solve_native(library, planes.reshape(R, C, H, W), removed, tol, max_iter).reshape(R * C, H, W)
    else:
        z = _solve(planes, m, tol, max_iter)
    if noise is not None:
        z = z + m * noise.reshape(R * C, H, W).to(planes.dtype)
    return (planes * (1 - m) + m * z).reshape(R, C, H, W).to(x.dtype)


def ranks(maps: torch.Tensor, spatial: Sequence[int]) -> torch.Tensor:
    """maps [N, K, h, w] -> rank of each input pixel [N, K, H*W], 0 the most relevant (ties: first
    pixel first)."""
    flat = resize_maps(maps.float(), spatial).reshape(*maps.shape[:2], -1)
    order = flat.argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(flat.shape[-1], device=flat.device).expand_as(order))
    return rank


def removal_masks(rank: torch.Tensor, percentages: Sequence[int], order: str) -> torch.Tensor:
    """rank [M, P] -> removed [M, len(percentages), P]: the round(p% of P) pixels of highest rank
    (morf: most relevant) or lowest (lerf)."""
    total = rank.shape[-1]
    counts = torch.tensor([round(p * total / 100) for p in percentages], device=rank.device)
    if order == "morf":
        return rank[:, None] < counts[None, :, None]
    return rank[:, None] >= (total - counts)[None, :, None]


def road(model: nn.Module, x: torch.Tensor, maps: torch.Tensor, targets: torch.Tensor,
         percentages: Sequence[int], max_batch: int, seed: int = 0, ids: Optional[Sequence[str]] = None,
         progress: Progress = NO_PROGRESS, precision: str = "fp32") -> Dict[str, torch.Tensor]:
    """x [N, C, H, W], maps [N, K, h, w], targets [N, K] -> {road_morf, road_lerf: [N, K, P],
    road_morf_auc, road_lerf_auc, road_combined: [N, K]}. Imputed copies are built and fed to the
    model max_batch rows at a time; `progress` counts them."""
    if x.dim() != 4:
        raise ValueError(f"ROAD needs image inputs [N, C, H, W], got {tuple(x.shape)}")
    N, K = targets.shape
    C, H, W = x.shape[1:]
    ids = list(ids) if ids is not None else [f"#{n}" for n in range(N)]
    P = len(percentages)
    rank = ranks(maps, (H, W))  # [N, K, H*W]
    rows = N * K * P
    n_of = torch.arange(N, device=x.device).repeat_interleave(K * P)
    k_of = torch.arange(K, device=x.device).repeat_interleave(P).repeat(N)
    p_of = torch.arange(P, device=x.device).repeat(N * K)
    out: Dict[str, torch.Tensor] = {}
    progress.add(rows * len(ORDERS))
    for order in ORDERS:
        def build(r, order=order):  # rows r -> imputed inputs [m, C, H, W]
            removed = removal_masks(rank[n_of[r], k_of[r]], percentages, order)
            removed = removed[torch.arange(len(r), device=x.device), p_of[r]].reshape(-1, H, W)
            noise = torch.stack([row_noise(seed, ids[n], order, int(targets[n, k]), percentages[p], (C, H, W),
                                           x.device) for n, k, p in zip(n_of[r].tolist(), k_of[r].tolist(),
                                                                         p_of[r].tolist())])
            return impute(x[n_of[r]], removed, noise)

        curve = torch.empty(rows, device=x.device)
        for r, logits in rows_logits(model, rows, build, max_batch, x.device, precision=precision):
            curve[r] = logits.float().softmax(1).gather(1, targets[n_of[r], k_of[r]][:, None])[:, 0]
            progress.step(len(r))
        curve = curve.reshape(N, K, P)
        out[f"road_{order}"] = curve
        out[f"road_{order}_auc"] = curve.mean(-1)
    out["road_combined"] = out["road_lerf_auc"] - out["road_morf_auc"]
    return out


def row_noise(seed: int, input_id: str, order: str, target: int, percentage: int, shape, device) -> torch.Tensor:
    """The noise of one imputed copy [C, H, W], std NOISE, keyed by what the copy is (pipeline.seeds)."""
    generator = keyed_generator(seed, input_id, "road", order, target, percentage, device=device)
    return NOISE * torch.randn(shape, generator=generator, device=device)
