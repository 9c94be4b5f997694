"""Diagonal linear networks trained with large-step SGD and GD: the paper's diagonal-network experiments E1-E3.

Paper: Andriushchenko et al., "SGD with Large Step Sizes Learns Sparse Features", ICML 2023, arXiv 2210.05337.
Model h(x) = <u ⊙ v, x> with u0 = α·1, v0 = 0 (α = --init-scale), loss L = ‖Xβ − y‖² / (2n) with β = u ⊙ v, on noiseless
data from a sparse non-negative teacher θ*. The paper's claim in this setting: SGD with a large step size keeps the
loss from converging ("loss stabilization") while its noise shrinks most coordinates of β to zero; the longer the
large-step phase lasts before the step size is decayed, the sparser β. Full-batch GD with large steps stays dense.

    python diag_net.py                                   # E1 (main text): the 4 runs at seed 1 (preset e1)
    python diag_net.py --seeds 1 2 3 4 5 6 7 8           # E1 over 8 seeds (one vectorised batch)
    python diag_net.py --preset e2                       # E2 (appendix): GD vs SGD, n = 40, d = 100
    python diag_net.py --preset e3                       # E3: loss surface on a plane, with projected trajectories
    python diag_net.py --iterations 2000                 # quick check, logged as experiment e1_custom
    python plots.py --logs runs/diag_net --out-dir figures

Definitions the code follows:
  * SGD with batch size 1: index i_t of the sample at step t from np.random.RandomState(seed).randint(n, size=N) (the
    sequence of reseeding legacy numpy and calling np.random.randint(n) once per step, as the authors do); update
    e = x_iᵀβ − y_i, u ← u − η·e·(x_i ⊙ v), v ← v − η·e·(x_i ⊙ u), both from the old (u, v). GD: the mean gradient.
  * Step size η until iteration ⌊T·N⌋ (T = --large-lr-frac), then η ÷ D (D = --decay); T = 1 or D = 1: constant.
  * Metrics BEFORE the update of iterations {0..99} ∪ round(linspace(0, N, K))[:-1] (utils.eval_iterations); the
    last is the "final" point of the authors' printed numbers. The state after all N steps is logged as
    `after_training`. Train/test loss L, ‖β‖₀ = #{|β_i| > 1e-50}, ‖β‖₁, ‖(u, v)‖₂, balancedness ‖|u| − |v|‖₂, and the
    rank of the Jacobian φ(X_r) on the first 2d test points (JacobianRank).
  * --sharpness-every K: `sharpness` = λ_max of the Hessian of the training loss L w.r.t. (u, v), exact (loss_hessian),
    at the first evaluation point of every K iterations (utils.sharpness_iterations); plots compare it with 2/η.
    --label-noise-std S: the SGD sample's target is y_i + S·ξ_t, ξ_t ~ N(0, 1) fresh at every step
    (utils.toy_label_noise, from the SGD-order seed); the logged losses and the sharpness use the clean targets.
  * All seeds of a run advance together as rows of (seeds × d) arrays. A seed whose state becomes NaN/inf is logged
    as `diverged` (with `diverged_at`) and dropped from the batch; the others go on. Every log of a run carries
    `seed_summary` (utils.seed_summary: diverged fraction, medians of the others with their bootstrap 90 %
    intervals), `run_index` (its position in the preset, which orders the figure legends) and, for a decayed run
    after another one, `vs_earlier_decay` (utils.compare_consecutive_decays: in how many seeds it beats that run).
  * Chaos: --init-jitter ε multiplies u0 by (1 + ε·N(0,1)) drawn from the seed (utils.jitter_factors); with
    --sgd-seed holding the SGD order fixed, the spread over seeds measures how much a 1e-7 change of the
    initialisation moves a run (`make demo` does this for E1 at the paper's seed 1).
"""
import contextlib
import math
import os
import sys
import time

import numpy as np
import torch

import utils

