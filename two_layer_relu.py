"""Small ReLU networks trained by batch-size-1 SGD: the paper's ReLU toy experiments E4, E5 and E6.

Paper: Andriushchenko et al., "SGD with Large Step Sizes Learns Sparse Features", ICML 2023, arXiv 2210.05337.
The claim tested here: the longer SGD runs with a large step size before the decay, the sparser the learned features
(fewer active, distinct neurons) and the lower the rank of the Jacobian.

    python two_layer_relu.py --preset e4    # 2-layer net, 1-D regression on 12 points (appendix)
    python two_layer_relu.py                # e5: 2-layer teacher–student, d = 2 (main text + neuron movement)
    python two_layer_relu.py --preset e6    # 3-layer teacher–student, d = 5 (appendix)
    python two_layer_relu.py --preset e5 --seeds 0 1 2 3    # more seeds (still experiment e5)
    python plots.py --logs runs/two_layer_relu --out-dir figures    # e4.png, e5.png, e5_neurons.png, e6.png

Every preset runs ALL runs of its experiment (one JSON log per run and seed, in --out-dir). E6 is a three-layer net
but shares everything else with E5 (teacher–student data, MSE, batch-1 SGD, the same metrics), so one script with a
small manual MLP covers all three.

Definitions the code follows:
  * SGD with batch size 1 on the plain squared error (no ½): θ ← θ − η_i ∇θ (h_θ(x_j) − y_j)², j drawn uniformly.
    Step sizes (utils.toy_step_sizes): η before iteration k = ⌊T·N⌋ (T = --large-lr-frac), optionally warmed up as
    η_i = η·(1 + (F − 1)(i/N)^p), then η_k / D (D = --decay) from iteration k on: the notebooks divide before k's
    update.
  * Metrics BEFORE the update of iterations {0..99} ∪ round(linspace(0, N, K))[:-1] (utils.eval_iterations, K = 151
    as in the notebooks); the last is the
    "final" point of the authors' printed numbers; the losses after all N steps are logged as `after_training`.
    Logged: iter, lr, train_loss, test_loss (E5/E6; E4's test set is its training set), rank (utils.jacobian_rank of
    the Jacobian on the rank points, ε = 1e-4) and, per hidden layer k, density_layer<k> / density_dedup_layer<k>
    (utils.feature_sparsity of that layer's post-ReLU activations on the training points, each example's row scaled
    to unit norm, 0/0 -> 0, de-duplicated with threshold τ = --tau).
  * --sharpness-every K: `sharpness` = λ_max of the Hessian of the full training loss (the plain MSE above, clean
    targets) w.r.t. all weights, in float64 (utils.hessian_top_eigenvalue, with `sharpness_hvps` and
    `sharpness_converged`), at the first evaluation point of every K iterations (utils.sharpness_iterations).
    --label-noise-std S: the SGD sample's target is y_j + S·ξ_t, ξ_t ~ N(0, 1) fresh at every step
    (utils.toy_label_noise, from the student seed); the logged losses use the clean targets.
  * Extra log keys: `function_grid` (E4: the learned function after training, with the data), `neurons` (E5: teacher
    directions and signs, student first-layer weights at init and at the end, output weights at the end),
    `run_index`, `timing`, `seeds_used` (the data and student seeds of this log), `seed_summary` (utils.seed_summary
    over the seeds of the run: diverged fraction, medians and their bootstrap 90 % intervals) and `vs_earlier_decay`
    (utils.compare_consecutive_decays: in how many seeds this run beats the previous, earlier-decayed one).
  * Randomness: exactly the authors' draws (their notebooks fc_nets_1d_regression.ipynb = E4,
    fc_nets_two_layer.ipynb = E5, fc_nets_multi_layer.ipynb = E6, repository tml-epfl/sgd-sparse-features), so each
    preset at the notebook's seed (E4: 3, E5: 0, E6: 5) gives the notebook's printed numbers. A seed s means:
      1. data (E5/E6): legacy numpy seeded with s + 1 draws X, then X_test (unit_sphere);
      2. teacher (E5/E6): torch seeded with s + 1, nn.Linear constructors first, then N(0,1) weights (draw_teacher);
      3. student: torch seeded with s, constructors first, then the preset's init (draw_student);
      4. SGD order: legacy numpy seeded with s, np.random.choice(n, 1, replace=False) per step (sgd_indices).
    Every run of one seed restarts from the same student and order. --data-seed / --student-seed hold 1-2 / 3-4
    fixed while --seeds vary; --init-jitter ε multiplies the initial weights by (1 + ε·N(0,1)) drawn from the seed
    (utils.jitter_factors): with both seeds held, the spread over seeds measures how chaotic a run is.
  * Arithmetic: float32, as in the notebooks (--dtype float64 to change it). Constant runs agree with the notebooks
    to 4-5 digits either way; the decayed runs at the edge of stability are chaotic, and their digits depend on the
    precision and the order of operations (the E6 T = 0.5 run: 0.0206 in float32, 0.0228 in float64).
"""
import argparse
import contextlib
import math
import os
import sys
import time

