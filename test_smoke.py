"""Every script end to end at a tiny size (as a subprocess, as a user runs it, then plots.py on its logs), and the
unit tests of what each script defines itself (models, toy training steps, presets). Unit tests of utils.py are in
test_utils.py; the tiny on-disk data sets are fixtures in conftest.py.

Run with `make test` (installs into .venv/ first). No network, no GPU, no real data set needed.
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
from conftest import CreatesFileWhenUnpickled

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


def toy_logs(main, folder, flags):
    """{file name: log} of the toy run `main(flags)` writes into `folder`."""
    main([*flags, "--out-dir", str(folder)])
    return {path.name: json.loads(path.read_text()) for path in folder.glob("*.json")}


def without_sharpness(log):
    """A toy log's measured trajectory (its evaluation records and the state after training), sharpness keys left
    out."""
    strip = ("sharpness", "sharpness_hvps", "sharpness_converged")
    return [{k: v for k, v in record.items() if k not in strip} for record in log["history"]], \
        log.get("after_training")


def check_sharpness_and_label_noise(main, flags, evals, tmp_path):
    """--sharpness-every K only adds `sharpness` at utils.sharpness_iterations (the same trajectory);
    --label-noise-std changes the trajectory, reproducibly."""
    plain = toy_logs(main, tmp_path / "plain", flags)
    measured = toy_logs(main, tmp_path / "measured", [*flags, "--sharpness-every", "50"])
    noisy = [toy_logs(main, tmp_path / f"noisy{i}", [*flags, "--label-noise-std", "0.05"]) for i in range(2)]
    assert plain.keys() == measured.keys() == noisy[0].keys() and plain
    expected = utils.sharpness_iterations(evals, 50).tolist()
    for name, log in measured.items():
        assert without_sharpness(log) == without_sharpness(plain[name])
        sharp = [record for record in log["history"] if "sharpness" in record]
        finite = {record["iter"] for record in log["history"] if record["train_loss"] is not None}
        assert [record["iter"] for record in sharp] == [t for t in expected if t in finite]  # none once diverged
        assert all(math.isfinite(record["sharpness"]) and record["sharpness"] > 0 for record in sharp)
        assert noisy[0][name]["config"]["label_noise_std"] == 0.05
        assert noisy[0][name]["history"] == noisy[1][name]["history"]
        assert noisy[0][name]["history"] != plain[name]["history"]


# ======================================================================================================================
# Every file of the repository
# ======================================================================================================================

PROCESS_STATE = """
import json, os, sys, torch
def state():
    import matplotlib
    return {"env": dict(os.environ), "threads": torch.get_num_threads(), "interop": torch.get_num_interop_threads(),
            "matmul": torch.get_float32_matmul_precision(), "dtype": str(torch.get_default_dtype()),
            "deterministic": torch.are_deterministic_algorithms_enabled(), "grad": torch.is_grad_enabled(),
            "cudnn": [torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
                      torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32],
            "rng": torch.get_rng_state().sum().item(), "backend": matplotlib.get_backend()}
before = state()
import %s
print(json.dumps([before, state()]))
"""


@pytest.mark.parametrize("module", ["utils", "diag_net", "two_layer_relu", "train_resnet", "train_densenet", "plots",
                                    "benchmark", "sweep"])
def test_importing_a_file_changes_nothing_in_the_process(module):
    result = run_script("-c", PROCESS_STATE % module)
    assert result.returncode == 0, result.stderr
    before, after = json.loads(result.stdout)
    assert before == after


# ======================================================================================================================
# Deep-net models (train_resnet.py, train_densenet.py)
# ======================================================================================================================

import torch.nn.functional as F  # noqa: E402  (imported here, beside the only tests that use them)
import train_densenet  # noqa: E402
import train_resnet  # noqa: E402


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())


def resnet18_parameters_by_hand(w, classes):
    """Parameter count of the authors' CIFAR ResNet-18, written out independently of the model code."""
    def conv3_bn(cin, cout):
        return 9 * cin * cout + 2 * cout  # 3×3 conv without bias, BN weight + bias

    total = conv3_bn(3, w)  # stem
    cin = w
    for c in (w, 2 * w, 4 * w, 8 * w):
        projection = 0 if c == w else cin * c + 2 * c  # stages 2-4 change the shape: 1×1 conv + BN shortcut
        total += conv3_bn(cin, c) + conv3_bn(c, c) + projection  # first block of the stage
        total += 2 * conv3_bn(c, c)  # second block
        cin = c
    return total + 8 * w * classes + classes  # linear head


def densenet_bc_channels(depth, k):
    """Channel counts at the three stage outputs of DenseNet-BC (compression 0.5), by hand."""
    n = (depth - 4) // 6
    stage1 = 2 * k + n * k
    stage2 = stage1 // 2 + n * k
    return stage1, stage2, stage2 // 2 + n * k


def densenet_bc_parameters_by_hand(depth, k, classes):
    n = (depth - 4) // 6
    total, c = 3 * 9 * 2 * k, 2 * k
    for stage in range(3):
        for _ in range(n):
            total += 2 * c + c * 4 * k + 2 * 4 * k + 9 * 4 * k * k  # BN, 1×1 conv, BN, 3×3 conv
            c += k
        if stage < 2:
            total += 2 * c + c * (c // 2)  # transition: BN + 1×1 conv
            c //= 2
    return total + 2 * c + c * classes + classes  # final BN, linear head


@pytest.fixture(scope="module")
def resnet18_w64():
    torch.manual_seed(0)
    return train_resnet.ResNet18(num_classes=10, width=64)


@pytest.fixture(scope="module")
def densenet_bc_100():
    torch.manual_seed(0)
    return train_densenet.DenseNetBC(num_classes=10)


def hooked_block_outputs(model, x):
    """Forward x and return {log name: output of the SPARSITY_BLOCKS module}, resolved by get_submodule.

    Each output is copied when its hook fires (what utils.BlockActivations measures) and must still be unchanged at
    the end of the forward pass: a later in-place op (e.g. ReLU(inplace=True) on a hooked BN output) would make a hook
    that reads the tensor later see a different activation.
    """
    outputs, live = {}, {}

    def keep(name):
        def hook(module, inputs, output):
            outputs[name], live[name] = output.detach().clone(), output.detach()
        return hook

    handles = [model.get_submodule(path).register_forward_hook(keep(name))
               for name, path in model.SPARSITY_BLOCKS.items()]
    try:
        model(x)
    finally:
        for handle in handles:
            handle.remove()
    for name, output in outputs.items():
        assert torch.equal(live[name], output), f"{name} was modified in place after its hook fired"
    return outputs


def test_resnet18_parameter_count_matches_hand_formula(resnet18_w64):
    assert resnet18_parameters_by_hand(2, 10) == 11420  # worked out on paper for w = 2
    assert count_parameters(train_resnet.ResNet18(num_classes=10, width=2)) == 11420
    assert count_parameters(resnet18_w64) == resnet18_parameters_by_hand(64, 10) == 11_173_962
    assert count_parameters(train_resnet.ResNet18(num_classes=200, width=8)) == resnet18_parameters_by_hand(8, 200)


def test_densenet_bc_parameter_count_matches_hand_formula(densenet_bc_100):
    assert count_parameters(densenet_bc_100) == densenet_bc_parameters_by_hand(100, 12, 10) == 769_162  # "0.8 M"
    assert count_parameters(train_densenet.DenseNetBC(num_classes=100)) == densenet_bc_parameters_by_hand(100, 12, 100)
    small = train_densenet.DenseNetBC(num_classes=200, depth=40, growth_rate=6)
    assert count_parameters(small) == densenet_bc_parameters_by_hand(40, 6, 200)
    odd = train_densenet.DenseNetBC(depth=10, growth_rate=5)  # 15 channels -> floor(7.5) = 7 after the transition
    assert odd.transition1.conv.out_channels == 7
    assert count_parameters(odd) == densenet_bc_parameters_by_hand(10, 5, 10)


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("classes", [10, 100, 200])
def test_deep_models_output_shapes_and_gradients(size, classes):
    torch.manual_seed(0)
    models = [train_resnet.ResNet18(num_classes=classes, width=4),
              train_densenet.DenseNetBC(num_classes=classes, depth=16, growth_rate=4)]
    for model in models:
        out = model(torch.rand(2, 3, size, size))
        assert out.shape == (2, classes) and torch.isfinite(out).all()
        out.square().mean().backward()
        assert all(p.grad is not None for p in model.parameters())  # no unused parameters


def test_densenet_bc_100_forward_on_tiny_imagenet_size(densenet_bc_100):
    assert densenet_bc_100.eval()(torch.rand(2, 3, 64, 64)).shape == (2, 10)


def test_resnet18_sparsity_blocks_have_the_papers_shapes_and_are_post_relu(resnet18_w64):
    torch.manual_seed(0)
    model = resnet18_w64.train()  # batch statistics: about half of every block's entries are zero
    blocks = hooked_block_outputs(model, torch.rand(4, 3, 32, 32))
    expected = {"block1": (64, 32, 32), "block2": (128, 16, 16), "block3": (256, 8, 8), "block4": (512, 4, 4),
                "block5": (512,)}
    assert {name: tuple(out.shape[1:]) for name, out in blocks.items()} == expected
    for name in ("block1", "block2", "block3", "block4"):
        assert blocks[name].min() == 0 and (blocks[name] > 0).any(), name  # post-ReLU: non-negative, some zeros
    assert blocks["block5"].min() >= 0
    assert torch.allclose(blocks["block5"], blocks["block4"].mean(dim=(2, 3)), atol=1e-6)
    small = hooked_block_outputs(train_resnet.ResNet18(width=8), torch.rand(2, 3, 64, 64))  # Tiny ImageNet size
    assert [tuple(out.shape[1:]) for out in small.values()] == [(8, 64, 64), (16, 32, 32), (32, 16, 16),
                                                                (64, 8, 8), (64,)]


def test_densenet_bc_sparsity_blocks_have_expected_shapes_and_are_post_relu(densenet_bc_100):
    c1, c2, c3 = densenet_bc_channels(100, 12)
    assert (c1, c2, c3) == (216, 300, 342)
    blocks = hooked_block_outputs(densenet_bc_100.train(), torch.rand(2, 3, 32, 32))
    expected = {"block1": (c1, 32, 32), "block2": (c2, 16, 16), "block3": (c3, 8, 8), "block4": (c3,)}
    assert {name: tuple(out.shape[1:]) for name, out in blocks.items()} == expected
    for name in ("block1", "block2", "block3"):
        assert blocks[name].min() == 0 and (blocks[name] > 0).any(), name
    assert torch.allclose(blocks["block4"], blocks["block3"].mean(dim=(2, 3)), atol=1e-6)


def test_resnet_basic_block_is_post_activation():
    """Recompute a block by hand: ReLU after the residual sum (post-activation), projection when the shape changes."""
    torch.manual_seed(0)
    block = train_resnet.BasicBlock(4, 8, stride=2).eval()
    for bn in (block.bn1, block.bn2, block.shortcut[1]):  # non-trivial running statistics and affine parameters
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2)
        bn.weight.data.uniform_(0.5, 2), bn.bias.data.uniform_(-1, 1)
    x = torch.randn(2, 4, 8, 8)

    def bn(module, h):
        return F.batch_norm(h, module.running_mean, module.running_var, module.weight, module.bias)

    inner = torch.relu(bn(block.bn1, F.conv2d(x, block.conv1.weight, stride=2, padding=1)))
    residual = bn(block.bn2, F.conv2d(inner, block.conv2.weight, padding=1))
    shortcut = bn(block.shortcut[1], F.conv2d(x, block.shortcut[0].weight, stride=2))
    assert torch.allclose(block(x), torch.relu(residual + shortcut), atol=1e-5)
    identity_block = train_resnet.BasicBlock(8, 8, stride=1)
    assert isinstance(identity_block.shortcut, torch.nn.Identity)


def test_densenet_bottleneck_layer_is_pre_activation_and_concatenates():
    torch.manual_seed(0)
    layer = train_densenet.BottleneckLayer(6, growth_rate=3).eval()
    x = torch.randn(2, 6, 5, 5)
    bn1, bn2 = layer.norm_act1[0], layer.norm_act2[0]
    h = F.conv2d(torch.relu(F.batch_norm(x, bn1.running_mean, bn1.running_var, bn1.weight, bn1.bias)),
                 layer.conv1.weight)
    assert layer.conv1.weight.shape[0] == 12  # bottleneck width 4k
    h = torch.relu(F.batch_norm(h, bn2.running_mean, bn2.running_var, bn2.weight, bn2.bias))
    new = F.conv2d(h, layer.conv2.weight, padding=1)
    out = layer(x)
    assert out.shape == (2, 9, 5, 5)
    assert torch.equal(out[:, :6], x) and torch.allclose(out[:, 6:], new, atol=1e-5)


@pytest.mark.parametrize("model_name", ["resnet", "densenet"])
def test_deep_model_initialisation_statistics(model_name, resnet18_w64, densenet_bc_100):
    """The authors' init: BN weight 1 / bias 0, linear bias 0, conv std sqrt(2 / fan_out) (checked where fan_in
    differs)."""
    model = resnet18_w64 if model_name == "resnet" else densenet_bc_100
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all((bn.weight == 1).all() and (bn.bias == 0).all() for bn in bns)
    assert (model.fc.bias == 0).all() and model.fc.weight.std() > 0
    conv = model.layer4[0].conv1 if model_name == "resnet" else model.stage3[-1].conv1  # 256→512 3×3 / 330→48 1×1
    fan_out = conv.weight.shape[0] * conv.weight[0, 0].numel()
    fan_in = conv.weight[0].numel()
    assert fan_in != fan_out
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / fan_out), rel=0.03)
    assert conv.weight.mean().abs().item() < 0.1 * math.sqrt(2 / fan_out)


def test_deep_models_channels_last_matches_contiguous():
    torch.manual_seed(0)
    x = torch.rand(4, 3, 32, 32)
    for model in (train_resnet.ResNet18(width=8), train_densenet.DenseNetBC(depth=40)):
        reference = model(x)  # train mode: batch statistics, so the running statistics do not matter
        model = model.to(memory_format=torch.channels_last)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        blocks = hooked_block_outputs(model, x_cl)
        first_block = blocks["block1"]  # stays channels_last through the stages (incl. DenseNet's concatenations)
        assert first_block.is_contiguous(memory_format=torch.channels_last)
        assert torch.allclose(model(x_cl), reference, atol=1e-5, rtol=1e-4)


