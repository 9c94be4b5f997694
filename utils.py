"""Shared pieces of the "SGD with Large Step Sizes Learns Sparse Features" reproduction kit (arXiv 2210.05337).

Copying an experiment out of this repository means copying its script and this file. Imports: the standard library,
numpy and torch only. Importing this file changes nothing in the process (no environment variable, thread count or
torch setting); the scripts set those in main().

Contents, in reading order:
  1. Step-size schedules        toy_step_sizes, deep_step_size
  2. Metrics                    feature_sparsity, neuron_subset, BlockActivations, block_feature_sparsity,
                                jacobian_rank, model_jacobian, hessian_top_eigenvalue (the sharpness),
                                SharpnessEstimate
  3. Toy-model helpers          resolve_preset, add_preset_flag, toy_run_names, eval_iterations, jitter_factors,
                                toy_label_noise, sharpness_iterations, seed_summary, median_ci90, format_median_ci,
                                later_decay_wins, compare_consecutive_decays
  4. Run logs and command line  RunLog, write_json_atomic, to_jsonable, run_slug, format_seconds, ArgumentParser,
                                FlagError, flag_name, usage_error, flag types, prepare_out_dir, seed_everything,
                                resolve_device, cpu_name, environment_info
  5. Image data                 ImageDataset, load_image_dataset, DownloadError, keep_first_train,
                                synthetic_image_dataset, epoch_batches, augment_batch, label_noise, images_to_float
  6. Deep-net building blocks   check_deep_net_args, default_eval_batch_size, configure_backend, apply_channels_last,
                                load_data, run_name, schedule_label, evaluate_classifier, save_checkpoint,
                                read_checkpoint, CheckpointError, load_checkpoint, logged_history,
                                check_earlier_run, StopOnSignal, RunClock, progress_line,
                                Processes (one process, or torchrun's N with DistributedDataParallel)
The definitions follow the paper; the README's "Definitions" section states them in full.
"""
import argparse
import contextlib
import difflib
import json
import math
import os
import pickle
import platform
import random
import signal
import subprocess
import sys
import tempfile
import time
import typing

import numpy as np
import torch


# ======================================================================================================================
# 1. Step-size schedules
# ======================================================================================================================


def toy_step_sizes(n_iters, lr, large_lr_frac=None, decay=1.0, warmup_factor=1.0, warmup_power=1.0,
                   decay_includes_k=False):
    """Per-iteration step sizes of the toy experiments, as a float64 array of length n_iters.

    Iteration i (0-based) uses η_i = lr·(1 + (F − 1)·(i/N)^p) while i ≤ k = ⌊T·N⌋ (N = n_iters, T = large_lr_frac,
    F = warmup_factor, p = warmup_power; F = 1 means no warmup, i.e. η_i = lr), and η_k / decay for every i > k: the
    single decay follows iteration k's update, as in the authors' diagonal-net code. decay_includes_k=True divides
    before k's update instead (η_k / decay from i = k on), as their ReLU notebooks do. large_lr_frac=None means a
    constant step size lr. i/N divides by the TOTAL iteration count, not the warmup length, as in the authors' code.
    """
    if large_lr_frac is None:
        return np.full(n_iters, float(lr))
    last_large = math.floor(large_lr_frac * n_iters)
    steps = np.arange(n_iters, dtype=np.float64)
    warm = lr * (1.0 + (warmup_factor - 1.0) * (steps / n_iters) ** warmup_power)
    peak = lr * (1.0 + (warmup_factor - 1.0) * (last_large / n_iters) ** warmup_power)
    still_large = steps < last_large if decay_includes_k else steps <= last_large
    return np.where(still_large, warm, peak / decay)


def deep_step_size(epoch, epochs, lr, schedule="piecewise", warmup_exp=1.0, large_lr_frac=0.5):
    """Step size of the deep-net experiments at fractional epoch `epoch` (the paper's ResNet/DenseNet schedules).

    constant: lr. piecewise: a large-step phase for epoch < T·E (T = large_lr_frac, E = epochs), then ÷10 until 0.9·E,
    then ÷100. During the large-step phase, with u = 100·epoch/E (one unit per 1 % of training):
      w > 1: exponential warmup lr·w^u;  w < 1: power warmup lr·(1 + u^w);  w = 1: no warmup, lr.
    Both later phases start from the value the warmup reached at T·E (peak multiplier w^(100T), e.g. 11.467 for
    w = 1.05, T = 0.5). The scripts call it once before every SGD step, with that step's fractional epoch.
    """
    if schedule == "constant":
        return lr
    if schedule != "piecewise":
        raise ValueError(f"unknown schedule {schedule!r}; expected 'constant' or 'piecewise'")

    def warmed(u):
        if warmup_exp > 1:
            return lr * warmup_exp ** u
        if warmup_exp < 1:
            return lr * (1.0 + u ** warmup_exp)
        return lr

    if epoch < large_lr_frac * epochs:
        return warmed(100.0 * epoch / epochs)
    peak = warmed(100.0 * large_lr_frac)
    return peak / 10 if epoch < 0.9 * epochs else peak / 100


# ======================================================================================================================
# 2. Metrics: feature sparsity, Jacobian rank, sharpness
# ======================================================================================================================


def feature_sparsity(phi, tau=0.95, max_neurons=None, seed=0):
    """The paper's feature sparsity coefficient: (density, dedup_density) of an activation matrix; lower = sparser.

    phi: N×M post-ReLU activations of N examples on M neurons (numpy array or tensor, any device; trailing dimensions,
    e.g. a conv layer's channel×height×width, are flattened so that every position is one neuron).
      1. if max_neurons is set and M > max_neurons, keep a seeded random subset of max_neurons columns (neuron_subset);
         M' = the number of columns from here on.
      2. density = fraction of positive entries (of the M' columns).
      3. drop the columns that are never positive ("dead" neurons).
      4. C = Pearson correlation between the remaining columns.
      5. greedy de-duplication: visit the columns in order and delete column i if |C_ij| > τ for some column j still
         present. When i is visited, every later column is still present and every earlier one left is not a partner
         of i (it was kept, so it has no partner after it). So i is deleted exactly when |C_ij| > τ for some j > i:
         one "any" over the strict upper triangle, no loop. A constant column has no correlation and is never deleted.
      6. dedup_density = positive entries of the kept columns / (N·M'): dead and deleted columns stay in M'.
    The paper's τ: 0.95 for deep nets (with max_neurons = 1000), 0.99 for the teacher–student nets, 0.999 for the 1-D
    regression. C is computed in float32 and every pair within the float32 error bound of τ is recomputed in float64,
    so the result is that of a float64 computation (see benchmark.py for the speed against the greedy loop).
    """
    phi = torch.as_tensor(phi)
    if phi.dim() < 2 or phi.numel() == 0:
        raise ValueError(f"feature_sparsity needs an N×M activation matrix with N, M >= 1, got {tuple(phi.shape)}")
    phi = phi.reshape(phi.shape[0], -1)
    subset = neuron_subset(phi.shape[1], max_neurons, seed)
    if subset is not None:
        phi = phi[:, subset.to(phi.device)]
    positives = (phi > 0).sum(dim=0, dtype=torch.int32)  # per neuron (int32: 1.6× faster than the default int64)
    alive = positives > 0
    x = phi if alive.all() else phi[:, alive]
    z, error = _float32_standardized(x)
    gamma = x.shape[0] * 2.0 ** -24 / (1 - x.shape[0] * 2.0 ** -24)  # float32 dot products of length N: ≤ γ_N·‖a‖‖b‖
    duplicate = torch.zeros(x.shape[1], dtype=torch.bool, device=x.device)
    for start in range(0, x.shape[1], 512):  # the upper triangle, one block of 512 rows at a time
        rows = slice(start, start + 512)
        block = _exact_matmul(z[:, rows].T, z[:, start:]).abs_()
        # |float32 correlation − exact| ≤ slack: above τ + slack is certain; within ±slack of τ, float64 decides
        slack = (1 + gamma) * (1 + error[rows, None]) * (1 + error[None, start:]) - 1
        duplicate[rows] = (block > tau + slack).triu_(diagonal=1).any(dim=1)
        unsure = (block > tau - slack).triu_(diagonal=1) & ~duplicate[rows, None]
        i, j = torch.nonzero(unsure, as_tuple=True)
        for i, j in zip((start + i).split(1024), (start + j).split(1024)):
            exact = (_standardized_columns(x[:, i]) * _standardized_columns(x[:, j])).sum(dim=0).abs()
            duplicate[i[exact > tau]] = True
    return positives.sum().item() / phi.numel(), positives[alive][~duplicate].sum().item() / phi.numel()


def _standardized_columns(x):
    """Columns centred and scaled to unit norm in float64, so that Pearson correlations are their dot products.
    Constant columns become zero columns: correlation 0 with everything, never a duplicate. They are found exactly
    (all entries equal), as the rounded mean of a constant column need not equal its entries."""
    centred = x.double() - x.double().mean(dim=0)
    centred[:, (x == x[:1]).all(dim=0)] = 0
    norms = centred.norm(dim=0)
    return centred / torch.where(norms > 0, norms, 1.0)


def _float32_standardized(x):
    """The standardised columns in float32 (products 2× faster than float64 on a CPU; no float64 copy of x), and for
    each column a bound on ‖float32 column − exact column‖₂.

    Column sums are float32 products with a row of ones (20× faster than float64 sums here), off by ≤ γ_N·Σ|x|. With
    u = 2⁻²⁴, m the mean, s = ‖x − m‖ and ratio = (s + √N·|m|)/s ≥ ‖x‖/s: the rounded mean shifts the centred column
    by ≤ (γ_N + u)·‖x‖ and forming x − m costs ≤ 2u·‖x‖ more, so ≤ (γ_N + 3u)·ratio relative to s; s itself, a float32
    sum of squares, is off by at most that plus γ_N; dividing by it doubles the first part. Hence the bound
    (4·ratio + 2)·(γ_N + 3u). Constant columns (s = 0) get an infinite bound: their pairs are decided in float64.
    """
    n = x.shape[0]
    ones = x.new_ones(1, n, dtype=torch.float32)
    mean = _exact_matmul(ones, x.float())[0] / n
    centred = x.float() - mean
    spread = _exact_matmul(ones, centred.square())[0].sqrt()
    gamma = n * 2.0 ** -24 / (1 - n * 2.0 ** -24)
    ratio = (spread + math.sqrt(n) * mean.abs()) / spread
    error = (4 * ratio + 2) * (gamma + 3 * 2.0 ** -24)
    return centred.mul_(torch.where(spread > 0, 1 / spread, 0.0)), error


