"""Small ReLU networks trained by batch-size-1 SGD: the paper's ReLU toy experiments E4, E5 and E6 (SPEC.md §3).

    python two_layer_relu.py --preset e4    # 2-layer net, 1-D regression on 12 points (appendix)
    python two_layer_relu.py --preset e5    # 2-layer teacher–student, d = 2 (main text + neuron movement)
    python two_layer_relu.py --preset e6    # 3-layer teacher–student, d = 5 (appendix; lives here too, see below)
    python plots.py --logs runs/two_layer_relu --out figures    # e4.png, e5.png, e5_neurons.png, e6.png

Every preset runs ALL runs of its experiment (one JSON log per run and seed, in --out-dir). E6 is a three-layer net,
but it shares everything else with E5 (teacher–student data, MSE, batch-1 SGD, the same metrics), so one script with
a generic manual MLP covers all three instead of duplicating the training loop.

What is computed (SPEC §1, §2, E4–E6):
  * SGD with batch size 1 on the plain mean squared error (no ½): θ ← θ − η_i ∇θ (h_θ(x_j) − y_j)², j drawn
    uniformly. Step sizes η_i from utils.toy_step_sizes: η until iteration ⌊T·N⌋ (optionally warmed up as
    η·(1 + (F − 1)(i/N)^p)), then divided by d.
  * Evaluations at iterations round(linspace(0, N, K))[:-1] with K = --eval-points = 250 (as in SPEC E1; shared
    with diag_net.py as utils.eval_iterations), each BEFORE that iteration's update; the printed "final" numbers are
    those of the last evaluation (SPEC E1 convention). The losses after all N steps are stored separately under the
    top-level log key `after_training` (as in diag_net.py).
  * Logged per evaluation: iter, lr (the step size of that iteration), train_loss, test_loss (E5/E6; E4 has test =
    train so it logs train_loss only), rank (SPEC §1.2: utils.model_jacobian + utils.jacobian_rank, ε = 1e-4, on 300
    evenly spaced points of [min x, max x] for E4 and on the first #params test points for E5/E6), and the feature
    sparsity of SPEC §1.1 (utils.feature_sparsity of ReLU(W1 x + b1) on all training points, each example row
    L2-normalised, 0/0 -> 0; τ = 0.999 for E4, 0.99 for E5/E6): keys feature_sparsity and feature_sparsity_dedup
    for the 2-layer nets; for E6 feature_sparsity_layer1, feature_sparsity_dedup_layer1, feature_sparsity_layer2,
    feature_sparsity_dedup_layer2 (layer 2 = ReLU(W2 ReLU(W1 x + b1) + b2), normalised the same way).
  * Extra top-level log keys: `function_grid` (E4: the learned function after the last step on --grid-points points,
    plus the data) and `neurons` (E5: teacher directions and signs, student first-layer weights at init and after
    the last step, student output weights after the last step). As in diag_net.py: `run_index` (the run's position
    in the preset, which orders the figure legends), `timing` (seconds: total_s, and its parts train_s for the SGD
    steps, metrics_s for the evaluations, callbacks_s for log writes and progress lines) and `seed_summary`
    (utils.seed_summary over all seeds of the run: diverged seeds and fraction, medians of the other seeds' final
    metrics), also printed at the end when several seeds ran.

Randomness (the authors' generator code is not available, so the draw order below is ours; see "Expected results"):
  data: numpy legacy RandomState(--data-seed) draws the teacher, then X_train, then X_test (E5/E6; E4's data are fixed).
  student: RandomState(seed) draws the student's initial weights layer by layer (weights, then biases), then the
  N SGD indices with randint(n, size=N); all runs of one seed share the init and the index sequence.

Expected results (our measurements, float64; metrics at the last evaluation). Exact agreement with the paper's printed
numbers is impossible: its data/init generator code is unavailable (we tried ~250 plausible numpy/torch draw orders
for E5's constant run; none reproduced train 1.354e-05 / test 6.098e-04). Outcomes depend strongly on the draw, so
compare medians over seeds (--seeds 0 1 2 ...):
  e4 (seed 3):  T = 0.02: train 1.78e-02, rank 98, dedup density 22.3 %  |  T = 0.5: train 0.259, rank 16, 9.7 %.
       8 seeds (0-7), medians: T = 0.02: train 1.3e-02, rank 97.5, 23.2 %  |  T = 0.5: train 2.5e-04, rank 21, 9.8 %.
       (paper: ≈ 22 % vs 6-7 %, rank ≈ 85 vs 20, both train ≈ 2e-4; the short run trains slower here.)
  e5 (seed 0):  η = 0.13 constant: train 6.07e-06, test 7.96e-04, rank 26, dedup 32.3 % (paper: 1.354e-05, 6.098e-04).
       η = 0.455 DIVERGES for seed 0 by iteration 57 (13 of seeds 0-15): with a = 0 at init, the output layer is
       unstable once η·‖ReLU(W1 x)‖² > 1 for some training x, which depends on the draw (the paper's η sits at the edge
       of divergence for its own draw, as in E1). The 3 surviving seeds are much sparser (dedup 13-15 % vs 34 %, rank
       10-12 vs 26.5) but their test loss is not lower (median 1.2e-03 / 8.1e-03 / 7.7e-03 vs 1.3e-03 constant), so
       the paper's "decay at 50 % -> 10× lower test loss" is NOT reproduced with our generator.
  e6 (seed 5):  test 0.066 (η = 0.011 const) -> 0.0185 / 0.0107 / 0.0081 (decay at 10 / 30 / 50 %); dedup density
       layer 1: 43 -> 31 / 31 / 27 %, layer 2: 52 -> 44 / 42 / 36 %; rank 147 -> 143 / 143 / 138 (paper: test
       ≈ 0.061 -> 0.021). 8 seeds (0-7), medians: test 0.045 -> 0.0146 / 0.0099 / 0.0083.
Runtime (wall, paper seeds, 2-core CPU shared with other jobs): e4 13-16 s, e5 6-9 s, e6 13-26 s, i.e. under a minute
for all three; 8 seeds of e6 take ~2 min. An SGD step costs ~15-30 µs (manual backprop in numpy), i.e. 0.2-0.5 s per
run; most of the time goes into the 249 evaluations per run (~4-50 ms each): the Jacobian rank (per-example gradients
and an SVD, 300×300 for e4) and the feature sparsity. Rewriting the JSON log after each evaluation (utils.RunLog)
costs ~0.5 ms, ~0.1 s per run.

Preset vs flags: a preset sets every knob; any explicit flag overrides that knob for all runs of the preset. The
per-run flags (--lr, --decay-frac, --decay, --warmup-factor, --warmup-power) take one value (applied to every run) or
one value per run; giving them a different count redefines the run list, and every per-run flag must then have 1 or
that many values (else a one-line error). A constant run is T = 1, d = 1, F = 1 (e.g. --lr 0.13 --decay-frac 1
--decay 1). Flags a preset does not use (e.g. --n-train with e4) are rejected. Runs with
any override other than --seeds / --out-dir are logged as experiment '<preset>_custom' (e.g. e5_custom), so that
their figures never mix with the paper configuration.
"""
import argparse
import math
import os
import sys
import time