SCRIPT = "diag_net"
L0_THRESHOLD = 1e-50  # ‖β‖₀ counts |β_i| > 1e-50
RANK_EPS = 1e-15  # the rank counts σ_k / σ_1 > 1e-15
DENSE_EVALS = 100  # every iteration 0..99 is evaluated too
SURFACE_RANGE, SURFACE_POINTS = (-0.5, 2.3), 100  # E3 grid: 100×100 points of [-0.5, 2.3]² in plane coordinates
PROGRESS_EVERY_S = 30.0  # progress line period on long runs
METRIC_KEYS = ("train_loss", "test_loss", "l0", "l1", "rank", "uv_norm", "balancedness")  # besides iter and lr

# ======================================================================================================================
# Presets and flags
# ======================================================================================================================

PER_RUN = ("algorithm", "lr", "large_lr_frac", "decay")  # one value for every run, or one value per run
E1_DATA = dict(n_train=80, input_dim=200, support_size=20, n_test=1000, data_seed=0, init_scale=0.1, iterations=100001,
               eval_points=250, sgd_seed=None, init_jitter=0.0, sharpness_every=0, label_noise_std=0.0)
PRESETS = {
    # E1 (main text): constant η = 0.25, and η = 0.282 decayed ÷4.8 / ÷3.4 / ÷1.5 after 10 / 30 / 50 % of training.
    # The decayed runs sit at the edge of divergence: compare them over seeds.
    "e1": dict(E1_DATA, seeds=[1], algorithm=["sgd"], lr=[0.25, 0.282, 0.282, 0.282],
               large_lr_frac=[1.0, 0.1, 0.3, 0.5], decay=[1.0, 4.8, 3.4, 1.5]),
    # E2 (appendix): large-step GD stays dense, large-step SGD finds a sparse β. The paper's SGD run (η = 0.272)
    # diverges for most seeds, so the SGD runs use 16 seeds, and η = 0.26 (fewer seeds diverge) is added beside it.
    "e2": dict(E1_DATA, n_train=40, input_dim=100, seeds=list(range(1, 17)),
               algorithm=["gd", "gd", "gd", "gd", "sgd", "sgd"], lr=[2.0, 3.53, 3.53, 3.53, 0.272, 0.26],
               large_lr_frac=[1.0, 0.1, 0.3, 0.5, 0.5, 0.5], decay=[1.0, 4.8, 3.4, 1.5, 20.0, 20.0]),
    # E3: trajectories on the plane through w_init, w* and w_flow; "÷3 at iteration 5000" of 10 001 = ⌊0.5·10001⌋.
    # Its first run, small-step GD, stands for the gradient flow that defines w_flow.
    "e3": dict(E1_DATA, n_train=20, input_dim=30, support_size=3, iterations=10001, seeds=[2],
               algorithm=["gd", "gd", "sgd"], lr=[0.03, 3.0, 0.6], large_lr_frac=[1.0, 0.5, 0.5],
               decay=[1.0, 3.0, 3.0]),
}
SURFACE_PRESET = "e3"


