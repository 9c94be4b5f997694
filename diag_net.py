"""Diagonal linear networks trained with large-step SGD and GD: experiments E1, E2, E3 of SPEC.md.

Model h(x) = <u ⊙ v, x> with u0 = α·1, v0 = 0 (α = --init-scale), square loss L = ‖Xβ − y‖² / (2n) with β = u ⊙ v,
sparse non-negative teacher θ* (SPEC E1). The paper's claim in this setting: SGD with a large step size keeps the loss
from converging ("loss stabilization") while its noise shrinks most coordinates of β to zero; the longer the
large-step phase lasts before the step size is decayed, the sparser β and the lower the test loss. Full-batch GD with
large steps does not do this (E2).

Commands (from the repository root; every run writes one JSON log per run and seed into --out-dir):

    python diag_net.py                                  # E1 constant run only (η = 0.25, seed 1), as a custom run
    python diag_net.py --preset e1                      # E1: the 4 runs of the main-text figure (seed 1)
    python diag_net.py --preset e1 --seeds 1 2 3 4 5 6 7 8   # E1 over 8 seeds (vectorised: one process, one batch)
    python diag_net.py --preset e2                      # E2: GD vs SGD, n = 40, d = 100
    python diag_net.py --preset e3                      # E3: loss-surface picture data (grid + projected paths)
    python diag_net.py --preset e1 --iterations 2000    # quick check, logged as experiment e1_custom (not e1)
    python plots.py --logs runs/diag_net --out figures  # figures e1.png, e2.png, e3.png (+ e3_metrics.png)

Expected results (measured with this script; authors' numbers from SPEC E1 in brackets). Final = last evaluation
point, iteration 99 599, before its update (the authors' convention); medians over the non-diverged seeds.
    E1 η = 0.25 constant, seed 1: train 1.4216e-06 [1.4216e-06], test 3.5286e-03 [3.5286e-03], ‖β‖₀ 200 [200],
        rank 200; after all 100 001 steps (log key `after_training`) train 3.5597e-06, test 3.5672e-03 (as in SPEC).
    The decayed and large-step runs below are chaotic (edge of divergence): exactly repeatable on one machine, but
    another CPU's kernels (AVX2 vs AVX-512), or a seed run alone vs inside a batch of seeds, changes their digits.
    Measured on an AMD EPYC (AVX-512), 2026-12-04:
    E1 η = 0.282 decayed, seed 1 alone: ÷4.8 at 10 %: test 3.04e-03 [6.59e-04], ‖β‖₀ 150 [156]; ÷3.4 at 30 %:
        3.00e-04 [2.85e-04], 95 [89]; ÷1.5 at 50 %: 2.82e-04 [1.54e-04], 69 [71].
    E1 over seeds 1-32 (`--seeds $(seq 1 32)`), diverged / test / ‖β‖₀ / rank: constant 0/32, 8.8e-03, 200, 200;
        10 %: 7/32, 1.42e-04, 170, 115; 30 %: 12/32, 1.87e-04, 88, 70; 50 %: 17/32, 1.56e-04, 71, 61.
        The later the decay, the sparser β (as in the paper); the median test loss does not improve with it.
    E2 (seed 1 for GD, which is deterministic): GD η = 2 constant: test 0.168, ‖β‖₀ 100 (dense); GD η = 3.53 decayed at
        10/30/50 %: test 0.491 / 0.439 / 0.471, ‖β‖₀ 86 / 79 / 78. SGD ÷20 at 50 %, seeds 1-16: η = 0.272 diverges for
        14/16 (median of the 2 others: test 0.042, ‖β‖₀ 38 [ref ≈ 0.0385, 33]); η = 0.26: 2/16 diverge, test 0.116,
        ‖β‖₀ 66.
    E3: GD η = 0.03 ends at train 4.9e-06 (w_flow); GD η = 3 ÷3: train 1.8e-10, test 0.126; SGD seed 2: test 4.9e-08,
        at a sign-flipped copy of w* (u_j = v_j = −√θ*_j on 2 of the 3 support coordinates), i.e. off the plane.
Runtime, 2-core CPU shared with other jobs (load ~1.7), wall clock including ~2.5 s of start-up (torch import):
    python diag_net.py (one run) 3 s;  --preset e1: 6.6 s (1 seed), 10.7 s (8 seeds), 15 s (16 seeds), 21 s (32);
    --preset e2: 11.5 s;  --preset e3: 3.2 s.  Per 100 001-step run: ~0.9-1.4 s for 1 seed, 2.3-3.9 s for 16 seeds
    (2.2-3.3× one seed; the batched SGD step alone scales 2.4×); log saves ≤ 0.01 s per run.

Design notes:
  * SGD draws indices with np.random.RandomState(seed).randint(n, size=N): the same sequence as reseeding legacy numpy
    and calling np.random.randint(n) once per step (SPEC E1). All seeds of a run advance together as the rows of
    (seeds × d) arrays; a seed whose state becomes NaN/inf is logged as `diverged` (with `diverged_at`) and removed
    from the batch, so it is frozen and produces no overflow noise, while the other seeds go on.
  * Metrics are computed BEFORE the update of each evaluation iteration {0..99} ∪ round(linspace(0, N, K))[:-1]
    (utils.eval_iterations, shared with two_layer_relu.py, which has no dense prefix).
  * Rank of φ(X) (SPEC §1.2): see JacobianRank — an exact reformulation, a certificate, and a deflation with a
    rigorous error band, so that SVDs are small (~0.4 ms per seed and evaluation instead of ~2.5 ms).
  * Every evaluation is recorded; the log file is rewritten atomically (utils.RunLog) at most every --log-interval
    seconds during a run, and always at its end, on divergence, interruption or failure: one save costs 0.35 ms on
    an idle machine, up to ~2 ms on a busy one, so saving after each of the 348 evaluations of 16 seeds costs as much
    as the training or more (--preset e1 with 16 seeds, loaded machine: 55 s with --log-interval 0, 21 s with 2 s).
  * Each log of a run carries `seed_summary` (utils.seed_summary, the same in two_layer_relu.py: all seeds of that
    run, diverged fraction, medians of the others at the last evaluation), so figures and tables can quote it from
    any one log, and `run_index` (the run's position in the preset), which orders the figure legends.
"""
import argparse
import contextlib
import math
import os
import sys
import time