import numpy as np
import torch

import utils

SCRIPT = "two_layer_relu"

# ======================================================================================================================
# Presets (SPEC E4–E6)
# ======================================================================================================================

# Per-run knobs: lists, one entry per run (or a single entry shared by every run). A constant run is written as
# T = 1, d = 1, F = 1 (utils.toy_step_sizes then returns η at every iteration).
RUN_KEYS = ("lr", "decay_frac", "decay", "warmup_factor", "warmup_power")

PRESETS = {
    # SPEC E4: 12 fixed points, 100 neurons with biases on the first layer, base η = 2e-4, linear warmup of factor
    # F = 400·T, (T, d) = (0.02, 2.5) vs (0.5, 3.0); test set = training set.
    "e4": dict(seeds=[3], iterations=31623, width=100, init_scale=2.5, init_scale_bias=2.5, init_scale_out=4.0,
               lr=[2e-4], decay_frac=[0.02, 0.5], decay=[2.5, 3.0], warmup_factor=[8.0, 200.0], warmup_power=[1.0],
               tau=0.999, rank_eps=1e-4, rank_points=300, grid_points=500),
    # SPEC E5: d = 2, n = 15, 3 teacher neurons, 20 student neurons, no biases, W1 = 0.5·N(0,1), a = 0.
    "e5": dict(seeds=[0], iterations=14126, data_seed=1, input_dim=2, n_train=15, n_test=1000, teacher_width=3,
               width=20, init_scale=0.5, init_scale_out=0.0,
               lr=[0.13, 0.455, 0.455, 0.455], decay_frac=[1.0, 0.1, 0.3, 0.5], decay=[1.0, 2.0, 4.0, 5.0],
               warmup_factor=[1.0], warmup_power=[1.0], tau=0.99, rank_eps=1e-4, rank_points=None),
    # SPEC E6: d = 5, n = 50, teacher 5→2→2→1, student 5→10→10→1 (all with biases), weights 0.8·N(0,1).
    "e6": dict(seeds=[5], iterations=10001, data_seed=6, input_dim=5, n_train=50, n_test=1000, teacher_width=2,
               width=10, init_scale=0.8, init_scale_out=0.8,
               lr=[0.011, 0.04, 0.04, 0.04], decay_frac=[1.0, 0.1, 0.3, 0.5], decay=[1.0, 3.5, 2.5, 5.0],
               warmup_factor=[1.0, 6.0, 6.0, 6.0], warmup_power=[1.0, 0.5, 0.5, 0.5],
               tau=0.99, rank_eps=1e-4, rank_points=None),
}

