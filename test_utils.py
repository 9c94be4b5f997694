"""Unit tests of utils.py, in the order of its sections (hand-computed values and the paper's definitions).

Scripts end to end (subprocesses at tiny sizes, then plots.py) are in test_smoke.py; the tiny on-disk data sets
are fixtures in conftest.py.
"""
import argparse
import json
import math
import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import utils
from conftest import (FAKE_CIFAR_PER_BATCH, FAKE_CIFAR_TEST, FAKE_TINY_COLOURS, FAKE_TINY_TRAIN, FAKE_TINY_VAL_LABELS,
                      FAKE_TINY_WNIDS, SHARED_DATA, CreatesFileWhenUnpickled, read_pickle)

# ======================================================================================================================
# Step-size schedules
# ======================================================================================================================


def test_toy_step_sizes_single_decay_after_floor_t_n():
    lrs = utils.toy_step_sizes(10, 0.5, large_lr_frac=0.3, decay=4.0)
    assert lrs.tolist() == [0.5] * 4 + [0.125] * 6  # iterations 0..⌊3.0⌋ = 3 at η, decay after iteration 3's update
    assert utils.toy_step_sizes(5, 0.25).tolist() == [0.25] * 5
    e1 = utils.toy_step_sizes(100001, 0.282, large_lr_frac=0.1, decay=4.8)
    assert e1[10000] == 0.282 and e1[10001] == pytest.approx(0.282 / 4.8)


def test_toy_step_sizes_decay_before_iteration_k_as_in_the_relu_notebooks():
    lrs = utils.toy_step_sizes(10, 0.5, large_lr_frac=0.3, decay=4.0, decay_includes_k=True)
    assert lrs.tolist() == [0.5] * 3 + [0.125] * 7  # iteration ⌊3.0⌋ = 3 already takes η / 4
    # with a warmup, iteration k takes the warmed-up value of k divided by D: (1 + 2·(3/10)) / 4
    warm = utils.toy_step_sizes(10, 1.0, large_lr_frac=0.3, decay=4.0, warmup_factor=3.0, decay_includes_k=True)
    assert warm[:3].tolist() == pytest.approx([1.0, 1.2, 1.4]) and warm[3:].tolist() == pytest.approx([0.4] * 7)
    e5 = utils.toy_step_sizes(14126, 0.455, large_lr_frac=0.1, decay=2.0, decay_includes_k=True)
    assert e5[1411] == 0.455 and e5[1412] == 0.2275  # ⌊0.1·14126⌋ = 1412


def test_toy_step_sizes_warmup_divides_by_total_iterations():
    n, lr, factor, power = 100, 0.04, 6.0, 0.5
    lrs = utils.toy_step_sizes(n, lr, large_lr_frac=0.3, decay=2.5, warmup_factor=factor, warmup_power=power)
    assert lrs[0] == lr
    assert lrs[16] == pytest.approx(lr * (1 + 5 * math.sqrt(16 / 100)))
    peak = lr * (1 + 5 * math.sqrt(30 / 100))
    assert lrs[30] == pytest.approx(peak)
    assert np.allclose(lrs[31:], peak / 2.5)
    linear = utils.toy_step_sizes(10, 1.0, large_lr_frac=0.5, decay=2.0, warmup_factor=3.0)  # p = 1
    assert linear[:6].tolist() == pytest.approx([1 + 2 * i / 10 for i in range(6)])
    assert linear[6:].tolist() == pytest.approx([2.0 / 2.0] * 4)


@pytest.mark.parametrize("frac, peak", [(0.1, 1.629), (0.3, 4.322), (0.5, 11.467)])
def test_deep_step_size_exponential_warmup_peaks(frac, peak):
    epochs, lr = 100, 0.75
    top = lr * 1.05 ** (100 * frac)
    assert top / lr == pytest.approx(peak, abs=5e-4)
    just_before = utils.deep_step_size(frac * epochs - 1e-9, epochs, lr, warmup_exp=1.05, large_lr_frac=frac)
    assert just_before == pytest.approx(top, rel=1e-9)
    after = utils.deep_step_size(frac * epochs, epochs, lr, warmup_exp=1.05, large_lr_frac=frac)
    assert after == pytest.approx(top / 10)
    assert utils.deep_step_size(90.0, epochs, lr, warmup_exp=1.05, large_lr_frac=frac) == pytest.approx(top / 100)


def test_deep_step_size_table_values():
    # u = 100·t/E: at E = 200 the warmup exponent is applied per 2 epochs.
    assert utils.deep_step_size(10.0, 200, 0.5, warmup_exp=1.05, large_lr_frac=0.5) == pytest.approx(0.5 * 1.05 ** 5)
    assert utils.deep_step_size(0.0, 100, 0.5, warmup_exp=1.05) == 0.5
    # power warmup (w < 1): η0·(1 + u^w), then η0·(1 + (100T)^w)/10 and /100
    assert utils.deep_step_size(4.0, 100, 0.1, warmup_exp=0.5, large_lr_frac=0.3) == pytest.approx(0.1 * 3)
    assert utils.deep_step_size(50.0, 100, 0.1, warmup_exp=0.5, large_lr_frac=0.3) == pytest.approx(
        0.1 * (1 + math.sqrt(30)) / 10)
    # no warmup (w = 1): η0, η0/10, η0/100; constant: η0 always
    assert [utils.deep_step_size(t, 100, 0.05, large_lr_frac=0.1) for t in (0, 9.99, 10, 89.9, 90, 99.9)] == \
        pytest.approx([0.05, 0.05, 0.005, 0.005, 0.0005, 0.0005])
    assert utils.deep_step_size(95.0, 100, 0.01, schedule="constant", warmup_exp=1.05) == 0.01


# ======================================================================================================================
# Metrics: feature sparsity, Jacobian rank
# ======================================================================================================================


def greedy_feature_sparsity(phi, tau):
    """The paper's definition, literally, without sampling: drop dead columns, then visit the columns in order and
    delete column i if |corr(i, j)| > τ for ANY column j still present (earlier or later), removing it at once."""
    phi = np.asarray(phi, dtype=np.float64)
    n_rows, n_cols = phi.shape
    density = (phi > 0).sum() / (n_rows * n_cols)
    alive = phi[:, (phi > 0).any(axis=0)]
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = np.atleast_2d(np.corrcoef(alive.T)) if alive.shape[1] > 1 else np.ones((1, 1))
    constant = (alive == alive[:1]).all(axis=0)  # no correlation (corrcoef may return rounding noise instead of NaN)
    corr[constant, :] = corr[:, constant] = np.nan
    present = list(range(alive.shape[1]))
    for i in range(alive.shape[1]):
        if any(abs(corr[i, j]) > tau for j in present if j != i):  # NaN > τ is False
            present.remove(i)
    return density, (alive[:, present] > 0).sum() / (n_rows * n_cols)


def random_activation_matrix(rng):
    """Random post-ReLU matrix with the hard cases: exact and scaled duplicates, near-duplicates, dead and constant
    columns."""
    n_rows, n_cols = rng.integers(2, 40), rng.integers(1, 30)
    phi = np.maximum(rng.normal(size=(n_rows, n_cols)), 0)
    for _ in range(rng.integers(0, 6)):
        a, b = rng.integers(0, n_cols, 2)
        phi[:, a] = phi[:, b] * rng.choice([1.0, rng.uniform(0.5, 2.0)])
    for _ in range(rng.integers(0, 3)):
        a, b = rng.integers(0, n_cols, 2)
        phi[:, a] = np.maximum(phi[:, b] + rng.uniform(0.01, 0.3) * rng.normal(size=n_rows), 0)
    if rng.random() < 0.4:
        phi[:, rng.integers(0, n_cols)] = 0.0  # dead
    if rng.random() < 0.4:
        phi[:, rng.integers(0, n_cols)] = 0.3  # constant positive: NaN correlation, never a duplicate
    return phi