import numpy as np
import torch

import utils

SCRIPT = "two_layer_relu"
PROGRESS_EVERY_S = 10.0  # progress line period on long runs
DENSE_EVALS = 100  # every iteration 0..99 is evaluated too, as in the notebooks

# ======================================================================================================================
# Presets and flags
# ======================================================================================================================

# One value for every run, or one value per run. A constant run is T = 1, D = 1, F = 1.
PER_RUN = ("lr", "large_lr_frac", "decay", "warmup_factor", "warmup_power")
PRESETS = {
    # E4 (appendix; notebook fc_nets_1d_regression.ipynb): 12 fixed points, 100 neurons with first-layer biases, base
    # η = 2e-4, linear warmup of factor F = 400·T, (T, D) = (0.02, 2.5) vs (0.5, 3.0); test set = training set.
    "e4": dict(seeds=[3], student_seed=None, init_jitter=0.0, dtype="float32", iterations=31623, eval_points=151,
               width=100, init_scale=2.5, init_scale_bias=2.5, init_scale_out=4.0, lr=[2e-4], large_lr_frac=[0.02, 0.5], decay=[2.5, 3.0], warmup_factor=[8.0, 200.0],
               warmup_power=[1.0], tau=0.999, rank_eps=1e-4, rank_points=300, grid_points=500, sharpness_every=0,
               label_noise_std=0.0),
    # E5 (main text; notebook fc_nets_two_layer.ipynb): d = 2, n = 15, 3 teacher neurons, 20 student neurons, no biases, W1 = 0.5·N(0,1), a = 0.
    "e5": dict(seeds=[0], data_seed=None, student_seed=None, init_jitter=0.0, dtype="float32", iterations=14126,
               eval_points=151, input_dim=2, n_train=15, n_test=1000,
               teacher_width=3, width=20, init_scale=0.5, init_scale_out=0.0, lr=[0.13, 0.455, 0.455, 0.455],
               large_lr_frac=[1.0, 0.1, 0.3, 0.5], decay=[1.0, 2.0, 4.0, 5.0], warmup_factor=[1.0],
               warmup_power=[1.0], tau=0.99, rank_eps=1e-4, rank_points=None, sharpness_every=0, label_noise_std=0.0),
    # E6 (appendix; notebook fc_nets_multi_layer.ipynb): d = 5, n = 50, teacher 5→2→2→1, student 5→10→10→1 (all with biases), weights 0.8·N(0,1).
    "e6": dict(seeds=[5], data_seed=None, student_seed=None, init_jitter=0.0, dtype="float32", iterations=10001,
               eval_points=151, input_dim=5, n_train=50, n_test=1000,
               teacher_width=2, width=10, init_scale=0.8, init_scale_out=0.8, lr=[0.011, 0.04, 0.04, 0.04],
               large_lr_frac=[1.0, 0.1, 0.3, 0.5], decay=[1.0, 3.5, 2.5, 5.0], warmup_factor=[1.0, 6.0, 6.0, 6.0],
               warmup_power=[1.0, 0.5, 0.5, 0.5], tau=0.99, rank_eps=1e-4, rank_points=None, sharpness_every=0,
               label_noise_std=0.0),
}
E4_OFFSETS = [-2.0, 1.5, 0.0, 0.0, 2.0, 1.0, 0.0, -1.0, 0.0, 1.0, 2.0, -1.0]  # E4 data: y = 0.345 + offsets