# All matrices here are small (≤ 1000×200): one BLAS thread is fastest, and multi-threaded OpenBLAS busy-waits badly
# when the cores are shared (measured 1.4 s instead of 0.02 s for the data draw). Must be set before numpy loads.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import utils  # noqa: E402

SCRIPT = "diag_net"
L0_THRESHOLD = 1e-50  # ‖β‖₀ counts |β_i| > 1e-50 (SPEC §1.3)
RANK_EPS = 1e-15  # rank of φ counts σ_k / σ_1 > 1e-15 on the first 2d test points (SPEC §1.2)
SIGMA_ONE_COLUMNS = 1e-4  # σ₁ of φ from the columns with w ≥ 1e-4·max w (the others move it by < 1e-6 relative)
DENSE_EVALS = 100  # every iteration 0..99 is evaluated (SPEC E1)
SURFACE_RANGE = (-0.5, 2.3)  # E3 grid over [-0.5, 2.3]² in plane coordinates (SPEC E3)
SURFACE_POINTS = 100
PROGRESS_EVERY_S = 30.0  # progress line period on long runs
METRIC_KEYS = ("train_loss", "test_loss", "l0", "l1", "rank", "uv_norm", "balancedness")  # besides iter and lr

# ======================================================================================================================
# Presets (SPEC E1-E3). `shared` = data/size settings common to all runs; `runs` = one dict per run.
# ======================================================================================================================


def _run(algorithm, lr, decay_frac=None, decay=None, seeds=None, role=None):
    """One run of a preset: algorithm, step size η, optional single decay ÷decay after ⌊T·N⌋."""
    return {"algorithm": algorithm, "lr": lr, "decay_frac": decay_frac, "decay": decay,
            "seeds": seeds, "role": role}


PRESETS = {
    # SPEC E1: main-text figure; the decayed runs are at the edge of divergence (compare over seeds).
    "e1": {"shared": {"n_train": 80, "d": 200, "r": 20, "iterations": 100001},
           "runs": [_run("sgd", 0.25), _run("sgd", 0.282, 0.1, 4.8), _run("sgd", 0.282, 0.3, 3.4),
                    _run("sgd", 0.282, 0.5, 1.5)]},
    # SPEC E2: large-step GD stays dense, large-step SGD finds a sparse β. The paper's SGD run (η = 0.272) diverges
    # for 14 of seeds 1-16 (seed 1 included), so its SGD runs use 16 seeds by default, and η = 0.26 (inside the
    # range [0.24, 0.272] SPEC E2 suggests sweeping; 2 of 16 seeds diverge) is added as a robust companion.
    "e2": {"shared": {"n_train": 40, "d": 100, "r": 20, "iterations": 100001},
           "runs": [_run("gd", 2.0), _run("gd", 3.53, 0.1, 4.8), _run("gd", 3.53, 0.3, 3.4),
                    _run("gd", 3.53, 0.5, 1.5), _run("sgd", 0.272, 0.5, 20.0, seeds=list(range(1, 17))),
                    _run("sgd", 0.26, 0.5, 20.0, seeds=list(range(1, 17)))]},
    # SPEC E3: "÷3 at iteration 5000" of 10 001 = decay after ⌊0.5·10001⌋ = 5000; SGD uses seed 2.
    "e3": {"shared": {"n_train": 20, "d": 30, "r": 3, "iterations": 10001},
           "runs": [_run("gd", 0.03, role="flow"), _run("gd", 3.0, 0.5, 3.0), _run("sgd", 0.6, 0.5, 3.0, seeds=[2])],
           "surface": True},
}
RUN_FLAGS = ("algorithm", "lr", "decay_frac", "decay")
# Flags that keep a preset's experiment name: more or other seeds, where the logs go, how often they are saved.
NEUTRAL_FLAGS = {"preset", "seeds", "out_dir", "log_interval"}

# ======================================================================================================================
# Data (SPEC E1)
# ======================================================================================================================


def make_data(n_train, d, r, n_test, data_seed):
    """Noiseless sparse regression data of SPEC E1, drawn from the legacy numpy generator seeded with `data_seed`.

    Order matters for reproducing the authors' numbers: X (n_train×d), then X_test (n_test×d), both standard
    Gaussian via multivariate_normal, then θ* = randn(d) with θ*[r:] = 0, θ* = |θ*| / ‖θ*‖₂. A RandomState instance
    produces the same stream as np.random.seed + the global functions, without touching global state.
    """
    rng = np.random.RandomState(data_seed)
    x_train = rng.multivariate_normal(np.zeros(d), np.eye(d), n_train)
    x_test = rng.multivariate_normal(np.zeros(d), np.eye(d), n_test)
    theta = rng.randn(d)
    theta[r:] = 0
    theta = np.abs(theta) / np.linalg.norm(theta)
    return {"X": x_train, "y": x_train @ theta, "X_test": x_test, "y_test": x_test @ theta, "theta": theta}


def sgd_indices(seeds, n, n_iters):
    """(seeds × N) sample indices: row k = RandomState(seed_k).randint(n, size=N) (SPEC E1)."""
    return np.stack([np.random.RandomState(seed).randint(n, size=n_iters) for seed in seeds])

# ======================================================================================================================
# Metrics (SPEC §1.2, §1.3)
# ======================================================================================================================