def build_parser():
    parser = utils.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=utils.PRESET_RULES)
    knob = lambda flag, text, **kwargs: utils.add_preset_flag(parser, PRESETS, flag, text, **kwargs)  # noqa: E731
    parser.add_argument("--preset", choices=sorted(PRESETS), default="e1",
                        help="e1 = SGD, 4 step-size schedules; e2 = GD vs SGD; e3 = loss surface")
    knob("--algorithm", "batch-1 SGD or full-batch GD, per run", nargs="+", choices=("sgd", "gd"))
    knob("--lr", "η: step size before the decay, per run", nargs="+", type=utils.positive_float)
    knob("--large-lr-frac", "T: η is divided after iteration ⌊T·N⌋ (1 = never), per run", nargs="+",
         type=utils.fraction)
    knob("--decay", "D: the step size is divided by D after ⌊T·N⌋ (1 = constant), per run", nargs="+",
         type=utils.positive_float)
    knob("--iterations", "N: SGD/GD iterations", type=utils.positive_int)
    knob("--eval-points", "K: evaluate before iterations {0..99} ∪ round(linspace(0, N, K))[:-1]",
         type=utils.positive_int)
    knob("--n-train", "n: training points", type=utils.positive_int)
    knob("--input-dim", "d: input dimension", type=utils.positive_int)
    knob("--support-size", "r: nonzero coordinates of the teacher θ* (r ≤ d)", type=utils.positive_int)
    knob("--n-test", "test points; the rank uses the first min(2d, n_test)", type=utils.positive_int)
    knob("--data-seed", "seed of the legacy numpy generator that draws X, X_test, θ*", type=utils.nonnegative_int)
    knob("--init-scale", "α: initialisation u0 = α·1, v0 = 0", type=utils.nonnegative_float)
    knob("--seeds", "SGD sampling seeds, one vectorised batch, one log each (GD runs: one log, seed null)", nargs="+",
         type=utils.nonnegative_int)
    knob("--sgd-seed", "hold the SGD order at this seed while --seeds vary (auto: each seed's own)",
         type=utils.nonnegative_int)
    knob("--init-jitter", "ε: multiply u0 by (1 + ε·N(0,1)), drawn from the seed (0 = off); with --sgd-seed held, the "
                          "seeds measure how chaotic a run is", type=utils.nonnegative_float)
    knob("--sharpness-every", "K: log `sharpness`, the largest eigenvalue λ_max of the Hessian of the full training "
                              "loss L = ‖Xβ − y‖²/(2n) (all n points, clean targets) w.r.t. (u, v), exact (closed "
                              "form, eigvalsh), at the first evaluation point in every K iterations (0 = off); "
                              "compare it with 2/lr", type=utils.nonnegative_int)
    knob("--label-noise-std", "S: label-noise SGD: add fresh N(0, S²) noise to the target of each SGD sample, drawn "
                              "from the seed of the SGD order (utils.toy_label_noise; 0 = off; SGD runs only)",
         type=utils.nonnegative_float)
    parser.add_argument("--out-dir", default=os.path.join("runs", SCRIPT), help="folder for the JSON run logs")
    parser.add_argument("--log-interval", type=utils.nonnegative_float, default=2.0,
                        help="seconds between log saves during a run (0 = after every evaluation; always at the "
                             "end): saving after each of the 348 evaluations of 16 seeds costs as much as training")
    return parser


def parse_args(argv=None):
    """Command-line layer: returns (args, config, runs, experiment); bad input exits with one line (exit code 2)."""
    args = build_parser().parse_args(argv)
    given = {key: value for key, value in vars(args).items() if key not in ("preset", "out_dir", "log_interval")}
    try:
        config, runs, experiment = utils.resolve_preset(args.preset, PRESETS[args.preset], given, PER_RUN)
    except utils.FlagError as err:
        utils.usage_error(err.flag, err.message)
    if config["support_size"] > config["input_dim"]:
        utils.usage_error("--support-size", f"r = {config['support_size']} must be at most d = {config['input_dim']}")
    if config["label_noise_std"] and any(run["algorithm"] == "gd" for run in runs):
        utils.usage_error("--label-noise-std", "applies to SGD runs only (a GD run is one deterministic run, without "
                                               "a seed to draw the noise from); give --algorithm sgd")
    return args, config, runs, experiment

# ======================================================================================================================
# Data, and the SGD and GD steps vectorised over seeds (state arrays are seeds × d)
# ======================================================================================================================


def make_data(n_train, input_dim, support_size, n_test, data_seed):
    """Noiseless sparse regression data, drawn from the legacy numpy generator seeded with `data_seed`.

    The draw order reproduces the authors' numbers: X (n_train×d), then X_test (n_test×d), both standard Gaussian via
    multivariate_normal, then θ* = randn(d) with θ*[r:] = 0, θ* = |θ*| / ‖θ*‖₂; y = Xθ*. A RandomState instance gives
    the stream of np.random.seed + the global functions without touching global state.
    """
    rng = np.random.RandomState(data_seed)
    x_train = rng.multivariate_normal(np.zeros(input_dim), np.eye(input_dim), n_train)
    x_test = rng.multivariate_normal(np.zeros(input_dim), np.eye(input_dim), n_test)
    theta = rng.randn(input_dim)
    theta[support_size:] = 0
    theta = np.abs(theta) / np.linalg.norm(theta)
    return {"X": x_train, "y": x_train @ theta, "X_test": x_test, "y_test": x_test @ theta, "theta": theta}