def _exact_matmul(a, b):
    """a @ b in true float32: a GPU would otherwise use TF32, whose ~1e-3 error exceeds feature_sparsity's slack."""
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        return a @ b
    finally:
        torch.set_float32_matmul_precision(precision)


def neuron_subset(n_cols, max_neurons, seed=0):
    """Sorted indices of the max_neurons columns feature_sparsity keeps (step 1), or None when no sampling is needed.

    A pure function of (n_cols, max_neurons, seed), so every evaluation of a run measures the same neurons.
    """
    if max_neurons is None or n_cols <= max_neurons:
        return None
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(n_cols, generator=generator)[:max_neurons].sort().values


class BlockActivations:
    """Forward hooks that gather, for feature_sparsity, the outputs of named modules of ANY torch model.

    blocks: {name used in results: module path for model.get_submodule, or the module itself}. While the context is
    open, every forward pass adds its batch: each block's count of positive entries over ALL its neurons, and its
    output restricted to the sampled neurons (so a 64×32×32 map never has to be held for 10 752 images). One forward
    pass serves all blocks (the authors' code ran one pass per block).

        with utils.BlockActivations(model, {"layer4": "layer4", "pooled": "avgpool"}) as acts, torch.no_grad():
            for x in batches:
                model(x)
        print(acts.feature_sparsity(tau=0.95))   # {"layer4": {"density_all": ..., "density": ..., ...}, ...}
    """

    def __init__(self, model, blocks, max_neurons=1000, seed=0):
        self.max_neurons, self.seed = max_neurons, seed
        self.modules = {name: model.get_submodule(m) if isinstance(m, str) else m for name, m in blocks.items()}
        self.handles, self.positives, self.entries, self.kept, self.subsets = [], {}, {}, {}, {}

    def __enter__(self):
        self.handles = [module.register_forward_hook(self._hook(name)) for name, module in self.modules.items()]
        return self

    def __exit__(self, *exc_info):
        for handle in self.handles:
            handle.remove()
        self.handles = []
        return False

    def _hook(self, name):
        def hook(module, inputs, output):
            output = output.detach().reshape(output.shape[0], -1)  # one column per neuron (channel × position)
            if name not in self.subsets:  # drawn once per block, not per batch (and moved to the device once)
                subset = neuron_subset(output.shape[1], self.max_neurons, self.seed)
                self.subsets[name] = None if subset is None else subset.to(output.device)
            subset = self.subsets[name]
            # count on the device (no host sync per batch); copy the kept columns, as a later in-place op of the
            # model (e.g. ReLU(inplace=True)) could still change the output
            self.positives[name] = self.positives.get(name, 0) + torch.count_nonzero(output > 0)
            self.entries[name] = self.entries.get(name, 0) + output.numel()
            kept = output.clone() if subset is None else output[:, subset]
            self.kept.setdefault(name, []).append(kept)

        return hook

    def feature_sparsity(self, tau=0.95):
        """{block: {"density_all", "density", "density_dedup"}} over all batches seen so far: the raw density over
        all neurons of the block (what the authors report), and feature_sparsity of the sampled neurons."""
        results = {}
        for name in self.kept:
            density, dedup = feature_sparsity(torch.cat(self.kept[name]), tau)
            results[name] = {"density_all": int(self.positives[name]) / self.entries[name], "density": density,
                             "density_dedup": dedup}
        return results


@torch.no_grad()
def block_feature_sparsity(model, blocks, batches, tau=0.95, max_neurons=1000, seed=0):
    """Feature sparsity of several blocks of a model from one eval-mode forward pass per batch.

    batches: an iterable of model inputs (e.g. `images.split(128)`). Returns {block: {"density_all", "density",
    "density_dedup"}} (see BlockActivations.feature_sparsity). The model's train/eval mode is restored afterwards.
    """
    was_training = model.training
    model.eval()
    try:
        with BlockActivations(model, blocks, max_neurons, seed) as acts:
            for batch in batches:
                model(batch)
    finally:
        model.train(was_training)
    return acts.feature_sparsity(tau)


def jacobian_rank(jacobian, eps):
    """Numerical rank of a Jacobian: #{k : σ_k / σ_1 > eps}, singular values in float64 (torch.linalg.svdvals).

    jacobian: P×D matrix whose row i is ∇_θ h_θ(x_i) (numpy array or tensor). An all-zero matrix has rank 0.
    """
    jac = torch.as_tensor(jacobian).double()
    if jac.numel() == 0:
        return 0
    singular_values = torch.linalg.svdvals(jac)
    if singular_values[0] <= 0:
        return 0
    return int((singular_values / singular_values[0] > eps).sum().item())


def model_jacobian(model, x):
    """Rows ∇_θ h_θ(x_i) for a scalar-output torch model, one per input row, as a P×(#params) tensor (torch.func)."""
    params = {name: p.detach() for name, p in model.named_parameters()}

    def scalar_output(p, xi):
        return torch.func.functional_call(model, p, (xi.unsqueeze(0),)).reshape(())

    grads = torch.func.vmap(torch.func.grad(scalar_output), in_dims=(None, 0))(params, x)
    return torch.cat([g.reshape(x.shape[0], -1) for g in grads.values()], dim=1)


# Defaults of hessian_top_eigenvalue. rtol 1e-3 bounds the distance to an eigenvalue by 0.1 % of the estimate: a
# sharpness is read against 2/η on a log scale, where that is invisible, and it moves by more than that between two
# measurements of a run. 50 products: cold starts on small ResNets (width 4-8, 16-64 images) converged in 12-21, warm
# starts after a few large steps in as many; the cap also bounds the memory of the kept Lanczos vectors
# (50 × #params floats: 2.2 GB for ResNet-18 at width 64).
SHARPNESS_RTOL, SHARPNESS_MAX_ITERS = 1e-3, 50


class SharpnessEstimate(typing.NamedTuple):
    """The result of hessian_top_eigenvalue."""
    eigenvalue: float  # the largest Ritz value θ ≤ λ_max
    vector: torch.Tensor  # its unit Ritz vector, flat over the parameters: the next call's warm start
    hvps: int  # Hessian-vector products used (= Lanczos iterations)
    converged: bool  # the residual bound fell to rtol·|θ| within max_iters products


def hessian_top_eigenvalue(model, loss_fn, vector=None, rtol=SHARPNESS_RTOL, max_iters=SHARPNESS_MAX_ITERS, seed=0):
    """The sharpness λ_max: the largest eigenvalue of the Hessian H = ∇²_θ L of L = loss_fn() w.r.t. the trainable
    parameters θ of `model`, by the Lanczos method on Hessian-vector products. Returns a SharpnessEstimate.

    loss_fn(): the scalar loss on a FIXED set of examples, computed with `model` as it is (its train/eval mode is the
    caller's choice: with BatchNorm in training mode, L uses the batch statistics of those examples, which is the loss
    SGD descends when they form one batch). It is called once and must be deterministic (no dropout).
    Products by double backward: one forward and backward pass with create_graph=True, then H·q = ∇_θ(∇_θL · q) by
    one torch.autograd.grad on the kept graph per product (no further forward pass).
    Lanczos: q₁ = `vector` (a warm start, e.g. the previous measurement's .vector) or, without one, a standard normal
    draw from a torch.Generator of its own seeded with `seed`; each product extends the orthonormal Krylov basis
    q₁..q_k (fully re-orthogonalised, twice, so float32 products keep it orthonormal) and the tridiagonal T_k = QᵀHQ.
    The estimate is T_k's largest eigenvalue θ with eigenvector s; H has an eigenvalue within the residual
    ‖H·Qs − θ·Qs‖ = β_k·|s_k| of θ, and the loop stops (converged) once that is ≤ rtol·|θ|, else after max_iters
    products. θ never exceeds λ_max: an unconverged estimate is an underestimate.
    Sign: Lanczos finds the largest eigenvalue itself, also where a negative eigenvalue has a larger magnitude, where
    power iteration would return that one (an untrained ResNet-18 at width 4 on 64 images: λ_max = 4.64, power
    iteration −7.72).
    Warm start: from the previous eigenvector the basis starts close to the new one and converges in fewer products;
    if that vector were still an exact eigenvector of an eigenvalue another one had overtaken, the residual would be
    small at once and the overtaken eigenvalue returned (pass vector=None for an independent measurement).
    No side effects: the parameters and their .grad are untouched (autograd.grad, no backward()), every buffer
    (BatchNorm running mean/var, num_batches_tracked) is restored after the forward pass updated it, and no global
    random number is drawn, so a training run is the same with and without measurements.
    """
    if max_iters < 1:
        raise ValueError(f"max_iters must be >= 1, got {max_iters}")
    params = [p for p in model.parameters() if p.requires_grad]
    saved = [buffer.clone() for buffer in model.buffers()]
    try:
        with torch.enable_grad():
            grads = torch.autograd.grad(loss_fn(), params, create_graph=True)
            grad = torch.cat([g.reshape(-1) for g in grads])
        if vector is None:
            vector = torch.randn(grad.numel(), generator=torch.Generator().manual_seed(seed), dtype=grad.dtype)
        q = vector.detach().to(grad)
        basis = (q / q.norm())[None]  # rows q_1..q_k
        alphas, betas = [], []  # T_k's diagonal and off-diagonal
        converged = False
        for hvps in range(1, max_iters + 1):
            # allow_unused: a parameter whose gradient is constant (e.g. a bias under a linear loss) has H rows of 0
            hq = torch.autograd.grad(grad @ basis[-1], params, retain_graph=True, allow_unused=True,
                                     materialize_grads=True)
            w = torch.cat([h.reshape(-1) for h in hq])
            alphas.append(torch.dot(basis[-1], w).item())
            for _ in range(2):  # w ⟂ every q: the three-term recurrence plus full re-orthogonalisation
                w = w - basis.T @ (basis @ w)
            beta = w.norm().item()
            if not math.isfinite(alphas[-1] + beta):  # a diverged model: no eigenvalue to find
                return SharpnessEstimate(math.nan, basis[0], hvps, False)
            eigenvalue, top = _top_ritz_pair(alphas, betas)
            if beta * abs(top[-1].item()) <= rtol * abs(eigenvalue):
                converged = True
                break
            betas.append(beta)
            basis = torch.cat([basis, (w / beta)[None]])
    finally:
        with torch.no_grad():
            for buffer, value in zip(model.buffers(), saved):
                buffer.copy_(value)
    ritz_vector = top.to(basis) @ basis[:len(alphas)]
    return SharpnessEstimate(eigenvalue, ritz_vector / ritz_vector.norm(), hvps, converged)