def build_parser():
    parser = utils.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=utils.PRESET_RULES)
    knob = lambda flag, text, **kwargs: utils.add_preset_flag(parser, PRESETS, flag, text, **kwargs)  # noqa: E731
    parser.add_argument("--preset", choices=sorted(PRESETS), default="e5",
                        help="e4 = 1-D regression, e5 = 2-layer teacher–student (d = 2), e6 = 3-layer teacher–student")
    knob("--lr", "η: base step size, per run", nargs="+", type=utils.positive_float)
    knob("--large-lr-frac", "T: the step size is divided after iteration ⌊T·N⌋, per run", nargs="+",
         type=utils.fraction)
    knob("--decay", "D: the step size is divided by D after ⌊T·N⌋ (1 = no decay), per run", nargs="+",
         type=utils.positive_float)
    knob("--warmup-factor", "F: warmup η·(1 + (F−1)(i/N)^p) for i ≤ ⌊T·N⌋ (1 = none), per run", nargs="+",
         type=utils.positive_float)
    knob("--warmup-power", "p: warmup power, per run", nargs="+", type=utils.positive_float)
    knob("--iterations", "N: SGD steps per run", type=utils.positive_int)
    knob("--eval-points", "K: evaluate before iterations {0..99} ∪ round(linspace(0, N, K))[:-1] (K ≥ 2)",
         type=eval_points_type)
    knob("--seeds", "one full set of runs per seed s: data and teacher from seed s + 1, student init and SGD order "
                    "from seed s (the notebooks' meaning)", nargs="+", type=utils.nonnegative_int)
    knob("--data-seed", "hold the data and the teacher at this seed while --seeds vary (auto: s + 1)",
         type=utils.nonnegative_int)
    knob("--student-seed", "hold the student init and the SGD order at this seed while --seeds vary (auto: s)",
         type=utils.nonnegative_int)
    knob("--init-jitter", "ε: multiply every initial weight by (1 + ε·N(0,1)), drawn from the seed s (0 = off); with "
                          "--data-seed and --student-seed held, the seeds measure how chaotic a run is",
         type=utils.nonnegative_float)
    knob("--dtype", "arithmetic of training and evaluation (the notebooks: float32)", choices=["float32", "float64"])
    knob("--input-dim", "d: input dimension", type=utils.positive_int)
    knob("--n-train", "n: training points", type=utils.positive_int)
    knob("--n-test", "test points", type=utils.positive_int)
    knob("--teacher-width", "teacher neurons per hidden layer", type=utils.positive_int)
    knob("--width", "m: student neurons per hidden layer", type=utils.positive_int)
    knob("--init-scale", "hidden-layer weights: N(0,1) times this (e4: |w_j|, random sign)",
         type=utils.nonnegative_float)
    knob("--init-scale-out", "output weights: N(0,1) times this", type=utils.nonnegative_float)
    knob("--init-scale-bias", "first-layer biases: N(0,1) times this", type=utils.nonnegative_float)
    knob("--tau", "τ: correlation threshold of the feature-sparsity de-duplication", type=utils.fraction)
    knob("--rank-eps", "ε: the rank counts σ_k/σ_1 > ε", type=utils.positive_float)
    knob("--rank-points", "points for the Jacobian rank (e4: evenly spaced on the data range; e5/e6: the first test "
                          "points, auto = #params)", type=utils.positive_int)
    knob("--grid-points", "grid points of the stored learned function", type=utils.positive_int)
    knob("--sharpness-every", "K: log `sharpness`, the largest eigenvalue λ_max of the Hessian of the full training "
                              "loss, the plain mean of (h(x_i) − y_i)² (no ½) over the n training points with clean "
                              "targets, w.r.t. all weights, in float64, by utils.hessian_top_eigenvalue (Lanczos, "
                              f"relative tolerance {utils.SHARPNESS_RTOL:g}, warm-started), at the first evaluation "
                              "point in every K iterations (0 = off); compare it with 2/lr", type=utils.nonnegative_int)
    knob("--label-noise-std", "S: label-noise SGD: add fresh N(0, S²) noise to the target of each SGD sample, drawn "
                              "from the student seed (utils.toy_label_noise; 0 = off)", type=utils.nonnegative_float)
    parser.add_argument("--out-dir", default=os.path.join("runs", SCRIPT), help="folder for the JSON run logs")
    return parser


def eval_points_type(text):
    """--eval-points: an integer >= 2 (K = 1 would give no evaluation at all)."""
    value = utils.positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"expected an integer >= 2, got {text!r}")
    return value