def sgd_indices(seeds, n, n_iters):
    """(seeds × N) sample indices: row k = RandomState(seed_k).randint(n, size=N)."""
    return np.stack([np.random.RandomState(seed).randint(n, size=n_iters) for seed in seeds])


def sgd_steps(u, v, xs, ys, lrs, states=None):
    """Batch-1 SGD steps for every seed at once (the update of the module docstring; the tuple assignment makes it
    simultaneous). xs: (seeds × L × d) the sampled rows, ys: (seeds × L) their targets, lrs: (L,) step sizes. Returns
    the new u, v and the (seeds × L) residuals, used to date a divergence. `states` (seeds × L × 2d), if given,
    receives (u, v) before each step."""
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
    """Full-batch GD steps on L = ‖X(u⊙v) − y‖²/(2n): ∇_u L = (Xᵀr/n)⊙v, ∇_v L = (Xᵀr/n)⊙u, r = Xβ − y.

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

# ======================================================================================================================
# Metrics, and the training loop of one run (all its seeds at once)
# ======================================================================================================================


def half_mse(x, y, beta):
    """L = ‖Xβ − y‖² / (2·#rows) for each row of beta."""
    residual = beta @ x.T - y
    return np.einsum("bn,bn->b", residual, residual) / (2 * len(y))


def loss_hessian(data, u, v):
    """The Hessian of the training loss L(u, v) = ‖X(u ⊙ v) − y‖²/(2n) w.r.t. w = (u, v), for each row of u, v:
    (rows × 2d × 2d), exact. With G = XᵀX/n, g = Xᵀ(Xβ − y)/n and ∂β/∂w = [diag v, diag u]:
    ∂²L/∂w_a∂w_b = c_a·G_ij·c_b (c = (v, u); i, j the coordinates of a, b: the Gauss–Newton part), plus g_i where
    {a, b} = {u_i, v_i} (β_i = u_i·v_i is bilinear)."""
    x, d = data["X"], u.shape[1]
    gram = np.tile(x.T @ x / len(x), (2, 2))
    g = ((u * v) @ x.T - data["y"]) @ x / len(x)
    c = np.concatenate([v, u], axis=1)
    hessian = c[:, :, None] * gram * c[:, None, :]
    coordinate = np.arange(d)
    hessian[:, coordinate, d + coordinate] += g
    hessian[:, d + coordinate, coordinate] += g
    return hessian


def sharpness(data, u, v):
    """λ_max of the training-loss Hessian (loss_hessian) for each row: its largest eigenvalue, exactly (eigvalsh of a
    2d × 2d matrix; no iteration needed at this size). torch's eigvalsh on the one torch thread main() sets: numpy's
    multi-threaded one ran 30× slower on a busy 2-core machine."""
    return torch.linalg.eigvalsh(torch.from_numpy(loss_hessian(data, u, v)))[:, -1].numpy()


# Speed trick, kept because it more than halves the wall time of the experiment (measured on a shared 2-core CPU:
# --preset e1 --seeds 1..16 takes 19-22 s with it, 48-65 s with one d×d SVD per state and evaluation).
class JacobianRank:
    """rank φ(X_r) = #{k : σ_k / σ_1 > 1e-15} for a batch of states (rows of u, v), where φ(X_r) = [X_r diag(v),
    X_r diag(u)] has rows ∇_(u,v) h(x_i) on the rank points X_r (the first 2d test points); 0 for an all-zero φ.

    Exact reformulation: φφᵀ = X_r diag(w²) X_rᵀ with w = √(u² + v²), so φ has the nonzero singular values of
    X_r diag(w), i.e. of R·diag(w) where X_r = QR (Q has orthonormal columns): a d×d SVD instead of 2d×2d.
    Speed trick: with the columns sorted by w, the tail after the k largest is dropped when its Frobenius norm
    δ ≤ ε·σ₁/10 (Weyl: no singular value moves by more than δ); if the k kept columns are certainly independent
    (σ_min(R)·w_(k) − δ ≥ 10·ε·σ₁), the rank is k without any SVD (constant-step runs, the start of every run);
    otherwise one SVD of the k kept columns. Sparsifying runs spread their singular values continuously down to the
    threshold, where a float64 SVD is only accurate to ~1e-16·σ₁: there another exact method (e.g. the SVD of φ
    itself) may count one more or one fewer.
    """

    def __init__(self, x_rank):
        self.r_factor = np.linalg.qr(x_rank, mode="r")
        self.col_norms = np.linalg.norm(self.r_factor, axis=0)
        singular = np.linalg.svd(self.r_factor, compute_uv=False)
        # σ_min of any subset of R's columns is ≥ σ_min(R) only if R is square (at least d rank points)
        self.s_max, self.s_min = singular[0], singular[-1] if len(singular) == len(self.col_norms) else 0.0

    def __call__(self, u, v):
        w = np.sqrt(u * u + v * v)
        order = np.argsort(-w, axis=1)
        w_sorted = np.take_along_axis(w, order, axis=1)
        cols_sq = (w_sorted * self.col_norms[order]) ** 2
        tail = np.sqrt(np.cumsum(cols_sq[:, ::-1], axis=1)[:, ::-1])  # tail[:, k] = ‖columns k, k+1, ...‖_F
        tail = np.concatenate([tail, np.zeros((len(w), 1))], axis=1)
        sigma_low, sigma_high = np.sqrt(cols_sq.max(axis=1)), self.s_max * w_sorted[:, 0]  # σ₁ lies in between
        kept = np.argmax(tail <= RANK_EPS * sigma_low[:, None] / 10, axis=1)
        w_last = np.take_along_axis(w_sorted, np.maximum(kept - 1, 0)[:, None], axis=1)[:, 0]
        tail_kept = np.take_along_axis(tail, kept[:, None], axis=1)[:, 0]
        ranks = kept.copy()
        for i in np.flatnonzero((self.s_min * w_last - tail_kept < 10 * RANK_EPS * sigma_high) & (kept > 0)):
            columns = self.r_factor[:, order[i, :kept[i]]] * w_sorted[i, :kept[i]]
            singular = torch.linalg.svdvals(torch.from_numpy(columns))
            ranks[i] = int((singular > RANK_EPS * singular[0]).sum())
        return ranks


def evaluate(data, u, v, rank_of):
    """Every per-evaluation metric for a batch of states, as {name: array over the batch}."""
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


def train(data, lrs, algorithm, seeds, evals, init_scale, rank_of, on_eval=None, on_diverge=None,
          keep_trajectory=False, sgd_seed=None, init_jitter=0.0, sharpness_at=(), label_noise_std=0.0):
    """Train one run for all `seeds` at once (one batch row per seed; GD ignores the seed values).

    sgd_seed: every row samples the SGD order of this seed instead of its own. init_jitter: each row's u0 is
    multiplied by its seed's utils.jitter_factors (rows of seed None, GD, are not jittered). sharpness_at: evaluation
    iterations whose metrics include `sharpness` (a measurement only: the trajectory is the same without it).
    label_noise_std: SGD only; the target of iteration t's sample gets the noise utils.toy_label_noise draws for t
    from the row's SGD-order seed.

    lrs: (N,) step size of every iteration; evals: sorted evaluation iterations (< N, starting at 0); rank_of: a
    JacobianRank of the data's rank points.
    on_eval(t, rows, metrics): called at each evaluation iteration t, before that iteration's update, with the batch
    rows still alive and their metrics. on_diverge(row, t): called once when a row becomes non-finite (t = first
    iteration whose residual is non-finite, or the evaluation whose metrics are); the row is then dropped.
    Returns {"u", "v": final states (NaN rows for diverged), "after": metrics after all N steps, "diverged_at": (-1 =
    never), "trajectory": (rows × N+1 × 2d) states before each iteration plus the final one, or None, "timing"}.
    """
    n_iters, d, batch = len(lrs), data["X"].shape[1], len(seeds)
    u, v = np.full((batch, d), float(init_scale)), np.zeros((batch, d))
    if init_jitter:
        for row, seed in enumerate(seeds):
            if seed is not None:
                u[row] *= utils.jitter_factors([d], init_jitter, seed)[0]
    order_seeds = seeds if sgd_seed is None else [sgd_seed] * batch
    indices = sgd_indices(order_seeds, len(data["y"]), n_iters) if algorithm == "sgd" else None
    if label_noise_std and algorithm != "sgd":
        raise ValueError("label noise applies to SGD runs only")
    noise = np.stack([utils.toy_label_noise(n_iters, label_noise_std, seed) for seed in order_seeds]) \
        if label_noise_std else None
    sharpness_at = {int(t) for t in sharpness_at}
    alive = np.arange(batch)
    diverged_at = np.full(batch, -1)
    trajectory = np.full((batch, n_iters + 1, 2 * d), np.nan) if keep_trajectory else None
    timing = {"train_s": 0.0, "metrics_s": 0.0, "callbacks_s": 0.0}
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
        for t0, t1 in zip(evals, [*evals[1:], n_iters]):
            if not len(alive):
                break
            tick = time.monotonic()
            metrics = evaluate(data, u, v, rank_of)
            finite = np.all([np.isfinite(m) for m in metrics.values()], axis=0)
            timing["metrics_s"] += time.monotonic() - tick
            if not finite.all():
                metrics = {key: value[finite] for key, value in metrics.items()}
                drop(~finite, t0)
            if t0 in sharpness_at and len(alive):  # of the finite rows only
                tick = time.monotonic()
                metrics["sharpness"] = sharpness(data, u, v)
                timing["metrics_s"] += time.monotonic() - tick
            tick = time.monotonic()
            if on_eval is not None and len(alive):
                on_eval(int(t0), alive, metrics)
            timing["callbacks_s"] += time.monotonic() - tick
            tick = time.monotonic()
            states = np.empty((len(alive), t1 - t0, 2 * d)) if keep_trajectory else None
            if algorithm == "sgd":
                chunk = indices[alive, t0:t1]
                targets = data["y"][chunk] if noise is None else data["y"][chunk] + noise[alive, t0:t1]
                u, v, residuals = sgd_steps(u, v, data["X"][chunk], targets, lrs[t0:t1], states)
            else:
                u, v, residuals = gd_steps(u, v, data["X"], data["y"], lrs[t0:t1], states)
            if keep_trajectory:
                trajectory[alive, t0:t1] = states
            bad = ~(np.isfinite(residuals).all(axis=1) & np.isfinite(u).all(axis=1) & np.isfinite(v).all(axis=1))
            if bad.any():  # date the divergence at the first non-finite residual of the row
                bad_steps = ~np.isfinite(residuals)
                drop(bad, t0 + np.where(bad_steps.any(axis=1), bad_steps.argmax(axis=1), t1 - t0 - 1))
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
# E3: the loss surface on the plane through w_init, w* and w_flow
# ======================================================================================================================


def _rounded(array, decimals=6):
    """Shorter JSON for big arrays (plane coordinates and losses are plotted, not recomputed)."""
    return np.round(np.asarray(array, dtype=float), decimals)


def attach_surface(data, config, outcomes):
    """E3: build the plane from the flow run (the first), store the grid and each seed's projected path in its log.

    Plane: orthonormal e1 ∥ w* − w_init and e2 = the part of w_flow − w_init orthogonal to e1 (none when that part
    is numerically zero). Grid: train and test loss at w = w_init + a·e1 + b·e2, a, b ∈ SURFACE_RANGE, stored with rows
    indexed by b and columns by a (loss[i][j] at a = coords[j], b = coords[i]), the layout of matplotlib's
    contourf(coords, coords, loss). Raw values; the figure clips them at 100.
    """
    d = config["input_dim"]
    w_init = np.concatenate([np.full(d, config["init_scale"]), np.zeros(d)])
    w_star = np.concatenate([np.sqrt(data["theta"]), np.sqrt(data["theta"])])
    w_flow = np.concatenate([outcomes[0][1]["u"][0], outcomes[0][1]["v"][0]])
    e1 = (w_star - w_init) / np.linalg.norm(w_star - w_init)
    e2 = (w_flow - w_init) - ((w_flow - w_init) @ e1) * e1
    if not np.isfinite(w_flow).all() or np.linalg.norm(e2) < 1e-12:
        print("E3: the flow run diverged or ended on the w_init–w* line; no loss surface is stored")
        return
    plane = np.stack([e1, e2 / np.linalg.norm(e2)])
    project = lambda w: _rounded((w - w_init) @ plane.T)  # noqa: E731  plane coordinates (a, b)
    coords = np.linspace(*SURFACE_RANGE, SURFACE_POINTS)
    b_grid, a_grid = np.meshgrid(coords, coords, indexing="ij")
    w = w_init + a_grid.reshape(-1, 1) * plane[0] + b_grid.reshape(-1, 1) * plane[1]
    beta = w[:, :d] * w[:, d:]
    with np.errstate(over="ignore", invalid="ignore"):
        train_loss = half_mse(data["X"], data["y"], beta).reshape(SURFACE_POINTS, SURFACE_POINTS)
        test_loss = half_mse(data["X_test"], data["y_test"], beta).reshape(SURFACE_POINTS, SURFACE_POINTS)
    surface = {"coords": _rounded(coords), "train_loss": _rounded(train_loss, 10), "test_loss": _rounded(test_loss, 10),
               "w_init": [0.0, 0.0], "w_flow": project(w_flow), "w_star": project(w_star),
               "layout": "loss[i][j] at a = coords[j], b = coords[i]; w = w_init + a·e1 + b·e2"}
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
                       trajectory_2d={"a": path[:, 0], "b": path[:, 1]})