def test_feature_sparsity_matches_greedy_definition_on_random_matrices():
    rng = np.random.default_rng(0)
    for _ in range(400):
        phi = random_activation_matrix(rng)
        tau = float(rng.choice([0.5, 0.9, 0.95, 0.99, 0.999]))
        expected = greedy_feature_sparsity(phi, tau)
        assert utils.feature_sparsity(phi, tau) == pytest.approx(expected, rel=1e-12, abs=0)
        assert utils.feature_sparsity(torch.tensor(phi, dtype=torch.float32), tau) == pytest.approx(expected, abs=1e-6)


def test_feature_sparsity_hand_computed():
    # 4 examples × 4 neurons: col0 dead, col2 = 2·col1 (duplicate, the LATER one survives), col3 independent.
    phi = np.array([[0, 1, 2, 0],
                    [0, 0, 0, 5],
                    [0, 3, 6, 1],
                    [0, 0, 0, 0]], dtype=float)
    density, dedup = utils.feature_sparsity(phi, 0.95)
    assert density == 6 / 16
    assert dedup == 4 / 16  # col1 deleted (2 positives), dead col0 and deleted col1 stay in the denominator


def test_feature_sparsity_threshold_is_strict_and_uses_absolute_correlation():
    x = np.array([1.0, 2.0, 3.0, 4.0])
    anti = np.stack([x, 5.0 - x], axis=1)  # correlation exactly -1: |C| > τ deletes the first
    assert utils.feature_sparsity(anti, 0.95) == (1.0, 0.5)
    # correlation 0.8 exactly between the two columns: kept at τ = 0.8 (strict >), deleted at τ = 0.79
    a = np.array([1.0, -1.0, 0.0, 0.0])
    b = 0.8 * a + 0.6 * np.array([0.0, 0.0, 1.0, -1.0])  # both parts zero-mean with equal norms
    pair = np.stack([a, b], axis=1) + 2.0  # shifted to be positive everywhere: no dead entries
    corr = np.corrcoef(pair.T)[0, 1]
    assert corr == pytest.approx(0.8)
    assert utils.feature_sparsity(pair, corr + 1e-9)[1] == 1.0
    assert utils.feature_sparsity(pair, corr - 1e-9)[1] == 0.5


def test_feature_sparsity_subsamples_columns_with_seed():
    rng = np.random.default_rng(1)
    phi = np.maximum(rng.normal(size=(50, 300)), 0)
    full = utils.feature_sparsity(phi, 0.95)
    sub = utils.feature_sparsity(phi, 0.95, max_neurons=100, seed=3)
    assert sub == utils.feature_sparsity(phi, 0.95, max_neurons=100, seed=3)  # deterministic given the seed
    subset = torch.randperm(300, generator=torch.Generator().manual_seed(3))[:100].sort().values.numpy()
    assert sub == pytest.approx(greedy_feature_sparsity(phi[:, subset], 0.95), rel=1e-12)  # both over the sample
    assert sub[1] <= sub[0]
    assert utils.feature_sparsity(phi, 0.95, max_neurons=1000) == full  # fewer columns than the cap: no subsampling


def test_feature_sparsity_never_deletes_constant_columns():
    # float64 constants whose rounded mean differs from their entries: centring leaves rounding noise, which must not
    # make them "correlate" perfectly with one another
    rng = np.random.default_rng(3)
    phi = np.concatenate([np.maximum(rng.normal(size=(1000, 5)), 0), np.full((1000, 3), [0.3, 0.7, 0.1])], axis=1)
    assert (0.3 * np.ones(1000)).mean() != 0.3  # the case this test is about
    density = (phi > 0).mean()
    assert utils.feature_sparsity(phi, 0.95) == pytest.approx((density, density), abs=1e-15)
    assert utils.feature_sparsity(phi.astype(np.float32), 0.95) == pytest.approx((density, density), abs=1e-15)


def test_feature_sparsity_flattens_conv_activations():
    rng = np.random.default_rng(2)
    maps = np.maximum(rng.normal(size=(20, 3, 4, 4)), 0)
    assert utils.feature_sparsity(maps, 0.95) == utils.feature_sparsity(maps.reshape(20, -1), 0.95)


def test_feature_sparsity_decides_pairs_near_the_threshold_in_float64():
    # Many pairs whose correlation sits within float32 error of τ: float64 decides, matching the greedy definition.
    rng = np.random.default_rng(4)
    base = rng.normal(size=(2000, 1))
    phi = np.maximum(np.concatenate([base + s * rng.normal(size=(2000, 1)) for s in np.linspace(0.3, 0.34, 40)], 1), 0)
    for tau in (0.95, 0.96, 0.97):
        assert utils.feature_sparsity(phi, tau) == pytest.approx(greedy_feature_sparsity(phi, tau), rel=1e-12)


def small_conv_net():
    return torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.Conv2d(6, 8, 3, stride=2, padding=1), torch.nn.ReLU(inplace=True),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_block_feature_sparsity_one_pass_equals_each_block_alone(memory_format):
    torch.manual_seed(0)
    model = small_conv_net().eval().to(memory_format=memory_format)
    images = torch.rand(40, 3, 8, 8).contiguous(memory_format=memory_format)
    blocks = {"conv1": "1", "conv2": "3", "pooled": "5"}  # 6·8·8, 8·4·4 and 8 neurons per image
    stats = utils.block_feature_sparsity(model, blocks, images.split(16), max_neurons=60, seed=5)
    for name, path in blocks.items():
        with torch.no_grad():
            captured = model[:int(path) + 1](images).clone()
        assert stats[name]["density_all"] == (captured > 0).sum().item() / captured.numel()
        density, dedup = utils.feature_sparsity(captured, 0.95, max_neurons=60, seed=5)
        assert (stats[name]["density"], stats[name]["density_dedup"]) == pytest.approx((density, dedup), abs=1e-12)
        assert stats[name]["density_dedup"] <= stats[name]["density"]  # same sampled neurons: never above
    assert model.training is False  # the helper restores the mode it found


def test_jacobian_rank_counts_relative_singular_values():
    jac = np.diag([1.0, 1e-3, 1e-6, 0.0])
    assert utils.jacobian_rank(jac, 1e-4) == 2
    assert utils.jacobian_rank(jac, 1e-7) == 3
    assert utils.jacobian_rank(np.zeros((3, 3)), 1e-4) == 0
    rng = np.random.default_rng(0)
    low_rank = rng.normal(size=(30, 5)) @ rng.normal(size=(5, 20))
    assert utils.jacobian_rank(low_rank, 1e-10) == 5


def test_model_jacobian_matches_autograd_rows():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
    x = torch.randn(5, 3)
    jac = utils.model_jacobian(model, x)
    assert jac.shape == (5, sum(p.numel() for p in model.parameters()))
    for i in range(5):
        model.zero_grad()
        model(x[i:i + 1]).sum().backward()
        row = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        assert torch.allclose(jac[i], row, atol=1e-6)


def explicit_hessian(model, loss_of_model):
    """The Hessian of loss_of_model(call) w.r.t. all parameters of `model`, flattened in parameters() order, from
    torch.autograd.functional.hessian: the reference of the Lanczos estimate. call(*inputs) runs `model` with the
    parameters being differentiated."""
    names, params = zip(*model.named_parameters())
    theta = torch.cat([p.detach().reshape(-1) for p in params])

    def flat_loss(flat):
        values = dict(zip(names, (c.view_as(p) for c, p in zip(flat.split([p.numel() for p in params]), params))))
        return loss_of_model(lambda *inputs: torch.func.functional_call(model, values, inputs))

    return torch.autograd.functional.hessian(flat_loss, theta)


