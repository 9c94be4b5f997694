"""Test suite: unit tests of the shared metrics/schedules/logs, and every script run end to end at a tiny size.

Run with `make test` (installs into .venv/ first) or `python -m pytest -q test_smoke.py`. No network, no GPU, no real
data set needed: the tests generate tiny files in each real on-disk format.
"""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import utils

REPO = os.path.dirname(os.path.abspath(__file__))


def run_script(*args, timeout=300):
    """Run a repo script as a subprocess (as a user would) and return the CompletedProcess."""
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def assert_valid_log(path, script):
    """The documented run-log schema (utils.RunLog): the keys every script writes, with sane types."""
    with open(path) as f:
        log = json.load(f)
    for key in ("script", "config", "env", "status", "history", "final"):
        assert key in log, f"{path}: missing {key!r}"
    assert log["script"] == script
    assert log["status"] in utils.RUN_STATUSES
    assert isinstance(log["history"], list) and log["history"], f"{path}: empty history"
    assert all("iter" in record for record in log["history"])
    assert log["final"] == log["history"][-1]
    assert "torch" in log["env"] and "device" in log["env"]
    return log


# ======================================================================================================================
# Feature sparsity (SPEC §1.1)
# ======================================================================================================================


def greedy_feature_sparsity(phi, corr_threshold):
    """The literal SPEC §1.1 definition, without subsampling: drop dead columns, then visit columns in order and delete
    column i if |corr(i, j)| > τ for ANY column j still present (earlier or later), removing it at once."""
    phi = np.asarray(phi, dtype=np.float64)
    n_rows, n_cols = phi.shape
    density = (phi > 0).sum() / (n_rows * n_cols)
    alive = phi[:, (phi > 0).any(axis=0)]
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = np.atleast_2d(np.corrcoef(alive.T)) if alive.shape[1] > 1 else np.ones((1, 1))
    present = list(range(alive.shape[1]))
    for i in range(alive.shape[1]):
        if any(abs(corr[i, j]) > corr_threshold for j in present if j != i):  # NaN > τ is False
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
    assert utils.duplicate_columns(torch.tensor(phi[:, 1:]), 0.95).tolist() == [True, False, False]


def test_feature_sparsity_threshold_is_strict_and_uses_absolute_correlation():
    x = np.array([1.0, 2.0, 3.0, 4.0])
    anti = np.stack([x, 5.0 - x], axis=1)  # correlation exactly -1: |C| > τ deletes the first
    assert utils.duplicate_columns(torch.tensor(anti), 0.95).tolist() == [True, False]
    # correlation 0.8 exactly between the two columns: kept at τ = 0.8 (strict >), deleted at τ = 0.79
    a = np.array([1.0, -1.0, 0.0, 0.0])
    b = 0.8 * a + 0.6 * np.array([0.0, 0.0, 1.0, -1.0])  # both parts zero-mean with equal norms
    pair = torch.tensor(np.stack([a, b], axis=1))
    corr = np.corrcoef(pair.numpy().T)[0, 1]
    assert corr == pytest.approx(0.8)
    assert utils.duplicate_columns(pair, corr + 1e-9).tolist() == [False, False]
    assert utils.duplicate_columns(pair, corr - 1e-9).tolist() == [True, False]


def test_feature_sparsity_subsamples_columns_with_seed():
    rng = np.random.default_rng(1)
    phi = np.maximum(rng.normal(size=(50, 300)), 0)
    full = utils.feature_sparsity(phi, 0.95)
    sub = utils.feature_sparsity(phi, 0.95, max_neurons=100, seed=3)
    assert sub == utils.feature_sparsity(phi, 0.95, max_neurons=100, seed=3)  # deterministic given the seed
    assert sub[0] == full[0]  # raw density is always over all columns
    subset = torch.randperm(300, generator=torch.Generator().manual_seed(3))[:100].sort().values.numpy()
    assert sub[1] == pytest.approx(greedy_feature_sparsity(phi[:, subset], 0.95)[1], rel=1e-12)
    assert utils.feature_sparsity(phi, 0.95, max_neurons=1000) == full  # fewer columns than the cap: no subsampling


def test_feature_sparsity_flattens_conv_activations():
    rng = np.random.default_rng(2)
    maps = np.maximum(rng.normal(size=(20, 3, 4, 4)), 0)
    assert utils.feature_sparsity(maps, 0.95) == utils.feature_sparsity(maps.reshape(20, -1), 0.95)