# ======================================================================================================================
# Logs and the driver
# ======================================================================================================================


class ThrottledRunLog(utils.RunLog):
    """utils.RunLog that rewrites its file at most every `interval` seconds (--log-interval) while the run is running;
    every evaluation is still recorded, and the first save and every save after a status change always happen. On
    leaving a `with` block, a seed that already diverged or finished keeps its status (utils.RunLog marks the rest)."""

    def __init__(self, path, script, config, interval, **extra):
        self.interval, self.last_save = interval, -math.inf
        super().__init__(path, script, config, **extra)

    def save(self):
        if self.data["status"] != "running" or time.monotonic() - self.last_save >= self.interval:
            super().save()
            self.last_save = time.monotonic()

    def __exit__(self, exc_type, exc, tb):
        return self.data["status"] == "running" and super().__exit__(exc_type, exc, tb)


def _metrics_row(metrics, i):
    """Row i of a {name: array} batch of metrics as plain Python numbers (counts as int)."""
    return {key: int(value[i]) if key in ("l0", "rank") else float(value[i]) for key, value in metrics.items()}


def execute_run(args, config, experiment, run_index, run, data, rank_of):
    """Train one run for all its seeds at once, writing one log per seed; returns (logs, train() result, seconds)."""
    n_iters = config["iterations"]
    seeds = config["seeds"] if run["algorithm"] == "sgd" else [None]  # GD is deterministic: one row, seed null
    label, slug = utils.toy_run_names(run)
    surface = args.preset == SURFACE_PRESET  # E3 keeps every state, to project the paths onto the plane
    if surface and run_index == 0:
        label += " (≈ gradient flow)"
    lrs = utils.toy_step_sizes(n_iters, run["lr"], run["large_lr_frac"], run["decay"])
    decay_iter = None if run["decay"] == 1 else math.floor(run["large_lr_frac"] * n_iters)
    env = utils.environment_info("cpu")
    logs = []
    for seed in seeds:
        log_config = dict(config, preset=args.preset, **run, seed=seed, seeds=None if seed is None else seeds,
                          decay_iter=decay_iter, out_dir=args.out_dir,
                          log_interval=args.log_interval, rank_points=min(2 * config["input_dim"], config["n_test"]),
                          rank_eps=RANK_EPS, l0_threshold=L0_THRESHOLD)
        path = os.path.join(args.out_dir, f"{experiment}_{slug}" + ("" if seed is None else f"_seed{seed}") + ".json")
        logs.append(ThrottledRunLog(path, SCRIPT, log_config, args.log_interval, env=env, experiment=experiment,
                                    run=label, run_index=run_index, seed=seed))
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

    start = time.monotonic()
    with contextlib.ExitStack() as stack:
        for log in logs:
            stack.enter_context(log)
        evals = utils.eval_iterations(n_iters, config["eval_points"], DENSE_EVALS)
        result = train(data, lrs, run["algorithm"], seeds, evals, config["init_scale"], rank_of, on_eval, on_diverge,
                       surface, config["sgd_seed"], config["init_jitter"],
                       utils.sharpness_iterations(evals, config["sharpness_every"]), config["label_noise_std"])
        seconds = time.monotonic() - start
        statuses = ["diverged" if log.data["status"] == "diverged" else "completed" for log in logs]
        summary = utils.seed_summary(seeds, statuses, [log.data["final"] for log in logs])
        timing = dict(result["timing"], total_s=seconds)
        for row, (log, status) in enumerate(zip(logs, statuses)):
            extra = {} if status == "diverged" else \
                {"after_training": {"iter": n_iters, **_metrics_row(result["after"], row)}}
            log.finish(status, seed_summary=summary, timing=timing, **extra)
    return logs, result, seconds