def test_hessian_top_eigenvalue_matches_eigvalsh_of_the_explicit_hessian_on_a_tiny_mlp():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()
    x, y = torch.randn(20, 3, dtype=torch.float64), torch.randint(3, (20,))
    eigenvalues = torch.linalg.eigvalsh(explicit_hessian(model, lambda call: F.cross_entropy(call(x), y)))
    estimate = utils.hessian_top_eigenvalue(model, lambda: F.cross_entropy(model(x), y), rtol=1e-10)
    assert estimate.converged and estimate.hvps <= len(eigenvalues)  # Lanczos: at most one product per dimension
    assert estimate.eigenvalue == pytest.approx(eigenvalues[-1].item(), rel=1e-4)
    assert torch.linalg.vector_norm(estimate.vector).item() == pytest.approx(1.0)
    # warm-started from its own eigenvector, the estimate is immediate; the default tolerance is within 1e-3
    warm = utils.hessian_top_eigenvalue(model, lambda: F.cross_entropy(model(x), y), estimate.vector)
    assert warm.converged and warm.hvps <= 2 and warm.eigenvalue == pytest.approx(eigenvalues[-1].item(), rel=1e-4)
    default = utils.hessian_top_eigenvalue(model, lambda: F.cross_entropy(model(x), y))
    assert default.converged and default.eigenvalue == pytest.approx(eigenvalues[-1].item(), rel=1e-3)
    # the Hessian of −L has a negative eigenvalue larger in magnitude than its top one: still the top one is found
    negated = utils.hessian_top_eigenvalue(model, lambda: -F.cross_entropy(model(x), y), rtol=1e-10)
    assert eigenvalues[-1] > -eigenvalues[0] > 0
    assert negated.eigenvalue == pytest.approx(-eigenvalues[0].item(), rel=1e-4)


def test_hessian_top_eigenvalue_matches_eigvalsh_on_the_diagonal_network_and_its_closed_form():
    import diag_net

    data = diag_net.make_data(n_train=20, input_dim=30, support_size=3, n_test=10, data_seed=0)
    u, v = np.full((1, 30), 0.1), np.zeros((1, 30))
    indices = diag_net.sgd_indices([1], 20, 400)
    u, v, _ = diag_net.sgd_steps(u, v, data["X"][indices], data["y"][indices], np.full(400, 0.3))  # off the init
    x, y = torch.from_numpy(data["X"]), torch.from_numpy(data["y"])

    class DiagonalNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.u, self.v = torch.nn.Parameter(torch.from_numpy(u[0])), torch.nn.Parameter(torch.from_numpy(v[0]))

        def forward(self, inputs):
            return inputs @ (self.u * self.v)

    def half_mse(call):  # diag_net's loss ‖Xβ − y‖²/(2n), checked against diag_net.half_mse below
        return (call(x) - y).square().sum() / (2 * len(y))

    model = DiagonalNet()
    assert half_mse(model).item() == pytest.approx(diag_net.half_mse(data["X"], data["y"], u * v)[0], rel=1e-12)
    hessian = explicit_hessian(model, half_mse)
    top = torch.linalg.eigvalsh(hessian)[-1].item()
    estimate = utils.hessian_top_eigenvalue(model, lambda: half_mse(model), rtol=1e-10)
    assert estimate.converged and estimate.eigenvalue == pytest.approx(top, rel=1e-4)
    # diag_net's closed-form Hessian and its exact sharpness, which the script logs
    np.testing.assert_allclose(diag_net.loss_hessian(data, u, v)[0], hessian.numpy(), atol=1e-12)
    assert diag_net.sharpness(data, u, v)[0] == pytest.approx(estimate.eigenvalue, rel=1e-4)


def test_hessian_top_eigenvalue_is_of_the_training_mode_loss_and_changes_nothing():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten(), torch.nn.Linear(16, 3)).double()
    model[1].running_mean.normal_()  # statistics that a measurement updating them would visibly change
    images, labels = torch.rand(8, 3, 6, 6, dtype=torch.float64), torch.randint(3, (8,))
    state = {key: value.clone() for key, value in model.state_dict().items()}
    rng = torch.get_rng_state()
    estimate = utils.hessian_top_eigenvalue(model, lambda: F.cross_entropy(model(images), labels), rtol=1e-10)
    assert torch.equal(rng, torch.get_rng_state())  # no global random number drawn
    for key, value in model.state_dict().items():  # parameters, BN running mean/var and num_batches_tracked
        assert torch.equal(value, state[key]), key
    assert all(p.grad is None for p in model.parameters()) and model.training
    # the Hessian of the loss with BatchNorm on the batch's own statistics (training mode): the loss SGD descends
    eigenvalues = torch.linalg.eigvalsh(explicit_hessian(model, lambda call: F.cross_entropy(call(images), labels)))
    assert estimate.converged and estimate.eigenvalue == pytest.approx(eigenvalues[-1].item(), rel=1e-4)


# ======================================================================================================================
# Toy-model helpers: evaluation points, seed summaries, presets
# ======================================================================================================================

# A preset of the shape both toy scripts use: shared knobs, and per-run knobs with one value per run or one for all.
TOY_PRESET = {"iterations": 100, "width": 8, "seeds": [0], "lr": [0.1, 0.2, 0.2], "decay": [1.0, 2.0, 4.0],
              "large_lr_frac": [0.5]}
TOY_PER_RUN = ("lr", "decay", "large_lr_frac")


def test_eval_iterations_by_hand_and_at_the_papers_sizes():
    # linspace(0, 10, 5) = [0, 2.5, 5, 7.5, 10] -> round half to even [0, 2, 5, 8, 10] -> drop the last
    assert utils.eval_iterations(10, 5).tolist() == [0, 2, 5, 8]
    assert utils.eval_iterations(10, 5, dense_prefix=3).tolist() == [0, 1, 2, 5, 8]  # ∪ {0, 1, 2}, 0 once
    # linspace(0, 3, 5) = [0, .75, 1.5, 2.25, 3] -> [0, 1, 2, 2]: duplicates removed; the prefix stops below N = 3
    assert utils.eval_iterations(3, 5, dense_prefix=10).tolist() == [0, 1, 2]
    # linspace(0, 1, 4)[:-1] = [0, 1/3, 2/3] -> [0, 0, 1]: iteration 1 = N does not exist, so it is dropped
    assert utils.eval_iterations(1, 4).tolist() == [0]
    # E1: 100 dense points + 249 spread ones, 0 counted once; the authors print their numbers at iteration 99 599
    e1 = utils.eval_iterations(100001, 250, dense_prefix=100)
    assert len(e1) == 348 and e1[:100].tolist() == list(range(100)) and e1[-1] == 99599
    e5 = utils.eval_iterations(14126, 250)  # the ReLU toys have no dense prefix
    assert len(e5) == 249 and e5[-1] == 14069  # round(14126·248/249)


def test_seed_summary_by_hand():
    finals = [{"iter": 90, "lr": 0.1, "train_loss": 1.0, "rank": 3}, {"iter": 40, "lr": 0.1, "train_loss": None},
              {"iter": 90, "lr": 0.1, "train_loss": 4.0, "rank": 6}, {"iter": 90, "lr": 0.1, "train_loss": 2.0}]
    summary = utils.seed_summary([7, 8, 9, 10], ["completed", "diverged", "completed", "completed"], finals)
    # seed 8 diverged; medians over seeds 7, 9, 10: train median(1, 4, 2) = 2, rank only where logged: median(3, 6)
    ci90 = summary.pop("median_ci90")
    assert summary == {"seeds": [7, 8, 9, 10], "diverged_seeds": [8], "fraction_diverged": 0.25,
                       "median_final": {"train_loss": 2.0, "rank": 4.5}, "final_iter": 90}
    assert ci90 == {"train_loss": utils.median_ci90([1.0, 4.0, 2.0]), "rank": utils.median_ci90([3, 6])}
    none_left = utils.seed_summary([None], ["diverged"], [{"iter": 3, "train_loss": None}])
    assert none_left["median_final"] is None and none_left["final_iter"] is None and none_left["fraction_diverged"] == 1
    assert none_left["median_ci90"] is None