DEFAULT_EVAL_POINTS = 250  # K of SPEC E1: evaluations at round(linspace(0, N, K))[:-1]

# Flags that do not change what is trained or measured; using them keeps the paper's experiment name.
NEUTRAL_KEYS = ("seeds",)

# E4's data (SPEC E4): x_k = (−5.5 + k)/4 + 0.07, y = 0.345 + offsets.
E4_OFFSETS = [-2.0, 1.5, 0.0, 0.0, 2.0, 1.0, 0.0, -1.0, 0.0, 1.0, 2.0, -1.0]

# ======================================================================================================================
# Data and initialisation (SPEC E4–E6)
# ======================================================================================================================


def e4_data():
    """The 12 fixed 1-D points of SPEC E4, as (X: 12×1, y: 12)."""
    k = np.arange(len(E4_OFFSETS), dtype=np.float64)
    return ((-5.5 + k) / 4 + 0.07)[:, None], 0.345 + np.array(E4_OFFSETS)


def unit_sphere(rng, n, dim):
    """n points N(0, I_dim) normalised to unit norm (SPEC E5/E6 inputs)."""
    x = rng.randn(n, dim)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def torch_default_bias(rng, fan_in, size):
    """PyTorch's default nn.Linear bias init, U(−1/√fan_in, 1/√fan_in), drawn from a numpy generator."""
    bound = 1.0 / math.sqrt(fan_in)
    return rng.uniform(-bound, bound, size)


def make_teacher(preset, cfg, rng):
    """Teacher network as a list of (W, b) layers. E5: unit-norm neurons, no biases, output signs a*_j = sign(N(0,1)).
    E6: 5→k→k→1, weights N(0,1), PyTorch-default biases."""
    d, k = cfg["input_dim"], cfg["teacher_width"]
    if preset == "e5":
        w = rng.randn(k, d)
        w /= np.linalg.norm(w, axis=1, keepdims=True)
        return [(w, None), (np.sign(rng.randn(1, k)), None)]
    sizes = [d, k, k, 1]
    return [(rng.randn(fan_out, fan_in), torch_default_bias(rng, fan_in, fan_out))
            for fan_in, fan_out in zip(sizes[:-1], sizes[1:])]


def make_problem(preset, cfg):
    """Training/test data, Jacobian-rank points and (E4) the plotting grid, as a dict of float64 arrays."""
    if preset == "e4":
        x, y = e4_data()
        # SPEC §1.2: the rank is measured on 300 points uniform on [min x, max x] (evenly spaced here).
        rank_x = np.linspace(x.min(), x.max(), cfg["rank_points"])[:, None]
        margin = 0.1 * (x.max() - x.min())
        grid = np.linspace(x.min() - margin, x.max() + margin, cfg["grid_points"])[:, None]
        return dict(x_train=x, y_train=y, x_test=None, y_test=None, rank_x=rank_x, grid=grid, teacher=None)
    rng = np.random.RandomState(cfg["data_seed"])
    teacher = make_teacher(preset, cfg, rng)
    x_train = unit_sphere(rng, cfg["n_train"], cfg["input_dim"])
    x_test = unit_sphere(rng, cfg["n_test"], cfg["input_dim"])
    y_train, _ = forward(teacher, x_train)
    y_test, _ = forward(teacher, x_test)
    # SPEC §1.2: the rank is measured on the first p = #params test points (resolved in resolve_config)
    return dict(x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test, rank_x=x_test[:cfg["rank_points"]],
                grid=None, teacher=teacher)


def student_sizes(preset, cfg):
    """Layer widths input → hidden(s) → 1 of the student."""
    m = cfg["width"]
    if preset == "e4":
        return [1, m, 1]
    return [cfg["input_dim"], m, 1] if preset == "e5" else [cfg["input_dim"], m, m, 1]


def student_biases(preset):
    """Which student layers have a bias: E4 first layer only (h = Σ a_j ReLU(w_j x + b_j)), E5 none, E6 all."""
    return {"e4": [True, False], "e5": [False, False], "e6": [True, True, True]}[preset]


def n_params(sizes, biases):
    """Number of trainable parameters of an MLP with these widths and bias flags."""
    return sum(fan_in * fan_out + (fan_out if bias else 0)
               for fan_in, fan_out, bias in zip(sizes[:-1], sizes[1:], biases))