class JacobianRank:
    """rank φ(X_r) for a batch of states (u, v), X_r = the first 2d test points, ε = 1e-15 (SPEC §1.2).

    Reformulation: φ(X_r) = [X_r diag(v), X_r diag(u)] (rows ∇_(u,v) h(x_i)) has φφᵀ = X_r diag(u² + v²) X_rᵀ, so its
    nonzero singular values are exactly those of X_r diag(w), w = √(u² + v²), and, with X_r = QR, those of R diag(w)
    (d×d). This avoids the 2d×2d SVD, whose d structural zero singular values come out at ~5e-16·σ₁ in float64.
    Certificate (no SVD): with the columns sorted by w, the tail after the k largest is dropped once it is negligible
    (Frobenius norm δ ≤ ε·σ₁/10: it moves every singular value by < ε·σ₁/10, Weyl). If the k kept columns are
    certainly independent (σ_min(R)·w_(k) − δ ≥ 10·ε·σ₁), the rank is k. This decides constant-step runs and the start
    of every run; sparsifying runs spread the w_j continuously over many decades (~5 per decade), so some always sit
    near the threshold and the certificate fails.
    Deflation (two small SVDs): the kept columns, sorted, are reduced to a k×k triangle T (_deflated_ranks). Columns
    with w ≥ w_split (far above the threshold) form the leading block T11; the count is split + #{σ(T22) > ε·σ₁}.
    Why: with R[:, sorted] = Q·S and T = S·diag(w), T⁻¹ = blockdiag(0, T22⁻¹) + E with ‖E‖ ≤ c / w_split,
    c = (1 + σ_max(R)/σ_min(R)) / σ_min(R), so (Weyl on T⁻¹) each small singular value of T is that of T22 up to a
    relative 1e-3 (`band`, which sets w_split); σ₁ comes from the leading columns (bounded above and below). Any
    σ(T22) within that band of the threshold → utils.jacobian_rank on the whole T. As T is built from unscaled,
    well-conditioned factors times the exact column scaling, the small, graded singular values come out to high
    relative accuracy — more accurately than from one SVD of T, whose absolute error (~1e-16·σ₁) is 10-50 % of the
    threshold itself: the two counts can differ by one where a singular value sits inside that noise.
    Both need X_r of full column rank; with fewer rank points than d (--n-test < d) every state gets one SVD.
    """

    def __init__(self, x_rank, eps=RANK_EPS, margin=10.0, band=1e-3):
        self.eps, self.margin, self.band = eps, margin, band
        self.r_factor = np.linalg.qr(x_rank, mode="r")
        self.col_norms = np.linalg.norm(self.r_factor, axis=0)
        self.gram = self.r_factor.T @ self.r_factor  # = X_rᵀX_r
        singular = np.linalg.svd(self.r_factor, compute_uv=False)
        self.s_max, self.s_min = singular[0], singular[-1]
        # Certificate and deflation need σ_min(R[:, S]) ≥ σ_min(R) > 0 and a Cholesky of RᵀR: X_r must have full column
        # rank, well conditioned (cond(R)² ≪ 1/ε_machine). Not so with fewer rank points than d (--n-test < d).
        self.full_rank = self.r_factor.shape[0] == self.r_factor.shape[1] and self.s_min > 1e-6 * self.s_max
        self.coupling = (1 + self.s_max / self.s_min) / self.s_min if self.full_rank else None
        self.svd_calls = 0  # evaluations the certificate could not decide (deflation or full SVD)
        self.full_svd_calls = 0  # of which the deflation could not decide either

    def __call__(self, u, v):
        """Ranks (int array, one per row of u and v)."""
        w = np.sqrt(u * u + v * v)
        if not self.full_rank:  # no certificate, no deflation: one SVD of R·diag(w) per state
            self.svd_calls += len(w)
            self.full_svd_calls += len(w)
            with _torch_single_thread():
                return np.array([utils.jacobian_rank(self.r_factor * row, self.eps) for row in w], dtype=int)
        order = np.argsort(-w, axis=1)
        w_sorted = np.take_along_axis(w, order, axis=1)
        cols_sq = (w_sorted * self.col_norms[order]) ** 2
        # tail[:, k] = Frobenius norm of the columns after the k largest (k = 0..d)
        tail = np.sqrt(np.concatenate([np.cumsum(cols_sq[:, ::-1], axis=1)[:, ::-1],
                                       np.zeros((len(w), 1))], axis=1))
        sigma_low = np.sqrt(cols_sq.max(axis=1))  # ≤ σ₁: the largest column norm
        sigma_high = np.minimum(self.s_max * w_sorted[:, 0], tail[:, 0])  # ≥ σ₁
        kept = np.argmax(tail <= self.eps * sigma_low[:, None] / self.margin, axis=1)
        w_last = np.take_along_axis(w_sorted, np.maximum(kept - 1, 0)[:, None], axis=1)[:, 0]
        tail_kept = np.take_along_axis(tail, kept[:, None], axis=1)[:, 0]
        certain = self.s_min * w_last - tail_kept >= self.margin * self.eps * sigma_high
        ranks = np.where(certain | (kept == 0), kept, 0)
        uncertain = np.flatnonzero(~certain & (kept > 0))
        if len(uncertain):
            ranks[uncertain] = self._deflated_ranks(w_sorted[uncertain], order[uncertain], kept[uncertain])
        return ranks

    def _deflated_ranks(self, w_sorted, order, kept):
        """Counts for the rows the certificate left open: the triangles T of all rows at once, then _count per row.

        T = S·diag(w) with S the R-factor of R[:, kept columns], i.e. S = chol(G[kept, kept])ᵀ with G = RᵀR: one
        batched Cholesky of unscaled, well-conditioned matrices (cond ≤ cond(R)²) instead of a QR of the graded d×k
        matrix (5× fewer flops, and the grading enters only through the exact column scaling). Rows are padded to a
        common size with an identity block, whose Cholesky factor is again the identity, and weight 0.
        """
        size = kept.max()
        pad = np.arange(size)[None, :] >= kept[:, None]
        index = np.where(pad, 0, order[:, :size])
        gram = self.gram[index[:, :, None], index[:, None, :]]
        gram[pad[:, :, None] | pad[:, None, :]] = 0
        rows, cols = np.nonzero(pad)
        gram[rows, cols, cols] = 1
        triangles = np.swapaxes(np.linalg.cholesky(gram), 1, 2) * np.where(pad, 0, w_sorted[:, :size])[:, None, :]
        self.svd_calls += len(kept)
        return [self._count(triangles[i, :k, :k], w_sorted[i, :k]) for i, k in enumerate(kept)]

    def _count(self, triangle, w_sorted):
        """#{σ(T) > ε·σ₁(T)} by deflation of the columns far above the threshold (class docstring)."""
        w_split = self.coupling * self.eps * self.s_max * w_sorted[0] / self.band
        split = int(np.sum(w_sorted >= w_split))
        if 0 < split < len(w_sorted):
            # σ₁(T) lies between σ₁ of its first `top` columns and hypot(that, norm of the other columns)
            top = int(np.sum(w_sorted >= SIGMA_ONE_COLUMNS * w_sorted[0]))
            sigma_one = np.linalg.svd(triangle[:top, :top], compute_uv=False)[0]
            small = np.linalg.svd(triangle[split:, split:], compute_uv=False)
            tau_low = self.eps * sigma_one
            tau_high = self.eps * math.hypot(sigma_one, np.linalg.norm(triangle[:, top:]))
            spread = self.coupling / w_sorted[split - 1]  # bound on ‖E‖
            above = small > tau_high / (1 - spread * tau_high)
            below = small < tau_low / (1 + spread * tau_low)
            if spread * tau_high < 1 and (above | below).all():
                return split + int(above.sum())
        self.full_svd_calls += 1
        with _torch_single_thread():
            return utils.jacobian_rank(triangle, self.eps)