def _top_ritz_pair(alphas, betas):
    """The largest eigenvalue of the symmetric tridiagonal matrix with diagonal `alphas` and off-diagonal `betas`,
    and its unit eigenvector (float64, on the CPU: the matrix is at most max_iters × max_iters)."""
    off_diagonal = torch.tensor(betas, dtype=torch.float64)
    tridiagonal = (torch.diag(torch.tensor(alphas, dtype=torch.float64)) + torch.diag(off_diagonal, 1)
                   + torch.diag(off_diagonal, -1))
    values, vectors = torch.linalg.eigh(tridiagonal)
    return values[-1].item(), vectors[:, -1]


# ======================================================================================================================
# 3. Toy-model helpers: evaluation points, seed summaries, presets (diag_net.py, two_layer_relu.py)
# ======================================================================================================================

# Flags that do not change what is trained (the sharpness is a measurement that consumes no training randomness): a
# preset run with only these keeps the preset's name.
NEUTRAL_FLAGS = ("seeds", "out_dir", "log_interval", "sharpness_every")
# The knobs of a chaos measurement: a jitter of the initialisation, and the seeds held fixed while it varies
JITTER_FLAGS = ("init_jitter", "data_seed", "student_seed", "sgd_seed")

# How a preset and explicit flags combine (resolve_preset), as both toy scripts print it in --help.
PRESET_RULES = """presets and flags: a preset sets every knob of a paper experiment; any explicit flag overrides that
knob for all runs of the preset. Per-run flags take one value (applied to every run) or one value per run. A flag the
preset does not use is rejected. Runs with any override other than --seeds, --out-dir, --sharpness-every (and diag_net's
--log-interval) are logged as experiment '<preset>_custom', so that a quick check never overwrites the paper's logs and
figures; a chaos measurement (--init-jitter, with or without held seeds, and nothing else) as '<preset>_jitter'."""


def resolve_preset(name, preset, given, per_run):
    """A toy preset combined with the flags given on the command line; returns (config, runs, experiment name).

    preset: {knob: value} for every knob of the experiment; each per-run knob (listed in `per_run`) holds a list with
    one value per run, or one value for every run. given: {knob: value} of the flags the user gave. The rules:
      * a preset sets every knob; any given flag overrides that knob for all runs of the preset;
      * a per-run flag takes one value (applied to every run) or one value per run;
      * a flag the preset does not use is rejected, and so are repeated seeds or two identical runs;
      * with any override other than NEUTRAL_FLAGS the experiment is named '<name>_custom', so that a quick check
        never overwrites the logs and figures of the paper's configuration; '<name>_jitter' when the overrides are a
        nonzero init_jitter and other JITTER_FLAGS only (a chaos measurement of the paper's runs).
    runs: one {per-run knob: value} dict per run. Raises FlagError naming the offending flag.
    """
    for key in given:
        if key not in preset and key not in NEUTRAL_FLAGS:
            raise FlagError(flag_name(key), f"not used by --preset {name}")
    config = {**preset, **given}
    n_runs = max(len(preset[key]) for key in per_run)
    for key in per_run:
        if len(config[key]) not in (1, n_runs):
            raise FlagError(flag_name(key), f"{len(config[key])} values, but --preset {name} has {n_runs} runs: give "
                                            f"1 value (for every run) or {n_runs} (one per run)")
    runs = [{key: config[key][i if len(config[key]) > 1 else 0] for key in per_run} for i in range(n_runs)]
    for i, run in enumerate(runs):
        if run in runs[:i]:
            flag = next((flag_name(key) for key in per_run if key in given), "--preset")
            raise FlagError(flag, f"runs {runs.index(run) + 1} and {i + 1} would be identical; give one value per run")
    seeds = config.get("seeds", [])
    if len(set(seeds)) < len(seeds):  # two runs of one seed would write one log and count twice in seed_summary
        raise FlagError("--seeds", f"repeated seed in {' '.join(map(str, seeds))}")
    changed = set(given) - set(NEUTRAL_FLAGS)
    if not changed:
        experiment = name
    elif config.get("init_jitter") and changed <= set(JITTER_FLAGS):
        experiment = f"{name}_jitter"
    else:
        experiment = f"{name}_custom"
    return config, runs, experiment


def add_preset_flag(parser, presets, flag, text, **kwargs):
    """Add a flag for a preset knob: its help lists every preset's value (the default depends on --preset), and it is
    absent from the parsed arguments unless given, so that resolve_preset sees exactly the explicit overrides."""
    def shown(value):
        if isinstance(value, list):
            return " ".join(map(shown, value))
        return "auto" if value is None else f"{value:g}" if isinstance(value, float) else str(value)

    key = flag[2:].replace("-", "_")
    values = "; ".join(f"{name}: {shown(preset[key])}" for name, preset in presets.items() if key in preset)
    parser.add_argument(flag, default=argparse.SUPPRESS, help=f"{text} [default by preset: {values}]", **kwargs)


def toy_run_names(run):
    """(label, file-name slug) of one toy run, e.g. ('SGD η = 0.282, ÷4.8 at 10 %', 'sgd_lr0.282_div4.8_at0.1').

    run: lr, large_lr_frac, decay, and optionally algorithm (diagonal nets), warmup_factor and warmup_power (ReLU
    toys). A run without decay (÷1) and without warmup (F = 1) is 'constant'.
    """
    warmup = run.get("warmup_factor", 1.0) != 1
    decayed = run["decay"] != 1
    parts = [f"η = {run['lr']:g}"]
    if warmup:
        parts.append(f"warmup ×{run['warmup_factor']:g} (p = {run['warmup_power']:g})")
    if decayed:
        parts.append(f"÷{run['decay']:g} at {100 * run['large_lr_frac']:g} %")
    elif warmup:
        parts.append(f"no decay after {100 * run['large_lr_frac']:g} %")
    else:
        parts.append("constant")
    algorithm = run.get("algorithm")
    label = (f"{algorithm.upper()} " if algorithm else "") + ", ".join(parts)
    slug = run_slug(**({algorithm: True} if algorithm else {}), lr=float(run["lr"]),
                    F=float(run["warmup_factor"]) if warmup else None, p=float(run["warmup_power"]) if warmup else None,
                    div=float(run["decay"]) if decayed else None,
                    at=float(run["large_lr_frac"]) if decayed or warmup else None)
    return label, slug


def eval_iterations(n_iters, n_points, dense_prefix=0):
    """Evaluation iterations of the toy experiments, sorted and unique: {0..dense_prefix−1} ∪ round(linspace(0, N,
    K))[:-1] with N = n_iters, K = n_points (the diagonal nets add every iteration below 100, as the authors do).

    Metrics are taken BEFORE the update of each of these iterations; the last one is the "final" point at which the
    authors print their numbers. np.round rounds halves to even (2.5 -> 2), like the authors' numpy. A point that
    rounds to N (only when K > N) is dropped: there is no iteration N to evaluate before.
    """
    spread = np.round(np.linspace(0, n_iters, n_points)).astype(int)[:-1]
    dense = np.arange(min(dense_prefix, n_iters))
    evals = np.unique(np.concatenate([dense, spread]))
    return evals[evals < n_iters]


# numpy stream keys of the toys' extra draws, apart from every other draw of a run (keys 1-4 are the deep nets' torch
# streams of section 5)
_JITTER_STREAM, _TOY_LABEL_NOISE_STREAM = 7, 8


def jitter_factors(shapes, relative, seed):
    """Factors (1 + relative·ξ), ξ ~ N(0,1), one array per shape in `shapes`, drawn in order from a generator keyed by
    (_JITTER_STREAM, seed) and no other draw of a run. Multiplying the initial weights by them (the toys' --init-jitter)
    measures how chaotic a run is: the spread of its results over tiny changes of the initialisation."""
    rng = np.random.default_rng([_JITTER_STREAM, seed])
    return [1.0 + relative * rng.standard_normal(shape) for shape in shapes]




def toy_label_noise(n_iters, std, seed):
    """std·ξ_t, ξ_t ~ N(0, 1) for t = 0..n_iters−1: the noise added to the target of iteration t's SGD sample (the toys'
    --label-noise-std), fresh at every step, drawn from a generator keyed by (_TOY_LABEL_NOISE_STREAM, seed) that no
    other draw of a run uses: the same seed gives the same noise, and the SGD order and initialisation stay as without
    it."""
    return std * np.random.default_rng([_TOY_LABEL_NOISE_STREAM, seed]).standard_normal(n_iters)