def init_student(preset, cfg, rng):
    """Student initialisation of SPEC E4–E6 as a list of [W, b] layers (b None when the layer has no bias)."""
    sizes, biases = student_sizes(preset, cfg), student_biases(preset)
    layers = []
    for index, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        is_output = index == len(sizes) - 2
        if preset == "e4" and not is_output:
            # SPEC E4: w_j = ±2.5 with a random sign, b_j = 2.5·N(0,1)
            weight = cfg["init_scale"] * rng.choice([-1.0, 1.0], size=(fan_out, fan_in))
            bias = cfg["init_scale_bias"] * rng.randn(fan_out)
        else:
            weight = (cfg["init_scale_out"] if is_output else cfg["init_scale"]) * rng.randn(fan_out, fan_in)
            bias = torch_default_bias(rng, fan_in, fan_out) if biases[index] else None
        layers.append([weight, bias])
    return layers


# ======================================================================================================================
# Model: forward pass and manual SGD step (no autograd: per-step torch overhead would dominate these tiny nets)
# ======================================================================================================================


def forward(layers, x):
    """Outputs h(x) (P,) of the MLP for inputs x (P×d), and the post-ReLU activations of every hidden layer."""
    hidden = []
    act = x
    for index, (weight, bias) in enumerate(layers):
        pre = act @ weight.T
        if bias is not None:
            pre = pre + bias
        if index == len(layers) - 1:
            return pre[:, 0], hidden
        act = np.maximum(pre, 0.0)
        hidden.append(act)


def sgd_step(layers, x, y, lr):
    """One in-place SGD step on the single example (x, y) for the loss (h(x) − y)² (plain MSE, SPEC §1.3).

    Backpropagation by hand: δ_L = 2η(h − y); ∂/∂W_l = δ_l a_{l−1}ᵀ, ∂/∂b_l = δ_l;
    δ_{l−1} = (W_lᵀ δ_l) ⊙ 1[a_{l−1} > 0].
    δ_{l−1} is formed with the OLD W_l before W_l is updated, so all layers move simultaneously as in torch SGD.
    ReLU'(0) = 0, as in torch.
    """
    acts = [x]
    for weight, bias in layers[:-1]:
        pre = weight @ acts[-1]
        if bias is not None:
            pre += bias
        acts.append(np.maximum(pre, 0.0))
    weight, bias = layers[-1]
    out = weight @ acts[-1]
    if bias is not None:
        out += bias
    delta = 2.0 * lr * (out - y)  # (1,): η·∂(h − y)²/∂h, so the updates below already include the step size
    for index in range(len(layers) - 1, -1, -1):
        weight, bias = layers[index]
        if index > 0:
            back = (weight.T @ delta) * (acts[index] > 0)
        weight -= delta[:, None] * acts[index][None, :]
        if bias is not None:
            bias -= delta
        if index > 0:
            delta = back


def torch_model(layers):
    """A float64 torch nn.Sequential with the same architecture (Linear/ReLU), for utils.model_jacobian."""
    modules = []
    for weight, bias in layers:
        modules += [torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=torch.float64),
                    torch.nn.ReLU()]
    model = torch.nn.Sequential(*modules[:-1])
    load_weights(model, layers)
    return model


def load_weights(model, layers):
    """Copy the numpy layers into the torch model built by torch_model (in place)."""
    linears = [module for module in model if isinstance(module, torch.nn.Linear)]
    with torch.no_grad():
        for linear, (weight, bias) in zip(linears, layers):
            linear.weight.copy_(torch.from_numpy(weight))
            if bias is not None:
                linear.bias.copy_(torch.from_numpy(bias))


# ======================================================================================================================
# Metrics (SPEC §1.1, §1.2)
# ======================================================================================================================


def normalise_rows(phi):
    """Each example's activation row scaled to unit L2 norm; an all-zero row stays zero (0/0 -> 0, SPEC §1.1)."""
    norms = np.linalg.norm(phi, axis=1, keepdims=True)
    return np.divide(phi, norms, out=np.zeros_like(phi), where=norms > 0)


def sparsity_metrics(hidden, tau):
    """feature_sparsity(_dedup) of every hidden layer on the training inputs (keys get _layer<k> when there are two)."""
    metrics = {}
    for index, phi in enumerate(hidden, start=1):
        suffix = f"_layer{index}" if len(hidden) > 1 else ""
        density, dedup = utils.feature_sparsity(normalise_rows(phi), corr_threshold=tau)
        metrics["feature_sparsity" + suffix] = density
        metrics["feature_sparsity_dedup" + suffix] = dedup
    return metrics