def parse_args(argv=None):
    """Command-line layer: returns (args, config, runs, experiment); bad input exits with one line (exit code 2)."""
    args = build_parser().parse_args(argv)
    given = {key: value for key, value in vars(args).items() if key not in ("preset", "out_dir")}
    try:
        config, runs, experiment = utils.resolve_preset(args.preset, PRESETS[args.preset], given, PER_RUN)
    except utils.FlagError as err:
        utils.usage_error(err.flag, err.message)
    if args.preset != "e4":  # the rank uses the first p = #params test points by default (60 for E5, 181 for E6)
        flag = "--rank-points" if config["rank_points"] else "--n-test"
        config["rank_points"] = config["rank_points"] or n_params(student_sizes(args.preset, config),
                                                                  student_biases(args.preset))
        if config["rank_points"] > config["n_test"]:
            utils.usage_error(flag, f"the Jacobian rank needs {config['rank_points']} test points but --n-test is "
                                    f"{config['n_test']}")
    return args, config, runs, experiment

# ======================================================================================================================
# Data, initialisation and the model (a manual MLP, no autograd: per-step torch overhead would dominate these tiny nets)
# ======================================================================================================================


def e4_data():
    """The 12 fixed 1-D points of E4, x_k = (−5.5 + k)/4 + 0.07, y = 0.345 + offsets, as float32 (X: 12×1, y: 12),
    computed in float64 and then rounded, as in the notebook."""
    k = np.arange(len(E4_OFFSETS), dtype=np.float64)
    x = ((-5.5 + k) / 4 + 0.07)[:, None]
    return x.astype(np.float32), (0.345 + np.array(E4_OFFSETS)).astype(np.float32)


def unit_sphere(rng, n, dim):
    """n points N(0, I_dim) from the legacy numpy generator `rng` (row by row: the numbers the notebooks' identity-
    covariance multivariate_normal returns), rounded to float32, then scaled to unit norm in float32 by torch's
    reduction (numpy's sums in another order: the last bit of some inputs would differ from the notebooks')."""
    x = torch.from_numpy(rng.standard_normal((n, dim)).astype(np.float32))
    return (x / x.pow(2).sum(1, keepdim=True).pow(0.5)).numpy()


@contextlib.contextmanager
def torch_seeded(seed):
    """torch's global generator seeded with `seed` inside the block and restored after it: the notebooks build their
    models from torch.nn.Linear, whose constructors draw from the global generator (there is no generator argument)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def linear_layers(sizes, biases):
    """The torch.nn.Linear layers of an MLP with these widths, float32. Their constructors consume PyTorch's default-
    initialisation draws (per layer: the weight, then the bias if any), as the notebooks' models do before the custom
    init replaces some of them; call it inside torch_seeded."""
    return [torch.nn.Linear(fan_in, fan_out, bias=bias) for fan_in, fan_out, bias in zip(sizes[:-1], sizes[1:], biases)]


def as_numpy(layers):
    """[[W, b]] float32 numpy arrays of torch Linear layers (b None without a bias), for the manual MLP."""
    return [[layer.weight.detach().numpy().copy(), None if layer.bias is None else layer.bias.detach().numpy().copy()]
            for layer in layers]


def draw_teacher(preset, config, data_seed):
    """The teacher of E5/E6 as [[W, b]] float32 layers, drawn as the notebooks do: torch seeded with the data seed
    (after the data), constructors first, then every weight replaced by N(0,1) (randn_like). E5 (no biases): first-
    layer rows scaled to unit norm, output weights a*_j = sign(·). E6 (biases): d→k→k→1, the biases keep the
    constructors' default draws U(±1/√fan_in)."""
    d, k = config["input_dim"], config["teacher_width"]
    sizes, biases = ([d, k, 1], [False, False]) if preset == "e5" else ([d, k, k, 1], [True, True, True])
    with torch_seeded(data_seed), torch.no_grad():
        layers = linear_layers(sizes, biases)
        for layer in layers:
            layer.weight.copy_(torch.randn_like(layer.weight))
        if preset == "e5":
            first, output = layers
            first.weight.div_(first.weight.pow(2).sum(1, keepdim=True).sqrt())
            output.weight.copy_(output.weight.sign())
    return as_numpy(layers)