@contextlib.contextmanager
def _torch_single_thread():
    """Run torch on one thread: its threads spin-wait on these small SVDs (18× slower measured on a shared 2-core
    machine). Needed when this module is imported after torch (the environment variables above then come too late)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def half_mse(x, y, beta):
    """L = ‖Xβ − y‖² / (2·#rows) for each row of beta (SPEC §1.3)."""
    residual = beta @ x.T - y
    return np.einsum("bn,bn->b", residual, residual) / (2 * len(y))


def evaluate(data, u, v, rank_of):
    """Every per-evaluation metric of SPEC §1.3 for a batch of states, as {name: array over the batch}."""
    beta = u * v
    abs_beta = np.abs(beta)
    return {
        "train_loss": half_mse(data["X"], data["y"], beta),
        "test_loss": half_mse(data["X_test"], data["y_test"], beta),
        "l0": (abs_beta > L0_THRESHOLD).sum(axis=1),
        "l1": abs_beta.sum(axis=1),
        "rank": rank_of(u, v),
        "uv_norm": np.sqrt((u * u).sum(axis=1) + (v * v).sum(axis=1)),
        "balancedness": np.linalg.norm(np.abs(u) - np.abs(v), axis=1),
    }

# ======================================================================================================================
# Training (SPEC E1 SGD, E2 GD), vectorised over seeds: state arrays are (seeds × d)
# ======================================================================================================================


def sgd_steps(u, v, xs, ys, lrs, states=None):
    """Batch-1 SGD steps for every seed at once (SPEC E1): e = x_iᵀ(u⊙v) − y_i, u −= η·e·(x_i⊙v), v −= η·e·(x_i⊙u).

    xs: (seeds × L × d) the sampled rows, ys: (seeds × L) their targets, lrs: (L,) step sizes. Returns the new u, v and
    the (seeds × L) residuals, used to date a divergence. `states` (seeds × L × 2d), if given, receives (u, v) before
    each step. The tuple assignment makes the update simultaneous (both use the old u and v).
    """
    residuals = np.empty(ys.shape)
    d = u.shape[1]
    for j, lr in enumerate(lrs):
        if states is not None:
            states[:, j, :d], states[:, j, d:] = u, v
        x = xs[:, j]
        e = np.einsum("sd,sd->s", x, u * v) - ys[:, j]
        residuals[:, j] = e
        g = (lr * e)[:, None] * x
        u, v = u - g * v, v - g * u
    return u, v, residuals


def gd_steps(u, v, x, y, lrs, states=None):
    """Full-batch GD steps on L = ‖X(u⊙v) − y‖²/(2n) (SPEC E2): ∇_u L = (Xᵀr/n)⊙v, ∇_v L = (Xᵀr/n)⊙u, r = Xβ − y.

    Same interface as sgd_steps; the residuals returned are Σ_i r_i per step (non-finite as soon as any r_i is).
    """
    residuals = np.empty((u.shape[0], len(lrs)))
    x_t, d = np.ascontiguousarray(x.T), u.shape[1]
    for j, lr in enumerate(lrs):
        if states is not None:
            states[:, j, :d], states[:, j, d:] = u, v
        r = (u * v) @ x_t - y
        residuals[:, j] = r.sum(axis=1)
        g = (r @ x) * (lr / len(y))
        u, v = u - g * v, v - g * u
    return u, v, residuals


def _first_bad_step(residuals):
    """Per row, the index of the first non-finite residual (the last index if all are finite but the state is not)."""
    bad = ~np.isfinite(residuals)
    return np.where(bad.any(axis=1), bad.argmax(axis=1), residuals.shape[1] - 1)


def train(data, lrs, algorithm, seeds, evals, init_scale, rank_of, on_eval=None, on_diverge=None,
          keep_trajectory=False):
    """Train one configuration for all `seeds` at once (one batch row per seed; GD ignores the seed values).

    lrs: (N,) step size of every iteration; evals: sorted evaluation iterations (< N, starting at 0).
    on_eval(t, rows, metrics): called at each evaluation iteration t, before that iteration's update, with the batch
    rows still alive and their metrics. on_diverge(row, t): called once when a row becomes non-finite (t = first
    iteration whose residual is non-finite, or the evaluation whose metrics are); the row is then dropped.
    Returns {"u", "v": final states (NaN rows for diverged), "after": metrics after all N steps, "diverged_at": (-1 =
    never), "trajectory": (rows × N+1 × 2d) states before each iteration plus the final one, or None, "timing"}.
    """
    n_iters, d, batch = len(lrs), data["X"].shape[1], len(seeds)
    u, v = np.full((batch, d), float(init_scale)), np.zeros((batch, d))
    indices = sgd_indices(seeds, len(data["y"]), n_iters) if algorithm == "sgd" else None
    alive = np.arange(batch)
    diverged_at = np.full(batch, -1)
    trajectory = np.full((batch, n_iters + 1, 2 * d), np.nan) if keep_trajectory else None
    timing = {"train_s": 0.0, "metrics_s": 0.0, "callbacks_s": 0.0}
    bounds = list(evals) + [n_iters]
    last_progress = time.monotonic()

    def drop(bad, when):
        """Mark rows (bad: mask over alive) as diverged at iterations `when`, remove them from the batch."""
        nonlocal u, v, alive
        for row, t in zip(alive[bad], np.broadcast_to(when, bad.shape)[bad]):
            diverged_at[row] = t
            if on_diverge is not None:
                on_diverge(row, int(t))
        u, v, alive = u[~bad], v[~bad], alive[~bad]

    # Overflow in a diverging row must not spam warnings; such rows are detected and dropped below.
    with np.errstate(over="ignore", invalid="ignore"):
        for k, t0 in enumerate(evals):
            if not len(alive):
                break
            tick = time.monotonic()
            metrics = evaluate(data, u, v, rank_of)
            finite = np.all([np.isfinite(m) for m in metrics.values()], axis=0)
            timing["metrics_s"] += time.monotonic() - tick
            if not finite.all():
                metrics = {key: value[finite] for key, value in metrics.items()}
                drop(~finite, t0)
            tick = time.monotonic()
            if on_eval is not None and len(alive):
                on_eval(int(t0), alive, metrics)
            timing["callbacks_s"] += time.monotonic() - tick
            tick = time.monotonic()
            t1 = bounds[k + 1]
            states = np.empty((len(alive), t1 - t0, 2 * d)) if keep_trajectory else None
            if algorithm == "sgd":
                chunk = indices[alive, t0:t1]
                u, v, residuals = sgd_steps(u, v, data["X"][chunk], data["y"][chunk], lrs[t0:t1], states)
            else:
                u, v, residuals = gd_steps(u, v, data["X"], data["y"], lrs[t0:t1], states)
            if keep_trajectory:
                trajectory[alive, t0:t1] = states
            bad = ~(np.isfinite(residuals).all(axis=1) & np.isfinite(u).all(axis=1) & np.isfinite(v).all(axis=1))
            if bad.any():
                drop(bad, t0 + _first_bad_step(residuals))
            timing["train_s"] += time.monotonic() - tick
            if time.monotonic() - last_progress > PROGRESS_EVERY_S:
                last_progress = time.monotonic()
                print(f"    iteration {t1}/{n_iters}, {len(alive)}/{batch} seeds alive", flush=True)
        final_u, final_v = np.full((batch, d), np.nan), np.full((batch, d), np.nan)
        final_u[alive], final_v[alive] = u, v
        after = {key: np.full(batch, np.nan) for key in METRIC_KEYS}
        if len(alive):
            for key, value in evaluate(data, u, v, rank_of).items():
                after[key][alive] = value
    if keep_trajectory:
        trajectory[alive, n_iters, :d], trajectory[alive, n_iters, d:] = u, v
    return {"u": final_u, "v": final_v, "after": after, "diverged_at": diverged_at, "trajectory": trajectory,
            "timing": timing}

# ======================================================================================================================
# E3: the plane through w_init, w* and w_flow (SPEC E3)
# ======================================================================================================================


def surface_plane(w_init, w_flow, w_star):
    """Orthonormal e1, e2: e1 ∥ w* − w_init, e2 = the part of w_flow − w_init orthogonal to e1 (SPEC E3).

    Returns None when w_flow − w_init is (numerically) parallel to e1, as then no plane is defined.
    """
    e1 = (w_star - w_init) / np.linalg.norm(w_star - w_init)
    flow = w_flow - w_init
    flow = flow - (flow @ e1) * e1
    if np.linalg.norm(flow) < 1e-12:
        return None
    return np.stack([e1, flow / np.linalg.norm(flow)])


def loss_surface(data, w_init, plane, low=SURFACE_RANGE[0], high=SURFACE_RANGE[1], points=SURFACE_POINTS):
    """Train and test loss on a points×points grid w = w_init + a·e1 + b·e2, a, b ∈ [low, high] (SPEC E3).

    Stored with rows indexed by b and columns by a (loss[i][j] at a = coords[j], b = coords[i]), the layout of
    matplotlib's contourf(coords, coords, loss). Raw values; the figure clips them at 100.
    """
    coords = np.linspace(low, high, points)
    b_grid, a_grid = np.meshgrid(coords, coords, indexing="ij")
    w = w_init + a_grid.reshape(-1, 1) * plane[0] + b_grid.reshape(-1, 1) * plane[1]
    d = len(w_init) // 2
    beta = w[:, :d] * w[:, d:]
    with np.errstate(over="ignore", invalid="ignore"):
        train = half_mse(data["X"], data["y"], beta).reshape(points, points)
        test = half_mse(data["X_test"], data["y_test"], beta).reshape(points, points)
    return {"coords": coords, "train_loss": train, "test_loss": test}


def _rounded(array, decimals=6):
    """Shorter JSON for big arrays (plane coordinates and losses are plotted, not recomputed)."""
    return np.round(np.asarray(array, dtype=float), decimals)

# ======================================================================================================================
# Command line: flags, presets, validation
# ======================================================================================================================

DEFAULTS = {"preset": None, "n_train": 80, "d": 200, "r": 20, "n_test": 1000, "data_seed": 0, "init_scale": 0.1,
            "algorithm": "sgd", "lr": 0.25, "decay_frac": None, "decay": None, "iterations": 100001,
            "eval_points": 250, "seeds": [1], "out_dir": os.path.join("runs", SCRIPT), "log_interval": 2.0}
_UNSET = object()  # marks flags not given on the command line (argparse keeps pre-set namespace attributes)

EPILOG = """presets (SPEC.md):
  e1  n=80 d=200 r=20, 100001 iterations, SGD: η=0.25 constant; η=0.282 ÷4.8 at 10 %, ÷3.4 at 30 %, ÷1.5 at 50 %
  e2  n=40 d=100 r=20, 100001 iterations, GD: η=2.0 constant; η=3.53 ÷4.8/÷3.4/÷1.5 at 10/30/50 %;
      SGD: η=0.272 (paper) and η=0.26, ÷20 at 50 %, seeds 1-16 (most seeds diverge at η=0.272)
  e3  n=20 d=30 r=3, 10001 iterations, GD η=0.03 ("gradient flow"); GD η=3.0 ÷3 at 50 %; SGD (seed 2) η=0.6 ÷3 at
      50 %; stores the 100×100 loss grid on the plane through w_init, w*, w_flow and the projected trajectories
with --preset, the data/size flags (--n-train --d --r --n-test --data-seed --init-scale --iterations --eval-points)
override the preset for ALL its runs, and the runs are then logged as experiment '<preset>_custom' (e.g. a quick
check: --preset e1 --iterations 2000 -> e1_custom), so they never overwrite the paper configuration's logs and figure;
--seeds replaces the seeds of its SGD runs (GD is deterministic: one log, seed null) and, like --out-dir and
--log-interval, keeps the preset's name. The per-run flags (--algorithm --lr --decay-frac --decay) are rejected with
--preset. Without --preset the flags describe one custom run (experiment "custom").
logs: <out-dir>/<experiment>_<run>_seed<k>.json (GD runs: no _seed part), one record per evaluation with iter, lr,
train_loss, test_loss, l0, l1, rank, uv_norm, balancedness; top-level run_index (position of the run in the preset),
seed_summary (all seeds of the run: diverged fraction, medians of the rest), after_training (metrics after all N
steps), timing (seconds); e3 adds surface, trajectory_2d, end_state.
Figures: python plots.py --logs <out-dir> --out figures
"""


def build_parser():
    parser = utils.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=EPILOG,
                                  formatter_class=_HelpFormatter)
    add = parser.add_argument
    add("--preset", choices=sorted(PRESETS), help="run every run of a paper experiment (see below)")
    add("--n-train", type=utils.positive_int, help="n: number of training points")
    add("--d", type=utils.positive_int, help="input dimension d")
    add("--r", type=utils.positive_int, help="support size r of the teacher θ* (r ≤ d)")
    add("--n-test", type=utils.positive_int,
        help="number of test points; the rank uses the first min(2d, n-test) of them")
    add("--data-seed", type=utils.nonnegative_int, help="seed of the legacy numpy generator that draws X, X_test, θ*")
    add("--init-scale", type=utils.nonnegative_float, help="α in the initialisation u0 = α·1, v0 = 0")
    add("--algorithm", choices=("sgd", "gd"), help="batch-1 SGD, or full-batch GD on the mean loss")
    add("--lr", type=utils.positive_float, help="step size η (before the decay)")
    add("--decay-frac", type=utils.fraction,
        help="T: divide η by --decay after iteration ⌊T·N⌋ (omit both for a constant step size)")
    add("--decay", type=utils.positive_float, help="d: the step size is divided by d after ⌊T·N⌋ (needs --decay-frac)")
    add("--iterations", type=utils.positive_int, help="N, number of SGD/GD iterations")
    add("--eval-points", type=utils.positive_int,
        help="K: evaluate at {0..99} ∪ round(linspace(0, N, K))[:-1], before that iteration's update")
    add("--seeds", type=utils.nonnegative_int, nargs="+",
        help="SGD sampling seeds, run together as one vectorised batch (one log per seed)")
    add("--out-dir", help="folder for the JSON run logs")
    add("--log-interval", type=utils.nonnegative_float,
        help="seconds between log saves during a run (0 = after every evaluation); logs are always saved at the end")
    return parser


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Show the custom-run default of every flag (flags default to a marker so that presets can tell what was given)."""

    def _get_help_string(self, action):
        if action.dest not in DEFAULTS:
            return action.help
        default = DEFAULTS[action.dest]
        if isinstance(default, list):
            shown = " ".join(map(str, default))
        elif default is None:
            shown = "none: one custom run" if action.dest == "preset" else "none: constant step size"
        else:
            shown = default
        return f"{action.help} (default: {shown})"


def parse_args(argv=None):
    """Parse flags, resolve presets; returns (args, experiment name, list of run dicts, surface flag)."""
    parser = build_parser()
    args = parser.parse_args(argv, namespace=argparse.Namespace(**{key: _UNSET for key in DEFAULTS}))
    given = {key for key in DEFAULTS if getattr(args, key) is not _UNSET}
    for key, value in DEFAULTS.items():
        if key not in given:
            setattr(args, key, value)
    if args.preset is None:
        runs, surface = [_custom_run(args, given)], False
    else:
        preset = PRESETS[args.preset]
        for key in RUN_FLAGS:
            if key in given:
                utils.usage_error(utils.flag_name(key), f"is set per run by --preset {args.preset}; drop --preset "
                                                        "to run one custom configuration")
        for key, value in preset["shared"].items():
            if key not in given:
                setattr(args, key, value)
        runs = [dict(run, seeds=args.seeds if "seeds" in given or run["seeds"] is None else run["seeds"])
                for run in preset["runs"]]
        surface = preset.get("surface", False)
    if args.r > args.d:
        utils.usage_error("--r", f"the support size r = {args.r} must be at most d = {args.d}")
    if len(set(args.seeds)) < len(args.seeds):  # two batch rows would write one log and count twice in seed_summary
        utils.usage_error("--seeds", f"repeated seed in {' '.join(map(str, args.seeds))}")
    utils.prepare_out_dir(args.out_dir)
    return args, experiment_name(args.preset, given), runs, surface


def experiment_name(preset, given):
    """'custom' without a preset; the preset's name (e1/e2/e3) when only flags that change neither the training nor
    the measurements were given; else '<preset>_custom', so that a quick check (--preset e1 --iterations 2000) never
    overwrites the logs and figure of the paper configuration (the naming of two_layer_relu.py)."""
    if preset is None:
        return "custom"
    return preset if given <= NEUTRAL_FLAGS else f"{preset}_custom"


def _custom_run(args, given):
    """The single run described by the per-run flags (no preset)."""
    if ("decay_frac" in given) != ("decay" in given):
        missing = "decay" if "decay_frac" in given else "decay_frac"
        utils.usage_error(utils.flag_name(missing), "--decay-frac and --decay must be given together")
    return _run(args.algorithm, args.lr, args.decay_frac, args.decay, seeds=args.seeds)

# ======================================================================================================================
# Driver: logs, summaries
# ======================================================================================================================


def run_label(run):
    """Human label, e.g. 'SGD η = 0.282, ÷4.8 at 10 %' (the `run` key of the logs and the figure legends)."""
    label = f"{run['algorithm'].upper()} η = {run['lr']:g}"
    if run["role"] == "flow":
        return label + " (≈ gradient flow)"
    if run["decay_frac"] is None:
        return label + ", constant"
    return label + f", ÷{run['decay']:g} at {100 * run['decay_frac']:g} %"


class ThrottledRunLog(utils.RunLog):
    """utils.RunLog that rewrites its file at most every `interval` seconds while the run is running; the first save
    and every save after a status change (finish, divergence, Ctrl-C, error) always happen.

    Every evaluation is still recorded (RunLog.record); only the file rewrite inside it is skipped while the last
    one is recent (why: module docstring, design notes). Also measures the time spent saving (log key `timing`).
    """

    def __init__(self, path, script, config, interval, **extra):
        self.interval, self.save_seconds, self.last_save = interval, 0.0, -math.inf
        super().__init__(path, script, config, **extra)

    def save(self):
        if self.data["status"] == "running" and time.monotonic() - self.last_save < self.interval:
            return
        tick = time.monotonic()
        super().save()
        self.last_save = time.monotonic()
        self.save_seconds += self.last_save - tick


def _exit_if_running(log):
    """ExitStack callback: let RunLog mark an interrupted/failed run, but never overwrite a finished seed's status."""

    def exit_callback(exc_type, exc, tb):
        return log.data["status"] == "running" and log.__exit__(exc_type, exc, tb)

    return exit_callback