def losses(layers, problem):
    """Plain mean squared errors (no ½, SPEC §1.3): train_loss, and test_loss where there is a test set (not E4);
    also returns the hidden activations on the training inputs, and whether every loss is finite."""
    out, hidden = forward(layers, problem["x_train"])
    metrics = {"train_loss": float(np.mean((out - problem["y_train"]) ** 2))}
    if problem["x_test"] is not None:
        out_test, _ = forward(layers, problem["x_test"])
        metrics["test_loss"] = float(np.mean((out_test - problem["y_test"]) ** 2))
    return metrics, hidden, all(math.isfinite(v) for v in metrics.values())


def evaluate(layers, problem, cfg, model):
    """All logged metrics of the current state; returns (metrics, finite). Non-finite losses skip the rest."""
    metrics, hidden, finite = losses(layers, problem)
    if not finite:
        return metrics, False
    load_weights(model, layers)
    jacobian = utils.model_jacobian(model, torch.from_numpy(problem["rank_x"]))
    metrics["rank"] = utils.jacobian_rank(jacobian, cfg["rank_eps"])
    metrics.update(sparsity_metrics(hidden, cfg["tau"]))
    return metrics, True


# ======================================================================================================================
# Training one run
# ======================================================================================================================


def run_label(run):
    """Human label of a run, e.g. 'η = 0.455, ÷2 at 10 %' or 'η = 0.04, warmup ×6 (p = 0.5), ÷3.5 at 10 %'."""
    if run["decay"] == 1 and run["warmup_factor"] == 1:
        return f"η = {run['lr']:g}, constant"
    parts = [f"η = {run['lr']:g}"]
    if run["warmup_factor"] != 1:
        parts.append(f"warmup ×{run['warmup_factor']:g} (p = {run['warmup_power']:g})")
    parts.append(f"÷{run['decay']:g} at {100 * run['decay_frac']:g} %" if run["decay"] != 1
                 else f"no decay after {100 * run['decay_frac']:g} %")
    return ", ".join(parts)


def run_slug(run):
    """File-name part of a run (utils.run_slug): lr, then T/d/F/p only where they matter."""
    constant = run["decay"] == 1 and run["warmup_factor"] == 1
    warm = run["warmup_factor"] != 1
    return utils.run_slug(lr=float(run["lr"]), T=None if constant else float(run["decay_frac"]),
                          d=float(run["decay"]) if run["decay"] != 1 else None,
                          F=float(run["warmup_factor"]) if warm else None,
                          p=float(run["warmup_power"]) if warm else None)


def neuron_positions(problem, init_layers, layers):
    """E5 neuron-movement data: teacher directions/signs, student first-layer weights at init and at the end."""
    (teacher_w, _), (teacher_a, _) = problem["teacher"]
    return {"teacher_w": teacher_w, "teacher_a": teacher_a[0], "student_w_init": init_layers[0][0],
            "student_w_end": layers[0][0], "student_a_end": layers[-1][0][0]}


def train_run(preset, cfg, run, seed, problem, log, progress, timing):
    """Batch-size-1 SGD for one run; records every evaluation into `log` and adds the seconds spent in the SGD steps,
    the evaluations and the log writes/progress lines to timing["train_s"/"metrics_s"/"callbacks_s"].
    Returns (status, extra log keys)."""
    rng = np.random.RandomState(seed)
    layers = init_student(preset, cfg, rng)
    init_layers = [[w.copy(), None if b is None else b.copy()] for w, b in layers]
    n_iters = cfg["iterations"]
    order = rng.randint(len(problem["y_train"]), size=n_iters)  # SGD indices, drawn after the init
    xs, ys = problem["x_train"][order], problem["y_train"][order]
    lrs = utils.toy_step_sizes(n_iters, run["lr"], run["decay_frac"], run["decay"], run["warmup_factor"],
                               run["warmup_power"])
    model = torch_model(layers)
    evals = utils.eval_iterations(n_iters, cfg["eval_points"]).tolist()  # starts at 0: segments cover every step
    with np.errstate(over="ignore", invalid="ignore"):  # divergence is detected from the losses, not from warnings
        for start, stop in zip(evals, evals[1:] + [n_iters]):
            tick = time.monotonic()
            metrics, finite = evaluate(layers, problem, cfg, model)
            evaluated = time.monotonic()
            log.record(iter=start, lr=float(lrs[start]), **metrics)
            progress(start, metrics)
            recorded = time.monotonic()
            timing["metrics_s"] += evaluated - tick
            timing["callbacks_s"] += recorded - evaluated
            if not finite:
                return "diverged", {"diverged_at": start}
            for i in range(start, stop):
                sgd_step(layers, xs[i], ys[i], lrs[i])
            timing["train_s"] += time.monotonic() - recorded
        final_losses, _, finite = losses(layers, problem)
        extra = {"after_training": {"iter": n_iters, **final_losses}}
        if not finite:
            return "diverged", {"diverged_at": n_iters, **extra}
    if preset == "e4":
        values, _ = forward(layers, problem["grid"])
        extra["function_grid"] = {"x": problem["grid"][:, 0], "y": values,
                                  "data_x": problem["x_train"][:, 0], "data_y": problem["y_train"]}
    elif preset == "e5":
        extra["neurons"] = neuron_positions(problem, init_layers, layers)
    return "completed", extra