def test_feature_sparsity_recheck_margin_decides_near_threshold_pairs_exactly():
    # Many pairs whose correlation sits within float32 error of τ: float64 decides, matching the greedy definition.
    rng = np.random.default_rng(4)
    base = rng.normal(size=(2000, 1))
    phi = np.maximum(np.concatenate([base + s * rng.normal(size=(2000, 1)) for s in np.linspace(0.3, 0.34, 40)], 1), 0)
    for tau in (0.95, 0.96, 0.97):
        assert utils.feature_sparsity(phi, tau) == pytest.approx(greedy_feature_sparsity(phi, tau), rel=1e-12)


# ======================================================================================================================
# Jacobian rank (SPEC §1.2)
# ======================================================================================================================


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


# ======================================================================================================================
# Step-size schedules (SPEC §2)
# ======================================================================================================================


def test_toy_step_sizes_single_decay_after_floor_t_n():
    lrs = utils.toy_step_sizes(10, 0.5, decay_frac=0.3, decay=4.0)
    assert lrs.tolist() == [0.5] * 4 + [0.125] * 6  # iterations 0..⌊3.0⌋ = 3 at η, decay after iteration 3's update
    assert utils.toy_step_sizes(5, 0.25).tolist() == [0.25] * 5
    e1 = utils.toy_step_sizes(100001, 0.282, decay_frac=0.1, decay=4.8)
    assert e1[10000] == 0.282 and e1[10001] == pytest.approx(0.282 / 4.8)


def test_toy_step_sizes_warmup_divides_by_total_iterations():
    n, lr, factor, power = 100, 0.04, 6.0, 0.5
    lrs = utils.toy_step_sizes(n, lr, decay_frac=0.3, decay=2.5, warmup_factor=factor, warmup_power=power)
    assert lrs[0] == lr
    assert lrs[16] == pytest.approx(lr * (1 + 5 * math.sqrt(16 / 100)))
    peak = lr * (1 + 5 * math.sqrt(30 / 100))
    assert lrs[30] == pytest.approx(peak)
    assert np.allclose(lrs[31:], peak / 2.5)
    linear = utils.toy_step_sizes(10, 1.0, decay_frac=0.5, decay=2.0, warmup_factor=3.0)  # p = 1
    assert linear[:6].tolist() == pytest.approx([1 + 2 * i / 10 for i in range(6)])
    assert linear[6:].tolist() == pytest.approx([2.0 / 2.0] * 4)


@pytest.mark.parametrize("frac, peak", [(0.1, 1.629), (0.3, 4.322), (0.5, 11.467)])
def test_deep_step_size_exponential_warmup_peaks(frac, peak):
    epochs, lr = 100, 0.75
    top = lr * 1.05 ** (100 * frac)
    assert top / lr == pytest.approx(peak, abs=5e-4)
    just_before = utils.deep_step_size(frac * epochs - 1e-9, epochs, lr, warmup_exp=1.05, large_frac=frac)
    assert just_before == pytest.approx(top, rel=1e-9)
    assert utils.deep_step_size(frac * epochs, epochs, lr, warmup_exp=1.05, large_frac=frac) == pytest.approx(top / 10)
    assert utils.deep_step_size(90.0, epochs, lr, warmup_exp=1.05, large_frac=frac) == pytest.approx(top / 100)


def test_deep_step_size_table_values():
    # u = 100·t/E: at E = 200 the warmup exponent is applied per 2 epochs.
    assert utils.deep_step_size(10.0, 200, 0.5, warmup_exp=1.05, large_frac=0.5) == pytest.approx(0.5 * 1.05 ** 5)
    assert utils.deep_step_size(0.0, 100, 0.5, warmup_exp=1.05) == 0.5
    # power warmup (w < 1): η0·(1 + u^w), then η0·(1 + (100T)^w)/10 and /100
    assert utils.deep_step_size(4.0, 100, 0.1, warmup_exp=0.5, large_frac=0.3) == pytest.approx(0.1 * 3)
    assert utils.deep_step_size(50.0, 100, 0.1, warmup_exp=0.5, large_frac=0.3) == pytest.approx(
        0.1 * (1 + math.sqrt(30)) / 10)
    # no warmup (w = 1): η0, η0/10, η0/100; constant: η0 always
    assert [utils.deep_step_size(t, 100, 0.05, large_frac=0.1) for t in (0, 9.99, 10, 89.9, 90, 99.9)] == \
        pytest.approx([0.05, 0.05, 0.005, 0.005, 0.0005, 0.0005])
    assert utils.deep_step_size(95.0, 100, 0.01, schedule="constant", warmup_exp=1.05) == 0.01


# ======================================================================================================================
# Run logs, slugs, command-line helpers
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


def test_prepare_out_dir_rejects_unwritable_path(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(SystemExit) as exit_info:
        utils.prepare_out_dir(str(blocker / "sub"))
    assert exit_info.value.code == 2 and "--out-dir" in capsys.readouterr().err
    assert utils.prepare_out_dir(str(tmp_path / "new")) == str(tmp_path / "new")