def run_config(args, run, seed, n_iters):
    """Every resolved setting of one run and seed, as stored in its log's `config`."""
    decay_iter = None if run["decay_frac"] is None else math.floor(run["decay_frac"] * n_iters)
    return {"preset": args.preset, "n_train": args.n_train, "d": args.d, "r": args.r, "n_test": args.n_test,
            "data_seed": args.data_seed, "init_scale": args.init_scale, "algorithm": run["algorithm"],
            "lr": run["lr"], "decay_frac": run["decay_frac"], "decay": run["decay"],
            "decay_iter": decay_iter, "iterations": n_iters, "eval_points": args.eval_points, "seed": seed,
            "seeds": run["seeds"] if run["algorithm"] == "sgd" else None, "out_dir": args.out_dir,
            "log_interval": args.log_interval, "rank_points": min(2 * args.d, args.n_test), "rank_eps": RANK_EPS,
            "l0_threshold": L0_THRESHOLD, "role": run["role"]}


def _metrics_row(metrics, i):
    """Row i of a {name: array} batch of metrics as plain Python numbers (counts as int)."""
    return {key: int(value[i]) if key in ("l0", "rank") else float(value[i]) for key, value in metrics.items()}


def execute_run(args, experiment, run_index, run, data, rank_of, keep_trajectory):
    """Train one run for all its seeds at once, writing one log per seed; returns (logs, train() result, seconds).

    run_index (the run's position in its preset, 0 for a custom run) is logged so that figure legends list the runs
    in preset order rather than in file-name order."""
    n_iters = args.iterations
    seeds = run["seeds"] if run["algorithm"] == "sgd" else [None]  # GD is deterministic: one row, seed null
    label = run_label(run)
    lrs = utils.toy_step_sizes(n_iters, run["lr"], run["decay_frac"], run["decay"] or 1.0)
    slug = utils.run_slug(**{run["algorithm"]: True}, lr=run["lr"], div=run["decay"], at=run["decay_frac"])
    env = utils.environment_info("cpu")
    logs = [ThrottledRunLog(
        os.path.join(args.out_dir, f"{experiment}_{slug}" + ("" if seed is None else f"_seed{seed}") + ".json"),
        SCRIPT, run_config(args, run, seed, n_iters), args.log_interval, env=env, experiment=experiment, run=label,
        run_index=run_index, seed=seed) for seed in seeds]
    batch = "deterministic, one log (--seeds not used)" if seeds == [None] else f"{len(seeds)} seed(s)"
    print(f"run {label}: {batch}, {n_iters} iterations", flush=True)

    def on_eval(t, rows, metrics):
        for i, row in enumerate(rows):
            logs[row].record(iter=t, lr=float(lrs[t]), **_metrics_row(metrics, i))

    def on_diverge(row, t):
        who = "the run" if seeds[row] is None else f"seed {seeds[row]}"
        others = "; the other seeds go on" if len(seeds) > 1 else ""
        print(f"    {who}: diverged (non-finite) at iteration {t}{others}", flush=True)
        logs[row].finish("diverged", diverged_at=t)

    start, svd_calls = time.monotonic(), (rank_of.svd_calls, rank_of.full_svd_calls)
    with contextlib.ExitStack() as stack:
        for log in logs:
            stack.push(_exit_if_running(log))
        evals = utils.eval_iterations(n_iters, args.eval_points, DENSE_EVALS)
        result = train(data, lrs, run["algorithm"], seeds, evals, args.init_scale, rank_of, on_eval, on_diverge,
                       keep_trajectory)
        seconds = time.monotonic() - start
        statuses = ["diverged" if log.data["status"] == "diverged" else "completed" for log in logs]
        summary = utils.seed_summary(seeds, statuses, [log.data["final"] for log in logs])
        timing = dict(result["timing"], total_s=seconds, rank_svd_calls=rank_of.svd_calls - svd_calls[0],
                      rank_full_svd_calls=rank_of.full_svd_calls - svd_calls[1],
                      log_save_s=sum(log.save_seconds for log in logs))
        for row, (log, status) in enumerate(zip(logs, statuses)):
            extra = {} if status == "diverged" else \
                {"after_training": {"iter": n_iters, **_metrics_row(result["after"], row)}}
            log.finish(status, seed_summary=summary, timing=timing, **extra)
    return logs, result, seconds