# ======================================================================================================================
# Command line
# ======================================================================================================================


def preset_help(key, text):
    """Help text listing every preset's value of `key` (the flag's default depends on --preset)."""
    values = []
    for name, preset in PRESETS.items():
        if key in preset:
            value = preset[key]
            shown = " ".join(f"{v:g}" for v in value) if isinstance(value, list) else (
                "#params" if value is None else f"{value:g}")
            values.append(f"{name}: {shown}")
    return f"{text} [default by preset: {'; '.join(values)}]"


def eval_points_type(text):
    """--eval-points: an integer >= 2 (K = 1 would give no evaluation at all)."""
    value = utils.positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"expected an integer >= 2, got {text!r}")
    return value


def build_parser():
    parser = utils.ArgumentParser(description=__doc__.split("\n\n")[0],
                                  epilog="Preset vs flags: " + __doc__.split("Preset vs flags: ")[1])
    sup = argparse.SUPPRESS  # preset-controlled flags: absent from args unless given, so overrides are visible
    parser.add_argument("--preset", choices=sorted(PRESETS), default="e5",
                        help="experiment of SPEC §3: e4 = 1-D regression, e5 = 2-layer teacher–student (d = 2), "
                             "e6 = 3-layer teacher–student")
    parser.add_argument("--out-dir", default=os.path.join("runs", SCRIPT), help="folder for the JSON run logs")
    parser.add_argument("--eval-points", type=eval_points_type, metavar="K", default=DEFAULT_EVAL_POINTS,
                        help="K: evaluate at round(linspace(0, N, K))[:-1], before that iteration's update")
    add = parser.add_argument
    add("--seeds", nargs="+", type=utils.nonnegative_int, default=sup, metavar="SEED",
        help=preset_help("seeds", "student init + SGD order seeds, one full set of runs per seed"))
    add("--iterations", type=utils.positive_int, default=sup, metavar="N",
        help=preset_help("iterations", "N: SGD steps per run"))
    add("--lr", nargs="+", type=utils.positive_float, default=sup, metavar="ETA",
        help=preset_help("lr", "η: base step size, one value or one per run"))
    add("--decay-frac", nargs="+", type=utils.fraction, default=sup, metavar="T",
        help=preset_help("decay_frac", "T: large-step fraction; decay after iteration ⌊T·N⌋, one or one per run"))
    add("--decay", nargs="+", type=utils.positive_float, default=sup, metavar="D",
        help=preset_help("decay", "d: the step size is divided by d after ⌊T·N⌋ (1 = no decay), one or one per run"))
    add("--warmup-factor", nargs="+", type=utils.positive_float, default=sup, metavar="F",
        help=preset_help("warmup_factor", "F: warmup η·(1 + (F−1)(i/N)^p) for i ≤ ⌊T·N⌋ (1 = none), one or one per "
                                          "run"))
    add("--warmup-power", nargs="+", type=utils.positive_float, default=sup, metavar="P",
        help=preset_help("warmup_power", "p: warmup power, one or one per run"))
    add("--data-seed", type=utils.nonnegative_int, default=sup,
        help=preset_help("data_seed", "seed of the teacher and the data (not used by e4)"))
    add("--input-dim", type=utils.positive_int, default=sup, metavar="D",
        help=preset_help("input_dim", "d: input dimension"))
    add("--n-train", type=utils.positive_int, default=sup, metavar="N",
        help=preset_help("n_train", "n: training points"))
    add("--n-test", type=utils.positive_int, default=sup, help=preset_help("n_test", "test points"))
    add("--teacher-width", type=utils.positive_int, default=sup,
        help=preset_help("teacher_width", "teacher neurons per hidden layer"))
    add("--width", type=utils.positive_int, default=sup, metavar="M",
        help=preset_help("width", "m: student neurons per hidden layer"))
    add("--init-scale", type=utils.nonnegative_float, default=sup,
        help=preset_help("init_scale", "hidden-layer weights: N(0,1) times this (e4: |w_j|, random sign)"))
    add("--init-scale-out", type=utils.nonnegative_float, default=sup,
        help=preset_help("init_scale_out", "output weights: N(0,1) times this"))
    add("--init-scale-bias", type=utils.nonnegative_float, default=sup,
        help=preset_help("init_scale_bias", "e4 only: first-layer biases N(0,1) times this (e6 uses PyTorch's "
                                            "default U(±1/√fan_in))"))
    add("--tau", type=utils.fraction, default=sup,
        help=preset_help("tau", "τ: correlation threshold of the feature-sparsity de-duplication (SPEC §1.1)"))
    add("--rank-eps", type=utils.positive_float, default=sup,
        help=preset_help("rank_eps", "ε: rank counts σ_k/σ_1 > ε (SPEC §1.2)"))
    add("--rank-points", type=utils.positive_int, default=sup,
        help=preset_help("rank_points", "points for the Jacobian rank (e4: evenly spaced on the data range; "
                                        "e5/e6: first test points)"))
    add("--grid-points", type=utils.positive_int, default=sup,
        help=preset_help("grid_points", "e4 only: grid points of the stored learned function"))
    return parser