def test_median_ci90_bootstrap_by_hand():
    assert utils.median_ci90([5.0, 5.0, 5.0]) == [5.0, 5.0]
    assert utils.median_ci90([7.0]) == [7.0, 7.0]
    # two values: a resample's median is 1 (both draws 1, p = 1/4), 1.5 (p = 1/2) or 2 (p = 1/4), so the 5th and
    # 95th percentiles of 2 000 resampled medians are 1 and 2
    assert utils.median_ci90([1.0, 2.0]) == [1.0, 2.0]
    values = list(np.random.default_rng(3).standard_normal(31))
    lower, upper = utils.median_ci90(values)
    assert lower < np.median(values) < upper and utils.median_ci90(values) == [lower, upper]  # fixed resampling seed
    # the interval of a median over 31 N(0,1) values is about ±1.645·1.2533/√31 = ±0.37 wide
    assert 0.4 < upper - lower < 1.1
    assert utils.median_ci90(values, seed=1) != [lower, upper]


def test_later_decay_wins_pairs_completed_seeds_only():
    earlier = {1: ("completed", {"test_loss": 3.0}), 2: ("completed", {"test_loss": 1.0}),
               3: ("diverged", {"test_loss": None}), 4: ("completed", {"test_loss": 5.0})}
    later = {1: ("completed", {"test_loss": 2.0}), 2: ("completed", {"test_loss": 4.0}),
             3: ("completed", {"test_loss": 0.1}), 4: ("diverged", {"test_loss": None})}
    # pairs: seeds 1 (3 -> 2, a win) and 2 (1 -> 4, a loss); seed 3 and 4 diverged in one of the runs
    assert utils.later_decay_wins(earlier, later, "test_loss") == {"metric": "test_loss", "wins": 1, "pairs": 2,
                                                                     "fraction": 0.5}
    assert utils.later_decay_wins({}, later, "test_loss")["fraction"] is None


def test_seed_noise_verdict_compares_the_difference_of_means_with_its_standard_error():
    # A = [1, 2, 3] (mean 2, var 1), B = [5, 6, 7] (mean 6, var 1): d = 4, se = sqrt(1/3 + 1/3) = 0.8165; 4 > 2·0.8165
    verdict, difference, error = utils.seed_noise_verdict([1, 2, 3], [5, 6, 7])
    assert verdict == "holds" and difference == pytest.approx(4.0) and error == pytest.approx(math.sqrt(2 / 3))
    assert utils.seed_noise_verdict([5, 6, 7], [1, 2, 3])[0] == "not reproduced"
    # B = [2, 4, 6] (mean 4, var 4): d = 2, se = sqrt(1/3 + 4/3) = 1.291; 2 < 2·1.291
    assert utils.seed_noise_verdict([1, 2, 3], [2, 4, 6])[0] == "within seed noise"
    assert utils.seed_noise_verdict([1, 2, 3], [2, 4, 6], z=1.5)[0] == "holds"  # 2 > 1.5·1.291 = 1.94
    with pytest.raises(ValueError, match="at least 2 seeds"):
        utils.seed_noise_verdict([1.0], [2.0, 3.0])


def test_jitter_factors_are_relative_reproducible_and_their_own_stream():
    state = np.random.get_state()
    first, second = utils.jitter_factors([(3, 4), (5,)], 1e-7, seed=2)
    assert first.shape == (3, 4) and second.shape == (5,)
    assert np.all(np.abs(first - 1) < 1e-6) and np.any(first != 1)
    again = utils.jitter_factors([(3, 4), (5,)], 1e-7, seed=2)
    assert np.array_equal(again[0], first) and np.array_equal(again[1], second)
    assert not np.array_equal(utils.jitter_factors([(3, 4)], 1e-7, seed=3)[0], first)
    assert np.array_equal(utils.jitter_factors([(3, 4)], 0.0, seed=2)[0], np.ones((3, 4)))
    assert all(np.array_equal(a, b) for a, b in zip(state, np.random.get_state()))  # global numpy untouched


def test_toy_label_noise_is_scaled_reproducible_fresh_per_step_and_its_own_stream():
    state = np.random.get_state()
    noise = utils.toy_label_noise(20000, 0.5, seed=3)
    assert noise.shape == (20000,) and abs(noise.std() - 0.5) < 0.01 and abs(noise.mean()) < 0.01
    assert np.array_equal(noise, utils.toy_label_noise(20000, 0.5, seed=3))
    assert np.array_equal(utils.toy_label_noise(20000, 1.0, seed=3), 2 * noise)
    assert not np.array_equal(noise, utils.toy_label_noise(20000, 0.5, seed=4))
    assert np.unique(noise).size == noise.size  # a fresh draw at every step
    assert not np.allclose(utils.jitter_factors([20000], 0.5, seed=3)[0] - 1, noise)  # not the jitter's draws
    assert all(np.array_equal(a, b) for a, b in zip(state, np.random.get_state()))  # global numpy untouched


def test_sharpness_iterations_are_the_first_evaluation_in_each_window_of_k_iterations():
    evals = [0, 1, 2, 3, 7, 12, 20, 28]
    assert utils.sharpness_iterations(evals, 5).tolist() == [0, 7, 12, 20, 28]  # windows [0, 5), [5, 10), ...
    assert utils.sharpness_iterations(evals, 10).tolist() == [0, 12, 20]  # [20, 30) has 20 and 28: the first
    assert utils.sharpness_iterations(evals, 1).tolist() == evals
    assert utils.sharpness_iterations(evals, 0).tolist() == []


def test_resolve_preset_names_a_chaos_measurement_apart():
    preset = {**TOY_PRESET, "init_jitter": 0.0, "data_seed": 1}
    assert utils.resolve_preset("e9", preset, {"init_jitter": 1e-7, "data_seed": 1, "seeds": [1, 2]},
                                TOY_PER_RUN)[2] == "e9_jitter"
    assert utils.resolve_preset("e9", preset, {"data_seed": 2}, TOY_PER_RUN)[2] == "e9_custom"  # no jitter
    assert utils.resolve_preset("e9", preset, {"init_jitter": 1e-7, "lr": [0.1]}, TOY_PER_RUN)[2] == "e9_custom"


def test_resolve_preset_broadcasts_one_value_and_takes_one_per_run():
    config, runs, experiment = utils.resolve_preset("e9", TOY_PRESET, {}, TOY_PER_RUN)
    assert experiment == "e9" and config == TOY_PRESET
    assert runs == [{"lr": 0.1, "decay": 1.0, "large_lr_frac": 0.5}, {"lr": 0.2, "decay": 2.0, "large_lr_frac": 0.5},
                    {"lr": 0.2, "decay": 4.0, "large_lr_frac": 0.5}]
    # one value overrides the knob of every run, one value per run sets each run; shared knobs override as given
    config, runs, experiment = utils.resolve_preset("e9", TOY_PRESET, {"lr": [0.3], "large_lr_frac": [0.1, 0.2, 0.3],
                                                                       "width": 4}, TOY_PER_RUN)
    assert [(run["lr"], run["decay"], run["large_lr_frac"]) for run in runs] == [(0.3, 1.0, 0.1), (0.3, 2.0, 0.2),
                                                                                (0.3, 4.0, 0.3)]
    assert config["width"] == 4 and config["iterations"] == 100 and experiment == "e9_custom"


def test_resolve_preset_names_the_experiment_custom_unless_only_neutral_flags_are_given():
    def experiment(given):
        return utils.resolve_preset("e9", TOY_PRESET, given, TOY_PER_RUN)[2]

    assert experiment({"seeds": [1, 2], "out_dir": "x", "log_interval": 0.0}) == "e9"  # nothing trained changes
    assert experiment({"iterations": 100}) == "e9_custom"  # even the preset's own value is an override


@pytest.mark.parametrize("given, flag, words", [
    ({"lr": [0.1, 0.2]}, "--lr", "2 values, but --preset e9 has 3 runs"),
    ({"n_train": 5}, "--n-train", "not used by --preset e9"),
    ({"decay": [2.0]}, "--decay", "runs 2 and 3 would be identical"),  # both become η = 0.2, ÷2
    ({"seeds": [1, 2, 1]}, "--seeds", "repeated seed"),
])
def test_resolve_preset_errors_name_the_flag(given, flag, words):
    with pytest.raises(utils.FlagError) as error:
        utils.resolve_preset("e9", TOY_PRESET, given, TOY_PER_RUN)
    assert error.value.flag == flag and words in error.value.message
    assert isinstance(error.value, ValueError) and str(error.value).startswith(flag)