def make_problem(preset, config, data_seed):
    """Training/test data, Jacobian-rank points, (E4) the plotting grid and (E5/E6) the teacher, as a dict.

    E5/E6 draw as the notebooks: legacy numpy seeded with `data_seed` draws X, then X_test (unit_sphere); the teacher
    (draw_teacher) comes after; its labels are computed in float32. E4's data are fixed (e4_data)."""
    if preset == "e4":
        x, y = e4_data()
        # the rank is measured on 300 points evenly spaced on [min x, max x] (the notebook draws them at random)
        rank_x = np.linspace(x.min(), x.max(), config["rank_points"], dtype=np.float32)[:, None]
        margin = 0.1 * (x.max() - x.min())
        grid = np.linspace(x.min() - margin, x.max() + margin, config["grid_points"], dtype=np.float32)[:, None]
        return dict(x_train=x, y_train=y, x_test=None, y_test=None, rank_x=rank_x, grid=grid, teacher=None)
    rng = np.random.RandomState(data_seed)
    x_train = unit_sphere(rng, config["n_train"], config["input_dim"])
    x_test = unit_sphere(rng, config["n_test"], config["input_dim"])
    teacher = draw_teacher(preset, config, data_seed)
    y_train, _ = forward(teacher, x_train)
    y_test, _ = forward(teacher, x_test)
    # the rank is measured on the first p = #params test points (resolved in parse_args)
    return dict(x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test, rank_x=x_test[:config["rank_points"]],
                grid=None, teacher=teacher)


def student_sizes(preset, config):
    """Layer widths input → hidden(s) → 1 of the student."""
    d = 1 if preset == "e4" else config["input_dim"]
    m = config["width"]
    return [d, m, m, 1] if preset == "e6" else [d, m, 1]


def student_biases(preset):
    """Which student layers have a bias: E4 first layer only (h = Σ a_j ReLU(w_j x + b_j)), E5 none, E6 all."""
    return {"e4": [True, False], "e5": [False, False], "e6": [True, True, True]}[preset]


def n_params(sizes, biases):
    """Number of trainable parameters of an MLP with these widths and bias flags."""
    return sum(fan_in * fan_out + (fan_out if bias else 0)
               for fan_in, fan_out, bias in zip(sizes[:-1], sizes[1:], biases))


def draw_student(preset, config, student_seed):
    """The student's initial [[W, b]] float32 layers, drawn as the notebooks do: torch seeded with the student seed,
    constructors first, then the custom init, layer by layer:
      E4: w_j = ±s (s = --init-scale, sign = 2·round(U[0,1)) − 1), then b = s_b·N(0,1), then a = s_out·N(0,1);
      E5/E6: every weight s·N(0,1) (s_out for the output layer; E5's a = 0·N(0,1) still consumes its draws), biases
      keep the constructors' default draws U(±1/√fan_in)."""
    with torch_seeded(student_seed), torch.no_grad():
        layers = linear_layers(student_sizes(preset, config), student_biases(preset))
        if preset == "e4":
            first, output = layers
            first.weight.copy_(config["init_scale"] * (2 * torch.round(torch.rand_like(first.weight)) - 1))
            first.bias.copy_(config["init_scale_bias"] * torch.randn_like(first.bias))
            output.weight.copy_(config["init_scale_out"] * torch.randn_like(output.weight))
        else:
            for index, layer in enumerate(layers):
                scale = config["init_scale_out"] if index == len(layers) - 1 else config["init_scale"]
                layer.weight.copy_(scale * torch.randn_like(layer.weight))
    return as_numpy(layers)


def jitter(layers, relative, seed):
    """Every initial weight and bias multiplied by its factor (1 + relative·ξ) of utils.jitter_factors (--init-jitter),
    keeping the layers' dtype."""
    arrays = [array for layer in layers for array in layer if array is not None]
    factors = iter(utils.jitter_factors([array.shape for array in arrays], relative, seed))
    return [[None if array is None else (array * next(factors)).astype(array.dtype) for array in layer]
            for layer in layers]