def test_deep_models_reject_impossible_architectures():
    for depth in (98, 4, 9):
        with pytest.raises(ValueError, match="depth must be 6n \\+ 4"):
            train_densenet.DenseNetBC(depth=depth)
    with pytest.raises(ValueError, match="compression"):
        train_densenet.DenseNetBC(compression=0)
    with pytest.raises(ValueError, match="growth_rate"):
        train_densenet.DenseNetBC(growth_rate=0)
    with pytest.raises(ValueError, match="width"):
        train_resnet.ResNet18(width=0)
    with pytest.raises(ValueError, match="num_classes"):
        train_resnet.ResNet18(num_classes=2.5)


# ======================================================================================================================
# Deep-net scripts end to end
# ======================================================================================================================

TINY_RESNET = ["train_resnet.py", "--width", "8", "--epochs", "1", "--batch-size", "64", "--eval-every", "2",
               "--sparsity-examples", "96", "--sparsity-neurons", "50", "--eval-batch-size", "64", "--device", "cpu"]
TINY_DENSENET = ["train_densenet.py", "--depth", "10", "--growth-rate", "4", "--epochs", "1", "--batch-size", "64",
                 "--eval-every", "2", "--sparsity-examples", "96", "--sparsity-neurons", "50", "--device", "cpu"]


def only_log(folder):
    """The single JSON run log in `folder` (a deep-net run writes exactly one, next to its checkpoint)."""
    logs = [name for name in os.listdir(folder) if name.endswith(".json")]
    assert len(logs) == 1, logs
    return os.path.join(folder, logs[0])


def test_every_training_step_sees_a_full_batch(tmp_path, monkeypatch):
    """200 = 3·64 + 8 images: each epoch is 3 steps of 64 images; the 8 left over are not a short 4th step."""
    seen = []

    class RecordingResNet(train_resnet.ResNet18):
        def forward(self, x):
            if self.training and torch.is_grad_enabled():
                seen.append(len(x))
            return super().forward(x)

    monkeypatch.setattr(train_resnet, "ResNet18", RecordingResNet)
    flags = [flag for flag in TINY_RESNET[1:]]
    flags[flags.index("--epochs") + 1] = "2"
    assert train_resnet.main([*flags, "--dataset", "synthetic", "--n-train", "200", "--out-dir", str(tmp_path)]) \
        == "completed"
    assert seen == [64] * 6
    log = json.load(open(only_log(tmp_path)))
    assert log["config"]["steps_per_epoch"] == 3 and log["final"]["iter"] == 6
    assert log["final"]["epoch"] == 2.0


@pytest.mark.parametrize("script", [TINY_RESNET, TINY_DENSENET], ids=["resnet", "densenet"])
def test_deep_net_script_runs_logs_and_plots(script, tmp_path):
    out = tmp_path / "runs"
    result = run_script(*script, "--dataset", "synthetic", "--n-train", "256", "--out-dir", str(out))
    assert result.returncode == 0, result.stderr
    assert "projected wall time" in result.stdout
    log = assert_valid_log(only_log(out), script[0][:-3])
    assert log["status"] == "completed"
    blocks = log["config"]["blocks"]
    assert len(blocks) == (5 if script is TINY_RESNET else 4)
    assert [r["iter"] for r in log["history"]] == [0, 2, 4]  # 256 images / batch 64 = 4 iterations, eval every 2
    for record in log["history"]:
        for key in ("epoch", "lr", "train_loss", "train_error", "test_loss", "test_error", "wall_time"):
            assert key in record
        for block in blocks:  # raw density over all neurons, raw and de-duplicated over the 50 sampled ones
            assert 0 < record[f"density_all_{block}"] <= 1
            assert 0 < record[f"density_dedup_{block}"] <= record[f"density_{block}"] <= 1
    # default schedule: exponential warmup 1.05 for T = 50 % of training, set from each step's fractional epoch
    assert log["history"][1]["lr"] == pytest.approx(0.75 * 1.05 ** 50 / 10)  # epoch 0.5 = T·E: first ÷10 step
    assert log["final"]["images_per_sec"] > 0
    figures = tmp_path / "figures"
    plotted = run_script("plots.py", "--logs", str(out), "--out-dir", str(figures))
    assert plotted.returncode == 0, plotted.stderr
    assert [p.suffix for p in figures.iterdir()] == [".png"]


# Width 4 runs fall back to NCHW (utils.apply_channels_last); Tiny ImageNet at width 16 keeps the channels_last path
# covered on 64×64 images.
@pytest.mark.parametrize("dataset, fixture, width", [("cifar10", "fake_cifar10_dir", "4"),
                                                     ("cifar100", "fake_cifar100_dir", "4"),
                                                     ("tinyimagenet", "fake_tinyimagenet_dir", "16")])
def test_deep_net_script_reads_each_on_disk_format(dataset, fixture, width, request, tmp_path):
    data_dir = request.getfixturevalue(fixture)
    result = run_script(*TINY_RESNET, "--width", width, "--dataset", dataset, "--data-dir", str(data_dir),
                        "--batch-size", "8", "--out-dir", str(tmp_path))  # fake sets: 40 (Tiny ImageNet 12) images
    assert result.returncode == 0, result.stderr
    log = assert_valid_log(only_log(tmp_path), "train_resnet")
    assert log["status"] == "completed" and log["config"]["dataset"] == dataset
    assert log["config"]["n_test"] > 0


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path):
    flags = [*TINY_RESNET, "--dataset", "synthetic", "--n-train", "128", "--epochs", "2", "--momentum", "0.9",
             "--augment", "--eval-every", "3"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert run_script(*flags, "--out-dir", str(whole)).returncode == 0
    first = run_script(*flags, "--out-dir", str(parts), "--stop-at-epoch", "1")
    assert first.returncode == 0 and "--resume" in first.stdout
    assert json.load(open(only_log(parts)))["status"] == "interrupted"
    second = run_script(*flags, "--out-dir", str(parts), "--resume")
    assert second.returncode == 0, second.stderr
    states = [utils.read_checkpoint(str(path)[:-5] + ".pt") for path in (only_log(whole), only_log(parts))]
    assert states[0]["step"] == states[1]["step"] == 4
    for name, tensor in states[0]["model"].items():
        assert torch.equal(tensor, states[1]["model"][name]), name
    logs = [json.load(open(only_log(folder))) for folder in (whole, parts)]
    assert logs[1]["status"] == "completed"
    strip = ("wall_time", "images_per_sec")  # timings differ; every measured quantity must not
    assert [{k: v for k, v in r.items() if k not in strip} for r in logs[0]["history"]] == \
        [{k: v for k, v in r.items() if k not in strip} for r in logs[1]["history"]]


def final_weights(folder):
    """The model weights in the checkpoint beside the single run log in `folder`."""
    return utils.read_checkpoint(only_log(folder)[:-5] + ".pt")["model"]


@pytest.mark.parametrize("script", [TINY_RESNET, TINY_DENSENET], ids=["resnet", "densenet"])
def test_sharpness_is_logged_and_leaves_the_training_trajectory_unchanged(script, tmp_path):
    # 2 epochs of 2 steps: evaluations at 0, 2, 4; the sharpness at 0 (in the evaluation's record) and 3 (its own)
    flags = [*script, "--dataset", "synthetic", "--n-train", "128", "--epochs", "2", "--sharpness-examples", "16"]
    plain, measured = tmp_path / "plain", tmp_path / "measured"
    assert run_script(*flags, "--out-dir", str(plain)).returncode == 0
    result = run_script(*flags, "--sharpness-every", "3", "--out-dir", str(measured))
    assert result.returncode == 0, result.stderr
    assert "sharpness" in result.stdout
    logs = [assert_valid_log(only_log(folder), script[0][:-3]) for folder in (plain, measured)]
    assert logs[1]["config"]["sharpness_every"] == 3 and logs[1]["config"]["sharpness_examples_used"] == 16
    sharp = [record for record in logs[1]["history"] if "sharpness" in record]
    assert [record["iter"] for record in sharp] == [0, 3]
    assert "train_loss" in sharp[0] and "train_loss" not in sharp[1] and sharp[1]["lr"] > 0
    for record in sharp:
        assert math.isfinite(record["sharpness"]) and record["sharpness"] > 0
        assert record["sharpness_hvps"] >= 1 and isinstance(record["sharpness_converged"], bool)
    # the measurement draws no training randomness and changes no weight or BatchNorm statistic
    strip = ("wall_time", "images_per_sec", "sharpness", "sharpness_hvps", "sharpness_converged")
    evaluations = [[{k: v for k, v in record.items() if k not in strip} for record in log["history"]
                    if "train_loss" in record] for log in logs]
    assert evaluations[0] == evaluations[1]
    weights = [final_weights(folder) for folder in (plain, measured)]
    for name, tensor in weights[0].items():  # BatchNorm running statistics included
        assert torch.equal(tensor, weights[1][name]), name


def test_deep_net_help_says_which_loss_the_sharpness_is_of():
    for module in (train_resnet, train_densenet):
        text = " ".join(module.build_parser().format_help().split())
        assert "BatchNorm in training mode" in text and "ONE batch" in text and "256" in text


def test_label_noise_changes_the_trajectory_reproducibly_and_resumes_exactly(tmp_path):
    flags = [*TINY_RESNET, "--dataset", "synthetic", "--n-train", "128", "--epochs", "2"]
    clean, noisy, parts = tmp_path / "clean", tmp_path / "noisy", tmp_path / "parts"
    assert run_script(*flags, "--out-dir", str(clean)).returncode == 0
    assert run_script(*flags, "--label-noise", "0.5", "--out-dir", str(noisy)).returncode == 0
    assert run_script(*flags, "--label-noise", "0.5", "--stop-at-epoch", "1", "--out-dir", str(parts)).returncode == 0
    resumed = run_script(*flags, "--label-noise", "0.5", "--resume", "--out-dir", str(parts))
    assert resumed.returncode == 0, resumed.stderr
    log = json.load(open(only_log(noisy)))
    assert log["config"]["label_noise"] == 0.5 and "_ln0.5_" in only_log(noisy)  # its own log, beside the clean one
    weights = {folder.name: final_weights(folder) for folder in (clean, noisy, parts)}
    assert all(torch.equal(tensor, weights["parts"][name]) for name, tensor in weights["noisy"].items())
    assert not all(torch.equal(tensor, weights["clean"][name]) for name, tensor in weights["noisy"].items())


def test_resume_refuses_a_stop_epoch_the_checkpoint_has_passed(tmp_path):
    flags = [*TINY_RESNET, "--dataset", "synthetic", "--n-train", "128", "--epochs", "3", "--out-dir", str(tmp_path)]
    assert run_script(*flags, "--stop-at-epoch", "2").returncode == 0
    again = run_script(*flags, "--resume", "--stop-at-epoch", "1", timeout=120)
    assert again.returncode == 2 and "--stop-at-epoch" in again.stderr and again.stderr.count("\n") == 1
    assert json.load(open(only_log(tmp_path)))["final"]["iter"] == 4  # untouched: 2 epochs of 2 steps


def test_resume_accepts_another_eval_batch_size_and_memory_format(tmp_path):
    """Neither changes what is trained (evaluation is read-only; the memory format changes only rounding), and
    apply_channels_last may switch channels_last off on one device and not on another."""
    flags = [*TINY_RESNET, "--dataset", "synthetic", "--n-train", "128", "--epochs", "2", "--out-dir", str(tmp_path)]
    assert run_script(*flags, "--stop-at-epoch", "1").returncode == 0
    second = run_script(*flags, "--resume", "--eval-batch-size", "16", "--no-channels-last")
    assert second.returncode == 0, second.stderr
    log = json.load(open(only_log(tmp_path)))
    assert log["status"] == "completed" and log["config"]["eval_batch_size"] == 16


def test_the_same_command_again_never_overwrites_a_run_and_restart_starts_over(tmp_path, capsys):
    """Re-running the command of a stopped run used to restart it from iteration 0 over its checkpoint and log."""
    flags = [*TINY_RESNET[1:], "--dataset", "synthetic", "--n-train", "128", "--epochs", "2",
             "--out-dir", str(tmp_path)]

    def refused():
        """stderr of the same command, which must stop with a one-line usage error (exit 2) before training."""
        with pytest.raises(SystemExit) as stop:
            train_resnet.main(flags)
        err = capsys.readouterr().err
        assert stop.value.code == 2 and err.count("\n") == 1, err
        return err

    assert train_resnet.main([*flags, "--stop-at-epoch", "1"]) == "interrupted"
    files = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}
    assert "argument --resume: this run stopped before its end" in refused()
    assert {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)} == files  # untouched
    assert train_resnet.main([*flags, "--resume"]) == "completed"
    assert "argument --restart: this run has already ended (completed;" in refused()  # a completed run too
    capsys.readouterr()
    assert train_resnet.main([*flags, "--restart"]) == "completed"
    out = capsys.readouterr().out
    assert "resuming" not in out and "iter      0/4" in out  # trained from iteration 0, not from the checkpoint
    log = json.load(open(only_log(tmp_path)))
    assert [record["iter"] for record in log["history"]] == [0, 2, 4] and "restart" not in log["config"]


def test_resume_refuses_a_checkpoint_carrying_a_pickled_object(tmp_path):
    """torch.load(weights_only=False) would run the code such a file names: --resume refuses it in one line."""
    flags = [*TINY_RESNET[1:], "--dataset", "synthetic", "--n-train", "128", "--epochs", "2",
             "--out-dir", str(tmp_path)]
    assert train_resnet.main([*flags, "--stop-at-epoch", "1"]) == "interrupted"
    checkpoint = only_log(tmp_path)[:-5] + ".pt"
    marker = tmp_path / "code-ran"
    torch.save({**utils.read_checkpoint(checkpoint), "note": CreatesFileWhenUnpickled(marker)}, checkpoint)
    result = run_script(TINY_RESNET[0], *flags, "--resume")
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "argument --resume:" in result.stderr and "carries a pickled Python object (io.open)" in result.stderr
    assert "Traceback" not in result.stderr and not marker.exists()