def print_summary(outcomes):
    """End-of-run table: per run the diverged fraction, and the medians of the other seeds at the last evaluation with
    their bootstrap 90 % intervals when several seeds ran; then how often a later decay beat the earlier one."""
    columns = [("train_loss", "train loss", 11, ".4e"), ("test_loss", "test loss", 11, ".4e"), ("l0", "‖β‖₀", 6, ".0f"),
               ("rank", "rank", 5, ".0f")]
    print(f"\n{'run':<34} {'seeds':>5} {'diverged':>8} {'iter':>7} "
          + " ".join(f"{title:>{width}}" for _, title, width, _ in columns) + f" {'time':>6}")
    for logs, _, seconds in outcomes:
        summary = logs[0].data["seed_summary"]
        med = summary["median_final"] or {}
        cells = " ".join(format(med[key], f"{width}{spec}") if key in med else "-".rjust(width)
                         for key, _, width, spec in columns)
        diverged = f"{len(summary['diverged_seeds'])}/{len(summary['seeds'])}"
        last = "-" if summary["final_iter"] is None else summary["final_iter"]
        print(f"{logs[0].data['run']:<34} {len(logs):>5} {diverged:>8} {last:>7} {cells} "
              f"{utils.format_seconds(seconds):>6}")
    print("(medians over the non-diverged seeds at the last evaluation point, before its update)")
    for logs, _, _ in outcomes:
        summary, wins = logs[0].data["seed_summary"], logs[0].data.get("vs_earlier_decay")
        if len(logs) > 1 and summary["median_final"]:
            print(f"{logs[0].data['run']}: " + "  ".join(f"{key} {utils.format_median_ci(summary, key)}"
                                                         for key, *_ in columns if key in summary["median_final"]))
        if wins:
            print(f"    lower {wins['metric']} than the earlier decay in {wins['wins']}/{wins['pairs']} seeds")