def sgd_indices(n, n_iters, seed):
    """The notebooks' SGD order: legacy numpy seeded with `seed`, then np.random.choice(n, 1, replace=False) at every
    step. Without replacement numpy draws a whole permutation of n and keeps its first element, so this stream is not
    the one np.random.randint(n) gives."""
    rng = np.random.RandomState(seed)
    return np.array([rng.choice(n, 1, replace=False)[0] for _ in range(n_iters)])


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
    """One in-place SGD step on the single example (x, y) for the loss (h(x) − y)² (plain MSE, no ½).

    Backpropagation by hand: δ_L = 2η(h − y); ∂/∂W_l = δ_l a_{l−1}ᵀ, ∂/∂b_l = δ_l;
    δ_{l−1} = (W_lᵀ δ_l) ⊙ 1[a_{l−1} > 0], formed with the OLD W_l before W_l is updated, so all layers move
    simultaneously as in torch SGD. ReLU'(0) = 0, as in torch.
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
    for index in reversed(range(len(layers))):
        weight, bias = layers[index]
        back = (weight.T @ delta) * (acts[index] > 0) if index > 0 else None  # from the old W_l
        weight -= delta[:, None] * acts[index][None, :]
        if bias is not None:
            bias -= delta
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
# Metrics, and the training loop of one run and one seed
# ======================================================================================================================


def normalise_rows(phi):
    """Each example's activation row scaled to unit L2 norm; an all-zero row stays zero (0/0 -> 0)."""
    norms = np.linalg.norm(phi, axis=1, keepdims=True)
    return np.divide(phi, norms, out=np.zeros_like(phi), where=norms > 0)


def sparsity_metrics(hidden, tau):
    """density_layer<k> and density_dedup_layer<k> of every hidden layer k on the training inputs."""
    metrics = {}
    for index, phi in enumerate(hidden, start=1):
        density, dedup = utils.feature_sparsity(normalise_rows(phi), tau)
        metrics[f"density_layer{index}"] = density
        metrics[f"density_dedup_layer{index}"] = dedup
    return metrics


def losses(layers, problem):
    """Plain mean squared errors (no ½): train_loss, and test_loss where there is a test set (not E4);
    also returns the hidden activations on the training inputs, and whether every loss is finite."""
    out, hidden = forward(layers, problem["x_train"])
    metrics = {"train_loss": float(np.mean((out - problem["y_train"]) ** 2))}
    if problem["x_test"] is not None:
        out_test, _ = forward(layers, problem["x_test"])
        metrics["test_loss"] = float(np.mean((out_test - problem["y_test"]) ** 2))
    return metrics, hidden, all(math.isfinite(v) for v in metrics.values())


def evaluate(layers, problem, config, model):
    """All logged metrics of the current state; returns (metrics, finite). Non-finite losses skip the rest."""
    metrics, hidden, finite = losses(layers, problem)
    if not finite:
        return metrics, False
    load_weights(model, layers)
    jacobian = utils.model_jacobian(model, torch.from_numpy(problem["rank_x"]).double())
    metrics["rank"] = utils.jacobian_rank(jacobian, config["rank_eps"])
    metrics.update(sparsity_metrics(hidden, config["tau"]))
    return metrics, True


def sharpness_metrics(model, layers, problem, vector):
    """`sharpness` = λ_max of the Hessian of the full training loss, the plain mean of (h(x_i) − y_i)² over the
    training points with their clean targets, at the weights `layers` (copied into the float64 torch `model`), by
    utils.hessian_top_eigenvalue warm-started from `vector`. Returns (log keys, the eigenvector for the next one)."""
    load_weights(model, layers)
    x, y = torch.from_numpy(problem["x_train"]).double(), torch.from_numpy(problem["y_train"]).double()
    estimate = utils.hessian_top_eigenvalue(model, lambda: (model(x)[:, 0] - y).square().mean(), vector)
    return {"sharpness": estimate.eigenvalue, "sharpness_hvps": estimate.hvps,
            "sharpness_converged": estimate.converged}, estimate.vector


def run_seeds(config, seed):
    """The seeds one --seeds value s stands for: data and teacher from s + 1, student init and SGD order from s (as in
    the notebooks), unless --data-seed / --student-seed hold them fixed. E4's data are fixed: no data seed."""
    seeds = {"student_seed": seed if config["student_seed"] is None else config["student_seed"]}
    if "data_seed" in config:
        seeds["data_seed"] = seed + 1 if config["data_seed"] is None else config["data_seed"]
    return seeds