def test_add_preset_flag_lists_every_presets_value_and_is_absent_unless_given():
    parser = argparse.ArgumentParser()
    presets = {"e1": {"lr": [0.25, 0.282], "algorithm": ["sgd"]}, "e2": {"lr": [2.0]}}
    utils.add_preset_flag(parser, presets, "--lr", "η", nargs="+", type=float)
    utils.add_preset_flag(parser, presets, "--algorithm", "which", nargs="+")
    assert parser._option_string_actions["--lr"].help == "η [default by preset: e1: 0.25 0.282; e2: 2]"
    assert parser._option_string_actions["--algorithm"].help == "which [default by preset: e1: sgd]"
    assert vars(parser.parse_args([])) == {} and vars(parser.parse_args(["--lr", "1"])) == {"lr": [1.0]}
    assert utils.flag_name("large_lr_frac") == "--large-lr-frac"


@pytest.mark.parametrize("run, label, slug", [
    ({"algorithm": "sgd", "lr": 0.25, "large_lr_frac": 1.0, "decay": 1.0}, "SGD η = 0.25, constant", "sgd_lr0.25"),
    ({"algorithm": "gd", "lr": 3.53, "large_lr_frac": 0.1, "decay": 4.8}, "GD η = 3.53, ÷4.8 at 10 %",
     "gd_lr3.53_div4.8_at0.1"),
    ({"lr": 0.04, "large_lr_frac": 0.3, "decay": 2.5, "warmup_factor": 6.0, "warmup_power": 0.5},
     "η = 0.04, warmup ×6 (p = 0.5), ÷2.5 at 30 %", "lr0.04_F6_p0.5_div2.5_at0.3"),
    ({"lr": 2e-4, "large_lr_frac": 0.5, "decay": 1.0, "warmup_factor": 200.0, "warmup_power": 1.0},
     "η = 0.0002, warmup ×200 (p = 1), no decay after 50 %", "lr0.0002_F200_p1_at0.5"),
    ({"lr": 0.13, "large_lr_frac": 1.0, "decay": 1.0, "warmup_factor": 1.0, "warmup_power": 1.0},
     "η = 0.13, constant", "lr0.13"),
])
def test_toy_run_names_by_hand(run, label, slug):
    assert utils.toy_run_names(run) == (label, slug)

# ======================================================================================================================
# Run logs and command line
# ======================================================================================================================


def test_write_json_atomic_replaces_whole_file_and_cleans_up(tmp_path):
    path = tmp_path / "log.json"
    utils.write_json_atomic(path, {"a": 1, "loss": float("nan"), "arr": np.arange(3), "t": torch.tensor(2.5)})
    assert json.loads(path.read_text()) == {"a": 1, "loss": None, "arr": [0, 1, 2], "t": 2.5}

    class Unserialisable:
        pass

    with pytest.raises(TypeError):
        utils.write_json_atomic(path, {"bad": Unserialisable()})
    assert json.loads(path.read_text())["a"] == 1  # the old complete file survives a failed write
    assert os.listdir(tmp_path) == ["log.json"]  # no temp file left behind


def test_run_log_statuses(tmp_path):
    path = tmp_path / "run.json"
    with utils.RunLog(path, "demo", {"lr": 0.1}) as log:
        assert json.loads(path.read_text())["status"] == "running"
        log.record(iter=0, train_loss=1.0)
        log.record(iter=10, train_loss=0.5)
    saved = json.loads(path.read_text())
    assert saved["status"] == "completed" and saved["final"] == {"iter": 10, "train_loss": 0.5}
    with pytest.raises(KeyboardInterrupt):
        with utils.RunLog(path, "demo", {}) as log:
            log.record(iter=0, train_loss=1.0)
            raise KeyboardInterrupt
    assert json.loads(path.read_text())["status"] == "interrupted"
    with pytest.raises(RuntimeError):
        with utils.RunLog(path, "demo", {}):
            raise RuntimeError("boom")
    saved = json.loads(path.read_text())
    assert saved["status"] == "failed" and "boom" in saved["error"]
    with pytest.raises(ValueError):
        utils.RunLog(path, "demo", {}).record(train_loss=1.0)  # records need an `iter`


def test_run_slug_is_file_name_safe():
    assert utils.run_slug(lr=0.25, decay=None, gd=True, sgd=False) == "lr0.25_gd"
    assert utils.run_slug(name="a b=c/d") == "namea-b-c-d"
    assert utils.run_slug() == "run"


def test_argument_parser_errors_are_one_line_with_exit_code_2(capsys):
    parser = utils.ArgumentParser(prog="prog")
    parser.add_argument("--lr", type=utils.positive_float, default=0.1)
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--lr", "-1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--lr" in err
    with pytest.raises(SystemExit) as exit_info:
        utils.usage_error("--out-dir", "cannot write")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().endswith("argument --out-dir: cannot write")


def test_help_shows_every_default_including_zero_but_not_none_or_false():
    parser = utils.ArgumentParser(prog="prog")
    parser.add_argument("--momentum", type=float, default=0.0, help="momentum")
    parser.add_argument("--seed", type=int, default=0, help="seed")
    parser.add_argument("--n-train", type=int, default=None, help="first N images")
    parser.add_argument("--augment", action="store_true", help="crop and flip")
    parser.add_argument("--eval-every", type=int, default=200, help="iterations (default: every 200)")
    text = " ".join(parser.format_help().split())
    assert "momentum (default: 0.0)" in text and "seed (default: 0)" in text
    assert "first N images --augment" in text and "crop and flip" in text and "(default: None)" not in text
    assert "(default: False)" not in text and text.count("default:") == 3