@pytest.mark.parametrize("signal_name, exit_code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_ctrl_c_or_sigterm_checkpoints_and_marks_the_log_interrupted(signal_name, exit_code, tmp_path):
    import signal
    flags = [*TINY_RESNET, "--dataset", "synthetic", "--n-train", "256", "--epochs", "50", "--out-dir", str(tmp_path)]
    process = subprocess.Popen([sys.executable, *flags], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    for line in process.stdout:
        if line.startswith("iter") and not line.startswith("iter      0"):
            break
    process.send_signal(getattr(signal, signal_name))
    process.communicate(timeout=120)
    assert process.returncode == exit_code
    log = json.load(open(only_log(tmp_path)))
    assert log["status"] == "interrupted"
    assert os.path.exists(only_log(tmp_path)[:-5] + ".pt")


def test_divergence_is_detected_logged_and_reported(tmp_path):
    result = run_script(*TINY_RESNET, "--dataset", "synthetic", "--n-train", "256", "--epochs", "40",
                        "--lr-schedule", "constant", "--lr", "1e6", "--out-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "DIVERGED" in result.stdout
    log = json.load(open(only_log(tmp_path)))
    assert log["status"] == "diverged"
    assert log["final"]["iter"] < 40 * 4  # stopped early instead of training on NaNs
    iters = [record["iter"] for record in log["history"]]
    assert len(iters) == len(set(iters)) and log["final"]["train_loss"] is None


@pytest.mark.parametrize("args, flag", [
    (["--lr", "-1"], "--lr"),
    (["--large-lr-frac", "0.95"], "--large-lr-frac"),
    (["--momentum", "1.5"], "--momentum"),
    (["--dataset", "imagenet"], "--dataset"),
    (["--resume"], "--resume"),
    (["--dataset", "cifar10", "--data-dir", "/nonexistent"], "--data-dir"),
    (["--n-train", "0"], "--n-train"),
    (["--n-train", "3000"], "--n-train"),  # the synthetic set has 2 560 training images
    (["--out-dir", "/proc/forbidden"], "--out-dir"),
])
def test_deep_net_bad_input_is_one_line_exit_2(args, flag, tmp_path):
    out = [] if "--out-dir" in args else ["--out-dir", str(tmp_path)]
    result = run_script(*TINY_RESNET, "--dataset", "synthetic", *out, *args)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and flag in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_deep_net_data_dir_inside_the_cifar_folder_is_a_one_line_hint(fake_cifar10_dir, tmp_path):
    inside = os.path.join(fake_cifar10_dir, "cifar-10-batches-py")
    result = run_script(*TINY_RESNET, "--dataset", "cifar10", "--data-dir", inside, "--out-dir", str(tmp_path))
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "--data-dir" in result.stderr and "point the data directory at its parent" in result.stderr


def test_densenet_rejects_invalid_depth(tmp_path):
    result = run_script(*TINY_DENSENET, "--depth", "11", "--dataset", "synthetic", "--out-dir", str(tmp_path))
    assert result.returncode == 2 and "--depth" in result.stderr and result.stderr.count("\n") == 1


# ======================================================================================================================
# Many processes: torchrun (gloo, CPU) and sweeps (sweep.py, sweep.sbatch)
# ======================================================================================================================

# 256 synthetic images in batches of 64 (32 per process): 4 steps per epoch, evaluations at 0, 3, 6, 8. Momentum,
# augmentation and label noise are on, so that every seeded draw of the two processes must be one process's.
TORCHRUN_FLAGS = [*TINY_RESNET[1:], "--dataset", "synthetic", "--n-train", "256", "--epochs", "2", "--lr", "0.02",
                  "--momentum", "0.9", "--augment", "--label-noise", "0.2", "--eval-every", "3"]


def torchrun_command(script=TINY_RESNET[0]):
    """`torchrun --standalone --nproc-per-node=2 SCRIPT` (a free port of its own, so tests may run side by side)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", script]


def torchrun(*args, script=TINY_RESNET[0], timeout=180):
    return subprocess.run([*torchrun_command(script), *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """The folder and output of one uninterrupted 2-process run with TORCHRUN_FLAGS."""
    out = tmp_path_factory.mktemp("torchrun_whole")
    result = torchrun(*TORCHRUN_FLAGS, "--out-dir", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


class HalvesResNet(train_resnet.ResNet18):
    """One process computing what two compute without SyncBatchNorm: a training forward pass normalises each half of
    the batch (each process's share) on its own, and only the first half updates the BatchNorm running statistics
    (rank 0's, which it evaluates and saves). The mean cross-entropy over both halves' logits is the mean of the two
    processes' losses, the loss whose gradient DDP averages."""

    def forward(self, x):
        if not (self.training and torch.is_grad_enabled()):
            return super().forward(x)
        first, second = x.chunk(2)
        logits = super().forward(first)
        # the second half updates copies of the buffers, dropped after (not the originals in place: the first half's
        # backward still needs them unchanged)
        kept = [(module, name, buffer) for module in self.modules()
                for name, buffer in module.named_buffers(recurse=False)]
        for module, name, buffer in kept:
            setattr(module, name, buffer.clone())
        logits = torch.cat([logits, super().forward(second)])
        for module, name, buffer in kept:
            setattr(module, name, buffer)
        return logits


def test_torchrun_two_processes_train_as_one_process_with_per_half_batchnorm(two_process_run, tmp_path, monkeypatch,
                                                                            one_torch_thread):
    """The reference runs on one thread, as each of torchrun's processes (OMP_NUM_THREADS=1): with two, rounding alone
    moves this run's last test loss by 1e-3 (large steps amplify it); on one, the two agree to 1e-7."""
    out, result = two_process_run
    assert result.stdout.count("iter      0/8") == 1 and "and 1 more processes" in result.stdout  # rank 0 prints
    monkeypatch.setattr(train_resnet, "ResNet18", HalvesResNet)
    assert train_resnet.main([*TORCHRUN_FLAGS, "--out-dir", str(tmp_path)]) == "completed"
    two, one = [json.load(open(only_log(folder))) for folder in (out, tmp_path)]
    assert two["config"]["batchnorm_share"] == 32 and one["config"]["batchnorm_share"] is None
    assert two["env"]["world_size"] == 2 and two["env"]["distributed_backend"] == "gloo"
    assert two["env"]["sync_batchnorm"] is False and one["env"]["world_size"] == 1
    assert [r["iter"] for r in two["history"]] == [r["iter"] for r in one["history"]] == [0, 3, 6, 8]
    for a, b in zip(two["history"], one["history"]):
        assert a["lr"] == b["lr"]
        for key in ("train_loss_batches", "train_loss", "test_loss", "density_block4", "density_dedup_block5"):
            if key in b or key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (a["iter"], key)
    weights = [final_weights(folder) for folder in (out, tmp_path)]
    assert weights[0].keys() == weights[1].keys()  # the plain network's names: no DDP "module." prefix
    for name, tensor in weights[1].items():  # BatchNorm running statistics included
        torch.testing.assert_close(weights[0][name], tensor, rtol=1e-5, atol=1e-6, msg=name)


def test_torchrun_run_stopped_and_resumed_ends_as_an_uninterrupted_one(two_process_run, tmp_path, capsys):
    whole, _ = two_process_run
    first = torchrun(*TORCHRUN_FLAGS, "--stop-at-epoch", "1", "--out-dir", str(tmp_path))
    assert first.returncode == 0 and "--resume" in first.stdout, first.stderr[-3000:]
    # one process would normalise over 64 images, not 32: refused, in one line
    with pytest.raises(SystemExit) as refused:
        train_resnet.main([*TORCHRUN_FLAGS, "--resume", "--out-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert refused.value.code == 2 and err.count("\n") == 1 and "BatchNorm statistics were over 32 images" in err
    second = torchrun(*TORCHRUN_FLAGS, "--resume", "--out-dir", str(tmp_path))
    assert second.returncode == 0, second.stderr[-3000:]
    states = [utils.read_checkpoint(only_log(folder)[:-5] + ".pt") for folder in (whole, tmp_path)]
    assert states[0]["step"] == states[1]["step"] == 8
    for name, tensor in states[0]["model"].items():
        assert torch.equal(tensor, states[1]["model"][name]), name
    logs = [json.load(open(only_log(folder))) for folder in (whole, tmp_path)]
    assert logs[1]["status"] == "completed"
    strip = ("wall_time", "images_per_sec")
    assert [{k: v for k, v in r.items() if k not in strip} for r in logs[0]["history"]] == \
        [{k: v for k, v in r.items() if k not in strip} for r in logs[1]["history"]]


def test_torchrun_sigterm_stops_every_process_at_one_step_with_a_checkpoint(tmp_path):
    import signal
    flags = [*TINY_RESNET[1:], "--dataset", "synthetic", "--n-train", "256", "--epochs", "100", "--eval-every", "40",
             "--out-dir", str(tmp_path)]
    process = subprocess.Popen([*torchrun_command(), *flags], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    for line in process.stdout:
        if line.startswith("iter") and not line.startswith("iter      0"):
            break
    process.send_signal(signal.SIGTERM)  # torchrun forwards it to both processes
    out, err = process.communicate(timeout=60)
    assert process.returncode != 0  # torchrun reports the signal it got
    assert "SIGTERM: stopping" in out and "checkpoint saved, continue with --resume" in out, err[-3000:]
    assert json.load(open(only_log(tmp_path)))["status"] == "interrupted"
    step = utils.read_checkpoint(only_log(tmp_path)[:-5] + ".pt")["step"]
    assert 40 < step < 400 and step % utils.DIVERGENCE_CHECK_EVERY == 0  # where the processes agree to stop


def test_torchrun_an_error_in_one_process_ends_the_job(tmp_path):
    """An exception in process 1 at step 5: process 0 fails in its next collective (gloo: connection closed) and
    torchrun ends the job; nothing waits for a process that is gone."""
    failing = tmp_path / "failing.py"
    failing.write_text(f"""import os, sys
sys.path.insert(0, {REPO!r})
import train_resnet, utils
augment = utils.augment_batch
def failing_augment(images, seed, step, *rest):
    if step == 5 and os.environ["RANK"] == "1":
        raise RuntimeError("injected failure in process 1")
    return augment(images, seed, step, *rest)
utils.augment_batch = failing_augment
train_resnet.main()
""")
    out = tmp_path / "runs"
    result = torchrun(*TINY_RESNET[1:], "--dataset", "synthetic", "--n-train", "256", "--epochs", "100", "--augment",
                      "--eval-every", "40", "--out-dir", str(out), script=str(failing), timeout=120)
    assert result.returncode != 0 and "injected failure in process 1" in result.stderr
    assert json.load(open(only_log(out)))["status"] == "failed"


@pytest.mark.parametrize("args, flag, message", [(["--batch-size", "63"], "--batch-size", "give a multiple of 2"),
                                                  (["--sync-bn"], "--sync-bn", "runs on CUDA only")])
def test_torchrun_flags_that_depend_on_the_processes_are_usage_errors(args, flag, message, tmp_path):
    result = torchrun(*TINY_RESNET[1:], "--dataset", "synthetic", *args, "--out-dir", str(tmp_path))
    assert result.returncode != 0
    assert f"train_resnet.py: error: argument {flag}: " in result.stderr and message in result.stderr
    assert "[rank0]: Traceback" not in result.stderr and not os.listdir(tmp_path)  # stopped before any file


def test_deep_net_help_states_the_cpu_batchnorm_caveat():
    for module in (train_resnet, train_densenet):
        text = " ".join(module.build_parser().format_help().split())
        assert "--sync-bn" in text and "On the CPU torch's SyncBatchNorm does not run" in text


def test_sweep_expands_counts_picks_and_runs_a_list(tmp_path, capsys):
    import sweep
    assert sweep.main(["expand", "--lr", "0.5", "0.75", "--large-lr-frac", "0.1", "0.3", "0.5", "--seeds", "0", "1",
                       "--out-dir", "shared dir", "--", "--epochs", "30", "--data-dir", "~/data"]) == 0
    listed = tmp_path / "sweep.txt"
    listed.write_text(capsys.readouterr().out + "\n# a comment, then a blank line\n\n")
    commands = sweep.read_commands(listed)
    assert len(commands) == 2 * 3 * 2 and listed.read_text().startswith("# python sweep.py expand --lr 0.5")
    assert commands[0] == ("python train_resnet.py --lr 0.5 --large-lr-frac 0.1 --seed 0 --epochs 30 --data-dir "
                           "'~/data' --out-dir 'shared dir'")  # one shell-quoted command per line
    assert commands[-1].startswith("python train_resnet.py --lr 0.75 --large-lr-frac 0.5 --seed 1 ")
    grid = {tuple(line.split()[3:9:2]) for line in commands}  # (lr, T, seed) of every line: the whole product
    assert grid == {(lr, t, s) for lr in ("0.5", "0.75") for t in ("0.1", "0.3", "0.5") for s in ("0", "1")}
    assert sweep.main(["count", str(listed)]) == 0 and capsys.readouterr().out == "12\n"
    assert sweep.main(["pick", str(listed), "4"]) == 0 and capsys.readouterr().out == commands[4] + "\n"
    with pytest.raises(SystemExit) as error:
        sweep.main(["pick", str(listed), "12"])
    assert error.value.code == 2 and "0 to 11" in capsys.readouterr().err
    # `run`: each command sees the one GPU it was given, at most one command per GPU at a time
    probe = tmp_path / "probe.txt"
    probe.write_text("".join(f"echo {i} $CUDA_VISIBLE_DEVICES > {tmp_path}/ran{i}; sleep 0.3\n" for i in range(5))
                     + "exit 3\n")
    assert sweep.run_on_gpus(sweep.read_commands(probe), ["4", "7"], poll_seconds=0.05) == [(3, "exit 3")]
    ran = [(tmp_path / f"ran{i}").read_text().split() for i in range(5)]
    assert [i for i, _ in ran] == list("01234") and {gpu for _, gpu in ran} == {"4", "7"}
    assert ran[0][1] != ran[1][1]  # the first two started side by side, one on each GPU


def test_sweep_sbatch_runs_the_line_of_its_array_task(tmp_path):
    listed = tmp_path / "list.txt"
    listed.write_text("# two commands\necho zero\n\necho one 'two words'\n")
    env = dict(os.environ, SLURM_ARRAY_TASK_ID="1", SLURM_SUBMIT_DIR=REPO,
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    result = subprocess.run(["bash", "sweep.sbatch", str(listed), "--resume"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "one two words --resume"  # the task's line, with the flags added
    env["SLURM_ARRAY_TASK_ID"] = "2"
    result = subprocess.run(["bash", "sweep.sbatch", str(listed)], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2 and "outside the list's 2 commands" in result.stderr


# ======================================================================================================================
# two_layer_relu.py: ReLU toys E4 (1-D regression), E5 (2-layer teacher–student), E6 (3-layer teacher–student)
# ======================================================================================================================

import two_layer_relu as relu_toy  # noqa: E402  (imported here so this section stays self-contained)


@pytest.fixture
def one_torch_thread():
    """The toy scripts' main() sets torch to one thread (their small SVDs run many times slower on shared cores with
    more); tests that call main() in this process restore the thread count afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def relu_toy_config(preset, **overrides):
    """The resolved config of a preset as the script builds it (rank points filled in), with overrides."""
    return {**relu_toy.parse_args(["--preset", preset])[1], **overrides}


def random_relu_layers(preset, seed=0):
    """A student of the preset's architecture with every weight random and non-zero (a = 0 would hide W1's grads)."""
    cfg = relu_toy_config(preset)
    rng = np.random.RandomState(seed)
    sizes, biases = relu_toy.student_sizes(preset, cfg), relu_toy.student_biases(preset)
    return [[rng.randn(fan_out, fan_in), rng.randn(fan_out) if bias else None]
            for fan_in, fan_out, bias in zip(sizes[:-1], sizes[1:], biases)]


@pytest.mark.parametrize("preset", ["e4", "e5", "e6"])
def test_relu_manual_sgd_step_matches_autograd(preset):
    layers = random_relu_layers(preset)
    model = relu_toy.torch_model(layers)  # nn.Sequential(Linear, ReLU, ...) holding the same weights
    x = np.random.RandomState(1).randn(layers[0][0].shape[1])
    y, lr = 0.7, 0.05
    loss = (model(torch.from_numpy(x)[None])[0, 0] - y) ** 2  # plain MSE on one example, no ½
    loss.backward()
    expected = [(p - lr * p.grad).detach().numpy() for p in model.parameters()]
    relu_toy.sgd_step(layers, x, y, lr)
    got = [array for layer in layers for array in layer if array is not None]
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("preset", ["e4", "e5", "e6"])
def test_relu_forward_matches_torch_model_and_param_count(preset):
    layers = random_relu_layers(preset, seed=2)
    x = np.random.RandomState(3).randn(7, layers[0][0].shape[1])
    out, hidden = relu_toy.forward(layers, x)
    model = relu_toy.torch_model(layers)
    np.testing.assert_allclose(out, model(torch.from_numpy(x))[:, 0].detach().numpy(), rtol=1e-12)
    assert len(hidden) == len(layers) - 1 and all((h >= 0).all() for h in hidden)
    cfg = relu_toy_config(preset)
    count = relu_toy.n_params(relu_toy.student_sizes(preset, cfg), relu_toy.student_biases(preset))
    assert count == sum(p.numel() for p in model.parameters()) == {"e4": 300, "e5": 60, "e6": 181}[preset]


def test_relu_normalise_rows_zero_row_stays_zero():
    phi = np.array([[3.0, 4.0], [0.0, 0.0]])
    with np.errstate(all="raise"):  # 0/0 must not even warn
        np.testing.assert_array_equal(relu_toy.normalise_rows(phi), [[0.6, 0.8], [0.0, 0.0]])


def test_relu_sparsity_uses_row_normalised_features():
    # Rows 1 and 2 are proportional: after row normalisation column 0 = [a, a, 0] and column 2 = [a, a, 1] are exactly
    # anti-correlated, so column 0 is deleted (density 5/9 -> 3/9). Without normalisation corr = −0.5 and nothing goes.
    phi = np.array([[1.0, 0.0, 1.0], [2.0, 0.0, 2.0], [0.0, 0.0, 3.0]])
    assert relu_toy.sparsity_metrics([phi], 0.99) == pytest.approx(
        {"density_layer1": 5 / 9, "density_dedup_layer1": 3 / 9})
    assert utils.feature_sparsity(phi, 0.99) == pytest.approx((5 / 9, 5 / 9))
    two = relu_toy.sparsity_metrics([phi, phi[:, :2]], 0.99)
    assert set(two) == {"density_layer1", "density_dedup_layer1", "density_layer2", "density_dedup_layer2"}
    assert two["density_layer2"] == pytest.approx(2 / 6)  # [[1, 0], [2, 0], [0, 0]]: 2 positive of 6


def test_relu_losses_are_plain_mse_without_half():
    # h(x) = 2·ReLU(x) − 1: train x = ±1, y = 0 -> errors 1, −1 -> MSE 1 (½·MSE would be 0.5); test x = 3, y = 2 -> 9
    layers = [[np.array([[1.0]]), None], [np.array([[2.0]]), np.array([-1.0])]]
    problem = {"x_train": np.array([[1.0], [-1.0]]), "y_train": np.zeros(2), "x_test": np.array([[3.0]]),
               "y_test": np.array([2.0])}
    metrics, hidden, finite = relu_toy.losses(layers, problem)
    assert metrics == {"train_loss": 1.0, "test_loss": 9.0} and finite
    np.testing.assert_array_equal(hidden[0], [[1.0], [0.0]])
    no_test, _, _ = relu_toy.losses(layers, {**problem, "x_test": None})  # E4: test set = training set
    assert no_test == {"train_loss": 1.0}


def test_relu_e4_data_hand_values():
    x, y = relu_toy.e4_data()
    assert x.shape == (12, 1) and y.shape == (12,)
    assert x[0, 0] == pytest.approx(-5.5 / 4 + 0.07) and x[11, 0] == pytest.approx(5.5 / 4 + 0.07)
    assert y[0] == pytest.approx(0.345 - 2) and y[4] == pytest.approx(2.345)


@pytest.mark.parametrize("preset, d, n, rank_points", [("e5", 2, 15, 60), ("e6", 5, 50, 181)])
def test_relu_teacher_student_data_shapes_and_seeding(preset, d, n, rank_points):
    cfg = relu_toy_config(preset)
    problem = relu_toy.make_problem(preset, cfg, data_seed=1)
    assert problem["x_train"].shape == (n, d) and problem["x_test"].shape == (1000, d)
    assert problem["y_train"].shape == (n,) and problem["rank_x"].shape == (rank_points, d)
    np.testing.assert_allclose(np.linalg.norm(problem["x_test"], axis=1), 1.0, rtol=1e-6)  # on the unit sphere
    assert all(problem[key].dtype == np.float32 for key in ("x_train", "y_train", "x_test", "y_test"))
    # the teacher of E5/E6, and its labels written out by hand (not through relu_toy.forward)
    teacher, x = problem["teacher"], problem["x_train"]
    assert [w.shape for w, _ in teacher] == {"e5": [(3, 2), (1, 3)], "e6": [(2, 5), (2, 2), (1, 2)]}[preset]
    if preset == "e5":  # unit-norm neurons, no biases, output signs a*_j = ±1
        (w, b1), (a, b2) = teacher
        assert b1 is None and b2 is None and set(np.abs(a).ravel()) == {1.0}
        np.testing.assert_allclose(np.linalg.norm(w, axis=1), 1.0, rtol=1e-6)
        expected = np.maximum(x @ w.T, 0) @ a[0]
    else:  # biases on every layer, PyTorch default U(±1/√fan_in)
        (w1, b1), (w2, b2), (w3, b3) = teacher
        assert all(np.abs(b).max() <= 1 / math.sqrt(w.shape[1]) for w, b in teacher)
        expected = np.maximum(np.maximum(x @ w1.T + b1, 0) @ w2.T + b2, 0) @ w3[0] + b3[0]
    np.testing.assert_allclose(problem["y_train"], expected, rtol=1e-5, atol=1e-6)  # float32
    again = relu_toy.make_problem(preset, cfg, data_seed=1)
    np.testing.assert_array_equal(again["x_train"], problem["x_train"])
    other = relu_toy.make_problem(preset, cfg, data_seed=2)
    assert not np.allclose(other["x_train"], problem["x_train"])


def test_relu_student_init_follows_the_presets():
    e4 = relu_toy.draw_student("e4", relu_toy_config("e4"), 3)
    assert set(np.abs(e4[0][0]).ravel()) == {2.5} and e4[1][1] is None  # w_j = ±2.5, no output bias
    assert {-2.5, 2.5} <= set(e4[0][0].ravel())
    e5 = relu_toy.draw_student("e5", relu_toy_config("e5"), 0)
    assert not e5[1][0].any() and e5[0][1] is None and e5[0][0].shape == (20, 2)  # a = 0, no biases
    e6 = relu_toy.draw_student("e6", relu_toy_config("e6"), 5)
    assert [w.shape for w, _ in e6] == [(10, 5), (10, 10), (1, 10)]
    assert np.abs(e6[0][1]).max() <= 1 / math.sqrt(5) and np.abs(e6[1][1]).max() <= 1 / math.sqrt(10)
    again = relu_toy.draw_student("e6", relu_toy_config("e6"), 5)
    np.testing.assert_array_equal(again[1][0], e6[1][0])
    assert all(array.dtype == np.float32 for layer in e6 for array in layer)


def test_relu_draws_are_the_notebooks_draws():
    """The draw order of the notebooks, written out by hand: global generators seeded, nn.Linear constructors
    first, then the custom init; numpy's choice without replacement for the SGD order."""
    state, numpy_state = torch.get_rng_state(), np.random.get_state()
    torch.manual_seed(0)
    first, output = torch.nn.Linear(2, 20, bias=False), torch.nn.Linear(20, 1, bias=False)
    w1, a = 0.5 * torch.randn_like(first.weight), 0.0 * torch.randn_like(output.weight)
    student = relu_toy.draw_student("e5", relu_toy_config("e5"), 0)
    np.testing.assert_array_equal(student[0][0], w1.numpy())
    np.testing.assert_array_equal(student[1][0], a.numpy())
    torch.manual_seed(1)  # E6's teacher at data seed 1: default biases kept, weights N(0,1)
    layers = [torch.nn.Linear(5, 2), torch.nn.Linear(2, 2), torch.nn.Linear(2, 1)]
    weights = [torch.randn_like(layer.weight) for layer in layers]
    teacher = relu_toy.draw_teacher("e6", relu_toy_config("e6"), 1)
    for (w, b), layer, weight in zip(teacher, layers, weights):
        np.testing.assert_array_equal(w, weight.numpy())
        np.testing.assert_array_equal(b, layer.bias.detach().numpy())
    np.random.seed(4)
    choices = [np.random.choice(15, size=1, replace=False)[0] for _ in range(300)]
    np.testing.assert_array_equal(relu_toy.sgd_indices(15, 300, 4), choices)
    assert not np.array_equal(choices, np.random.RandomState(4).randint(15, size=300))  # not the randint stream
    np.random.seed(2)  # the notebooks' inputs: float64 Gaussians rounded to float32, normalised by torch
    gaussian = np.random.multivariate_normal(np.zeros(5), np.eye(5), 50)
    x = torch.tensor(gaussian).float()
    np.testing.assert_array_equal(relu_toy.unit_sphere(np.random.RandomState(2), 50, 5),
                                  (x / torch.sum(x ** 2, 1, keepdim=True) ** 0.5).numpy())
    torch.set_rng_state(state)
    np.random.set_state(numpy_state)


def test_relu_seed_meaning_and_held_seeds():
    config = relu_toy_config("e5")
    assert relu_toy.run_seeds(config, 4) == {"student_seed": 4, "data_seed": 5}  # the notebooks: data s + 1
    assert relu_toy.run_seeds({**config, "data_seed": 1}, 4) == {"student_seed": 4, "data_seed": 1}
    assert relu_toy.run_seeds({**config, "student_seed": 0}, 4) == {"student_seed": 0, "data_seed": 5}
    assert relu_toy.run_seeds(relu_toy_config("e4"), 3) == {"student_seed": 3}  # E4's data are fixed


def test_relu_jitter_is_tiny_relative_and_keyed_by_the_seed():
    layers = relu_toy.draw_student("e6", relu_toy_config("e6"), 5)
    jittered = relu_toy.jitter(layers, 1e-3, seed=0)
    for layer, moved in zip(layers, jittered):
        for array, changed in zip(layer, moved):
            assert changed.dtype == array.dtype and not np.array_equal(changed, array)
            np.testing.assert_allclose(changed, array, rtol=6e-3)
    np.testing.assert_array_equal(relu_toy.jitter(layers, 1e-3, seed=0)[0][0], jittered[0][0])
    assert not np.array_equal(relu_toy.jitter(layers, 1e-3, seed=1)[0][0], jittered[0][0])


# The notebooks' printed numbers at their own seeds (train, test loss at the last evaluation), and the tolerance each
# reproduces to here: the constant and the early-decay runs are not chaotic; E6's four runs agree to 4 digits.
NOTEBOOK_NUMBERS = {
    "e4": {0: (2.086e-04, None, 0.02)},
    "e5": {0: (1.3538e-05, 6.0982e-04, 0.002), 1: (1.019e-05, 1.622e-04, 0.02)},
    "e6": {0: (1.371e-03, 0.061388, 0.01), 1: (1.097e-03, 0.032181, 0.01), 2: (1.005e-03, 0.024772, 0.01),
           3: (1.061e-03, 0.020578, 0.01)},
}


@pytest.mark.parametrize("preset", ["e4", "e5", "e6"])
def test_relu_presets_reproduce_the_notebooks_numbers(preset, tmp_path, one_torch_thread):
    relu_toy.main(["--preset", preset, "--out-dir", str(tmp_path)])
    finals = {log["run_index"]: log["final"] for log in map(json.loads, (p.read_text() for p in tmp_path.glob("*.json")))}
    for run_index, (train, test, tolerance) in NOTEBOOK_NUMBERS[preset].items():
        assert finals[run_index]["iter"] == {"e4": 31412, "e5": 14032, "e6": 9934}[preset]
        assert finals[run_index]["train_loss"] == pytest.approx(train, rel=tolerance)
        if test is not None:
            assert finals[run_index]["test_loss"] == pytest.approx(test, rel=tolerance)


def test_relu_flags_reach_the_shared_preset_mechanism():
    _, config, runs, experiment = relu_toy.parse_args(["--preset", "e6", "--seeds", "1", "2"])
    assert experiment == "e6" and config["seeds"] == [1, 2] and config["eval_points"] == 151  # seeds: still e6
    _, config, runs, experiment = relu_toy.parse_args(["--preset", "e6", "--lr", "0.02", "--eval-points", "100"])
    assert experiment == "e6_custom" and config["eval_points"] == 100
    assert [run["lr"] for run in runs] == [0.02] * 4 and [run["decay"] for run in runs] == [1.0, 3.5, 2.5, 5.0]


RELU_TINY = ["--iterations", "200", "--eval-points", "8"]


@pytest.mark.parametrize("preset, n_runs, extra", [
    ("e4", 2, ["--warmup-factor", "1"]),  # without the 200× warmup, 200 steps cannot diverge
    ("e5", 4, []),
    ("e6", 4, []),
])
def test_relu_presets_tiny_runs_and_plots(preset, n_runs, extra, tmp_path):
    logs_dir, figures = tmp_path / "runs", tmp_path / "figures"
    result = run_script("two_layer_relu.py", "--preset", preset, *RELU_TINY, *extra, "--out-dir", str(logs_dir))
    assert result.returncode == 0, result.stderr
    assert "Summary" in result.stdout
    paths = sorted(logs_dir.glob("*.json"))
    assert len(paths) == n_runs
    for path in paths:
        log = assert_valid_log(path, "two_layer_relu")
        assert log["experiment"] == f"{preset}_custom" and path.name.startswith(f"{preset}_custom_")
        records = log["history"]
        evals = utils.eval_iterations(200, 8, relu_toy.DENSE_EVALS).tolist()
        assert [r["iter"] for r in records] == evals[:len(records)]  # a diverged run stops at its first NaN
        cfg = log["config"]
        # the keys diag_net.py writes too: run position in the preset, seconds, the run over its seeds
        assert cfg["large_lr_frac"] == relu_toy.PRESETS[preset]["large_lr_frac"][log["run_index"]]
        assert cfg["eval_points"] == 8 and "n_evals" not in cfg
        assert set(log["timing"]) == {"train_s", "metrics_s", "callbacks_s", "total_s"}
        assert log["timing"]["total_s"] >= log["timing"]["metrics_s"] > 0
        assert log["seed_summary"]["seeds"] == [relu_toy.PRESETS[preset]["seeds"][0]]
        lrs = utils.toy_step_sizes(200, cfg["lr"], cfg["large_lr_frac"], cfg["decay"], cfg["warmup_factor"],
                                   cfg["warmup_power"], decay_includes_k=True)
        assert [r["lr"] for r in records] == pytest.approx(lrs[[r["iter"] for r in records]].tolist(), rel=1e-6)
        if log["status"] != "completed":
            assert preset == "e5" and log["status"] == "diverged"  # η = 0.455 can diverge in 200 steps
            assert records[-1]["train_loss"] is None  # the NaN is logged (as null), then the run stops
            continue
        assert len(records) == len(evals)
        final = log["final"]
        layer_keys = (["density_layer1", "density_dedup_layer2"] if preset == "e6"
                      else ["density_layer1", "density_dedup_layer1"])
        for key in ["train_loss", "rank", *layer_keys] + ([] if preset == "e4" else ["test_loss"]):
            assert final[key] is not None, key
        assert 0 <= final[layer_keys[1]] <= 1 and 0 < final["rank"] <= cfg["rank_points"]
        assert log["after_training"]["iter"] == 200 and "after_last_step" not in log
        if preset == "e4":
            assert len(log["function_grid"]["y"]) == cfg["grid_points"]
        if preset == "e5":
            assert np.array(log["neurons"]["student_w_end"]).shape == (20, 2)
    plotted = run_script("plots.py", "--logs", str(logs_dir), "--out-dir", str(figures))
    assert plotted.returncode == 0, plotted.stderr
    expected = {f"{preset}_custom.png"} | ({f"{preset}_custom_neurons.png"} if preset == "e5" else set())
    assert {p.name for p in figures.glob("*.png")} == expected


def test_relu_sharpness_is_a_measurement_only_and_label_noise_a_reproducible_change(tmp_path, one_torch_thread):
    check_sharpness_and_label_noise(relu_toy.main, ["--preset", "e5", *RELU_TINY],
                                    utils.eval_iterations(200, 8, relu_toy.DENSE_EVALS), tmp_path)


def test_relu_e5_neuron_figure_only_for_two_dimensional_inputs(tmp_path, one_torch_thread):
    import plots
    relu_toy.main(["--preset", "e5", "--input-dim", "3", "--iterations", "20", "--eval-points", "3", "--lr", "0.1",
                   "0.11", "0.12", "0.13", "--large-lr-frac", "1", "--decay", "1", "--out-dir", str(tmp_path / "runs")])
    written = plots.main(["--logs", str(tmp_path / "runs"), "--out-dir", str(tmp_path / "figures")])
    assert [os.path.basename(path) for path in written] == ["e5_custom.png"]  # no 2-D neuron picture of 3-D weights


def test_relu_divergence_is_logged_and_other_runs_go_on(tmp_path):
    # e5 has 4 runs: two stable constant step sizes and two that blow up at once
    result = run_script("two_layer_relu.py", "--preset", "e5", *RELU_TINY, "--lr", "0.1", "0.11", "50", "60",
                        "--large-lr-frac", "1", "--decay", "1", "--seeds", "0", "1", "--out-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "DIVERGED" in result.stdout
    logs = [json.loads(path.read_text()) for path in sorted(tmp_path.glob("*.json"))]
    statuses = {(log["run"], log["seed"]): log["status"] for log in logs}
    assert statuses == {(f"η = {lr}, constant", seed): "completed" if lr in ("0.1", "0.11") else "diverged"
                        for lr in ("0.1", "0.11", "50", "60") for seed in (0, 1)}
    # every log of a run carries the run over its seeds, with diag_net.py's structure (utils.seed_summary)
    stable = [log for log in logs if log["run"] == "η = 0.1, constant"]
    summary = stable[0]["seed_summary"]
    assert summary == stable[1]["seed_summary"] and summary["seeds"] == [0, 1] and summary["diverged_seeds"] == []
    assert summary["fraction_diverged"] == 0 and summary["final_iter"] == 171  # round(200·6/7)
    assert summary["median_final"]["test_loss"] == pytest.approx(np.mean([log["final"]["test_loss"] for log in stable]))
    lower, upper = summary["median_ci90"]["test_loss"]
    assert min(log["final"]["test_loss"] for log in stable) <= lower <= upper <= max(
        log["final"]["test_loss"] for log in stable)
    blown = next(log for log in logs if log["run"] == "η = 50, constant")["seed_summary"]
    assert blown["fraction_diverged"] == 1 and blown["median_final"] is None and blown["diverged_seeds"] == [0, 1]
    # ... and the printed per-run table after the per-seed one
    per_run = result.stdout.split("Per run over 2 seeds")[1].splitlines()[1:]
    assert "η = 0.1, constant: diverged 0/2" in per_run[0] and "test " in per_run[1] and " [" in per_run[1]
    assert "η = 50, constant: diverged 2/2" in per_run[4] and "every seed diverged" in per_run[5]


@pytest.mark.parametrize("args, flag", [
    (["--lr", "-1"], "--lr"),
    (["--iterations", "0"], "--iterations"),
    (["--n-train", "0"], "--n-train"),
    (["--preset", "e9"], "--preset"),
    (["--preset", "e4", "--n-train", "5"], "--n-train"),
    (["--lr", "0.1", "0.2"], "--lr"),
    (["--n-test", "10"], "--n-test"),
    (["--seeds", "1", "1"], "--seeds"),
    (["--out-dir", "/proc/forbidden"], "--out-dir"),
])
def test_relu_bad_input_is_one_line_exit_2(args, flag, tmp_path, capsys):
    # in-process (the parser is the same code path as the CLI; saves a torch start-up per case)
    out = [] if "--out-dir" in args else ["--out-dir", str(tmp_path)]
    with pytest.raises(SystemExit) as exit_info:
        relu_toy.main([*out, *args])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.count("\n") == 1 and flag in err, err
    assert not list(tmp_path.glob("*.json"))  # rejected before any run started


def test_relu_bad_input_from_the_command_line(tmp_path):
    result = run_script("two_layer_relu.py", "--decay", "-3", "--out-dir", str(tmp_path))
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "--decay" in result.stderr
    assert "Traceback" not in result.stderr


# ======================================================================================================================
# diag_net.py: diagonal linear networks E1 (SGD), E2 (GD vs SGD), E3 (loss-surface picture)
# ======================================================================================================================

import warnings  # noqa: E402  (imports kept in this section so that it can be moved or removed as one block)

import diag_net  # noqa: E402


def _diag_net_histories(data, lrs, algorithm, seeds, evals, rank_of):
    """Run diag_net.train and collect, per batch row, the list of (iter, metrics...) records it reports."""
    records = {row: [] for row in range(len(seeds))}

    def on_eval(t, rows, metrics):
        for i, row in enumerate(rows):
            records[row].append([t] + [metrics[key][i] for key in diag_net.METRIC_KEYS])

    result = diag_net.train(data, lrs, algorithm, seeds, evals, 0.1, rank_of, on_eval)
    return {row: np.array(recs, dtype=float) for row, recs in records.items()}, result


def test_diag_net_e1_constant_run_reproduces_the_authors_numbers(tmp_path, one_torch_thread):
    # E1, η = 0.25 constant, seed 1, full size (100 001 steps), the first run of `python diag_net.py`: at the last
    # evaluation point 99 599 the authors printed train 1.4216e-06, test 3.5286e-03, ‖β‖₀ 200; after all steps the
    # same run has train 3.5597e-06, test 3.5672e-03.
    diag_net.main(["--out-dir", str(tmp_path), "--log-interval", "60"])
    log = assert_valid_log(tmp_path / "e1_sgd_lr0.25_seed1.json", "diag_net")
    assert log["status"] == "completed" and log["experiment"] == "e1" and log["seed"] == 1
    final, after = log["final"], log["after_training"]
    assert final["iter"] == 99599 and after["iter"] == 100001
    # to the printed 5 digits (rel 1e-4): the before/after-update test losses differ by only 1.1 %
    assert final["train_loss"] == pytest.approx(1.4216e-06, rel=1e-4)
    assert final["test_loss"] == pytest.approx(3.5286e-03, rel=1e-4)
    assert final["l0"] == 200
    assert after["train_loss"] == pytest.approx(3.5597e-06, rel=1e-4)
    assert after["test_loss"] == pytest.approx(3.5672e-03, rel=1e-4)
    assert len(log["history"]) == 348 and [rec["iter"] for rec in log["history"][:100]] == list(range(100))
    assert log["seed_summary"]["fraction_diverged"] == 0
    assert log["seed_summary"]["median_final"]["test_loss"] == final["test_loss"]


def test_diag_net_data_generator_follows_the_authors_draw_order():
    data = diag_net.make_data(n_train=80, input_dim=200, support_size=20, n_test=1000, data_seed=0)
    assert data["X"].shape == (80, 200) and data["X_test"].shape == (1000, 200) and data["theta"].shape == (200,)
    theta = data["theta"]
    assert np.linalg.norm(theta) == pytest.approx(1.0, abs=1e-12)
    assert (theta[:20] > 0).all() and (theta[20:] == 0).all()
    np.testing.assert_allclose(data["y"], data["X"] @ theta)
    np.testing.assert_allclose(data["y_test"], data["X_test"] @ theta)
    # legacy global numpy seeded with 0: X is the first draw, X_test the second, then randn for θ*
    np.random.seed(0)
    x_first = np.random.multivariate_normal(np.zeros(200), np.eye(200), 80)
    x_second = np.random.multivariate_normal(np.zeros(200), np.eye(200), 1000)
    raw_theta = np.random.randn(200)[:20]
    np.testing.assert_array_equal(data["X"], x_first)
    np.testing.assert_array_equal(data["X_test"], x_second)
    np.testing.assert_allclose(theta[:20], np.abs(raw_theta) / np.linalg.norm(raw_theta))


def test_diag_net_sgd_indices_equal_reseeding_legacy_numpy_per_step():
    np.random.seed(3)
    per_step = [np.random.randint(80) for _ in range(500)]
    np.testing.assert_array_equal(diag_net.sgd_indices([1, 3], 80, 500)[1], per_step)


def test_diag_net_metrics_by_hand():
    # two states: β = u⊙v = [1, 1e-51, −1] and [1, 1e-49, −1]; ‖β‖₀ counts |β_i| > 1e-50
    data = {"X": np.eye(3)[:2], "y": np.array([1.0, 0.0]), "X_test": np.eye(3), "y_test": np.zeros(3)}
    u = np.array([[2.0, 1e-25, -1.0], [2.0, 1e-24, -1.0]])
    v = np.array([[0.5, 1e-26, 1.0], [0.5, 1e-25, 1.0]])
    metrics = diag_net.evaluate(data, u, v, diag_net.JacobianRank(data["X_test"]))
    assert metrics["l0"].tolist() == [2, 3]
    assert metrics["train_loss"] == pytest.approx([0, 0], abs=1e-90)  # Xβ = [1, ~0] = y
    assert metrics["test_loss"] == pytest.approx([2 / 6, 2 / 6])  # ‖β‖² / (2·3): the diagonal nets' loss has a ½
    assert metrics["l1"] == pytest.approx([2, 2])
    assert metrics["uv_norm"] == pytest.approx([2.5, 2.5])  # √(4 + 1 + 0.25 + 1)
    assert metrics["balancedness"] == pytest.approx([1.5, 1.5])  # ‖|u| − |v|‖₂ = |2 − 0.5|
    assert metrics["rank"].tolist() == [2, 2]  # the ~1e-25 coordinate is below ε = 1e-15 relative


def test_diag_net_sgd_step_by_hand():
    x, y = np.array([[1.0, 2.0]]), np.array([1.0])
    u, v = np.array([[0.5, 1.0]]), np.array([[1.0, -1.0]])
    # e = 1·0.5 + 2·(−1) − 1 = −2.5;  u −= 0.1·e·x⊙v,  v −= 0.1·e·x⊙u (both from the old values)
    u1, v1, residuals = diag_net.sgd_steps(u, v, x[None], y[None], np.array([0.1]))
    assert residuals[0, 0] == pytest.approx(-2.5)
    np.testing.assert_allclose(u1, [[0.5 + 0.25 * 1.0, 1.0 + 0.25 * 2.0 * -1.0]])
    np.testing.assert_allclose(v1, [[1.0 + 0.25 * 0.5, -1.0 + 0.25 * 2.0 * 1.0]])


def test_diag_net_gd_step_is_the_gradient_of_the_half_mse():
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((7, 4)), rng.standard_normal(7)
    u, v = rng.standard_normal((1, 4)), rng.standard_normal((1, 4))

    def loss(uu, vv):
        return np.sum((x @ (uu * vv) - y) ** 2) / (2 * len(y))

    lr, h = 1e-3, 1e-6
    u1, v1, _ = diag_net.gd_steps(u, v, x, y, np.array([lr]))
    for state, stepped, which in ((u, u1, 0), (v, v1, 1)):
        numeric = []
        for i in range(4):
            bump = np.zeros(4)
            bump[i] = h
            args_plus = (u[0] + bump, v[0]) if which == 0 else (u[0], v[0] + bump)
            args_minus = (u[0] - bump, v[0]) if which == 0 else (u[0], v[0] - bump)
            numeric.append((loss(*args_plus) - loss(*args_minus)) / (2 * h))
        np.testing.assert_allclose((state - stepped)[0] / lr, numeric, rtol=1e-6)


def test_diag_net_vectorised_seeds_equal_single_seed_runs():
    data = diag_net.make_data(n_train=20, input_dim=30, support_size=3, n_test=100, data_seed=0)
    rank_of = diag_net.JacobianRank(data["X_test"][:60])
    lrs, evals = utils.toy_step_sizes(1500, 0.5, 0.5, 3.0), utils.eval_iterations(1500, 20, diag_net.DENSE_EVALS)
    batched, batched_result = _diag_net_histories(data, lrs, "sgd", [1, 2, 5], evals, rank_of)
    for row, seed in enumerate([1, 2, 5]):
        single, single_result = _diag_net_histories(data, lrs, "sgd", [seed], evals, rank_of)
        # identical dynamics (bit for bit); losses may differ in the last bit (BLAS matrix vs vector product)
        np.testing.assert_array_equal(batched_result["u"][row], single_result["u"][0])
        np.testing.assert_array_equal(batched_result["v"][row], single_result["v"][0])
        np.testing.assert_allclose(batched[row], single[0], rtol=1e-12, atol=0)
    assert not np.array_equal(batched[0], batched[1])  # the seeds do differ


def test_diag_net_sharpness_is_a_measurement_only_and_label_noise_a_reproducible_change(tmp_path, one_torch_thread):
    flags = ["--iterations", "300", "--eval-points", "10", "--seeds", "1", "2"]
    check_sharpness_and_label_noise(diag_net.main, flags, utils.eval_iterations(300, 10, diag_net.DENSE_EVALS),
                                    tmp_path)


def test_diag_net_one_diverging_seed_is_logged_and_the_others_go_on(tmp_path, one_torch_thread):
    # E2 at 1 500 iterations: its SGD run at the paper's step size (η = 0.272, ÷20 at 50 %) blows up at iteration 131
    # for seed 6; seed 10 survives (measured)
    args = ["--preset", "e2", "--iterations", "1500", "--eval-points", "30", "--log-interval", "0"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow/invalid-value warnings from the diverging row
        diag_net.main(args + ["--seeds", "6", "10", "--out-dir", str(tmp_path)])
    diverged = assert_valid_log(tmp_path / "e2_custom_sgd_lr0.272_div20_at0.5_seed6.json", "diag_net")
    alive = assert_valid_log(tmp_path / "e2_custom_sgd_lr0.272_div20_at0.5_seed10.json", "diag_net")
    assert diverged["status"] == "diverged" and diverged["diverged_at"] == 131
    assert diverged["final"]["iter"] < 131 and all(math.isfinite(r["train_loss"]) for r in diverged["history"])
    assert alive["status"] == "completed" and alive["final"]["iter"] == 1448  # round(1500·28/29)
    summary = alive["seed_summary"]
    assert summary == diverged["seed_summary"] and summary["fraction_diverged"] == 0.5
    assert summary["diverged_seeds"] == [6] and summary["median_final"]["l0"] == alive["final"]["l0"]
    # seed 10 alone follows the same trajectory as inside the batch
    diag_net.main(args + ["--seeds", "10", "--out-dir", str(tmp_path / "single")])
    single = assert_valid_log(tmp_path / "single" / "e2_custom_sgd_lr0.272_div20_at0.5_seed10.json", "diag_net")
    assert [r["iter"] for r in single["history"]] == [r["iter"] for r in alive["history"]]
    assert [r["l0"] for r in single["history"]] == [r["l0"] for r in alive["history"]]
    np.testing.assert_allclose([r["test_loss"] for r in single["history"]],
                               [r["test_loss"] for r in alive["history"]], rtol=1e-12)


def _graded_states(rng, count, d, log10_low):
    """(u, v) whose magnitudes w_j spread over [10^log10_low, 1] as in a sparsifying run."""
    w = 10.0 ** rng.uniform(log10_low, 0, (count, d))
    angle = rng.uniform(0, 2 * np.pi, (count, d))
    return w * np.cos(angle), w * np.sin(angle)


def test_diag_net_rank_equals_svd_rank_of_the_full_jacobian(monkeypatch):
    rng = np.random.default_rng(0)
    d = 40
    x_rank = rng.standard_normal((2 * d, d))
    rank_of = diag_net.JacobianRank(x_rank)
    svds = []
    svdvals = torch.linalg.svdvals
    monkeypatch.setattr(diag_net.torch.linalg, "svdvals", lambda a: svds.append(a.shape) or svdvals(a))

    def reference(u, v, x=x_rank):  # the definition: φ = [x⊙v, x⊙u] on the rank points, σ_k/σ_1 > 1e-15
        return utils.jacobian_rank(np.hstack([x * v, x * u]), 1e-15)

    # clearly separated magnitudes: 25 columns far above the threshold, 15 far below; decided without an SVD
    u = np.where(np.arange(d) < 25, 1.0, 1e-30) * rng.uniform(0.5, 1.5, (6, d))
    v = np.where(np.arange(d) < 10, 0.3, 0.0) * np.ones((6, d))
    ranks, svd_shapes = rank_of(u, v), list(svds)  # (the reference below makes SVDs too)
    assert list(ranks) == [25] * 6 == [reference(a, b) for a, b in zip(u, v)] and svd_shapes == []
    assert rank_of(np.zeros((1, d)), np.zeros((1, d)))[0] == 0
    # magnitudes spread continuously through the threshold (a sparsifying run): mostly one SVD of the kept columns;
    # equal to the full-Jacobian SVD up to rounding at the threshold (±1, rarely)
    u, v = _graded_states(rng, 60, d, -30)
    svds.clear()
    ranks, svd_count = rank_of(u, v), len(svds)
    expected = np.array([reference(a, b) for a, b in zip(u, v)])
    assert svd_count > 50 and 10 < expected.min() < expected.max() < d
    assert np.abs(ranks - expected).max() <= 1 and (ranks != expected).mean() <= 0.1
    # fewer rank points than d (--n-test < d): no certificate, still the rank of the definition
    few = rng.standard_normal((d // 2, d))
    ranks = diag_net.JacobianRank(few)(u[:10], v[:10])
    expected = np.array([reference(a, b, few) for a, b in zip(u[:10], v[:10])])
    assert np.abs(ranks - expected).max() <= 1 and (ranks == expected).mean() >= 0.9


@pytest.mark.parametrize("preset, n_logs", [("e1", 8), ("e2", 8), ("e3", 4)])
def test_diag_net_presets_run_small_and_plot(tmp_path, preset, n_logs):
    out = tmp_path / "runs"
    result = run_script("diag_net.py", "--preset", preset, "--iterations", "300", "--eval-points", "10",
                        "--seeds", "1", "2", "--out-dir", str(out))
    assert result.returncode == 0, result.stderr
    paths = sorted(out.glob("*.json"))
    assert len(paths) == n_logs  # one log per SGD run and seed, one per GD run (seed null); --seeds replaces E3's 2
    for path in paths:
        log = assert_valid_log(path, "diag_net")
        # --iterations changes the experiment: logged (and drawn) as e1_custom, never over the paper's e1
        assert log["experiment"] == f"{preset}_custom" and path.name.startswith(f"{preset}_custom_")
        assert log["config"]["iterations"] == 300 and "seed_summary" in log
        assert {"train_loss", "test_loss", "l0", "l1", "rank", "uv_norm", "balancedness", "lr"} <= set(log["final"])
        cfg, values = log["config"], diag_net.PRESETS[preset]  # η up to and including iteration ⌊T·N⌋, then η/D
        for key in diag_net.PER_RUN:  # run_index = position in the preset; a one-value list holds for every run
            assert cfg[key] == values[key][log["run_index"] if len(values[key]) > 1 else 0], key
        assert cfg["n_train"] == values["n_train"] and cfg["input_dim"] == values["input_dim"]
        decay_iter = None if cfg["decay"] == 1 else math.floor(cfg["large_lr_frac"] * 300)
        assert cfg["decay_iter"] == decay_iter
        for record in log["history"]:
            decayed = decay_iter is not None and record["iter"] > decay_iter
            assert record["lr"] == pytest.approx(cfg["lr"] / cfg["decay"] if decayed else cfg["lr"])
        if preset == "e3":
            assert np.array(log["surface"]["train_loss"]).shape == (100, 100)
            assert len(log["trajectory_2d"]["a"]) == 301 and log["surface"]["w_init"] == [0.0, 0.0]
            assert log["end_state"]["support_size"] == 3
    figures = tmp_path / "figures"
    result = run_script("plots.py", "--logs", str(out), "--out-dir", str(figures))
    assert result.returncode == 0, result.stderr
    expected = {f"{preset}_custom.png"} | ({"e3_custom_metrics.png"} if preset == "e3" else set())
    assert {path.name for path in figures.glob("*.png")} == expected


def test_diag_net_flags_reach_the_shared_preset_mechanism():
    _, config, runs, experiment = diag_net.parse_args([])  # `python diag_net.py` runs the 4 runs of E1
    assert experiment == "e1" and [run["lr"] for run in runs] == [0.25, 0.282, 0.282, 0.282]
    assert [run["algorithm"] for run in runs] == ["sgd"] * 4 and config["input_dim"] == 200
    # seeds, where the logs go and how often they are saved change nothing that is trained or measured
    assert diag_net.parse_args(["--seeds", "1", "2", "--log-interval", "0", "--out-dir", "x"])[3] == "e1"
    assert diag_net.parse_args(["--preset", "e2", "--n-train", "30"])[3] == "e2_custom"


@pytest.mark.parametrize("args, flag", [
    (["--lr", "-0.1"], "--lr"),
    (["--n-train", "0"], "--n-train"),
    (["--preset", "e9"], "--preset"),
    (["--lr", "0.3", "0.2"], "--lr"),  # E1 has 4 runs: one value, or four
    (["--large-lr-frac", "0.5", "--decay", "3"], "--large-lr-frac"),  # runs 2-4 would be identical
    (["--input-dim", "10"], "--support-size"),  # r = 20 > d
    (["--seeds", "1", "2", "1"], "--seeds"),
    (["--preset", "e2", "--label-noise-std", "0.1"], "--label-noise-std"),  # E2 has GD runs: no seed, no noise
    (["--sharpness-every", "-1"], "--sharpness-every"),
])
def test_diag_net_bad_input_is_one_line_naming_the_flag(capsys, args, flag):
    with pytest.raises(SystemExit) as exit_info:
        diag_net.parse_args(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and f"argument {flag}:" in err, err


def test_diag_net_bad_input_from_the_command_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = run_script("diag_net.py", "--out-dir", str(blocker / "sub"))
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "--out-dir" in result.stderr
    assert "Traceback" not in result.stderr


# ======================================================================================================================
# plots.py, Ctrl-C of the toy scripts, the README's snippet
# ======================================================================================================================


def test_plots_lines_follow_run_index_and_keep_file_order_without_it():
    import plots
    logs = [{"run": name, "run_index": index} for name, index in [("c", 2), ("a", 0), ("c", 2), ("b", 1)]]
    assert [line.label for line in plots.plot_lines(logs)] == ["a", "b", "c"]  # file order would give c, a, b
    deep = [{"run": name} for name in ["z", "y", "z"]]  # deep-net logs have no run_index: order of appearance
    lines = plots.plot_lines(deep)
    assert [line.label for line in lines] == ["z", "y"] and len(lines[0].logs) == 2


def _toy_log(script, run, run_index, seed, status, train_losses, **config):
    """A minimal toy run log with the keys the toy drawers read (one record per train-loss value, every 10 steps)."""
    history = [{"iter": 10 * i, "lr": 0.1, "train_loss": loss, "test_loss": loss, "rank": 5, "l0": 5,
                "density_layer1": 0.5, "density_dedup_layer1": 0.25} for i, loss in enumerate(train_losses)]
    return {"script": script, "experiment": "x", "run": run, "run_index": run_index, "seed": seed, "status": status,
            "config": {"decay_iter": None, **config}, "history": history, "final": history[-1]}


@pytest.mark.parametrize("script, config", [("diag_net", {"n_train": 20, "input_dim": 30, "support_size": 3}),
                                            ("two_layer_relu", {"preset": "e5", "input_dim": 3})])
def test_plots_toy_drawers_order_runs_and_treat_diverged_seeds_alike(script, config, tmp_path, monkeypatch):
    import matplotlib.pyplot as plt
    import plots
    figures = []
    monkeypatch.setattr(plots, "save_figure", lambda fig, out_dir, name: figures.append(fig) or name)
    logs = [  # in file-name order run A (index 1) comes first; every seed of run B (index 0) diverged
        _toy_log(script, "A", 1, 1, "completed", [1.0, 1e-3], **config),
        _toy_log(script, "A", 1, 2, "diverged", [1.0, 1e30, None], **config),
        _toy_log(script, "B", 0, 1, "diverged", [1.0, 1e20, None], **config),
        _toy_log(script, "B", 0, 2, "diverged", [1.0, None], **config)]
    plots.DRAWERS[script]("x", logs, str(tmp_path))
    train_panel = figures[0].axes[0]
    assert train_panel.get_legend_handles_labels()[1] == ["B [2/2 diverged] (2 seeds)", "A [1/2 diverged]"]
    b_line, a_line = train_panel.get_lines()
    assert b_line.get_linestyle() == "-." and b_line.get_marker() == "x"  # all diverged: drawn apart, × at the end
    assert list(b_line.get_ydata()) == [1.0, 1e20]
    # the diverged seed of A (1e30) is out of its median and band: one seed left, so the only band is B's
    assert a_line.get_linestyle() == "-" and list(a_line.get_ydata()) == [1.0, 1e-3]
    (band,) = train_panel.collections
    assert max(path.vertices[:, 1].max() for path in band.get_paths()) == 1e20
    plt.close("all")


# A deep-net config as train_resnet.py writes it (two blocks, to keep the figures small); _deep_log varies it.
DEEP_CONFIG = {"dataset": "cifar10", "data_dir": "./data", "download": False, "n_train": 10000, "epochs": 25,
               "batch_size": 250, "lr": 0.75, "lr_schedule": "piecewise", "warmup_exp": 1.05, "large_lr_frac": 0.5,
               "momentum": 0.0, "weight_decay": 0.0, "augment": False, "eval_every": 64, "sparsity_examples": 2048,
               "sparsity_neurons": 1000, "tau": 0.95, "eval_batch_size": 128, "seed": 0, "device": "auto",
               "out_dir": "runs/train_resnet", "stop_at_epoch": None, "precision": "fp32", "compile": False,
               "channels_last": True, "deterministic": False, "width": 16, "n_test": 10000, "num_classes": 10,
               "precision_used": "fp32", "sparsity_examples_used": 2048, "blocks": ["block1", "block2"]}


def _deep_log(seed=0, status="completed", loss=1.0, iters=None, **changes):
    """A minimal train_resnet.py log: DEEP_CONFIG with `changes`, every metric equal to `loss` at every evaluation
    (every --eval-every steps to the end unless `iters` says where the run's evaluations stopped)."""
    import types
    config = {**DEEP_CONFIG, "seed": seed, **changes}
    config["steps_per_epoch"] = config["n_train"] // config["batch_size"]
    config["total_steps"] = config["steps_per_epoch"] * config["epochs"]
    if iters is None:
        iters = sorted({*range(0, config["total_steps"], config["eval_every"]), config["total_steps"]})
    history = [{"iter": i, "epoch": i / config["steps_per_epoch"], "train_loss": loss, "train_error": loss / 10,
                "test_loss": loss, "test_error": loss / 10, "density_block1": loss / 10,
                "density_dedup_block1": loss / 20, "density_block2": loss / 10, "density_dedup_block2": loss / 20,
                "lr": utils.deep_step_size(i / config["steps_per_epoch"], config["epochs"], config["lr"],
                                           config["lr_schedule"], config["warmup_exp"], config["large_lr_frac"])}
               for i in iters]
    label = utils.schedule_label(types.SimpleNamespace(**config))
    return {"script": "train_resnet", "experiment": "resnet18_cifar10", "run": label, "seed": seed,
            "status": status, "config": config, "history": history, "final": history[-1] if history else None}


def _draw_deep(logs, monkeypatch, tmp_path):
    """The deep-net figure of `logs`, all in one figure (not saved): (figure, legend labels)."""
    import plots
    figures = []
    monkeypatch.setattr(plots, "save_figure", lambda fig, out_dir, name: figures.append(fig) or name)
    plots.draw_deep_net("resnet18_cifar10", logs, str(tmp_path))
    (fig,) = figures
    return fig, [text.get_text() for text in fig.legends[0].get_texts()]


def test_plots_seeds_of_one_configuration_make_one_line(monkeypatch, tmp_path):
    import matplotlib.pyplot as plt
    # seeds may come from other machines, folders and evaluation batch sizes, and from older code that did not
    # write a key a later version adds with its off default (here a future label_noise = 0 or sharpness_every = 0)
    logs = [_deep_log(seed=0, loss=1.0),
            _deep_log(seed=1, loss=3.0, out_dir="elsewhere", data_dir="/data", device="cuda", eval_batch_size=512,
                      download=True, precision="bf16", label_noise=0.0, sharpness_every=0)]
    _, labels = _draw_deep(logs, monkeypatch, tmp_path)
    assert labels == ["η0 = 0.75, exp. warmup w = 1.05, decay at 50 % (2 seeds)"]
    # a key that changes the experiment, even one older logs lack, splits them
    split = [_deep_log(seed=0), _deep_log(seed=1, label_noise=0.1)]
    _, labels = _draw_deep(split, monkeypatch, tmp_path)
    assert labels == ["η0 = 0.75, exp. warmup w = 1.05, decay at 50 %",
                      "η0 = 0.75, exp. warmup w = 1.05, decay at 50 %, label noise 0.1"]
    plt.close("all")


def test_plots_deep_runs_of_other_settings_are_separate_figures_named_by_their_difference(monkeypatch, tmp_path):
    import matplotlib.pyplot as plt
    import plots
    figures = {}
    monkeypatch.setattr(plots, "save_figure", lambda fig, out_dir, name: figures.setdefault(name, fig) and name)
    # the setting with the most logs keeps the experiment's name; schedules and label noise share a figure
    logs = [_deep_log(seed=0), _deep_log(seed=1), _deep_log(lr=0.1, lr_schedule="constant"),
            _deep_log(lr=0.1, lr_schedule="constant", label_noise=0.2), _deep_log(epochs=8),
            _deep_log(momentum=0.9, augment=True)]
    written = plots.DRAWERS["train_resnet"]("resnet18_cifar10", logs, str(tmp_path))
    assert written == ["resnet18_cifar10", "resnet18_cifar10_epochs8", "resnet18_cifar10_augment_momentum0.9"]
    main = [text.get_text() for text in figures["resnet18_cifar10"].legends[0].get_texts()]
    assert main == ["η0 = 0.75, exp. warmup w = 1.05, decay at 50 % (2 seeds)", "η = 0.1 constant",
                    "η = 0.1 constant, label noise 0.2"]
    assert "8 epochs" in figures["resnet18_cifar10_epochs8"]._suptitle.get_text()
    plt.close("all")


@pytest.mark.parametrize("changes, shown", [
    ([{"epochs": 2}, {"epochs": 8}], ["epochs 2", "epochs 8"]),
    ([{"width": 8}, {"width": 16}, {"n_train": 1280}], ["n-train 10000, width 8", "n-train 10000, width 16",
                                                        "n-train 1280, width 16"]),  # in the config's key order
], ids=["epochs", "width-and-n-train"])
def test_plots_runs_of_other_configurations_are_separate_lines_named_by_their_difference(changes, shown, monkeypatch,
                                                                                         tmp_path):
    import matplotlib.pyplot as plt
    # all seed 0, same schedule: plots.py used to draw these as one line '(2 seeds)' / '(3 seeds)'
    logs = [_deep_log(seed=0, **change) for change in changes]
    fig, labels = _draw_deep(logs, monkeypatch, tmp_path)
    label = "η0 = 0.75, exp. warmup w = 1.05, decay at 50 %"
    assert sorted(labels) == sorted(f"{label} ({text})" for text in shown)
    assert len(fig.axes[1].get_lines()) >= len(changes)  # train loss: one curve per run (and the decay markers)
    # a width that differs between two schedules is named too (the schedule label does not say it); the schedule
    # keys are not repeated, the label holds them
    logs = [_deep_log(width=8), _deep_log(width=16, lr=0.01, lr_schedule="constant")]
    _, labels = _draw_deep(logs, monkeypatch, tmp_path)
    assert labels == [f"{label} (width 8)", "η = 0.01 constant (width 16)"]
    plt.close("all")


@pytest.mark.parametrize("status", ["interrupted", "failed", "running"])
def test_plots_unfinished_run_is_marked_and_not_merged(status, monkeypatch, tmp_path):
    import matplotlib.pyplot as plt
    # two completed seeds (loss 1 and 3) and a third seed that stopped at epoch 3.2 with loss 100
    logs = [_deep_log(seed=0, loss=1.0), _deep_log(seed=2, status=status, loss=100.0, iters=[0, 64, 128]),
            _deep_log(seed=1, loss=3.0)]
    fig, labels = _draw_deep(logs, monkeypatch, tmp_path)
    label = "η0 = 0.75, exp. warmup w = 1.05, decay at 50 %"
    assert labels == [f"{label} (2 seeds)", f"{label} (seed 2, {status}; logged up to epoch 3.2)"]
    train_loss = fig.axes[1]
    completed, unfinished = [line for line in train_loss.get_lines() if line.get_linestyle() == "-"]
    assert set(completed.get_ydata()) == {2.0}  # the median of 1 and 3: the 100 of the unfinished run is not in it
    assert max(path.vertices[:, 1].max() for path in train_loss.collections[0].get_paths()) == 3.0
    assert list(unfinished.get_xdata()) == [0, 1.6, 3.2] and unfinished.get_marker() == "o"  # open circle at its end
    assert list(unfinished.get_markevery()) == [-1] and fig.legends[0].legend_handles[1].get_marker() == "o"
    plt.close("all")


def test_plots_deep_net_figure_shows_step_size_decays_train_error_and_configuration(monkeypatch, tmp_path):
    import matplotlib.pyplot as plt
    e9 = {"momentum": 0.9, "weight_decay": 5e-4, "augment": True}
    logs = [_deep_log(**e9), _deep_log(lr=0.01, lr_schedule="constant", **e9), _deep_log(large_lr_frac=0.1, **e9)]
    fig, labels = _draw_deep(logs, monkeypatch, tmp_path)
    title = fig._suptitle.get_text()
    for part in ["ResNet-18 (width 16)", "CIFAR-10", "10 000 training images", "batch 250", "25 epochs",
                 "momentum 0.9", "weight decay 0.0005", "augmentation", "dashed vertical lines = step-size decays"]:
        assert part in title, part
    panels = [ax for ax in fig.axes if ax.get_visible() and ax.axison]
    assert [ax.get_title() for ax in panels] == ["step size η (log scale)", "train loss (log scale)", "train error (%)",
                                                 "test error (%)", "block1: feature density (%)",
                                                 "block2: feature density (%)"]
    # step sizes: every step's, from utils.deep_step_size, as the run used them, on a log axis
    step_size = panels[0]
    assert step_size.get_yscale() == "log"
    curve = step_size.get_lines()[0]
    assert curve.get_drawstyle() == "steps-post" and len(curve.get_xdata()) == 1001
    assert curve.get_ydata()[500] == pytest.approx(0.75 * 1.05 ** 50 / 10)  # epoch 12.5 = T·E: first ÷10 step
    # decay points of the two piecewise runs (T·E and 0.9·E), dashed, on every panel; none for the constant run
    for ax in panels:
        decays = sorted(line.get_xdata()[0] for line in ax.get_lines() if line.get_linestyle() == "--")
        assert decays == pytest.approx([2.5, 12.5, 22.5, 22.5]), ax.get_title()
    assert "plain SGD" in _draw_deep([_deep_log()], monkeypatch, tmp_path)[0]._suptitle.get_text()
    plt.close("all")


@pytest.mark.parametrize("script", ["diag_net", "two_layer_relu", "train_resnet"])
def test_plots_sharpness_panel_only_when_the_logs_have_sharpness(script, tmp_path, monkeypatch):
    import matplotlib.pyplot as plt
    import plots
    figures = []
    monkeypatch.setattr(plots, "save_figure", lambda fig, out_dir, name: figures.append(fig) or name)

    def two_seeds(with_sharpness):
        """Two seeds of one run; with sharpness 5, 10 (seed 0) and 15, 20 (seed 1) at the first two measurements."""
        logs = []
        for seed in (0, 1):
            values = [5.0 + 10 * seed, 10.0 + 10 * seed]
            if script == "train_resnet":  # evaluations every 64 steps; the sharpness as records of their own, between
                log = _deep_log(seed=seed)  # them, without the other metrics (as train_resnet.py logs it)
                if with_sharpness:
                    log["history"] = sorted(log["history"] + [
                        {"iter": i, "epoch": i / 40, "lr": utils.deep_step_size(i / 40, 25, 0.75, "piecewise", 1.05,
                                                                                0.5), "sharpness": value}
                        for i, value in zip([32, 96], values)], key=lambda record: record["iter"])
            else:  # toys: the sharpness inside the evaluation records at iterations 0 and 20 (lr 0.1: 2/η = 20)
                config = {"n_train": 20, "input_dim": 30, "support_size": 3} if script == "diag_net" else \
                    {"preset": "e5", "input_dim": 3}
                log = _toy_log(script, "A", 0, seed, "completed", [1.0, 0.5, 0.1], **config)
                for record, value in zip(log["history"][::2], values if with_sharpness else []):
                    record["sharpness"] = value
            logs.append(log)
        return logs

    figures.clear()
    plots.DRAWERS[script]("x", two_seeds(False), str(tmp_path))
    without = [ax.get_title() for ax in figures[0].axes if ax.axison]
    assert without and not any("sharpness" in title for title in without)
    figures.clear()
    plots.DRAWERS[script]("x", two_seeds(True), str(tmp_path))
    panels = [ax for ax in figures[0].axes if ax.axison]
    titles = [ax.get_title() for ax in panels]
    assert [title for title in titles if title != plots.SHARPNESS_PANEL[1]] == without  # one panel more, the others
    (sharpness,) = [ax for ax in panels if ax.get_title() == plots.SHARPNESS_PANEL[1]]
    assert sharpness.get_yscale() == "log"
    solid, dashed = sharpness.get_lines()  # λ_max (median over seeds) and 2/η, dashed, in the same colour
    assert list(solid.get_ydata()) == [10.0, 15.0] and dashed.get_linestyle() == "--"
    assert dashed.get_color() == solid.get_color()
    if script == "train_resnet":
        assert list(solid.get_xdata()) == [0.8, 2.4]  # epochs 32/40 and 96/40
        # 2/η at every logged step size from the first to the last measurement: the two and the evaluation between
        assert list(dashed.get_xdata()) == [0.8, 1.6, 2.4]
        assert list(dashed.get_ydata()) == pytest.approx([2 / utils.deep_step_size(epoch, 25, 0.75, "piecewise", 1.05,
                                                                                   0.5) for epoch in [0.8, 1.6, 2.4]])
        # the sharpness-only records leave the other panels alone: the train loss has no point at epoch 0.8
        train_loss = next(ax for ax in panels if ax.get_title().startswith("train loss")).get_lines()[0]
        assert 0.8 not in list(train_loss.get_xdata()) and not np.isnan(train_loss.get_ydata()).any()
    else:
        assert list(solid.get_xdata()) == [0, 20] and list(dashed.get_ydata()) == [20.0, 20.0, 20.0]
    plt.close("all")


@pytest.mark.parametrize("script, config", [("diag_net", {"n_train": 20, "input_dim": 30, "support_size": 3}),
                                            ("two_layer_relu", {"preset": "e5", "input_dim": 3})])
def test_plots_toy_drawers_split_configurations_and_mark_unfinished_runs(script, config, tmp_path, monkeypatch):
    import matplotlib.pyplot as plt
    import plots
    figures = []
    monkeypatch.setattr(plots, "save_figure", lambda fig, out_dir, name: figures.append(fig) or name)
    logs = [_toy_log(script, "A", 0, 1, "completed", [1.0, 0.1], iterations=100, seeds=[1, 2], **config),
            _toy_log(script, "A", 0, 2, "completed", [1.0, 0.3], iterations=100, seeds=[1, 2], out_dir="x", **config),
            _toy_log(script, "A", 0, 3, "interrupted", [1.0], iterations=100, seeds=[3], **config),
            _toy_log(script, "A", 0, 1, "completed", [1.0, 0.2], iterations=50, seeds=[1], **config)]
    plots.DRAWERS[script]("x", logs, str(tmp_path))
    train_panel = figures[0].axes[0]
    assert train_panel.get_legend_handles_labels()[1] == [
        "A (iterations 100) (2 seeds)", "A (iterations 100) (seed 3, interrupted; logged up to iteration 0)",
        "A (iterations 50)"]
    assert list(train_panel.get_lines()[0].get_ydata()) == pytest.approx([1.0, 0.2])  # median of 0.1 and 0.3 only
    plt.close("all")

@pytest.mark.parametrize("command", [["diag_net.py", "--iterations", "1000000", "--log-interval", "0"],
                                     ["two_layer_relu.py", "--preset", "e6", "--iterations", "100000"]],
                         ids=["diag_net", "two_layer_relu"])
def test_toy_ctrl_c_marks_the_log_interrupted_without_traceback(tmp_path, command):
    import signal
    import time
    # SIGINT back to its default in the child: a CI runner or `cmd &` may start us with it ignored
    process = subprocess.Popen([sys.executable, *command, "--out-dir", str(tmp_path)], cwd=REPO, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 60
    while not any(json.loads(path.read_text())["history"] for path in tmp_path.glob("*.json")):  # training started
        assert time.monotonic() < deadline and process.poll() is None
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130 and err.count("\n") == 1 and "Traceback" not in err, err
    assert [json.loads(path.read_text())["status"] for path in tmp_path.glob("*.json")] == ["interrupted"]


def test_readme_sparsity_example_runs():
    """The README's "measure feature sparsity in your own network" snippet, executed as written."""
    with open(os.path.join(REPO, "README.md")) as f:
        readme = f.read()
    section = readme.split("## Measure feature sparsity in your own network", 1)[1]
    snippet = section.split("```python\n", 1)[1].split("```", 1)[0]
    result = run_script("-c", snippet)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["layer3", "layer4", "pooled"]


# ======================================================================================================================
# benchmark.py: speed of the pipeline against the best achievable on the same machine (targets reported, not tested)
# ======================================================================================================================

BENCHMARK_KEYS = {"name", "ours", "baseline", "unit", "ratio", "target", "met", "verdict", "details"}


def test_benchmark_quick_writes_every_documented_record(tmp_path):
    import benchmark

    out = tmp_path / "bench.json"
    result = run_script("benchmark.py", "--quick", "--out", str(out))
    assert result.returncode == 0, result.stderr
    records = json.loads(out.read_text())
    assert [r["name"] for r in records] == list(benchmark.ITEMS)
    for r in records:
        assert set(r) == BENCHMARK_KEYS, r["name"]
        assert all(math.isfinite(r[key]) and r[key] > 0 for key in ("ours", "baseline", "ratio")), r
        op, value = r["target"].split()
        if r["verdict"] == "INVALID":
            assert r["met"] is None and r["details"]["invalid_reasons"]
        else:
            assert r["met"] is (r["ratio"] >= float(value) if op == ">=" else r["ratio"] <= float(value))
            assert r["verdict"] == ("met" if r["met"] else "missed") and not r["details"]["invalid_reasons"]
        assert r["details"]["env"]["quick"] is True and r["details"]["env"]["data"].startswith("synthetic")
    by_name = {r["name"]: r for r in records}
    # the speed-ups are between identical results: the benchmark checks them and records that it did
    assert by_name["sparsity_dedup"]["details"]["identical_output"] is True
    assert by_name["sparsity_blocks"]["details"]["identical_densities"] is True
    assert by_name["train_step"]["ratio"] == pytest.approx(by_name["train_step"]["ours"]
                                                           / by_name["train_step"]["baseline"])
    assert "train_step" in result.stdout and "wrote" in result.stdout  # the table is printed
    table = run_script("benchmark.py", "--table", str(out))  # the README's markdown table, from the JSON alone
    assert table.returncode == 0, table.stderr
    rows = table.stdout.splitlines()
    assert rows[0].startswith("`python benchmark.py` on ") and len(rows) == 4 + len(benchmark.ITEMS)
    assert all(f"| {name} |" in table.stdout for name in benchmark.ITEMS) and "synthetic" in table.stdout


def test_readme_performance_table_is_what_benchmark_table_prints():
    """The README's performance numbers come from the committed results/benchmark.json, printed by one command."""
    import benchmark
    here = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(here, "results", "benchmark.json")) as f:
        table = benchmark.markdown_table(json.load(f))
    with open(os.path.join(here, "README.md")) as f:
        assert table in f.read()


def test_benchmark_verdicts_are_invalid_when_the_timings_cannot_be_trusted():
    import benchmark

    steady = benchmark.record("x", 1.0, 2.0, "s", 2.0, (">=", 1.5), {}, [[1.0, 1.1, 1.2], [2.0, 2.1]])
    assert steady["verdict"] == "met" and steady["met"] is True
    assert steady["details"]["spreads"] == pytest.approx([1.2, 1.05])
    noisy = benchmark.record("x", 1.0, 2.0, "s", 2.0, (">=", 1.5), {}, [[1.0, 2.5], [2.0, 2.1]])
    assert noisy["verdict"] == "INVALID" and noisy["met"] is None and "2.50×" in noisy["details"]["invalid_reasons"][0]
    odd = benchmark.record("x", 1.0, 2.0, "s", 0.5, (">=", 0.9), {}, [[1.0], [2.0]], implausible="reference slower")
    assert odd["verdict"] == "INVALID" and odd["details"]["invalid_reasons"] == ["reference slower"]
    assert benchmark.record("x", 1.0, 2.0, "s", 0.5, (">=", 0.9), {})["verdict"] == "missed"
    assert benchmark.side_by_side(lambda: None, lambda: None, 5)[2].__len__() == 5


def test_benchmark_plain_greedy_reference_is_the_papers_definition():
    """The reference of the sparsity item must compute the definition itself, or the comparison would be meaningless."""
    import benchmark
    from test_utils import greedy_feature_sparsity, random_activation_matrix

    rng = np.random.default_rng(7)
    for _ in range(40):
        phi = random_activation_matrix(rng)
        tau = float(rng.choice([0.9, 0.95, 0.99]))
        density, dedup, kept = benchmark.plain_greedy_sparsity(phi, tau)
        assert (density, dedup) == pytest.approx(greedy_feature_sparsity(phi, tau), rel=1e-12, abs=0)
        assert kept.sum() <= (phi > 0).any(axis=0).sum()


@pytest.mark.parametrize("args, flag", [(["--only", "everything"], "--only"), (["--repeats", "0"], "--repeats"),
                                        (["--data-dir", "/nonexistent"], "--data-dir")])
def test_benchmark_bad_flags_are_one_line_errors(args, flag):
    result = run_script("benchmark.py", *args)
    assert result.returncode == 2 and flag in result.stderr and result.stderr.count("\n") == 1, result.stderr


def test_plots_deep_table_gives_mean_and_std_over_seeds_per_configuration():
    import plots
    logs = [_deep_log(seed=seed, loss=loss) for seed, loss in [(0, 1.0), (1, 3.0)]] + [_deep_log(epochs=8)]
    for log in logs:
        log["final"] = dict(log["final"], wall_time=120.0)
    rows = plots.deep_table(logs).splitlines()
    assert rows[0].startswith("| run | seeds | train error (%) | test error (%) | block1 dedup. density (%)")
    # two seeds: train error 10 % and 30 % -> 20.0 ± 14.1 (sample std); the 8-epoch run is a line of its own
    assert "| 2 | 20.00 ± 14.14 | 20.0 ± 14.1 | 10.0 ± 7.1 | 10.0 ± 7.1 | 2.0 |" in rows[2]
    assert "(epochs 8)" in rows[3] and "| 1 | 10.00 | 10.0 | 5.0 | 5.0 | 2.0 |" in rows[3]


def test_plots_deep_claims_pick_the_tuned_baseline_and_give_verdicts_over_seeds():
    import plots
    constant = {"lr": 0.1, "lr_schedule": "constant"}
    # _deep_log: train loss = `loss`, train and test error = loss / 10, de-duplicated densities = loss / 20
    logs = [_deep_log(seed=seed, loss=loss, **constant) for seed, loss in [(0, 0.03), (1, 0.032), (2, 0.028)]]
    logs.append(_deep_log(seed=0, loss=0.04, lr=0.2, lr_schedule="constant"))  # higher training loss: not the baseline
    logs += [_deep_log(seed=seed, loss=loss) for seed, loss in [(0, 0.01), (1, 0.011), (2, 0.009)]]  # T = 0.5
    logs.append(_deep_log(seed=3, status="diverged", loss=float("nan")))
    logs.append(_deep_log(seed=0, loss=0.5, large_lr_frac=0.3))  # does not fit: 5 % training error
    logs.append(_deep_log(seed=0, loss=0.1, epochs=8))  # another setting, without a baseline
    logs.append(_deep_log(seed=1, loss=0.001, status="interrupted", **constant))  # unfinished: never counted
    logs.append(_deep_log(seed=0, loss=0.0001, label_noise=0.2, **constant))  # label noise: the control, no baseline
    finals = {"baseline": ([0.60, 0.62, 0.58], [0.48, 0.50, 0.46]), "T = 0.5": ([0.40, 0.60, 0.50], [0.38, 0.40, 0.36])}
    for run, start in [("baseline", 0), ("T = 0.5", 4)]:
        for log, density, test_error in zip(logs[start:start + 3], *finals[run]):
            log["final"] = dict(log["final"], density_dedup_block2=density, test_error=test_error)
    settings = plots.deep_settings("resnet18_cifar10", logs)
    assert list(settings) == ["resnet18_cifar10", "resnet18_cifar10_epochs8"] and len(settings["resnet18_cifar10"]) == 11
    assert plots.deep_claims("resnet18_cifar10_epochs8", settings["resnet18_cifar10_epochs8"]) == \
        "**Claims of the paper, resnet18_cifar10_epochs8**: not checked, no constant-step run with seed 0 to compare with."
    claims = plots.deep_claims("resnet18_cifar10", settings["resnet18_cifar10"])
    assert claims.count("**Claims of the paper, resnet18_cifar10**") == 1
    assert "baseline: η = 0.1 constant, the constant step with the lowest final training loss at seed 0 " \
           "(η = 0.1 constant: 0.0300, η = 0.2 constant: 0.0400)" in claims
    rows = [row for row in claims.splitlines() if row.startswith("| ") and "---" not in row][1:]
    assert len(rows) == 5  # block1, block2, test error vs the baseline; T 0.3 -> 0.5 on block2 and test error
    # block2 density 50 ± 10 % vs 60 ± 2 %: d = 10, se = sqrt(100/3 + 4/3) = 5.89: 1.7 standard errors, within the
    # seed noise; the diverged seed is named
    assert rows[1] == ("| sparser features | block2 dedup. density (%) | η0 = 0.75, exp. warmup w = 1.05, decay at 50 % "
                       "(3, +1 diverged) vs η = 0.1 constant (3) | 50.0 ± 10.0 vs 60.0 ± 2.0 | **within seed noise** "
                       "(difference 10.0, 1.7 standard errors) |")
    # test error 38 ± 2 % vs 48 ± 2 %: d = 10, se = sqrt(4/3 + 4/3) = 1.63: 6.1 standard errors
    assert rows[2].endswith("| 38.0 ± 2.0 vs 48.0 ± 2.0 | **holds** (difference 10.0, 6.1 standard errors) |")
    assert rows[3].startswith("| longer large-step phase, sparser features | block2")
    assert rows[4].endswith("| none yet: needs ≥ 2 completed seeds each (has 3 and 1); confounded: η0 = 0.75, exp. "
                            "warmup w = 1.05, decay at 30 % does not fit (5.0 % training error) |")
    # a second η0 is a group of its own: never compared with the first one's T
    logs += [_deep_log(seed=seed, loss=0.01, lr=0.5, large_lr_frac=0.3) for seed in (0, 1)]
    claims = plots.deep_claims("resnet18_cifar10", plots.deep_settings("resnet18_cifar10", logs)["resnet18_cifar10"])
    assert claims.count("| sparser features | block2") == 2 and claims.count("longer large-step phase") == 2


def test_plots_deep_sharpness_table_lists_each_measurement_against_two_over_eta():
    import plots
    log = _deep_log(eval_every=100, epochs=1, n_train=500, lr_schedule="constant", lr=0.5)  # records at 0 and 2
    log["history"][0].update(sharpness=8.0, sharpness_hvps=12, sharpness_converged=True)
    log["history"].insert(1, {"iter": 1, "epoch": 0.5, "lr": 0.5, "sharpness": 2.0, "sharpness_hvps": 3,
                              "sharpness_converged": True})  # a measurement between evaluations
    rows = plots.deep_sharpness_table(log).splitlines()
    assert rows[0] == "| epoch | η | 2/η | λ_max | λ_max·η/2 | Hessian-vector products | train loss | " \
                      "block2 dedup. density (%) |"
    assert rows[2] == "| 0 | 0.5 | 4 | 8 | 2.00 | 12 | 1 | 5.0 |"  # loss 1: density_dedup = 1/20
    assert rows[3] == "| 0.5 | 0.5 | 4 | 2 | 0.50 | 3 | – | – |" and len(rows) == 4


def test_plots_toy_table_reports_the_paper_seed_the_distribution_and_the_jitter_spread():
    import plots

    def toy_log(seed, run_index, test_loss, status="completed", experiment="e5"):
        final = {"iter": 10, "test_loss": test_loss, "density_dedup_layer1": 0.5}
        return {"script": "two_layer_relu", "experiment": experiment, "run": f"run {run_index}",
                "run_index": run_index, "seed": seed, "status": status, "final": final}

    logs = [toy_log(seed, 0, loss) for seed, loss in [(0, 2.0), (1, 4.0), (2, 3.0)]]
    logs.append(toy_log(3, 0, None, status="diverged"))
    jitter = [dict(toy_log(seed, 0, loss, experiment="e5_jitter"), config={"init_jitter": 1e-7})
              for seed, loss in [(0, 1.0), (1, 5.0)]]
    for group in (logs, jitter):
        summary = utils.seed_summary([log["seed"] for log in group], [log["status"] for log in group],
                                     [log["final"] for log in group])
        for log in group:
            log["seed_summary"] = summary
    rows = plots.toy_table("e5", logs, jitter).splitlines()
    assert "paper (seed 0)" in rows[0] and "seeds 0–3" in rows[0] and "1e-07 init jitter" in rows[0]
    cells = [cell.strip() for cell in rows[2].split("|")[1:-1]]
    assert cells[:4] == ["run 0", "test loss", "0.0006098", "2"]  # the notebook's number, ours at seed 0
    assert cells[4] == utils.format_median_ci(logs[0]["seed_summary"], "test_loss") and cells[4].startswith("3 [")
    assert cells[5] == "1/4" and cells[6] == ""
    assert cells[7] == f"{utils.format_median_ci(jitter[0]['seed_summary'], 'test_loss')} (1 – 5), diverged 0/2"


def test_readme_tables_are_exactly_what_plots_table_prints():
    """Every results table of the README comes from the committed logs: `python plots.py --logs results --table`."""
    import plots
    here = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(here, "README.md")) as f:
        readme = f.read()
    printed = plots.results_tables(plots.load_logs(os.path.join(here, "results")))
    for section in printed.split("\n\n**"):
        section = section if section.startswith("**") else "**" + section
        assert section.strip() in readme, section[:200]