def train_run(preset, config, run, seed, problem, log, timing):
    """Batch-size-1 SGD for one run; records every evaluation into `log` and adds the seconds spent in the SGD steps,
    the evaluations and the log writes/progress lines to timing["train_s"/"metrics_s"/"callbacks_s"].
    Returns (status, extra log keys)."""
    student_seed = run_seeds(config, seed)["student_seed"]
    layers = draw_student(preset, config, student_seed)
    if config["init_jitter"]:
        layers = jitter(layers, config["init_jitter"], seed)
    layers = [[None if array is None else array.astype(config["dtype"]) for array in layer] for layer in layers]
    init_w = layers[0][0].copy()  # E5's neuron-movement figure shows the first layer at init and at the end
    n_iters = config["iterations"]
    order = problem["sgd_order"]  # drawn once per seed (main): every run of the seed takes the same order
    xs, ys = problem["x_train"][order], problem["y_train"][order]
    if config["label_noise_std"]:  # label-noise SGD: fresh noise on the target of every step's sample
        ys = (ys + utils.toy_label_noise(n_iters, config["label_noise_std"], student_seed)).astype(ys.dtype)
    # the notebooks divide the step size BEFORE the update of iteration ⌊T·N⌋
    lrs = utils.toy_step_sizes(n_iters, run["lr"], run["large_lr_frac"], run["decay"], run["warmup_factor"],
                               run["warmup_power"], decay_includes_k=True).astype(config["dtype"])
    model = torch_model(layers)
    evals = utils.eval_iterations(n_iters, config["eval_points"], DENSE_EVALS).tolist()  # starts at 0: segments cover every step
    measured, vector = set(utils.sharpness_iterations(evals, config["sharpness_every"]).tolist()), None
    last_progress = time.monotonic()
    with np.errstate(over="ignore", invalid="ignore"):  # divergence is detected from the losses, not from warnings
        for start, stop in zip(evals, evals[1:] + [n_iters]):
            tick = time.monotonic()
            metrics, finite = evaluate(layers, problem, config, model)
            if finite and start in measured:
                sharpness, vector = sharpness_metrics(model, layers, problem, vector)
                metrics.update(sharpness)
            evaluated = time.monotonic()
            log.record(iter=start, lr=float(lrs[start]), **metrics)
            if time.monotonic() - last_progress > PROGRESS_EVERY_S:  # only long runs get progress lines
                last_progress = time.monotonic()
                print(f"    iter {start}/{n_iters}  {format_metrics(metrics)}", flush=True)
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
        (teacher_w, _), (teacher_a, _) = problem["teacher"]
        extra["neurons"] = {"teacher_w": teacher_w, "teacher_a": teacher_a[0], "student_w_init": init_w,
                            "student_w_end": layers[0][0], "student_a_end": layers[-1][0][0]}
    return "completed", extra

# ======================================================================================================================
# Logs and the driver
# ======================================================================================================================

SUMMARY_KEYS = {"train_loss": "train", "test_loss": "test", "rank": "rank", "density_dedup_layer1": "dedup L1",
                "density_dedup_layer2": "dedup L2"}


def format_metrics(record):
    """'train 1.3e-05  test 6.1e-04  rank 27  dedup L1 0.32' from the summary keys present (and finite) in a record."""
    return "  ".join(f"{short} {record[key]:.4g}" for key, short in SUMMARY_KEYS.items()
                     if record.get(key) is not None)


def run_one(args, config, experiment, run_index, run, seed, problem, env):
    """Train one (run, seed) into its own JSON log; returns the finished utils.RunLog."""
    label, slug = utils.toy_run_names(run)
    path = os.path.join(args.out_dir, f"{experiment}_{slug}_seed{seed}.json")
    constant = run["decay"] == 1 and run["warmup_factor"] == 1
    # decay_iter: last large-step iteration ⌊T·N⌋ (the plots draw the dashed decay line there)
    log_config = dict(config, preset=args.preset, **run, seed=seed, out_dir=args.out_dir,
                      decay_iter=None if constant else math.floor(run["large_lr_frac"] * config["iterations"]))
    print(f"[seed {seed}] {label}", flush=True)
    start = time.monotonic()
    timing = {"train_s": 0.0, "metrics_s": 0.0, "callbacks_s": 0.0}
    with utils.RunLog(path, SCRIPT, log_config, env=env, experiment=experiment, run=label, run_index=run_index,
                      seed=seed, seeds_used=run_seeds(config, seed)) as log:
        status, extra = train_run(args.preset, config, run, seed, problem, log, timing)
        log.finish(status, timing=dict(timing, total_s=time.monotonic() - start), **extra)
    final = log.data["final"]
    if status == "diverged":
        print(f"    DIVERGED: non-finite loss by iteration {extra['diverged_at']}; log marked 'diverged', "
              f"continuing with the other runs", flush=True)
    else:
        print(f"    done in {utils.format_seconds(time.monotonic() - start)}; last evaluation (iter {final['iter']}): "
              f"{format_metrics(final)}", flush=True)
    return log