def attach_surface(data, args, runs, outcomes):
    """E3: build the plane from the flow run, store the grid and each seed's projected trajectory in its log."""
    d = args.d
    w_init = np.concatenate([np.full(d, args.init_scale), np.zeros(d)])
    w_star = np.concatenate([np.sqrt(data["theta"]), np.sqrt(data["theta"])])
    flow = next(i for i, run in enumerate(runs) if run["role"] == "flow")
    w_flow = np.concatenate([outcomes[flow][1]["u"][0], outcomes[flow][1]["v"][0]])
    plane = surface_plane(w_init, w_flow, w_star) if np.isfinite(w_flow).all() else None
    if plane is None:
        print("E3: the flow run diverged or ended on the w_init–w* line; no loss surface is stored")
        return
    project = lambda w: (w - w_init) @ plane.T  # noqa: E731  plane coordinates (a, b)
    grid = loss_surface(data, w_init, plane)
    surface = {"coords": _rounded(grid["coords"]), "train_loss": _rounded(grid["train_loss"], 10),
               "test_loss": _rounded(grid["test_loss"], 10), "w_init": [0.0, 0.0],
               "w_flow": _rounded(project(w_flow)), "w_star": _rounded(project(w_star)),
               "layout": "loss[i][j] at a = coords[j], b = coords[i]; w = w_init + a·e1 + b·e2 (SPEC E3)"}
    support = data["theta"] > 0
    for logs, result, _ in outcomes:
        for row, log in enumerate(logs):
            end = result["diverged_at"][row] if log.data["status"] == "diverged" else len(result["trajectory"][row])
            path = project(result["trajectory"][row, :end])
            u, v = result["u"][row], result["v"][row]
            # u⊙v = θ* also holds at sign-flipped copies of w* (u_j = v_j = −√θ*_j), which lie off this plane: say
            # so, or a run that ends there looks as if it had not converged in the figure
            end_state = None if log.data["status"] == "diverged" else {
                "beta_error": float(np.linalg.norm(u * v - data["theta"])),
                "negative_support_coords": int(np.sum((u < 0) & support)), "support_size": int(support.sum())}
            # one point per iteration 0..end-1 (state before its update); completed runs add the state after N steps
            log.finish(log.data["status"], surface=surface, end_state=end_state,
                       trajectory_2d={"a": _rounded(path[:, 0]), "b": _rounded(path[:, 1])})