def resolve_config(args):
    """Preset values overridden by the explicitly given flags; rejects flags the preset does not use.

    Returns (config, experiment name, the explicitly given keys). The experiment is the preset's name (e4/e5/e6) when
    only --seeds/--out-dir were changed, else '<preset>_custom'.
    """
    given = {k: v for k, v in vars(args).items() if k not in ("preset", "out_dir", "eval_points")}
    preset = PRESETS[args.preset]
    for key in given:
        if key not in preset:
            utils.usage_error(utils.flag_name(key), f"not used by --preset {args.preset}")
    cfg = {**preset, **given, "eval_points": args.eval_points}
    if len(set(cfg["seeds"])) != len(cfg["seeds"]):  # a repeated seed would overwrite its own logs
        utils.usage_error("--seeds", f"repeated seed in {' '.join(map(str, cfg['seeds']))}")
    if args.preset != "e4":
        # SPEC §1.2: by default the rank uses p = #params test points (60 for E5, 181 for E6)
        p = n_params(student_sizes(args.preset, cfg), student_biases(args.preset))
        flag = "--rank-points" if cfg["rank_points"] else "--n-test"
        cfg["rank_points"] = cfg["rank_points"] or p
        if cfg["rank_points"] > cfg["n_test"]:
            utils.usage_error(flag, f"the Jacobian rank needs {cfg['rank_points']} test points but --n-test is "
                                    f"{cfg['n_test']}")
    custom = any(key not in NEUTRAL_KEYS for key in given) or args.eval_points != DEFAULT_EVAL_POINTS
    return cfg, f"{args.preset}_custom" if custom else args.preset, given


def expand_runs(cfg, given, preset):
    """The list of runs: per-run flags broadcast from length 1 to the longest list (SPEC §3 runs of the preset)."""
    n_runs = max(len(cfg[key]) for key in RUN_KEYS)
    for key in RUN_KEYS:
        count = len(cfg[key])
        if count not in (1, n_runs):
            # name the lists that fix the run count, and where they come from, so the fix is obvious
            others = [f"{utils.flag_name(k)}{'' if k in given else f' (from --preset {preset})'}" for k in RUN_KEYS
                      if len(cfg[k]) == n_runs]
            utils.usage_error(utils.flag_name(key), f"{count} values, but {', '.join(others)} define {n_runs} "
                                                    f"runs; give 1 or {n_runs} values, or give those flags {count} "
                                                    "values too")
    runs = [{key: cfg[key][i if len(cfg[key]) > 1 else 0] for key in RUN_KEYS} for i in range(n_runs)]
    slugs = [run_slug(run) for run in runs]
    for i, slug in enumerate(slugs):
        if slug in slugs[:i]:
            utils.usage_error("--lr", f"runs {slugs.index(slug) + 1} and {i + 1} are identical ({slug}); every run "
                                      f"needs its own (η, T, d, F, p)")
    return runs


# ======================================================================================================================
# Main
# ======================================================================================================================


SUMMARY_KEYS = {"train_loss": "train", "test_loss": "test", "rank": "rank", "feature_sparsity_dedup": "dedup",
                "feature_sparsity_dedup_layer1": "dedup L1", "feature_sparsity_dedup_layer2": "dedup L2"}


def format_metrics(record):
    """'train 1.3e-05  test 6.1e-04  rank 27  dedup 0.32' from the summary keys present (and finite) in a record."""
    return "  ".join(f"{short} {record[key]:.4g}" for key, short in SUMMARY_KEYS.items()
                     if record.get(key) is not None)


class Progress:
    """Prints a line every `every` seconds of a run (only long runs get progress lines)."""

    def __init__(self, n_iters, every=10.0):
        self.n_iters, self.every, self.last = n_iters, every, time.time()

    def __call__(self, i, metrics):
        if time.time() - self.last > self.every:
            self.last = time.time()
            print(f"    iter {i}/{self.n_iters}  {format_metrics(metrics)}", flush=True)