def test_prepare_out_dir_rejects_unwritable_path(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(SystemExit) as exit_info:
        utils.prepare_out_dir(str(blocker / "sub"))
    assert exit_info.value.code == 2 and "--out-dir" in capsys.readouterr().err
    assert utils.prepare_out_dir(str(tmp_path / "new")) == str(tmp_path / "new")


def test_a_mistyped_flag_gets_a_suggestion(capsys):
    parser = utils.ArgumentParser(prog="prog")
    for flag in ("--lr", "--large-lr-frac", "--rank-points", "--eval-points", "--lr-schedule"):
        parser.add_argument(flag)
    for typed, expected in (("--lr_init", "--lr"), ("--lr-init=0.1", "--lr"), ("--eval-point", "--eval-points"),
                            ("--large_lr_frac", "--large-lr-frac"),
                            ("--larg-lr-frac", "--large-lr-frac")):
        with pytest.raises(SystemExit):
            parser.parse_args([typed, "1"])
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"did you mean {expected}?" in err, err
    with pytest.raises(SystemExit):
        parser.parse_args(["--zzz"])
    assert "did you mean" not in capsys.readouterr().err
    with pytest.raises(SystemExit):  # an old name gets its new one, not the closest spelling (--decay)
        parser.parse_args(["--decay-frac", "0.5"])
    assert "--decay-frac is now --large-lr-frac" in capsys.readouterr().err


# ======================================================================================================================
# Image data
# ======================================================================================================================


def test_cifar10_loader_reads_channel_major_rows_exactly(fake_cifar10_dir):
    data = utils.load_image_dataset("cifar10", fake_cifar10_dir)
    assert data.name == "cifar10" and data.num_classes == 10
    assert data.train_images.shape == (5 * FAKE_CIFAR_PER_BATCH, 3, 32, 32) and data.train_images.dtype == torch.uint8
    assert data.test_images.shape == (FAKE_CIFAR_TEST, 3, 32, 32) and data.test_labels.dtype == torch.int64
    # the hand-made image: plane 0 must be R = 8·row, plane 1 G = 8·column, plane 2 B = 77
    image = data.train_images[0].long()
    assert torch.equal(image[0], 8 * torch.arange(32)[:, None].expand(32, 32))
    assert torch.equal(image[1], 8 * torch.arange(32)[None, :].expand(32, 32))
    assert torch.equal(image[2], torch.full((32, 32), 77))
    folder = os.path.join(fake_cifar10_dir, "cifar-10-batches-py")
    batches = [read_pickle(os.path.join(folder, f"data_batch_{k}")) for k in range(1, 6)]
    rows = np.concatenate([b["data"] for b in batches])
    assert torch.equal(data.train_images.reshape(len(rows), -1), torch.from_numpy(rows))
    assert data.train_labels.tolist() == sum((b["labels"] for b in batches), [])
    assert data.test_labels.tolist() == [k % 10 for k in range(FAKE_CIFAR_TEST)]


def test_cifar100_loader_uses_fine_labels(fake_cifar100_dir):
    data = utils.load_image_dataset("cifar100", fake_cifar100_dir)
    train = read_pickle(os.path.join(fake_cifar100_dir, "cifar-100-python", "train"))
    assert data.num_classes == 100 and data.train_images.shape == (5 * FAKE_CIFAR_PER_BATCH, 3, 32, 32)
    assert data.train_labels.tolist() == train["fine_labels"] and data.train_labels.max() == 99
    assert torch.equal(data.train_images.reshape(len(train["data"]), -1), torch.from_numpy(train["data"]))
    assert data.test_images.shape == (FAKE_CIFAR_TEST, 3, 32, 32)


def test_tinyimagenet_loader_classes_labels_pixels(fake_tinyimagenet_dir, tmp_path):
    root = shutil.copytree(fake_tinyimagenet_dir, tmp_path / "data")
    data = utils.load_image_dataset("tinyimagenet", str(root))
    assert data.num_classes == len(FAKE_TINY_WNIDS)  # from wnids.txt (200 in the real set)
    n_train = len(FAKE_TINY_WNIDS) * FAKE_TINY_TRAIN
    assert data.train_images.shape == (n_train, 3, 64, 64) and data.train_images.dtype == torch.uint8
    # stored class-interleaved (k-th image of every class, then the next), so any prefix is class-balanced
    assert data.train_labels.tolist() == [0, 1, 2] * FAKE_TINY_TRAIN
    colours = data.train_images.float().mean(dim=(2, 3))
    grey = n_train - 2  # the last image of class 1
    expected = torch.tensor([FAKE_TINY_COLOURS[k] for k in data.train_labels.tolist()], dtype=torch.float)
    expected[grey] = 128.0
    assert (colours - expected).abs().max() < 3  # JPEG of a flat colour: within a few levels
    assert torch.equal(data.train_images[grey, 0], data.train_images[grey, 1])  # greyscale -> 3 equal channels
    assert torch.equal(data.train_images[grey, 0], data.train_images[grey, 2])
    assert data.test_labels.tolist() == list(FAKE_TINY_VAL_LABELS)  # from val_annotations.txt, in file order
    assert data.test_images.shape == (len(FAKE_TINY_VAL_LABELS), 3, 64, 64)
    assert (data.test_images[0].float() - 60).abs().max() < 3 and torch.equal(data.test_images[0, 0],
                                                                               data.test_images[0, 2])


def test_tinyimagenet_damaged_jpeg_raises_naming_the_file(fake_tinyimagenet_dir, tmp_path):
    root = shutil.copytree(fake_tinyimagenet_dir, tmp_path / "data")
    (root / "tiny-imagenet-200" / "val" / "images" / "val_3.JPEG").write_bytes(b"\xff\xd8 not really a JPEG")
    with pytest.raises(ValueError, match="val_3.JPEG"):
        utils.load_image_dataset("tinyimagenet", str(root))


def test_keep_first_train_keeps_the_prefix_and_rejects_too_many(fake_cifar10_dir):
    full = utils.load_image_dataset("cifar10", fake_cifar10_dir)
    part = utils.keep_first_train(full, 10)
    assert torch.equal(part.train_images, full.train_images[:10]) and torch.equal(part.train_labels,
                                                                                 full.train_labels[:10])
    assert torch.equal(part.test_images, full.test_images)
    with pytest.raises(ValueError, match="41 training images requested but cifar10 has 40"):
        utils.keep_first_train(full, 41)


@pytest.mark.parametrize("name, folder", [("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python"),
                                          ("tinyimagenet", "tiny-imagenet-200")])
def test_missing_data_raises_saying_where_and_how_to_get_it(name, folder, tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        utils.load_image_dataset(name, str(tmp_path))
    assert "--download" in str(error.value) and os.path.join(str(tmp_path), folder) in str(error.value)


def test_failed_download_raises_a_download_error(tmp_path, monkeypatch):
    import urllib.error

    import torchvision.datasets.utils

    calls = []

    def no_network(url, download_root, md5=None, **kwargs):
        calls.append((url, md5))
        raise urllib.error.URLError("[Errno -3] Temporary failure\nin name resolution")

    monkeypatch.setattr(torchvision.datasets.utils, "download_and_extract_archive", no_network)
    with pytest.raises(utils.DownloadError) as error:
        utils.load_image_dataset("cifar10", str(tmp_path / "data"), download=True)
    assert calls == [("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a")]
    message = str(error.value)
    assert "\n" not in message and "downloading CIFAR-10" in message and "name resolution" in message


def test_failed_download_of_unreachable_url_fails_fast(tmp_path, monkeypatch):
    # the real torchvision download path against a closed local port: refused at once, no network needed
    monkeypatch.setitem(utils.IMAGE_SOURCES["cifar100"], "url", "http://127.0.0.1:9/cifar-100-python.tar.gz")
    with pytest.raises(utils.DownloadError, match="downloading CIFAR-100"):
        utils.load_image_dataset("cifar100", str(tmp_path), download=True)


def test_download_fills_missing_data_dir(fake_cifar10_dir, tmp_path, monkeypatch):
    import torchvision.datasets.utils

    def fake_download(url, download_root, md5=None, **kwargs):  # "extracts" the fake archive
        shutil.copytree(os.path.join(fake_cifar10_dir, "cifar-10-batches-py"),
                        os.path.join(download_root, "cifar-10-batches-py"))

    monkeypatch.setattr(torchvision.datasets.utils, "download_and_extract_archive", fake_download)
    data = utils.load_image_dataset("cifar10", str(tmp_path / "new"), download=True)
    assert data.train_images.shape[0] == 5 * FAKE_CIFAR_PER_BATCH


def candidate_crops(image, padding=4):
    """All (top, left, flip) -> crop of the zero-padded image, by plain slicing (the reference semantics)."""
    channels, height, width = image.shape
    padded = torch.zeros(channels, height + 2 * padding, width + 2 * padding, dtype=image.dtype)
    padded[:, padding:padding + height, padding:padding + width] = image
    crops = {}
    for top in range(2 * padding + 1):
        for left in range(2 * padding + 1):
            crop = padded[:, top:top + height, left:left + width]
            crops[(top, left, False)], crops[(top, left, True)] = crop, crop.flip(2)
    return crops


def test_augment_batch_is_a_padded_crop_or_its_mirror():
    images = torch.randint(0, 256, (64, 3, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    out = utils.augment_batch(images, seed=3, step=7)
    assert out.shape == images.shape and out.dtype == torch.uint8
    found = []
    for image, result in zip(images, out):
        matches = [key for key, crop in candidate_crops(image).items() if torch.equal(crop, result)]
        assert len(matches) == 1, "output is not a 4-pixel-padded crop (or its mirror) of its input"
        found.append(matches[0])
    tops, lefts, flips = zip(*found)
    assert len(set(tops)) >= 6 and len(set(lefts)) >= 6 and 16 <= sum(flips) <= 48  # really random, both flips


def test_augment_batch_is_a_pure_function_of_seed_and_step():
    images = torch.randint(0, 256, (32, 3, 32, 32), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    state = torch.get_rng_state()
    a = utils.augment_batch(images, seed=0, step=5)
    assert torch.equal(a, utils.augment_batch(images, seed=0, step=5))
    assert not torch.equal(a, utils.augment_batch(images, seed=0, step=6))
    assert not torch.equal(a, utils.augment_batch(images, seed=1, step=5))
    assert torch.equal(state, torch.get_rng_state())  # the global generator is untouched
    if torch.cuda.is_available():  # random numbers are drawn on the CPU: GPU batches are augmented identically
        assert torch.equal(a, utils.augment_batch(images.cuda(), seed=0, step=5).cpu())


def test_label_noise_rate_uniform_labels_fresh_per_step_and_reproducible():
    labels = torch.arange(256) % 10
    state = torch.get_rng_state()
    noisy = torch.stack([utils.label_noise(labels, 10, 0.3, seed=0, step=step) for step in range(200)])
    changed = noisy != labels
    # each label is redrawn with probability P, uniformly over all 10 classes: it changes with probability P·(1 − 1/C)
    assert changed.float().mean().item() == pytest.approx(0.3 * 0.9, abs=0.01)
    assert torch.bincount(noisy[changed], minlength=10).min() > 0.8 * changed.sum() / 10  # uniform over classes
    assert not torch.equal(changed[0], changed[1])  # fresh noise at every step
    assert torch.equal(noisy[5], utils.label_noise(labels, 10, 0.3, seed=0, step=5))  # a function of (seed, step)
    assert not torch.equal(noisy[5], utils.label_noise(labels, 10, 0.3, seed=1, step=5))
    assert torch.equal(utils.label_noise(labels, 10, 0.0, seed=0, step=5), labels)
    assert (utils.label_noise(labels, 10, 1.0, seed=0, step=5) != labels).float().mean() > 0.8
    assert torch.equal(state, torch.get_rng_state())  # the global generator is untouched
    assert torch.equal(labels, torch.arange(256) % 10)  # a new tensor: the data set's labels stay clean


def test_augment_batch_of_blank_images_gives_shifted_rectangles():
    out = utils.augment_batch(torch.full((256, 3, 32, 32), 255, dtype=torch.uint8), seed=0, step=0)
    assert out.unique().tolist() == [0, 255]  # the zero padding shows up
    heights, widths = [], []
    for image in out:
        mask = image[0] > 0
        assert torch.equal(image[0], image[1]) and torch.equal(image[0], image[2])
        rows, cols = mask.any(dim=1), mask.any(dim=0)
        assert torch.equal(mask, rows[:, None] & cols[None, :])  # the non-zero area is a rectangle ...
        for line in (rows, cols):  # ... touching the image border on one side (a shift, not a hole)
            assert bool(line[0]) or bool(line[-1])
        heights.append(int(rows.sum()))
        widths.append(int(cols.sum()))
    assert set(heights) == set(widths) == {28, 29, 30, 31, 32}  # shifts of 0..4 pixels (offsets 0..8 of 9)


def test_epoch_batches_are_full_disjoint_and_a_pure_function_of_seed_and_epoch():
    state = torch.get_rng_state()
    batches = utils.epoch_batches(1000, 64, epoch=3, seed=7, device="cpu")
    assert batches.dtype == torch.int64 and batches.shape == (15, 64)  # 1000 = 15·64 + 40: no short 16th batch
    used = batches.flatten()
    assert len(used.unique()) == 960 and used.min() >= 0 and used.max() < 1000
    assert torch.equal(batches, utils.epoch_batches(1000, 64, epoch=3, seed=7, device="cpu"))
    assert not torch.equal(batches, utils.epoch_batches(1000, 64, epoch=4, seed=7, device="cpu"))
    assert not torch.equal(batches, utils.epoch_batches(1000, 64, epoch=3, seed=8, device="cpu"))
    assert torch.equal(state, torch.get_rng_state())
    left_out = [set(range(1000)) - set(utils.epoch_batches(1000, 64, epoch, 7).flatten().tolist()) for epoch in range(5)]
    assert all(len(s) == 40 for s in left_out) and len(set(map(frozenset, left_out))) == 5  # other images each epoch
    assert utils.epoch_batches(256, 256, 0, 0).shape == (1, 256)
    with pytest.raises(ValueError, match="batch size"):
        utils.epoch_batches(100, 256, 0, 0)


def test_images_to_float_scales_to_unit_interval_without_normalisation():
    images = torch.tensor([0, 51, 255], dtype=torch.uint8).reshape(1, 3, 1, 1).expand(2, 3, 4, 4).contiguous()
    out = utils.images_to_float(images)
    assert out.dtype == torch.float32 and out.shape == images.shape
    assert out[0, :, 0, 0].tolist() == pytest.approx([0.0, 0.2, 1.0])
    last = utils.images_to_float(images, channels_last=True)
    assert last.is_contiguous(memory_format=torch.channels_last) and torch.equal(last, out)


def test_synthetic_dataset_is_fixed_balanced_and_learnable():
    torch.manual_seed(0)
    first = utils.load_image_dataset("synthetic", None)
    torch.manual_seed(1)  # the training seed must not change the data
    second = utils.keep_first_train(utils.load_image_dataset("synthetic", None), 100)
    assert first.train_images.shape == (utils.SYNTHETIC_TRAIN, 3, 32, 32) and first.num_classes == 10
    assert first.test_images.shape == (utils.SYNTHETIC_TEST, 3, 32, 32) and first.train_images.dtype == torch.uint8
    assert torch.equal(second.train_images, first.train_images[:100]) and torch.equal(second.test_images,
                                                                                      first.test_images)
    assert torch.bincount(first.train_labels).tolist() == [utils.SYNTHETIC_TRAIN // 10] * 10
    # learnable: even a nearest-class-mean classifier on raw pixels is far above chance (10 %)
    x = first.train_images.flatten(1).float()
    means = torch.stack([x[first.train_labels == k].mean(dim=0) for k in range(10)])
    predicted = torch.cdist(first.test_images.flatten(1).float(), means).argmin(dim=1)
    assert (predicted == first.test_labels).float().mean() > 0.6


@pytest.mark.skipif(not os.path.isdir(os.path.join(SHARED_DATA, "cifar-10-batches-py")),
                    reason="real CIFAR-10 not present in ../shared/data (optional; the kit never needs it)")
def test_real_cifar10_in_shared_data_loads():
    # a re-encoded copy whose checksums differ from the official files: the loader reads the layout, not MD5 sums
    data = utils.load_image_dataset("cifar10", SHARED_DATA)
    assert data.train_images.shape == (50000, 3, 32, 32) and data.test_images.shape == (10000, 3, 32, 32)
    assert torch.bincount(data.train_labels).tolist() == [5000] * 10
    assert torch.bincount(data.test_labels).tolist() == [1000] * 10
    raw = read_pickle(os.path.join(SHARED_DATA, "cifar-10-batches-py", "test_batch"))
    assert torch.equal(data.test_images[-1].flatten(), torch.from_numpy(raw["data"][-1]))


# ======================================================================================================================
# Deep-net building blocks
# ======================================================================================================================


def test_eval_batch_size_default_depends_on_the_device_and_an_explicit_value_is_kept():
    def resolved(device, eval_batch_size=None):
        args = argparse.Namespace(eval_batch_size=eval_batch_size, precision="fp32", deterministic=False)
        utils.configure_backend(args, torch.device(device))
        return args.eval_batch_size

    assert resolved("cpu") == 128 and resolved("cpu", 700) == 700
    assert resolved("meta") == 512  # any accelerator (the CUDA-only settings are not touched for "meta")


def test_channels_last_falls_back_to_nchw_only_for_models_with_the_broken_onednn_conv(capsys):
    """A 1×1 stride-2 conv with 2-7 input channels (ResNet-18's shortcuts at --width 2-7) is broken in oneDNN's
    channels_last CPU backward on AVX2; 8 input channels or stride 1 keep channels_last; CUDA never falls back."""
    def net(channels, stride):
        return torch.nn.Sequential(torch.nn.Conv2d(3, channels, 3), torch.nn.Conv2d(channels, 16, 1, stride=stride))

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for model, device, keeps in [(net(4, 2), cpu, False), (net(8, 2), cpu, True), (net(4, 1), cpu, True),
                                 (net(4, 2), cuda, True)]:
        args = argparse.Namespace(channels_last=True)
        model = utils.apply_channels_last(args, model, device)
        assert args.channels_last is keeps
        assert model[0].weight.is_contiguous(memory_format=torch.channels_last if keeps else torch.contiguous_format)
    assert capsys.readouterr().out.count("note: running without channels_last") == 1
    args = argparse.Namespace(channels_last=False)  # --no-channels-last leaves the model as it is
    model = utils.apply_channels_last(args, net(8, 2), cpu)
    assert not model[0].weight.is_contiguous(memory_format=torch.channels_last) and args.channels_last is False


def test_run_clock_images_per_sec_excludes_evaluation_time_also_during_an_evaluation(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(utils.time, "perf_counter", lambda: now[0])
    clock = utils.RunClock(elapsed_before=10.0)
    clock.add_step(512)
    now[0] += 2.0  # 2 s of training
    with clock.evaluating():
        now[0] += 3.0  # 3 s into an evaluation: the logged throughput must not count them
        assert clock.images_per_sec() == 256.0
    now[0] += 2.0
    clock.add_step(512)
    assert clock.images_per_sec() == 256.0 and clock.elapsed() == 17.0 and clock.eval_seconds == 3.0
    # 2 s per step, 3 s per evaluation: from step 90 to 100, evaluating every 5 steps: 10 steps and 2 evaluations
    assert clock.remaining_seconds(step=90, stop_step=100, total_steps=100, eval_every=5) == 10 * 2.0 + 2 * 3.0
    # every 4th step and the last one (10): 4, 8, 10; stopping early (--stop-at-epoch) skips the last one
    assert clock.remaining_seconds(step=0, stop_step=10, total_steps=10, eval_every=4) == 10 * 2.0 + 3 * 3.0
    assert clock.remaining_seconds(step=0, stop_step=6, total_steps=10, eval_every=4) == 6 * 2.0 + 1 * 3.0


def test_evaluate_classifier_reports_losses_errors_and_three_densities_per_block():
    torch.manual_seed(0)
    args = argparse.Namespace(sparsity_examples=64, sparsity_neurons=20, eval_batch_size=16, channels_last=False,
                              tau=0.95, seed=0)
    data = utils.keep_first_train(utils.synthetic_image_dataset(), 100)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, stride=4), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 8 * 8, 10))
    metrics = utils.evaluate_classifier(model, data, {"conv": "1"}, args)
    assert set(metrics) == {"train_loss", "train_error", "test_loss", "test_error", "density_all_conv",
                            "density_conv", "density_dedup_conv"}
    with torch.no_grad():
        logits = model(utils.images_to_float(data.test_images))
        hidden = model[:2](utils.images_to_float(data.train_images[:64]))
    assert metrics["test_loss"] == pytest.approx(F.cross_entropy(logits, data.test_labels).item(), rel=1e-5)
    assert metrics["test_error"] == (logits.argmax(1) != data.test_labels).float().mean().item()
    assert metrics["density_all_conv"] == pytest.approx((hidden > 0).float().mean().item())  # all 256 neurons
    assert (metrics["density_conv"], metrics["density_dedup_conv"]) == pytest.approx(
        utils.feature_sparsity(hidden, 0.95, max_neurons=20, seed=0))  # the 20 sampled ones
    assert model.training


def test_read_checkpoint_loads_what_save_checkpoint_wrote_and_refuses_pickled_objects_and_unreadable_files(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()  # a momentum buffer in the optimizer state
    path = str(tmp_path / "run.pt")
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": 7, "window_loss": 1.5,
             "window_steps": 2, "elapsed": 3.0, "args": {"lr": 0.1, "n_train": None, "dataset": "synthetic"},
             "torch_rng": torch.get_rng_state()}
    utils.save_checkpoint(path, **state)
    loaded = utils.read_checkpoint(path)
    assert torch.equal(loaded["torch_rng"], state["torch_rng"]) and loaded["args"] == state["args"]
    assert torch.equal(loaded["optimizer"]["state"][0]["momentum_buffer"],
                       state["optimizer"]["state"][0]["momentum_buffer"])

    marker = tmp_path / "code-ran"
    torch.save({**state, "note": CreatesFileWhenUnpickled(marker)}, path)
    with pytest.raises(utils.CheckpointError, match=r"pickled Python object \(io\.open\); refusing"):
        utils.read_checkpoint(path)
    assert not marker.exists()  # refused before anything in the file ran

    torch.save({"model": model.state_dict()}, path)
    with pytest.raises(utils.CheckpointError, match="not a checkpoint of train_resnet.py or train_densenet.py"):
        utils.read_checkpoint(path)
    for content in (b"", b"plain text", open(path, "rb").read()[:200]):  # empty, not torch, truncated
        with open(path, "wb") as f:
            f.write(content)
        with pytest.raises(utils.CheckpointError, match="not a (readable )?torch checkpoint"):
            utils.read_checkpoint(path)
    with pytest.raises(utils.CheckpointError, match="cannot read"):
        utils.read_checkpoint(str(tmp_path))  # a folder


def test_check_earlier_run_refuses_to_overwrite_a_run_unless_told_to_resume_or_restart(tmp_path, capsys):
    log_path, checkpoint_path = str(tmp_path / "run.json"), str(tmp_path / "run.pt")

    def check(resume=False, restart=False):
        """The exit code and stderr of utils.check_earlier_run (None and '' if it lets the run start)."""
        try:
            utils.check_earlier_run(argparse.Namespace(resume=resume, restart=restart), log_path, checkpoint_path)
        except SystemExit as stop:
            return stop.code, capsys.readouterr().err
        return None, capsys.readouterr().err

    def write(status, checkpoint):
        utils.write_json_atomic(log_path, {"status": status, "history": []})
        if checkpoint:
            utils.save_checkpoint(checkpoint_path, step=2)

    assert check() == (None, "")  # a new run
    write("interrupted", checkpoint=True)
    code, err = check()
    assert code == 2 and err.count("\n") == 1 and "argument --resume:" in err and "--restart" in err
    assert "(log status: interrupted)" in err and os.path.exists(log_path) and os.path.exists(checkpoint_path)
    assert check(resume=True) == (None, "") and os.path.exists(checkpoint_path)
    assert check(restart=True) == (None, "")
    assert not os.path.exists(log_path) and not os.path.exists(checkpoint_path)
    for status in ("completed", "diverged"):  # a finished run is refused too, with or without its checkpoint
        for checkpoint in (True, False):
            write(status, checkpoint)
            code, err = check()
            assert code == 2 and f"argument --restart: this run has already ended ({status};" in err
            check(restart=True)
    write("failed", checkpoint=False)  # crashed before its first checkpoint: nothing to resume
    code, err = check()
    assert code == 2 and "argument --restart:" in err and "no checkpoint to resume from" in err


def test_schedule_label_names_the_schedule_the_optimiser_and_label_noise():
    import types
    args = dict(lr=0.1, lr_schedule="constant", warmup_exp=1.05, large_lr_frac=0.5, momentum=0.0, weight_decay=0.0,
                augment=False, label_noise=0.0)
    assert utils.schedule_label(types.SimpleNamespace(**args)) == "η = 0.1 constant"
    assert utils.schedule_label(types.SimpleNamespace(**dict(args, label_noise=0.2))) == \
        "η = 0.1 constant, label noise 0.2"
    decayed = dict(args, lr=0.05, lr_schedule="piecewise", warmup_exp=1.0, momentum=0.9, weight_decay=5e-4,
                   augment=True)
    assert utils.schedule_label(types.SimpleNamespace(**decayed)) == "η0 = 0.05, decay at 50 % (mom 0.9, wd 0.0005, aug)"