def print_summary(outcomes):
    """End-of-run table: per run the diverged fraction and the medians of the other seeds at the last evaluation."""
    print(f"\n{'run':<34} {'seeds':>5} {'diverged':>8} {'iter':>7} {'train loss':>11} {'test loss':>11} "
          f"{'‖β‖₀':>6} {'rank':>5} {'time':>6} {'log I/O':>7}")
    for logs, _, seconds in outcomes:
        summary, timing = logs[0].data["seed_summary"], logs[0].data["timing"]
        med = summary["median_final"] or {}
        cell = lambda key, width, spec: format(med[key], f"{width}{spec}") if key in med else "-".rjust(width)  # noqa
        diverged = f"{len(summary['diverged_seeds'])}/{len(summary['seeds'])}"
        last = "-" if summary["final_iter"] is None else summary["final_iter"]
        print(f"{logs[0].data['run']:<34} {len(logs):>5} {diverged:>8} {last:>7} {cell('train_loss', 11, '.4e')} "
              f"{cell('test_loss', 11, '.4e')} {cell('l0', 6, '.0f')} {cell('rank', 5, '.0f')} "
              f"{utils.format_seconds(seconds):>6} {timing['log_save_s']:6.2f}s")
    print("(medians over the non-diverged seeds at the last evaluation point, before its update)")


def main(argv=None):
    args, experiment, runs, surface = parse_args(argv)
    data = make_data(args.n_train, args.d, args.r, args.n_test, args.data_seed)
    rank_of = JacobianRank(data["X_test"][:2 * args.d])
    start = time.monotonic()
    outcomes = [execute_run(args, experiment, index, run, data, rank_of, surface) for index, run in enumerate(runs)]
    if surface:
        attach_surface(data, args, runs, outcomes)
    print_summary(outcomes)
    print(f"total {utils.format_seconds(time.monotonic() - start)}; logs in {args.out_dir}")
    return outcomes


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # RunLog has marked the running logs `interrupted`; no traceback for a Ctrl-C
        print("interrupted: the logs of the running run are marked 'interrupted'", file=sys.stderr)
        raise SystemExit(130)  # the shell's code for Ctrl-C, so that a sweep loop stops too