def run_one(args, cfg, experiment, run_index, run, seed, problem, env):
    """Train one (run, seed) into its own JSON log; returns the finished utils.RunLog.

    run_index (the run's position in the preset) is logged so that figure legends list the runs in preset order."""
    label = run_label(run)
    path = os.path.join(args.out_dir, f"{experiment}_{run_slug(run)}_seed{seed}.json")
    constant = run["decay"] == 1 and run["warmup_factor"] == 1
    # decay_iter: last large-step iteration ⌊T·N⌋ (the plots draw the dashed decay line there)
    config = {"preset": args.preset, **{k: v for k, v in cfg.items() if k not in RUN_KEYS + ("seeds",)}, **run,
              "seed": seed, "decay_iter": None if constant else math.floor(run["decay_frac"] * cfg["iterations"]),
              "out_dir": args.out_dir}
    print(f"[seed {seed}] {label}", flush=True)
    start = time.monotonic()
    timing = {"train_s": 0.0, "metrics_s": 0.0, "callbacks_s": 0.0}  # the log key and parts of diag_net.py's
    with utils.RunLog(path, SCRIPT, config, env=env, experiment=experiment, run=label, run_index=run_index,
                      seed=seed) as log:
        status, extra = train_run(args.preset, cfg, run, seed, problem, log, Progress(cfg["iterations"]), timing)
        log.finish(status, timing=dict(timing, total_s=time.monotonic() - start), **extra)
    final = log.data["final"]
    if status == "diverged":
        print(f"    DIVERGED: non-finite loss by iteration {extra['diverged_at']}; log marked 'diverged', "
              f"continuing with the other runs", flush=True)
    else:
        print(f"    done in {utils.format_seconds(time.monotonic() - start)}; last evaluation (iter {final['iter']}): "
              f"{format_metrics(final)}", flush=True)
    return log


def attach_seed_summary(logs):
    """utils.seed_summary of one run over its seeds, stored in every log of the run (key `seed_summary`, as in
    diag_net.py); returns it."""
    summary = utils.seed_summary([log.data["seed"] for log in logs], [log.data["status"] for log in logs],
                                 [log.data["final"] for log in logs])
    for log in logs:
        log.finish(log.data["status"], seed_summary=summary)
    return summary


def print_summary(experiment, logs_by_seed, summaries, seconds):
    """End-of-command tables: every (seed, run), then, when several seeds ran, each run over its seeds (SPEC E1: runs
    at the edge of divergence are compared by the diverged fraction and the medians of the other seeds)."""
    print(f"\nSummary of {experiment} (metrics at the last evaluation, before its update; "
          f"total {utils.format_seconds(seconds)}):")
    for logs in logs_by_seed:
        for log in logs:
            data = log.data
            print(f"  seed {data['seed']:<3d} {data['run']:<46s} {data['status']:<9s} iter {data['final']['iter']:<6d} "
                  f"{format_metrics(data['final'])}")
    if len(logs_by_seed) < 2:
        return
    print(f"\nPer run over {len(logs_by_seed)} seeds (medians over the non-diverged seeds, at the last evaluation):")
    for log, summary in zip(logs_by_seed[0], summaries):
        diverged = f"{len(summary['diverged_seeds'])}/{len(summary['seeds'])}"
        medians = format_metrics(summary["median_final"]) if summary["median_final"] else "every seed diverged"
        print(f"  {log.data['run']:<46s} diverged {diverged:<6s} {medians}")


def main(argv=None):
    args = build_parser().parse_args(argv)
    cfg, experiment, given = resolve_config(args)
    runs = expand_runs(cfg, given, args.preset)
    utils.prepare_out_dir(args.out_dir)
    torch.set_num_threads(1)  # tiny SVDs and Jacobians: extra threads only add contention (measured up to 100×)
    problem = make_problem(args.preset, cfg)
    env = utils.environment_info("cpu")
    print(f"{experiment}: {len(runs)} run(s) × {len(cfg['seeds'])} seed(s), N = {cfg['iterations']} iterations, "
          f"logs in {args.out_dir}", flush=True)
    started = time.monotonic()
    # seeds outer, runs inner: all runs of one seed share its init and SGD order (module docstring)
    logs_by_seed = [[run_one(args, cfg, experiment, index, run, seed, problem, env) for index, run in enumerate(runs)]
                    for seed in cfg["seeds"]]
    summaries = [attach_seed_summary(list(run_logs)) for run_logs in zip(*logs_by_seed)]
    print_summary(experiment, logs_by_seed, summaries, time.monotonic() - started)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # RunLog has marked the running log `interrupted`; no traceback for a Ctrl-C
        print("interrupted: the log of the running run is marked 'interrupted'", file=sys.stderr)
        raise SystemExit(130)  # the shell's code for Ctrl-C, so that a sweep loop stops too