def main(argv=None):
    args, config, runs, experiment = parse_args(argv)
    utils.prepare_out_dir(args.out_dir)
    # One torch thread: on a 2-core machine shared with other jobs, torch's threads spin-wait on the small SVDs of the
    # rank (measured: --seeds 1..16 of e1 ran 19 s on one thread, killed after 344 s on the default two).
    torch.set_num_threads(1)
    data = make_data(config["n_train"], config["input_dim"], config["support_size"], config["n_test"],
                     config["data_seed"])
    rank_of = JacobianRank(data["X_test"][:2 * config["input_dim"]])
    start = time.monotonic()
    outcomes = [execute_run(args, config, experiment, index, run, data, rank_of) for index, run in enumerate(runs)]
    if args.preset == SURFACE_PRESET:
        attach_surface(data, config, outcomes)
    utils.compare_consecutive_decays(runs, [logs for logs, _, _ in outcomes])
    print_summary(outcomes)
    print(f"total {utils.format_seconds(time.monotonic() - start)}; logs in {args.out_dir}")
    return outcomes


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # RunLog has marked the running logs `interrupted`; no traceback for a Ctrl-C
        print("interrupted: the logs of the running run are marked 'interrupted'", file=sys.stderr)
        raise SystemExit(130)  # the shell's code for Ctrl-C, so that a sweep loop stops too