def print_summary(experiment, logs_by_seed, seconds):
    """End-of-command tables: every (seed, run), then, when several seeds ran, each run over its seeds: the diverged
    fraction, the medians of the other seeds with their bootstrap 90 % intervals (large-step runs sit at the edge of
    divergence), and in how many seeds a decayed run beats the previous, earlier-decayed one."""
    print(f"\nSummary of {experiment} (metrics at the last evaluation, before its update; "
          f"total {utils.format_seconds(seconds)}):")
    for logs in logs_by_seed:
        for log in logs:
            data = log.data
            print(f"  seed {data['seed']:<3d} {data['run']:<46s} {data['status']:<9s} iter {data['final']['iter']:<6d} "
                  f"{format_metrics(data['final'])}")
    if len(logs_by_seed) < 2:
        return
    print(f"\nPer run over {len(logs_by_seed)} seeds (median [bootstrap 90 % interval] over the non-diverged seeds, "
          "at the last evaluation):")
    for log in logs_by_seed[0]:
        summary = log.data["seed_summary"]
        print(f"  {log.data['run']}: diverged {len(summary['diverged_seeds'])}/{len(summary['seeds'])}")
        if not summary["median_final"]:
            print("      every seed diverged")
            continue
        print("      " + "  ".join(f"{short} {utils.format_median_ci(summary, key)}" for key, short in
                                    SUMMARY_KEYS.items() if key in summary["median_final"]))
        wins = log.data.get("vs_earlier_decay")
        if wins:
            print(f"      lower {wins['metric']} than the earlier decay in {wins['wins']}/{wins['pairs']} seeds")


def summarize_seeds(runs, logs_by_seed):
    """Store in every log its run over the seeds (utils.seed_summary) and, for a decayed run that follows another one,
    the paired comparison with it over the seeds (utils.compare_consecutive_decays)."""
    logs_per_run = list(zip(*logs_by_seed))
    for run_logs in logs_per_run:
        summary = utils.seed_summary([log.data["seed"] for log in run_logs], [log.data["status"] for log in run_logs],
                                     [log.data["final"] for log in run_logs])
        for log in run_logs:
            log.finish(log.data["status"], seed_summary=summary)
    utils.compare_consecutive_decays(runs, logs_per_run)


def main(argv=None):
    args, config, runs, experiment = parse_args(argv)
    utils.prepare_out_dir(args.out_dir)
    # One torch thread: on a 2-core machine shared with other jobs, torch's threads spin-wait on the small SVDs and
    # Jacobians of the evaluations (measured: --preset e4 ran 9 s on one thread, 198 s on the default two).
    torch.set_num_threads(1)
    env = utils.environment_info("cpu")
    print(f"{experiment}: {len(runs)} run(s) × {len(config['seeds'])} seed(s), N = {config['iterations']} "
          f"iterations, logs in {args.out_dir}", flush=True)
    started = time.monotonic()
    # seeds outer, runs inner: all runs of one seed share its data, init and SGD order (module docstring)
    logs_by_seed = []
    for seed in config["seeds"]:
        problem = make_problem(args.preset, config, run_seeds(config, seed).get("data_seed"))
        problem = {key: value.astype(config["dtype"]) if isinstance(value, np.ndarray) else value
                   for key, value in problem.items()}
        problem["sgd_order"] = sgd_indices(len(problem["y_train"]), config["iterations"],
                                           run_seeds(config, seed)["student_seed"])
        logs_by_seed.append([run_one(args, config, experiment, index, run, seed, problem, env)
                             for index, run in enumerate(runs)])
    summarize_seeds(runs, logs_by_seed)
    print_summary(experiment, logs_by_seed, time.monotonic() - started)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # RunLog has marked the running log `interrupted`; no traceback for a Ctrl-C
        print("interrupted: the log of the running run is marked 'interrupted'", file=sys.stderr)
        raise SystemExit(130)  # the shell's code for Ctrl-C, so that a sweep loop stops too