def sharpness_iterations(evals, every):
    """The evaluation iterations at which the toys measure the sharpness for --sharpness-every K: the first evaluation
    iteration in each window [jK, (j + 1)K) of iterations (K = 1: every evaluation; K = 0: none). Iterations, like the
    deep nets' K, and not every K-th evaluation: the toys' evaluation points are denser at the start."""
    evals = np.asarray(evals, dtype=int)
    if not every:
        return evals[:0]
    return evals[np.unique(evals // every, return_index=True)[1]]


BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED = 2000, 0  # fixed resampling seed: a summary is reproducible to the last digit


def median_ci90(values, resamples=BOOTSTRAP_RESAMPLES, seed=BOOTSTRAP_SEED):
    """Bootstrap 90 % confidence interval [5th, 95th percentile] of the median of `values`: the medians of
    `resamples` resamples of the values with replacement, drawn from a generator with a fixed seed."""
    values = np.asarray(values, dtype=np.float64)
    draws = np.random.default_rng(seed).integers(0, len(values), size=(resamples, len(values)))
    lower, upper = np.percentile(np.median(values[draws], axis=1), [5, 95])
    return [float(lower), float(upper)]


def seed_summary(seeds, statuses, finals):
    """One run over its seeds (large-step runs sit at the edge of divergence, so they are compared over seeds):
    which seeds diverged, and the median of every metric of the final records of the others, with a bootstrap 90 %
    confidence interval of that median (median_ci90).

    seeds, statuses, finals: one entry per seed (a deterministic run has seeds [None]); finals are the logs' `final`
    records (the last evaluation, before its update). Only 'completed' seeds enter the medians; `iter` and `lr` are
    not metrics, and a metric some completed seed lacks (or logged as null) is taken over the seeds that have it.
    Both toy scripts store the result as the `seed_summary` key of every log of the run.
    """
    done = [final for status, final in zip(statuses, finals) if status == "completed"]
    diverged = [seed for seed, status in zip(seeds, statuses) if status == "diverged"]
    medians = ci90 = None
    if done:
        keys = [key for key in done[0] if key not in ("iter", "lr")]
        values = {key: [final[key] for final in done if final.get(key) is not None] for key in keys}
        medians = {key: float(np.median(found)) for key, found in values.items() if found}
        ci90 = {key: median_ci90(found) for key, found in values.items() if found}
    return {"seeds": list(seeds), "diverged_seeds": diverged, "fraction_diverged": len(diverged) / len(seeds),
            "median_final": medians, "median_ci90": ci90, "final_iter": done[0]["iter"] if done else None}


def format_median_ci(summary, key):
    """'0.0006098 [0.000512, 0.000731]': a seed summary's median of `key` with its bootstrap 90 % interval."""
    lower, upper = summary["median_ci90"][key]
    return f"{summary['median_final'][key]:.4g} [{lower:.3g}, {upper:.3g}]"


def later_decay_wins(earlier, later, key):
    """Paired comparison of two runs over the same seeds: in how many seeds the run with the later decay ends with a
    lower `key` than the run with the earlier one. earlier, later: {seed: (status, final record)}; a seed counts only
    where both runs completed. Returns {"metric", "wins", "pairs", "fraction"} (fraction None without pairs)."""
    pairs = [(earlier[seed][1][key], later[seed][1][key]) for seed in earlier
             if seed in later and earlier[seed][0] == later[seed][0] == "completed"
             and earlier[seed][1].get(key) is not None and later[seed][1].get(key) is not None]
    wins = sum(late < early for early, late in pairs)
    return {"metric": key, "wins": wins, "pairs": len(pairs), "fraction": wins / len(pairs) if pairs else None}


# A difference counts when it exceeds this many standard errors. A rule of thumb, not a significance level: with 3
# seeds a side, a Welch t-test at 95 % (two-sided) would ask for about 3-4 standard errors, so the verdicts print the
# number of standard errors too.
SEED_NOISE_Z = 2.0


def seed_noise_verdict(expected_lower, expected_higher, z=SEED_NOISE_Z):
    """Does a claim 'A ends lower than B' hold over seeds? expected_lower: A's final values, one per seed;
    expected_higher: B's. The difference of the means d = mean(B) - mean(A) is compared with its standard error
    se = sqrt(var(A)/n_A + var(B)/n_B) (sample variances, ddof 1): 'holds' if d > z·se, 'not reproduced' if d < -z·se
    (the opposite holds), else 'within seed noise'. Returns (verdict, d, se); needs at least 2 values on each side."""
    lower, higher = (np.asarray(values, dtype=np.float64) for values in (expected_lower, expected_higher))
    if len(lower) < 2 or len(higher) < 2:
        raise ValueError(f"a verdict needs at least 2 seeds on each side, got {len(lower)} and {len(higher)}")
    difference = float(higher.mean() - lower.mean())
    error = float(np.sqrt(lower.var(ddof=1) / len(lower) + higher.var(ddof=1) / len(higher)))
    if difference > z * error:
        return "holds", difference, error
    if difference < -z * error:
        return "not reproduced", difference, error
    return "within seed noise", difference, error


def compare_consecutive_decays(runs, logs_per_run):
    """Store in the logs of every decayed run that follows another decayed run of the same algorithm (the preset's
    order: decay at 10 %, then 30 %, then 50 %) its paired comparison with that run over the seeds, as the key
    `vs_earlier_decay` (later_decay_wins on the test loss, or on the training loss where there is no test set).
    runs: the preset's runs; logs_per_run: the finished RunLogs of each run, one per seed."""
    for index in range(1, len(runs)):
        earlier, later = runs[index - 1], runs[index]
        if (earlier["decay"] == 1 or later["decay"] == 1 or earlier.get("algorithm") != later.get("algorithm")
                or later["large_lr_frac"] <= earlier["large_lr_frac"]):  # only a LATER decay is compared
            continue
        outcomes = [{log.data["seed"]: (log.data["status"], log.data["final"]) for log in logs_per_run[i]}
                    for i in (index - 1, index)]
        key = "test_loss" if "test_loss" in logs_per_run[index][0].data["final"] else "train_loss"
        wins = later_decay_wins(*outcomes, key)
        for log in logs_per_run[index]:
            log.finish(log.data["status"], vs_earlier_decay=wins)


# ======================================================================================================================
# 4. Run logs and command line
# ======================================================================================================================

RUN_STATUSES = ("running", "completed", "diverged", "interrupted", "failed")


def to_jsonable(value):
    """Convert numpy/torch scalars and arrays to plain JSON; non-finite floats become null (strict JSON has no NaN)."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json_atomic(path, obj):
    """Write `obj` as strict JSON (NaN/inf -> null) to a temp file in the same folder, then rename it over `path`.

    A reader, a crash of the run or Ctrl-C only ever sees the old complete file or the new complete file. No fsync:
    toy runs rewrite their logs many times a second and an fsync costs 5-10 ms; ext4 and similar file systems flush a
    file's data before a rename that replaces another file, so even an OS crash leaves a complete version.
    """
    text = json.dumps(to_jsonable(obj), allow_nan=False, separators=(",", ":"))  # before the temp file: a failed
    folder, name = os.path.split(os.path.abspath(path))  # encoding leaves nothing behind
    tmp = os.path.join(folder, f".{name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


class RunLog:
    """One JSON log per run: script, config, env, status, history (one record per evaluation, with `iter`), final.

    The file is rewritten atomically after every `record`, so the log on disk is always valid JSON that contains
    everything measured so far. Use as a context manager: Ctrl-C marks the run `interrupted`, any other
    exception `failed` (with the error message), and both still save the log before the exception propagates.
    Add records with `record` (not by editing `data["history"]`, which is kept for reading). path=None keeps the
    log in memory only (the processes of a torchrun run other than rank 0, which writes the file).
    """

    def __init__(self, path, script, config, env=None, history=None, **extra):
        """Start (and save) the log; `history` carries the records of an earlier part of a resumed run."""
        self.path = path
        history = list(history or [])
        self.data = {"script": script, "config": dict(config), "env": env or environment_info(),
                     "status": "running", "history": history, "final": history[-1] if history else None, **extra}
        self.save()

    def record(self, **metrics):
        """Append one evaluation record (must contain `iter`) and save."""
        if "iter" not in metrics:
            raise ValueError("every history record needs an 'iter' key")
        self.data["history"].append(metrics)
        self.data["final"] = metrics
        self.save()

    def finish(self, status="completed", **extra):
        """Set the final status (one of RUN_STATUSES), attach any extra top-level results, and save."""
        if status not in RUN_STATUSES:
            raise ValueError(f"unknown status {status!r}")
        self.data["status"] = status
        self.data.update(extra)
        self.save()

    def save(self):
        """Rewrite the whole log atomically (nothing to write for path=None)."""
        if self.path is not None:
            write_json_atomic(self.path, self.data)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            if self.data["status"] == "running":
                self.finish("completed")
        elif issubclass(exc_type, KeyboardInterrupt):
            self.finish("interrupted")
        else:
            self.finish("failed", error=f"{exc_type.__name__}: {exc}")
        return False


def run_slug(**parts):
    """A file-name-safe run name from key/value parts: run_slug(lr=0.25, decay=None) -> 'lr0.25'.

    No spaces and no '=' (shell- and glob-friendly); None/False parts are skipped, True parts keep only their key.
    """
    pieces = []
    for key, value in parts.items():
        if value is None or value is False:
            continue
        pieces.append(key if value is True else f"{key}{value:g}" if isinstance(value, float) else f"{key}{value}")
    slug = "_".join(pieces) or "run"
    return "".join(c if c.isalnum() or c in "._-" else "-" for c in slug)


def format_seconds(seconds):
    """Human-readable duration: 42s, 3m05s, 2h07m."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show each flag's default, except where the help text already explains it or there is none (None/False)."""

    def _get_help_string(self, action):
        if "default" in (action.help or "") or action.default is None or action.default is False:  # not 0 == False
            return action.help
        return super()._get_help_string(action)


# Flags of earlier versions of the kit -> their names now (one name per concept across the scripts)
RENAMED_FLAGS = {"--decay-frac": "--large-lr-frac", "--d": "--input-dim", "--r": "--support-size", "--out": "--out-dir",
                 "--n": "--n-train", "--decay-factor": "--decay", "--n-evals": "--eval-points"}


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors (`prog: error: argument --lr: ... (see --help)`, exit code 2) and a suggestion
    for a mistyped flag (`--lr_init` -> "did you mean --lr?"). The stock parser prints the whole usage block first; a
    researcher scanning a sweep's stderr wants one line that names the flag."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        kwargs.setdefault("allow_abbrev", False)  # `--lr` must never silently match `--lr-schedule`
        super().__init__(*args, **kwargs)

    def error(self, message):
        if message.startswith("unrecognized arguments:"):
            message += self._suggestion(message.split(":", 1)[1].split())
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")

    def _suggestion(self, unknown):
        """'; did you mean --lr?' for the first unknown flag that extends a known one (--lr_init, --lr-init -> --lr)
        or is spelled closely (--larg-lr-frac -> --large-lr-frac); '' if none is."""
        known = [flag for action in self._actions for flag in action.option_strings if flag.startswith("--")]
        for word in unknown:
            typed = word.split("=")[0].replace("_", "-")
            if RENAMED_FLAGS.get(typed) in known:
                return f"; {typed} is now {RENAMED_FLAGS[typed]}"
            if typed.startswith("--"):
                extended = [flag for flag in known if typed.startswith(flag + "-")]
                close = extended or difflib.get_close_matches(typed, known, n=1, cutoff=0.6)
                if close:
                    return f"; did you mean {max(close, key=len)}?"
        return ""


class FlagError(ValueError):
    """A bad value of one command-line flag. The scripts print it as a one-line usage error naming `flag`."""

    def __init__(self, flag, message):
        super().__init__(f"{flag}: {message}")
        self.flag, self.message = flag, message


def flag_name(dest):
    """The command-line flag of an argparse destination, 'large_lr_frac' -> '--large-lr-frac' (to name it in errors)."""
    return "--" + dest.replace("_", "-")


def usage_error(flag, message):
    """Stop with a one-line usage error naming `flag` and exit code 2 (for checks argparse cannot express).
    Command-line layer only: library functions raise exceptions instead."""
    prog = os.path.basename(sys.argv[0]) or "python"
    sys.stderr.write(f"{prog}: error: argument {flag}: {message}\n")
    raise SystemExit(2)


def _number_type(cast, check, requirement):
    """Build an argparse `type=` callable that casts, validates and explains the requirement when it fails."""

    def parse(text):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {requirement}, got {text!r}") from None
        if not check(value):
            raise argparse.ArgumentTypeError(f"expected {requirement}, got {text!r}")
        return value

    parse.__name__ = requirement  # argparse shows this name in some messages
    return parse


positive_float = _number_type(float, lambda v: math.isfinite(v) and v > 0, "a number > 0")
nonnegative_float = _number_type(float, lambda v: math.isfinite(v) and v >= 0, "a number >= 0")
fraction = _number_type(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")
positive_int = _number_type(int, lambda v: v > 0, "an integer >= 1")
nonnegative_int = _number_type(int, lambda v: v >= 0, "an integer >= 0")


def prepare_out_dir(path, flag="--out-dir"):
    """Create the output folder at start-up and prove it is writable, so a long run never fails at its first save."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as err:
        usage_error(flag, f"cannot write to {path!r} ({err.strerror or err}); pass a writable folder")
    return path


def seed_everything(seed):
    """Seed python, numpy's legacy global generator and torch (CPU and all CUDA devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name):
    """Map `auto|cpu|cuda|mps` to a torch.device; `auto` prefers CUDA, then Apple MPS, then CPU."""
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("CUDA was requested but torch sees no CUDA device; use --device cpu or auto")
    if name == "mps" and not mps:
        raise ValueError("MPS was requested but is not available; use --device cpu or auto")
    return torch.device(name)


def _git_commit():
    """The repository's commit hash, or None outside a git checkout (e.g. after copying a script elsewhere)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def cpu_name():
    """The CPU model as /proc/cpuinfo names it (lscpu's "Model name"), else what the platform module knows."""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def environment_info(device="cpu"):
    """Versions and hardware, stored in every log so that a number can be traced to where it was produced."""
    device = torch.device(device)
    return {"python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
            "numpy": np.__version__, "cuda": torch.version.cuda, "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
            "torch_threads": torch.get_num_threads(), "git_commit": _git_commit(),
            "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:])}


# ======================================================================================================================
# 5. Image data
# ======================================================================================================================
#
# The deep-net scripts keep a whole data set as uint8 tensors on the training device (as airbench does): a batch is
# an index slice of a seeded permutation, augmentation is a few tensor ops on the whole batch, and there is no
# DataLoader and no per-image Python code in the training loop. All randomness is a pure function of (seed, epoch)
# or (seed, step), so a resumed run replays exactly the same batches without saving generator state.

IMAGE_DATASETS = ("cifar10", "cifar100", "tinyimagenet", "synthetic")  # `choices=` for --dataset
SYNTHETIC_TRAIN, SYNTHETIC_TEST = 2560, 512  # size of the generated "synthetic" set (32×32, 10 classes)

# Where each data set lives under data_dir (the layouts torchvision downloads) and the official archive a download
# fetches. Only a downloaded archive's MD5 is checked: extracted files are read as they are, so re-encoded copies
# with other checksums load too.
IMAGE_SOURCES = {
    "cifar10": dict(title="CIFAR-10", folder="cifar-10-batches-py", num_classes=10, label_key="labels",
                    train=[f"data_batch_{k}" for k in range(1, 6)], test=["test_batch"],
                    expect="data_batch_1..5 and test_batch", size="170 MB",
                    url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                    md5="c58f30108f718f92721af3b95e74349a"),
    "cifar100": dict(title="CIFAR-100", folder="cifar-100-python", num_classes=100, label_key="fine_labels",
                     train=["train"], test=["test"], expect="train and test", size="170 MB",
                     url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                     md5="eb9058c3a382ffc7106e4002c42a8d85"),
    "tinyimagenet": dict(title="Tiny ImageNet", folder="tiny-imagenet-200",
                         train=["wnids.txt", "train"], test=[os.path.join("val", "val_annotations.txt")],
                         expect="wnids.txt, train/ and val/val_annotations.txt", size="250 MB",
                         url="http://cs231n.stanford.edu/tiny-imagenet-200.zip",
                         md5="90528d7ca1a48142e341f4ef8d21d0de"),
}

# Tags that give each consumer of (seed, index) its own random stream: epoch e's permutation and step e's
# augmentation must not share random numbers.
_PERMUTATION_STREAM, _AUGMENT_STREAM, _SYNTHETIC_STREAM, _LABEL_NOISE_STREAM = 1, 2, 3, 4
_SYNTHETIC_SEED = 20230  # fixed: the synthetic set is the same whatever --seed a run uses


class DownloadError(RuntimeError):
    """Fetching a data set failed (no network, MD5 mismatch, full disk, ...): the environment, not the arguments."""


class ImageDataset(typing.NamedTuple):
    """A whole image-classification data set in memory. Images are uint8 N×3×H×W (RGB, 0..255; convert batches with
    images_to_float), labels int64 in [0, num_classes)."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    num_classes: int
    name: str

    def to(self, device):
        """The same data set with its four tensors on `device`."""
        return self._replace(**{field: getattr(self, field).to(device) for field in self._fields[:4]})


def load_image_dataset(name, data_dir, download=False):
    """Load an image data set (`name` in IMAGE_DATASETS) as an ImageDataset on the CPU.

    - cifar10 / cifar100: the python pickles in <data_dir>/cifar-10-batches-py/ or <data_dir>/cifar-100-python/.
    - tinyimagenet: <data_dir>/tiny-imagenet-200/ (200 classes in wnids.txt order, 64×64; test set = the 10 000 val
      images; decoding the 110 000 JPEGs takes ~20-40 s on a laptop CPU).
    - synthetic: a generated set (no files; data_dir is ignored), see synthetic_image_dataset.
    download=True fetches a missing data set from its official archive (MD5-checked) into data_dir.
    Raises FileNotFoundError for missing data, ValueError for an unreadable file, DownloadError for a failed download.
    """
    if name == "synthetic":
        return synthetic_image_dataset()
    if name not in IMAGE_SOURCES:
        raise ValueError(f"unknown image data set {name!r}; expected one of {IMAGE_DATASETS}")
    folder = _locate_image_data(name, data_dir, download)
    return _read_tiny_imagenet(folder) if name == "tinyimagenet" else _read_cifar(name, folder)


def keep_first_train(data, n_train):
    """Keep the first n_train training images (a copy, so the rest can be freed); the test set is untouched."""
    available = len(data.train_labels)
    if not 1 <= n_train <= available:
        raise ValueError(f"{n_train} training images requested but {data.name} has {available}")
    return data._replace(train_images=data.train_images[:n_train].clone(),
                         train_labels=data.train_labels[:n_train].clone())


def _image_data_present(source, folder):
    return all(os.path.exists(os.path.join(folder, path)) for path in source["train"] + source["test"])


def _locate_image_data(name, data_dir, download):
    """The data set's folder under data_dir, downloading it first if asked."""
    source = IMAGE_SOURCES[name]
    folder = os.path.join(data_dir, source["folder"])
    if not _image_data_present(source, folder) and download:
        _download_image_data(source, data_dir)
    if _image_data_present(source, folder):
        return folder
    if _image_data_present(source, data_dir):  # the user pointed INTO the data set's folder
        raise FileNotFoundError(f"{data_dir} is the {source['folder']}/ folder itself; point the data directory at "
                                f"its parent, {os.path.dirname(os.path.abspath(data_dir))}")
    raise FileNotFoundError(f"{source['title']} not found: expected {source['expect']} in {folder}; download it "
                            f"(--download, about {source['size']}) or point the data directory at the folder that "
                            f"holds {source['folder']}/")


def _download_image_data(source, data_dir):
    """Fetch and extract the official archive into data_dir (torchvision checks its MD5 before extracting)."""
    print(f"downloading {source['title']} (about {source['size']}) from {source['url']} into {data_dir}", flush=True)
    try:
        from torchvision.datasets.utils import download_and_extract_archive

        os.makedirs(data_dir, exist_ok=True)
        download_and_extract_archive(source["url"], download_root=data_dir, md5=source["md5"], remove_finished=True)
    except Exception as err:  # every cause gets the same one-line advice instead of a traceback
        reason = " ".join(str(err).split()) or type(err).__name__
        raise DownloadError(f"downloading {source['title']} from {source['url']} failed ({reason}); fetch and extract "
                            f"it by hand so that {os.path.join(data_dir, source['folder'])}/ exists") from None


def _read_cifar(name, folder):
    source = IMAGE_SOURCES[name]
    train = [_read_cifar_file(os.path.join(folder, f), source) for f in source["train"]]
    test = [_read_cifar_file(os.path.join(folder, f), source) for f in source["test"]]
    return ImageDataset(train_images=torch.from_numpy(np.concatenate([images for images, _ in train])),
                        train_labels=torch.from_numpy(np.concatenate([labels for _, labels in train])),
                        test_images=torch.from_numpy(np.concatenate([images for images, _ in test])),
                        test_labels=torch.from_numpy(np.concatenate([labels for _, labels in test])),
                        num_classes=source["num_classes"], name=name)


def _read_cifar_file(path, source):
    """One CIFAR pickle -> (uint8 N×3×32×32, int64 N). Each row of `data` is the R, then G, then B 32×32 plane."""
    try:
        with open(path, "rb") as f:
            # latin1 decodes the byte strings of the original Python 2 pickles; files written by Python 3 load too
            entry = pickle.load(f, encoding="latin1")
        entry = {key.decode("latin1") if isinstance(key, bytes) else key: value for key, value in entry.items()}
        data = np.ascontiguousarray(entry["data"], dtype=np.uint8)
        labels = np.asarray(entry[source["label_key"]], dtype=np.int64)
    except Exception as err:  # a damaged or foreign file: one line naming it, not a traceback
        raise ValueError(f"{path} is not a readable {source['title']} file ({type(err).__name__}: {err})") from None
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or labels.shape != (len(data),):
        raise ValueError(f"{path}: expected `data` of shape N×3072 and N labels, got {data.shape} and {labels.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() >= source["num_classes"]):
        raise ValueError(f"{path}: labels outside 0..{source['num_classes'] - 1}")
    return data.reshape(-1, 3, 32, 32), labels


def _read_tiny_imagenet(folder):
    """Tiny ImageNet as an ImageDataset: classes in wnids.txt order; the training images class-interleaved (the k-th
    image of every class, then the (k+1)-th, ...), so that any prefix (--n-train, or the fixed images that measure
    feature sparsity) is class-balanced, as CIFAR's is; every epoch is shuffled anyway."""
    with open(os.path.join(folder, "wnids.txt")) as f:
        wnids = [line.strip() for line in f if line.strip()]
    index = {wnid: k for k, wnid in enumerate(wnids)}
    files, labels, ranks = [], [], []
    for k, wnid in enumerate(wnids):
        image_dir = os.path.join(folder, "train", wnid, "images")
        if not os.path.isdir(image_dir):
            raise FileNotFoundError(f"{image_dir} is missing (class {wnid} of wnids.txt)")
        names = sorted(n for n in os.listdir(image_dir) if n.lower().endswith((".jpeg", ".jpg")))
        files += [os.path.join(image_dir, n) for n in names]
        labels += [k] * len(names)
        ranks += range(len(names))
    order = np.lexsort((labels, ranks))  # primary key: rank within the class; ties broken by class
    val_files, val_labels = [], []
    with open(os.path.join(folder, "val", "val_annotations.txt")) as f:
        for line in f:
            fields = line.rstrip("\r\n").split("\t")  # file, wnid, bounding box
            if len(fields) < 2:
                continue
            if fields[1] not in index:
                raise ValueError(f"val_annotations.txt labels {fields[0]} with {fields[1]}, which is not in wnids.txt")
            val_files.append(os.path.join(folder, "val", "images", fields[0]))
            val_labels.append(index[fields[1]])
    return ImageDataset(train_images=_decode_jpegs([files[i] for i in order]),
                        train_labels=torch.tensor(labels)[order], test_images=_decode_jpegs(val_files),
                        test_labels=torch.tensor(val_labels, dtype=torch.int64), num_classes=len(wnids),
                        name="tinyimagenet")


def _decode_jpegs(paths, size=64):
    """Decode image files into one uint8 N×3×size×size tensor. PIL's convert("RGB") turns greyscale JPEGs (the real
    set has some) into 3 equal channels."""
    from PIL import Image

    pixels = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as image:
                pixels[i] = np.asarray(image.convert("RGB"))
        except (OSError, ValueError) as err:  # includes PIL.UnidentifiedImageError and a wrong image size
            raise ValueError(f"cannot decode {path} as a {size}×{size} image ({err})") from None
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()  # H×W×3 -> 3×H×W


def synthetic_image_dataset():
    """A generated 10-class set of 32×32 RGB images: SYNTHETIC_TRAIN (2 560) train / SYNTHETIC_TEST (512) test images.

    Class c has its own mean colour and its own sinusoidal stripes (orientation c·18°, 2, 3 or 4 periods per image,
    a stripe colour); an image is its class's stripes at a random phase (i.e. randomly shifted) plus Gaussian pixel
    noise of std 0.25 (a quarter of the pixel range). Labels cycle 0..9, so every prefix of 10k images is balanced.
    Learnable but not trivial: a nearest-class-mean classifier gets ~89 % test accuracy; a 2-layer conv net trained
    for 4 epochs with augment_batch reaches ~31 % test error (chance: 90 %). Deterministic: a fixed data seed,
    independent of the training --seed.
    """
    generator = torch.Generator().manual_seed(_stream_seed(_SYNTHETIC_STREAM, _SYNTHETIC_SEED, 0))
    colours, stripe_colours = torch.randn(2, 10, 3, 1, 1, generator=generator)
    angles = torch.arange(10) * math.pi / 10
    frequencies = 2 * math.pi * (2 + torch.arange(10) % 3) / 32  # radians per pixel
    n_total = SYNTHETIC_TRAIN + SYNTHETIC_TEST
    labels = torch.arange(n_total) % 10
    phases = 2 * math.pi * torch.rand(n_total, 1, 1, generator=generator)
    y, x = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    along = x * angles.cos()[labels, None, None] + y * angles.sin()[labels, None, None]  # N×32×32
    stripes = torch.sin(frequencies[labels, None, None] * along + phases)
    images = 0.5 + 0.05 * colours[labels] + 0.1 * stripes[:, None] * stripe_colours[labels]
    images = images + 0.25 * torch.randn(n_total, 3, 32, 32, generator=generator)
    images = (255 * images).round().clamp(0, 255).to(torch.uint8)
    return ImageDataset(train_images=images[:SYNTHETIC_TRAIN].clone(), train_labels=labels[:SYNTHETIC_TRAIN].clone(),
                        test_images=images[SYNTHETIC_TRAIN:].clone(), test_labels=labels[SYNTHETIC_TRAIN:].clone(),
                        num_classes=10, name="synthetic")


def _stream_seed(stream, seed, index):
    """A 63-bit torch seed that is a pure function of (stream, seed, index).

    numpy's SeedSequence hashes the three integers, so nearby (seed, index) pairs give unrelated streams.
    """
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0, got seed={seed}, index={index}")
    high, low = np.random.SeedSequence([stream, seed, index]).generate_state(2, dtype=np.uint32)
    return (int(high) & 0x7FFFFFFF) << 32 | int(low)


def epoch_batches(n, batch_size, epoch, seed, device="cpu"):
    """The mini-batches of epoch `epoch`: a (n // batch_size, batch_size) tensor of training-image indices, row i the
    batch of the epoch's i-th step. A pure function of (seed, epoch).

    The epoch's seeded permutation of the n images, cut into full batches; the n mod batch_size images left over
    (different ones each epoch) are not used in that epoch, as with the authors' loader (`drop_last`). Kept, that
    short batch would be a step with a gradient several times noisier than the others at the same large step size,
    every epoch: with 10 000 = 39·256 + 16 images it stops the large-step phase from ever fitting the data.
    Stateless, so a run resumed at epoch e replays exactly the batches of an uninterrupted run. Drawn on the CPU
    (then moved to `device`), so CPU and GPU runs with the same seed see the same batches.
    """
    if not 0 < batch_size <= n:
        raise ValueError(f"the batch size must be between 1 and the number of training images ({n}), got {batch_size}")
    generator = torch.Generator().manual_seed(_stream_seed(_PERMUTATION_STREAM, seed, epoch))
    permutation = torch.randperm(n, generator=generator)
    steps = n // batch_size
    return permutation[:steps * batch_size].view(steps, batch_size).to(device)


def augment_batch(images, seed, step, padding=4):
    """Random crop with `padding` zero pixels on each side (output the input size) and random horizontal flip.

    The standard CIFAR augmentation of the authors' code (RandomCrop(32, padding=4) + RandomHorizontalFlip): the
    crop's top-left corner is uniform in {0..2·padding}² of the zero-padded image and each image is mirrored with
    probability 1/2. Vectorised over the batch on its own device (one gather, no per-image loop). The random numbers
    are a pure function of (seed, step), drawn on the CPU, so resumed and CPU/GPU runs augment identically.
    images: uint8 (or float) B×C×H×W. Returns a new tensor of the same shape, dtype and device.
    """
    n, _, height, width = images.shape
    generator = torch.Generator().manual_seed(_stream_seed(_AUGMENT_STREAM, seed, step))
    offsets = torch.randint(0, 2 * padding + 1, (2, n), generator=generator)
    flips = torch.randint(0, 2, (1, n), generator=generator)
    top, left, flip = torch.cat([offsets, flips]).to(images.device)  # one host-to-device copy
    padded = torch.nn.functional.pad(images, (padding, padding, padding, padding))
    return _crop_windows(padded, top, left, flip == 1, height, width)


def label_noise(labels, num_classes, fraction, seed, step):
    """The labels of step `step`'s batch under label-noise SGD: each label, with probability `fraction`, is replaced
    by one drawn uniformly from all num_classes classes (possibly itself: on average fraction·(1 − 1/C) of the labels
    change). The authors' per-batch label noise (their sgd_p_label_noise) draws a Binomial(B, P) number of positions
    at random and gives them uniform labels: the same distribution. Fresh at every step, a pure function of
    (seed, step) drawn on the CPU from a stream of its own, like augment_batch, so that resumed and CPU/GPU runs get
    the same noise. labels: int64 tensor on any device; returns a new tensor.
    """
    generator = torch.Generator().manual_seed(_stream_seed(_LABEL_NOISE_STREAM, seed, step))
    noisy = torch.rand(len(labels), generator=generator) < fraction
    random_labels = torch.randint(num_classes, (len(labels),), generator=generator)
    return torch.where(noisy.to(labels.device), random_labels.to(labels.device), labels)


def _crop_windows(padded, top, left, flip, height, width):
    """Window [top_i : top_i + height, left_i : left_i + width] of each image i of `padded`, mirrored where flip_i.

    One gather with per-image flat pixel indices: output pixel (y, x) of image i reads padded pixel
    (top_i + y, left_i + x), or (top_i + y, left_i + width − 1 − x) when mirrored.
    """
    n, channels, _, padded_width = padded.shape
    rows = top[:, None] + torch.arange(height, device=padded.device)
    cols = left[:, None] + torch.arange(width, device=padded.device)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    index = (rows[:, :, None] * padded_width + cols[:, None, :]).reshape(n, 1, height * width)
    windows = padded.reshape(n, channels, -1).gather(2, index.expand(n, channels, height * width))
    return windows.reshape(n, channels, height, width)


def images_to_float(images, channels_last=False):
    """uint8 images -> float32 in [0, 1] (x / 255; no per-channel normalisation, as in the authors' code), optionally
    in the channels_last memory format."""
    images = images.float().div_(255)
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images


# ======================================================================================================================
# 6. Deep-net building blocks (train_resnet.py, train_densenet.py)
# ======================================================================================================================

DIVERGENCE_CHECK_EVERY = 25  # steps between finite-loss checks: one host sync each, never one per step
# flags that may differ between the parts of a resumed run: evaluation never changes the training trajectory (nor
# does how often the sharpness is measured), the memory format only its rounding (apply_channels_last may also switch
# channels_last off on one device, not another), and neither does where the data lives or whether it may be downloaded;
# --sync-bn may change with the number of processes (load_checkpoint checks the BatchNorm share it results in)
RESUME_MAY_CHANGE = {"resume", "restart", "stop_at_epoch", "device", "eval_batch_size", "channels_last", "data_dir",
                     "download", "sharpness_every", "sync_bn"}


def check_deep_net_args(args):
    """Cross-flag checks argparse cannot express, as one-line usage errors."""
    if args.lr_schedule == "piecewise" and not args.large_lr_frac < 0.9:
        usage_error("--large-lr-frac", f"must be below 0.9 (the ÷100 phase starts at 0.9·E), got {args.large_lr_frac}")
    if args.momentum >= 1:
        usage_error("--momentum", f"must be in [0, 1), got {args.momentum}")
    if args.stop_at_epoch is not None and args.stop_at_epoch >= args.epochs:
        usage_error("--stop-at-epoch", f"must be below --epochs ({args.epochs}), got {args.stop_at_epoch}")


def default_eval_batch_size(device):
    """Images per evaluation forward pass: 128 on CPU, where small batches stay in cache (measured 2× faster than 512
    on a 2-core CPU), 512 on accelerators."""
    return 128 if device.type == "cpu" else 512


def configure_backend(args, device):
    """Apply --precision / --deterministic to torch's global settings (call it from main(), never at import) and
    resolve the device-dependent default of --eval-batch-size; returns the precision actually used."""
    if args.eval_batch_size is None:
        args.eval_batch_size = default_eval_batch_size(device)
    precision = args.precision if device.type == "cuda" else "fp32"
    if precision != args.precision:
        print(f"note: --precision {args.precision} applies to CUDA only; running fp32 on {device.type}")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = precision != "fp32"
        torch.backends.cudnn.allow_tf32 = precision != "fp32"  # PyTorch enables TF32 convs by default
        torch.backends.cudnn.benchmark = not args.deterministic
        torch.backends.cudnn.deterministic = args.deterministic
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    return precision


def apply_channels_last(args, model, device):
    """Move the model to channels_last if --channels-last (faster convolutions on CPU and GPU). Exception: torch
    2.14's oneDNN CPU backward of a channels_last 1×1 strided conv with 2-7 input channels crashes, hangs or returns
    wrong weight gradients with its AVX2 kernels (reproduced with ONEDNN_MAX_CPU_ISA=AVX2). Such models (ResNet-18 at
    --width 2-7) run NCHW on every CPU, since oneDNN picks its kernels at run time; args.channels_last is set to
    False, so that the logged config and the input batches follow."""
    broken = any(isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1) and max(m.stride) > 1
                 and 2 <= m.in_channels <= 7 for m in model.modules())
    if args.channels_last and device.type == "cpu" and broken:
        print("note: running without channels_last: torch's CPU backward of a channels_last 1×1 strided conv with "
              "2-7 input channels is broken (crashes or wrong gradients); use --width 8 or more for channels_last")
        args.channels_last = False
    return model.to(memory_format=torch.channels_last) if args.channels_last else model


def load_data(args, device):
    """The run's data set (--dataset, --data-dir, --download, --n-train) on `device`. Command-line layer: missing or
    unreadable data and a too large --n-train are one-line usage errors (exit 2), a failed download exits with 1."""
    try:
        data = load_image_dataset(args.dataset, args.data_dir, args.download)
    except DownloadError as err:
        sys.stderr.write(f"{os.path.basename(sys.argv[0]) or 'python'}: error: {err}\n")
        raise SystemExit(1) from None
    except (OSError, ValueError) as err:
        usage_error("--data-dir", str(err))
    if args.n_train is not None and args.n_train != len(data.train_labels):
        try:
            data = keep_first_train(data, args.n_train)
        except ValueError as err:
            usage_error("--n-train", str(err))
    if args.batch_size > len(data.train_labels):
        usage_error("--batch-size", f"must be at most the number of training images ({len(data.train_labels)}): "
                                    "every step takes one full batch")
    return data.to(device)


def run_name(args, experiment, **model_parts):
    """File-name stem of a deep-net run: experiment, schedule, optimiser and size flags, model parts, seed."""
    schedule = {"constant": {}, "piecewise": {"warm": args.warmup_exp, "T": args.large_lr_frac}}[args.lr_schedule]
    parts = {"lr": args.lr, args.lr_schedule: True, **schedule, "mom": args.momentum or None,
             "wd": args.weight_decay or None, "aug": args.augment, "ln": args.label_noise or None, "ep": args.epochs,
             "bs": args.batch_size, "n": args.n_train, **model_parts}
    return f"{experiment}_{run_slug(**parts)}_seed{args.seed}"


def schedule_label(args):
    """Human label of a run's step-size schedule: the `run` key of its log and its plot legend."""
    if args.lr_schedule == "constant":
        label = f"η = {args.lr:g} constant"
    elif args.warmup_exp == 1:
        label = f"η0 = {args.lr:g}, decay at {100 * args.large_lr_frac:g} %"
    else:
        kind = "exp." if args.warmup_exp > 1 else "power"
        label = f"η0 = {args.lr:g}, {kind} warmup w = {args.warmup_exp:g}, decay at {100 * args.large_lr_frac:g} %"
    if args.momentum or args.weight_decay or args.augment:
        label += f" (mom {args.momentum:g}, wd {args.weight_decay:g}{', aug' if args.augment else ''})"
    if getattr(args, "label_noise", 0):
        label += f", label noise {args.label_noise:g}"
    return label


@torch.no_grad()
def evaluate_classifier(model, data, blocks, args, autocast=False):
    """The metrics of one evaluation, in eval mode: train loss/error and the feature sparsity of every block from ONE
    pass over the first --sparsity-examples (fixed, unaugmented) training images, then test loss/error on the whole
    test set. Keys: train_loss, train_error, test_loss, test_error, and density_all_<block>, density_<block>,
    density_dedup_<block> (see BlockActivations.feature_sparsity)."""
    model.eval()
    n = min(args.sparsity_examples, len(data.train_labels))
    with BlockActivations(model, blocks, args.sparsity_neurons, args.seed) as acts:
        train_loss, train_error = _loss_and_error(model, data.train_images[:n], data.train_labels[:n], args, autocast)
    test_loss, test_error = _loss_and_error(model, data.test_images, data.test_labels, args, autocast)
    model.train()
    metrics = {"train_loss": train_loss, "train_error": train_error, "test_loss": test_loss, "test_error": test_error}
    for block, densities in acts.feature_sparsity(args.tau).items():
        metrics.update({f"{kind}_{block}": value for kind, value in densities.items()})
    return metrics


def _loss_and_error(model, images, labels, args, autocast):
    """Mean cross-entropy and error rate over an image set, in --eval-batch-size chunks (one host sync at the end)."""
    loss_sum = torch.zeros((), device=images.device)
    errors = torch.zeros((), device=images.device, dtype=torch.long)
    for chunk, target in zip(images.split(args.eval_batch_size), labels.split(args.eval_batch_size)):
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = model(images_to_float(chunk, args.channels_last)).float()
        loss_sum += torch.nn.functional.cross_entropy(logits, target, reduction="sum")
        errors += (logits.argmax(dim=1) != target).sum()
    return loss_sum.item() / len(labels), errors.item() / len(labels)


# what every deep-net checkpoint holds (the scripts' checkpoint() calls save exactly these)
CHECKPOINT_KEYS = {"model", "optimizer", "step", "window_loss", "window_steps", "elapsed", "args", "torch_rng"}


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: unreadable, not a checkpoint, or carrying a pickled Python object."""


def save_checkpoint(path, **state):
    """torch.save to a temp file, then rename it over `path`: a crash or Ctrl-C never leaves a broken checkpoint.
    `state` must hold only tensors, numbers, strings, None, lists and dicts, so that read_checkpoint can load it."""
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)


def read_checkpoint(path, device="cpu"):
    """Load a checkpoint with torch.load(weights_only=True), which rebuilds tensors and plain containers only: a
    pickled object in a file someone shared (torch's full unpickler calls whatever function the file names) is
    refused, never run. Raises CheckpointError, with a one-line reason, for that and for any unreadable file."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except OSError as err:
        raise CheckpointError(f"cannot read {path} ({err.strerror or err})") from None
    except pickle.UnpicklingError as err:
        # torch names the refused object as "Unsupported global: GLOBAL module.name was not an allowed global ..."
        name = str(err).partition("Unsupported global: GLOBAL ")[2].split(" ")[0]
        if name:
            raise CheckpointError(f"{path} carries a pickled Python object ({name}); refusing to load it, since "
                                  "loading would run code the file names (checkpoints of this kit hold only tensors, "
                                  "numbers, strings, lists and dicts)") from None
        raise CheckpointError(f"{path} is not a torch checkpoint") from None
    except (RuntimeError, EOFError, ValueError):  # what torch raises for empty, truncated or foreign files
        raise CheckpointError(f"{path} is not a readable torch checkpoint (empty, truncated or another kind of "
                              "file)") from None
    if not isinstance(state, dict) or not CHECKPOINT_KEYS <= state.keys():
        raise CheckpointError(f"{path} is not a checkpoint of train_resnet.py or train_densenet.py")
    return state


def load_checkpoint(path, args, device, batchnorm_share=None):
    """The checkpoint of this exact run, for --resume, with torch's RNG state restored. Command-line layer: a missing,
    unreadable or unsafe checkpoint, one made with other flags (except RESUME_MAY_CHANGE), or one whose BatchNorm
    statistics were over another number of images (Processes.batchnorm_share: None = the whole batch; a checkpoint
    without the key is from one process) is a one-line usage error."""
    if not os.path.exists(path):
        usage_error("--resume", f"no checkpoint at {path}; start the run without --resume (resume needs the same flags "
                                "and --out-dir as the original run)")
    try:
        state = read_checkpoint(path, device)
    except CheckpointError as err:
        usage_error("--resume", str(err))
    changed = [key for key, value in state["args"].items()
               if key not in RESUME_MAY_CHANGE and vars(args).get(key) != value]
    if changed:
        usage_error("--resume", f"the checkpoint was made with different {', '.join(map(flag_name, changed))}; use "
                                "the original flags")
    if state.get("batchnorm_share") != batchnorm_share:
        then, now = (f"{share} images per process" if share else "the whole batch"
                     for share in (state.get("batchnorm_share"), batchnorm_share))
        usage_error("--resume", f"the checkpoint's BatchNorm statistics were over {then}, this run's would be over "
                                f"{now}: resume it on as many processes (torchrun --nproc-per-node), or with "
                                "SyncBatchNorm on CUDA")
    torch.set_rng_state(state["torch_rng"])
    return state


def logged_history(path, last_iter):
    """The records of the log at `path` up to iteration last_iter: a resumed run continues its log from there."""
    with open(path) as f:
        return [record for record in json.load(f)["history"] if record["iter"] <= last_iter]


def check_earlier_run(args, log_path, checkpoint_path):
    """Never overwrite this run's own log or checkpoint unasked (re-running the command of an interrupted run used to
    restart it from iteration 0 and destroy both): with neither --resume nor --restart, a run whose log or checkpoint
    is already there, finished or not, stops with a one-line usage error saying which flag to pass. --restart deletes
    both, so that a restart that fails early never leaves the old checkpoint beside the new log. Command-line layer."""
    found = [path for path in (log_path, checkpoint_path) if os.path.exists(path)]
    if args.resume or not found:
        return
    if args.restart:
        for path in found:
            os.remove(path)
        return
    status = _logged_status(log_path)
    if status in ("completed", "diverged"):
        usage_error("--restart", f"this run has already ended ({status}; log {log_path}); pass --restart to delete "
                                 "its log and checkpoint and run it again")
    if os.path.exists(checkpoint_path):
        usage_error("--resume", f"this run stopped before its end and left a checkpoint, {checkpoint_path} (log "
                                f"status: {status or 'no readable log'}); continue it with --resume, or pass --restart "
                                "to delete its checkpoint and log and start over")
    usage_error("--restart", f"this run's log {log_path} (status: {status or 'unreadable'}) is already there, with no "
                             "checkpoint to resume from; pass --restart to delete it and start over")


def _logged_status(path):
    """The status of the run log at `path`, or None if there is no readable log."""
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        with open(path) as f:
            return json.load(f)["status"]
    return None


class StopOnSignal:
    """While open, the first Ctrl-C or SIGTERM (which job schedulers send before killing a job) only sets `requested`
    to the signal's number, so that the training loop can finish its step, checkpoint and mark the log; a second
    one raises KeyboardInterrupt at once. repeat_aborts=False (the processes of a torchrun run) ignores a second one:
    torchrun's workers get a signal from torchrun, which forwards Ctrl-C and SIGTERM and kills them itself if they have
    not ended after its --shutdown-timeout (30 s), and under SLURM also from the scheduler (both at once); the loop
    stops at the next step the processes agree on (see the scripts)."""

    def __init__(self, repeat_aborts=True):
        self.requested, self.previous, self.repeat_aborts = 0, {}, repeat_aborts

    def __enter__(self):
        self.previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc_info):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        return False

    def _handle(self, signum, frame):
        if self.requested:
            if self.repeat_aborts:
                raise KeyboardInterrupt
            return
        self.requested = signum
        then = "after this step (send it again to abort at once)" if self.repeat_aborts else \
            f"at the next step the processes agree on (at most {DIVERGENCE_CHECK_EVERY} steps)"
        print(f"\n{signal.Signals(signum).name}: stopping {then}", flush=True)


class RunClock:
    """Wall time of a run: training images and seconds (for images/s, evaluation excluded) and evaluation seconds
    (for the ETA). elapsed_before: wall time of the earlier parts of a resumed run."""

    def __init__(self, elapsed_before=0.0):
        now = time.perf_counter()
        self.start, self.window_start, self.in_evaluation = now - elapsed_before, now, False
        self.train_seconds = self.eval_seconds = 0.0
        self.steps = self.images = self.evals = 0

    def add_step(self, n_images):
        self.steps += 1
        self.images += n_images

    @contextlib.contextmanager
    def evaluating(self):
        """Time the body as evaluation, not training."""
        start = time.perf_counter()
        self.train_seconds += start - self.window_start
        self.in_evaluation = True
        try:
            yield
        finally:
            self.window_start = time.perf_counter()
            self.eval_seconds += self.window_start - start
            self.evals += 1
            self.in_evaluation = False

    def elapsed(self):
        return time.perf_counter() - self.start

    def images_per_sec(self):
        """Training images per second so far (evaluation time excluded, also during one), None before any step."""
        seconds = self.train_seconds + (0.0 if self.in_evaluation else time.perf_counter() - self.window_start)
        return self.images / seconds if self.images and seconds > 0 else None

    def remaining_seconds(self, step, stop_step, total_steps, eval_every):
        """Estimated seconds from `step` to `stop_step`: the training steps at the speed so far, and the evaluations
        still to come (every eval_every-th step, and the last step of the run), at their mean duration so far."""
        per_step = self.images / self.steps / self.images_per_sec() if self.steps else 0.0
        per_eval = self.eval_seconds / self.evals if self.evals else 0.0
        evals_left = stop_step // eval_every - step // eval_every
        if stop_step == total_steps and total_steps % eval_every:
            evals_left += 1
        return (stop_step - step) * per_step + evals_left * per_eval


def progress_line(record, total_steps, block, clock, eta_seconds):
    """One line per evaluation: iteration, epoch, step size, losses and errors, the last block's densities, the
    sharpness against 2/η when it was measured at this iteration, speed."""
    eta = f", ETA {format_seconds(eta_seconds)}" if clock.steps and record["iter"] < total_steps else ""
    sharpness = f" | sharpness {record['sharpness']:.4g} (2/lr {2 / record['lr']:.4g})" if "sharpness" in record else ""
    return (f"iter {record['iter']:>6}/{total_steps} ep {record['epoch']:6.2f} | lr {record['lr']:.4g} | train loss "
            f"{record['train_loss']:.4f} err {100 * record['train_error']:5.2f}% | test err "
            f"{100 * record['test_error']:5.2f}% | {block} density {100 * record[f'density_{block}']:.1f}% dedup "
            f"{100 * record[f'density_dedup_{block}']:.1f}%{sharpness} | {clock.images_per_sec() or 0:.0f} img/s | "
            f"{format_seconds(clock.elapsed())} elapsed{eta}")


# --------------------------------------------------------------------------------------- many processes: torchrun -----

class Processes:
    """The processes that train one model: this one alone (`python train_resnet.py ...`), or the N processes of
    `torchrun --nproc-per-node=N train_resnet.py ...`, one per device, with DistributedDataParallel (DDP). The scripts
    call the same methods either way; for a single process each one returns its input or does nothing, so a plain run
    computes exactly what it computed before this class existed.

    The experiment does not depend on N: --batch-size stays the GLOBAL batch B. Every process draws the same seeded
    global batch (epoch_batches), augmentation and label noise (keyed by seed and step, for the whole batch), and
    trains on its contiguous share of B/N images (`share`); DDP averages the N share gradients, which is the gradient
    of the mean loss over the B images, and the step size is the schedule's at the same global step. BatchNorm: with
    SyncBatchNorm (CUDA, `sync_bn`) its statistics are over the B images, as in one process; without it (on CPU, where
    torch's SyncBatchNorm raises, or with --no-sync-bn) each process normalises its own B/N images: `batchnorm_share`
    is then B/N (None = the whole batch), logged in the config and checked on --resume.
    Rank 0 alone evaluates, writes the log and the checkpoints and prints (the others' stdout goes to /dev/null; their
    stderr stays, so that any error shows). Decisions that end or change the loop (divergence, Ctrl-C/SIGTERM,
    a usage error on rank 0) are taken from values every process holds or receives (`mean`, `any_rank`, `from_main`),
    so that all leave the loop at the same step: a process that left alone would leave the others waiting.
    """

    def __init__(self, device, rank=0, world_size=1, sync_bn=False, batchnorm_share=None, backend=None):
        self.device, self.rank, self.world_size = device, rank, world_size
        self.sync_bn, self.batchnorm_share, self.backend = sync_bn, batchnorm_share, backend

    @property
    def is_main(self):
        """True on the process that evaluates, logs, checkpoints and prints (rank 0; the only one without torchrun)."""
        return self.rank == 0

    @classmethod
    def start(cls, args, device):
        """This run's processes. Under torchrun (its environment variables WORLD_SIZE > 1, RANK, LOCAL_RANK): check
        the flags that depend on N (one-line usage errors, before any process waits for another), then join the
        process group: NCCL with each process on cuda:LOCAL_RANK, or gloo on the CPU. Other devices (MPS) are refused.
        Uses args.batch_size, args.sync_bn (None = on where possible) and args.sharpness_every."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size == 1:
            return cls(device)
        rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
        if args.batch_size % world_size:
            usage_error("--batch-size", f"{args.batch_size} is the global batch, split evenly over the {world_size} "
                                        f"processes: give a multiple of {world_size}")
        if device.type == "cuda":
            if local_rank >= torch.cuda.device_count():
                usage_error("--device", f"process {rank} has local rank {local_rank}, but torch sees "
                                        f"{torch.cuda.device_count()} CUDA devices: start at most one process per GPU")
            device, backend = torch.device("cuda", local_rank), "nccl"
            torch.cuda.set_device(device)
        elif device.type == "cpu":
            backend = "gloo"
        else:
            usage_error("--device", f"torchrun runs on CUDA (NCCL) or on the CPU (gloo), not on {device.type}")
        if args.sync_bn and device.type != "cuda":
            usage_error("--sync-bn", "torch's SyncBatchNorm runs on CUDA only; on the CPU each process normalises its "
                                     "own share of the batch (drop --sync-bn, or pass --no-sync-bn)")
        sync_bn = device.type == "cuda" and args.sync_bn is not False
        if sync_bn and args.sharpness_every:
            usage_error("--sharpness-every", "under torchrun with SyncBatchNorm, rank 0 cannot measure the sharpness "
                                             "alone (SyncBatchNorm synchronises every training-mode forward pass "
                                             "with the other processes); add --no-sync-bn, or measure it in one "
                                             "process")
        share = None if sync_bn else args.batch_size // world_size
        torch.distributed.init_process_group(backend, device_id=device if backend == "nccl" else None)
        if rank:
            sys.stdout = open(os.devnull, "w")  # one progress report, rank 0's
        return cls(device, rank, world_size, sync_bn, share, backend)

    def info(self):
        """What the log's env records about the processes."""
        return {"world_size": self.world_size, "distributed_backend": self.backend, "sync_batchnorm": self.sync_bn}

    def wrap(self, model):
        """The module to train: `model` itself for one process; under torchrun, DDP around it, its BatchNorm layers
        converted to SyncBatchNorm in place if `sync_bn` (`model` must not itself be a BatchNorm layer). `model`
        stays the plain network: evaluate, measure and checkpoint it (its state_dict keys do not change).
        forward_sync_buffers=False: no copy of rank 0's BatchNorm running statistics to the others before every forward
        pass; they only serve evaluation, which rank 0 does with its own."""
        if self.world_size == 1:
            return model
        if self.sync_bn and torch.nn.SyncBatchNorm.convert_sync_batchnorm(model) is not model:
            raise ValueError("Processes.wrap: the model must not itself be a BatchNorm layer")
        device_ids = [self.device] if self.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids, forward_sync_buffers=False)

    def share(self, batch):
        """This process's contiguous 1/N of a global batch (its rows rank·B/N to (rank + 1)·B/N − 1)."""
        size = len(batch) // self.world_size
        return batch[self.rank * size:(self.rank + 1) * size]

    def mean(self, tensor):
        """The mean of `tensor` over the processes (the same value on every one; a new tensor, no host sync)."""
        if self.world_size == 1:
            return tensor
        total = tensor.detach().clone()
        torch.distributed.all_reduce(total)  # a sum: gloo has no average
        return total / self.world_size

    def any_rank(self, value):
        """The largest of an integer over the processes (a signal number, a flag), known to every one."""
        if self.world_size == 1:
            return value
        flag = torch.tensor(int(value), device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag.item())

    def from_main(self, value):
        """Rank 0's integer, known to every process (the others' `value` is ignored)."""
        if self.world_size == 1:
            return value
        flag = torch.tensor(int(value), device=self.device)
        torch.distributed.broadcast(flag, src=0)
        return int(flag.item())

    def on_main(self, function, *args):
        """function(*args) on rank 0 only (e.g. check_earlier_run, which may delete files); if it ends the program
        there (a usage error, SystemExit), every process ends with the same exit code, silently but for rank 0."""
        if self.world_size == 1:
            return function(*args)
        code = 0
        if self.is_main:
            try:
                function(*args)
            except SystemExit as stop:
                code = stop.code if isinstance(stop.code, int) and stop.code else 1
        code = self.from_main(code)
        if code:
            raise SystemExit(code)

    def close(self):
        """Leave the process group at the end of a run (nothing to do for one process). Every process first waits
        for the others (rank 0 may still be writing the checkpoint and the log): a process that tore its gloo
        connections down while a peer still held them was seen to abort ("terminate called without an active
        exception", exit -6) on a loaded 2-core machine."""
        if self.world_size > 1:
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
