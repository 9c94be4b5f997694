"""Speed of the kit's pipeline against the best achievable on the same machine, in the same run.

Researchers run these experiments as sweeps (step sizes × schedules × seeds), so speed decides how much of the paper a
user can afford to reproduce. Every item times OUR real code path and a reference side by side, in one process:
after a warm-up, the two are run alternately (the order flips every repeat), at least 5 times each, and the MINIMUM
of each side's repeats is compared: another process on the machine can only add time to a repeat, never remove it,
so the fastest of several identical repeats is the estimate that load disturbs least (the medians of 3 repeats flipped
verdicts under load). An item is INVALID, not met or missed, when its own numbers cannot be trusted: either side's
repeats spread by more than 2× (max / min), or its reference is implausible (item-specific, e.g. a bare training step
slower than the full loop it is the reference for). The 1-minute load average before and after each item is recorded.

  item                 ours                                              reference                              target
  train_step           train_resnet.py's training loop: in-memory data,  a bare forward+backward+SGD loop of   ≥ 0.90
                       on-device augmentation, schedule, loss window,    the same model on one fixed batch
                       divergence checks (evaluation excluded)           (images/s ratio)
  data_path            one epoch of our batches (seeded permutation      torchvision DataLoader, per-image      ≥ 5×
                       slice, crop+flip gather, float conversion)        RandomCrop(32, 4) + flip + ToTensor,
                                                                         at its fastest worker count
  sparsity_dedup       utils.feature_sparsity, 10752 × 4096, ~1/3 of     the plain greedy loop: numpy           ≥ 5×
                       the columns duplicating others; same output       float64 corrcoef, then delete one row
                                                                         and column at a time
  sparsity_blocks      all ResNet-18 blocks from ONE eval pass (hooks)   one forward pass per block (the        ≥ 3×
                       over --sparsity-examples images; same densities   authors' code)
  eval_overhead        share of wall time spent in evaluation during a train_resnet.py run with the default     ≤ 15 %
                       --eval-every and --sparsity-examples at the CPU setting (--width 16)
  sharpness_cost       one --sharpness-every measurement (Lanczos,       one epoch of 10 000 training images   ≤ 1
                       default tolerance, cold start) on 256 images,     at the loop's speed (item 1)
                       ResNet-18 width 16
  seed_sweep           diag_net.py with 16 seeds                         the same with 1 seed (same iterations) ≤ 3×
  compute_efficiency   FLOP/s of the bare ResNet-18 (width 64)           the best dense float32 matrix product  ≥ 0.5
                       training step (FLOPs counted by torch)            of the machine (MKL matmul or oneDNN)

Commands (from the repository root):

    python benchmark.py                       # full run, 2-10 min on a 2-core CPU; table + benchmark.json
    python benchmark.py --quick               # small sizes, ~30 s: checks that everything runs (numbers are rough)
    python benchmark.py --only data_path sparsity_dedup --out /tmp/b.json
    python benchmark.py --table results/benchmark.json   # the README's performance table, from a benchmark.json
    OMP_NUM_THREADS=1 python benchmark.py     # one thread for torch and numpy alike: steadier on a busy machine

benchmark.json is a list of records {name, ours, baseline, unit, ratio, target, met, verdict, details}; `details`
holds the absolute numbers, every repeat, their spreads, sizes, data set, load averages and the environment. Real
CIFAR-10 is used when found (--data-dir, else ./data); otherwise the generated synthetic set, and the table says which
data each data-dependent item used.
Targets are reported, never asserted: timings depend on the machine and on whatever else it is running.
"""
import contextlib
import datetime
import io
import json
import math
import os
import platform
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

import diag_net
import train_resnet
import utils

REPO = os.path.dirname(os.path.abspath(__file__))
ITEMS = ("train_step", "data_path", "sparsity_dedup", "sparsity_blocks", "eval_overhead", "sharpness_cost",
         "seed_sweep", "compute_efficiency")

# Sizes of the full run and of --quick (a smoke test of the machinery, seconds; its ratios are not meaningful).
MIN_REPEATS = 5  # the default of a full run: a minimum over fewer repeats is still at the mercy of one busy moment
MAX_SPREAD = 2.0  # repeats of one side spread by more than this factor (max / min): the item is INVALID
FULL = dict(repeats=MIN_REPEATS, width=16, batch=256, steps=10, dedup_shape=(10752, 4096), blocks_examples=10752,
            eval_steps=200, loader_workers=(0, 1, 2), loader_probe_batches=40, seed_iterations=100001,
            peak_size=4096, efficiency_width=64, efficiency_batch=64, efficiency_steps=2, eval_examples=None,
            sharpness_examples=256)
QUICK = dict(repeats=1, width=16, batch=16, steps=2, dedup_shape=(1024, 384), blocks_examples=64,
             eval_steps=4, loader_workers=(0,), loader_probe_batches=2, seed_iterations=1000,
             peak_size=512, efficiency_width=16, efficiency_batch=16, efficiency_steps=1, eval_examples=64,
             sharpness_examples=16)

# ======================================================================================================================
# Timing
# ======================================================================================================================


def sync(device):
    """Wait for queued GPU work, so that a timer measures the computation and not only its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def side_by_side(ours, reference, repeats, warmup=1):
    """Minimum seconds of two callables timed alternately (the order flips every repeat) after `warmup` calls each.

    Each callable must finish its own work (sync the device) before returning. Returns (ours, reference, pairs) with
    pairs = [(ours_s, reference_s), ...] for the record and its spread check.
    """
    for _ in range(warmup):
        ours()
        reference()
    pairs = []
    for rep in range(repeats):
        timed = {}
        for name, fn in (("ours", ours), ("reference", reference))[::1 if rep % 2 == 0 else -1]:
            start = time.perf_counter()
            fn()
            timed[name] = time.perf_counter() - start
        pairs.append((timed["ours"], timed["reference"]))
    return min(p[0] for p in pairs), min(p[1] for p in pairs), pairs


def spread(seconds):
    """max / min of repeated timings of the same work (1.0 for a single repeat)."""
    return max(seconds) / min(seconds)


def record(name, ours, baseline, unit, ratio, target, details, repeats=(), implausible=None):
    """One benchmark.json record; target = (">=" or "<=", value). repeats: the lists of repeated timings of each side
    (their spread is checked); implausible: why the reference cannot be trusted, if it cannot. The verdict is 'met',
    'missed' or 'INVALID' (then `met` is None: no claim either way)."""
    op, value = target
    met = ratio >= value if op == ">=" else ratio <= value
    spreads = [spread(seconds) for seconds in repeats if len(seconds) > 1]
    reasons = [f"repeats spread {max(spreads):.2f}× (> {MAX_SPREAD:g}×)"] if spreads and max(spreads) > MAX_SPREAD else []
    reasons += [implausible] if implausible else []
    details.update(spreads=spreads, invalid_reasons=reasons)
    verdict = "INVALID" if reasons else "met" if met else "missed"
    return {"name": name, "ours": ours, "baseline": baseline, "unit": unit, "ratio": ratio,
            "target": f"{op} {value:g}", "met": None if reasons else bool(met), "verdict": verdict,
            "details": details}


@contextlib.contextmanager
def quiet():
    """Silence the progress lines of the code under test (the benchmark prints its own table)."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


# ======================================================================================================================
# Shared set-up: data, training runs
# ======================================================================================================================


def find_cifar10(data_dir):
    """The folder holding cifar-10-batches-py/: --data-dir, else ./data."""
    candidates = [data_dir] if data_dir else ["data"]
    for folder in candidates:
        if os.path.exists(os.path.join(folder, "cifar-10-batches-py", "data_batch_1")):
            return folder
    return None


def load_images(args, device):
    """(ImageDataset, description): real CIFAR-10 when found (never in --quick unless --data-dir is given), else the
    synthetic set."""
    folder = find_cifar10(args.data_dir) if (args.data_dir or not args.quick) else None
    if folder is None:
        return utils.synthetic_image_dataset().to(device), "synthetic (generated; CIFAR-10 not found)"
    return utils.load_image_dataset("cifar10", folder).to(device), f"cifar10 from {os.path.abspath(folder)}"


def train_argv(size, out_dir, device, extra=()):
    """train_resnet.py flags of the benchmark runs: the E9 setting (momentum, weight decay, augmentation), which
    exercises every part of the loop; a moderate η so that random weights never diverge. The data set is the
    benchmark's: real CIFAR-10 if found, else the synthetic set."""
    data = ["--dataset", "cifar10", "--data-dir", size["cifar_dir"]] if size.get("cifar_dir") else ["--dataset",
                                                                                                     "synthetic"]
    return ["--width", str(size["width"]), "--batch-size", str(size["batch"]), "--lr", "0.05", "--warmup-exp", "1",
            "--momentum", "0.9", "--weight-decay", "5e-4", "--augment", "--out-dir", out_dir, "--device", device.type,
            *data, *extra]


def subset(data, n_train, n_test):
    """The first n_train training and n_test test images (a shorter epoch / a cheaper evaluation)."""
    return data._replace(train_images=data.train_images[:n_train], train_labels=data.train_labels[:n_train],
                         test_images=data.test_images[:n_test], test_labels=data.test_labels[:n_test])


def bare_step_loop(model, images, labels, steps, device, lr=0.05, momentum=0.9, weight_decay=5e-4):
    """A callable running `steps` plain forward+backward+SGD steps on one fixed, pre-made batch."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)

    def loop():
        for _ in range(steps):
            loss = F.cross_entropy(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        sync(device)

    return loop


def fixed_batch(data, batch, channels_last, device):
    images = utils.images_to_float(data.train_images[:batch], channels_last)
    return images.to(device), data.train_labels[:batch].to(device)


# ======================================================================================================================
# Items
# ======================================================================================================================


def training_loop_seconds(ctx):
    """Seconds of train_resnet.py's training loop over one epoch of size["steps"] iterations: train_resnet.main as a
    user runs it, evaluation excluded (read from the run's `images_per_sec`, which does not count evaluation time)."""
    size, device = ctx["size"], ctx["device"]
    steps, batch = size["steps"], size["batch"]
    n_eval = size["eval_examples"] or 256  # evaluation is excluded from the timing: keep it short
    with tempfile.TemporaryDirectory() as out_dir:
        argv = train_argv(size, out_dir, device, ["--epochs", "1", "--eval-every", str(steps), "--sparsity-examples",
                                                  str(n_eval), "--n-train", str(steps * batch)])
        with quiet():
            status = train_resnet.main(argv)
        if status != "completed":
            raise RuntimeError(f"benchmark training run ended {status}")
        (name,) = [name for name in os.listdir(out_dir) if name.endswith(".json")]
        with open(os.path.join(out_dir, name)) as f:
            log = json.load(f)
    return steps * batch / log["final"]["images_per_sec"]


def loop_step_seconds(ctx):
    """Seconds per iteration of the real training loop (after a warm-up run), when item 1 has not measured it."""
    training_loop_seconds(ctx)
    return training_loop_seconds(ctx) / ctx["size"]["steps"]


def bench_train_step(ctx):
    """Item 1: the real training loop (evaluation excluded) vs a bare loop of the same steps on one fixed batch."""
    size, device, data = ctx["size"], ctx["device"], ctx["data"]
    steps, batch = size["steps"], size["batch"]
    ours_seconds = []
    model = train_resnet.ResNet18(data.num_classes, size["width"]).to(device).to(memory_format=torch.channels_last)
    bare = bare_step_loop(model, *fixed_batch(data, batch, True, device), steps, device)
    _, bare_min, pairs = side_by_side(lambda: ours_seconds.append(training_loop_seconds(ctx)), bare, size["repeats"])
    ours_min = min(ours_seconds[1:])  # [0] is the warm-up
    ctx["loop_step_seconds"], ctx["bare_step_seconds"] = ours_min / steps, bare_min / steps
    ours_ips, bare_ips = steps * batch / ours_min, steps * batch / bare_min
    details = {"width": size["width"], "batch_size": batch, "steps_per_repeat": steps,
               "ours_images_per_s": ours_ips, "bare_images_per_s": bare_ips,
               "ours_s_per_step": ours_min / steps, "bare_s_per_step": bare_min / steps,
               "repeats_s": [[o, b] for o, (_, b) in zip(ours_seconds[1:], pairs)], "data": ctx["data_name"],
               "settings": "E9 flags: --augment --momentum 0.9 --weight-decay 5e-4, channels_last"}
    # the bare loop does a subset of the full loop's work on the same model: slower than it means a disturbed timing
    implausible = (f"the bare reference ({bare_ips:.0f} images/s) is slower than the full loop ({ours_ips:.0f})"
                   if ours_ips > 1.1 * bare_ips else None)
    return record("train_step", ours_ips, bare_ips, "images/s", ours_ips / bare_ips, (">=", 0.90), details,
                  [ours_seconds[1:], [b for _, b in pairs]], implausible)


class _PILImages(torch.utils.data.Dataset):
    """CIFAR-style dataset the usual torchvision way: one PIL image per item, per-image transforms."""

    def __init__(self, images_hwc, labels, transform):
        self.images, self.labels, self.transform = images_hwc, labels, transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[index])), int(self.labels[index])


def bench_data_path(ctx):
    """Item 2: one epoch of our batches vs a torchvision DataLoader over the same images (fastest worker count)."""
    import torchvision.transforms as T

    size, device, data = ctx["size"], ctx["device"], ctx["data"]
    batch = 256
    n_train = len(data.train_labels)
    epochs_done = [0]

    def ours():  # every batch of one epoch, as train_resnet.py's loop makes them (a new epoch each call)
        epoch = epochs_done[0]
        batches = utils.epoch_batches(n_train, batch, epoch, 0, device)
        for index, indices in enumerate(batches):
            images = utils.augment_batch(data.train_images[indices], 0, epoch * len(batches) + index)
            made = utils.images_to_float(images, True), data.train_labels[indices]
        epochs_done[0] += 1
        sync(device)
        return made

    transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor()])
    dataset = _PILImages(data.train_images.cpu().permute(0, 2, 3, 1).numpy(), data.train_labels.cpu().numpy(),
                         transform)

    def loader_epoch(loader, max_batches=None):
        for k, (images, labels) in enumerate(loader):
            images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            if max_batches is not None and k + 1 >= max_batches:
                break
        sync(device)

    # The usual way at its best: persistent workers (no start-up per epoch), the fastest worker count on a probe.
    loaders, probe = {}, {}
    for workers in size["loader_workers"]:
        loaders[workers] = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers,
                                                       persistent_workers=workers > 0,
                                                       pin_memory=device.type == "cuda")
        loader_epoch(loaders[workers], 2)  # start the workers
        start = time.perf_counter()
        loader_epoch(loaders[workers], size["loader_probe_batches"])
        probe[workers] = time.perf_counter() - start
    best = min(probe, key=probe.get)
    ours_min, loader_min, pairs = side_by_side(ours, lambda: loader_epoch(loaders[best]), size["repeats"])
    loaders.clear()  # stops the worker processes
    details = {"images_per_epoch": len(dataset), "batch_size": batch, "loader_workers": best,
               "loader_probe_s": {str(k): v for k, v in probe.items()}, "ours_images_per_s": len(dataset) / ours_min,
               "loader_images_per_s": len(dataset) / loader_min, "repeats_s": pairs, "data": ctx["data_name"],
               "cpu_cores": os.cpu_count()}
    return record("data_path", ours_min, loader_min, "s/epoch", loader_min / ours_min, (">=", 5.0), details,
                  list(zip(*pairs)))


def duplicated_activations(n_rows, n_cols, seed=0):
    """A post-ReLU-like N×M matrix in which a third of the columns duplicate others.

    Unique columns: 32 shared latent factors plus independent noise (so ordinary neurons correlate mildly, up to
    ~0.4, as real features do); duplicates: a random positive multiple of another column's pre-activation plus 10 %
    noise (|corr| ≈ 0.95-0.99 after the ReLU, so some fall near τ = 0.95 and take the float64 path). Columns shuffled.
    """
    g = torch.Generator().manual_seed(seed)
    n_copies = n_cols // 3
    n_unique = n_cols - n_copies
    pre = torch.randn(n_rows, 32, generator=g) @ (0.15 * torch.randn(32, n_unique, generator=g))
    pre += torch.randn(n_rows, n_unique, generator=g)
    source = torch.randint(0, n_unique, (n_copies,), generator=g)
    copies = pre[:, source] * (0.5 + torch.rand(n_copies, generator=g))
    copies += 0.1 * torch.randn(n_rows, n_copies, generator=g)
    order = torch.randperm(n_cols, generator=g)
    return torch.relu(torch.cat([pre, copies], dim=1)[:, order]).contiguous()


def plain_greedy_sparsity(phi, tau):
    """The paper's de-duplication the straightforward way: float64 numpy, the full correlation matrix, then the greedy
    pass in column order, deleting one row and column at a time (zeroed in place; the authors' code copies the matrix
    with np.delete at every deletion, which is far slower). Returns (density, dedup_density, kept mask of the alive
    columns)."""
    phi = np.asarray(phi, dtype=np.float64)
    positive = phi > 0
    alive = positive.any(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = np.abs(np.corrcoef(phi[:, alive], rowvar=False).reshape(alive.sum(), alive.sum()))
    corr = np.nan_to_num(corr, nan=0.0)  # a NaN correlation (constant column) never deletes
    constant = (phi[:, alive] == phi[:1, alive]).all(axis=0)  # nor does corrcoef's rounding noise for a constant
    corr[constant, :] = corr[:, constant] = 0.0
    np.fill_diagonal(corr, 0.0)
    kept = np.ones(corr.shape[0], dtype=bool)
    for i in range(corr.shape[0]):
        if (corr[i] > tau).any():  # some column still present is a duplicate of column i
            kept[i] = False
            corr[i, :] = 0.0  # delete row and column i
            corr[:, i] = 0.0
    return positive.sum() / phi.size, positive[:, alive][:, kept].sum() / phi.size, kept


def bench_sparsity_dedup(ctx):
    """Item 3: utils.feature_sparsity vs the plain greedy loop on the same float32 matrix; outputs must be identical."""
    size, device = ctx["size"], ctx["device"]
    n_rows, n_cols = size["dedup_shape"]
    phi = duplicated_activations(n_rows, n_cols).to(device)
    phi_reference = phi.cpu().numpy()
    results = {}

    def ours():
        results["ours"] = utils.feature_sparsity(phi, 0.95)
        sync(device)

    def reference():
        results["reference"] = plain_greedy_sparsity(phi_reference, 0.95)

    ours_min, reference_min, pairs = side_by_side(ours, reference, size["repeats"])
    (density, dedup), (ref_density, ref_dedup, kept) = results["ours"], results["reference"]
    identical = bool(dedup == ref_dedup and density == ref_density)
    details = {"shape": [n_rows, n_cols], "tau": 0.95, "deleted_columns": int((~kept).sum()), "density": density,
               "dedup_density": dedup, "identical_output": identical, "repeats_s": pairs,
               "reference": "numpy float64 corrcoef + greedy pass deleting one row and column at a time"}
    if not identical:
        raise RuntimeError(f"sparsity_dedup: feature_sparsity differs from the plain greedy ({dedup} vs {ref_dedup})")
    return record("sparsity_dedup", ours_min, reference_min, "s", reference_min / ours_min, (">=", 5.0), details,
                  list(zip(*pairs)))


def bench_sparsity_blocks(ctx):
    """Item 3b: feature sparsity of all 5 ResNet-18 blocks from ONE eval-mode pass (hooks) vs one pass per block."""
    size, device, data = ctx["size"], ctx["device"], ctx["data"]
    torch.manual_seed(0)
    model = train_resnet.ResNet18(data.num_classes, size["width"]).to(device).to(memory_format=torch.channels_last)
    images = data.train_images[:size["blocks_examples"]]  # the fixed, unaugmented images that measure sparsity
    blocks = model.SPARSITY_BLOCKS
    results = {}

    def batches():  # as utils.evaluate_classifier feeds them: eval-size chunks converted on the device
        return (utils.images_to_float(chunk, True) for chunk in images.split(utils.default_eval_batch_size(device)))

    def ours():
        results["ours"] = utils.block_feature_sparsity(model, blocks, batches(), 0.95, 1000, 0)
        sync(device)

    def reference():
        results["reference"] = {name: utils.block_feature_sparsity(model, {name: path}, batches(), 0.95, 1000, 0)[name]
                                for name, path in blocks.items()}
        sync(device)

    with torch.no_grad():  # warm-up: one eval batch creates the kernels of the eval shapes (no full-pass warm-up)
        model.eval()(next(batches()))
    ours_min, reference_min, pairs = side_by_side(ours, reference, size["repeats"], warmup=0)
    identical = results["ours"] == results["reference"]
    if not identical:
        raise RuntimeError(f"sparsity_blocks: one-pass densities differ: {results}")
    details = {"width": size["width"], "examples": int(images.shape[0]), "neurons_per_block": 1000,
               "blocks": list(blocks), "densities": results["ours"], "identical_densities": identical,
               "repeats_s": pairs, "data": ctx["data_name"],
               "reference": "one full eval-mode forward pass per block, hooked on that block only"}
    return record("sparsity_blocks", ours_min, reference_min, "s", reference_min / ours_min, (">=", 3.0), details,
                  list(zip(*pairs)))


def bench_eval_overhead(ctx):
    """Item 4: share of a train_resnet.py run's wall time spent evaluating, with the default --eval-every (200
    iterations) and --sparsity-examples (10752 images), at the CPU setting (--width 16, batch 256, all test images).

    Both parts are measured on the run's own code: one evaluation as the loop performs it (utils.evaluate_classifier:
    train loss/error and every block's sparsity from one pass, test loss/error; then the checkpoint), and the loop's
    seconds per iteration (item 1). Share = E / (E + eval_every · t_step); running a whole 200-iteration period would
    only add minutes.
    """
    size, device, data = ctx["size"], ctx["device"], ctx["data"]
    flags = ["--sparsity-examples", str(size["eval_examples"])] if ctx["quick"] else []  # else the defaults
    n_test = size["eval_examples"] or len(data.test_labels)
    args = train_resnet.build_parser().parse_args(train_argv(size, "unused", device, flags))
    utils.configure_backend(args, device)
    model = train_resnet.ResNet18(data.num_classes, args.width).to(device)
    model = utils.apply_channels_last(args, model, device)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
    evaluated = subset(data, len(data.train_labels), n_test)
    seconds = []
    with tempfile.TemporaryDirectory() as out_dir:
        for _ in range(size["repeats"]):
            start = time.perf_counter()
            utils.evaluate_classifier(model, evaluated, model.SPARSITY_BLOCKS, args)
            utils.save_checkpoint(os.path.join(out_dir, "run.pt"), model=model.state_dict(),
                                  optimizer=optimizer.state_dict())
            sync(device)
            seconds.append(time.perf_counter() - start)
    per_eval = min(seconds)
    step_seconds = ctx.get("loop_step_seconds") or loop_step_seconds(ctx)
    period = per_eval + args.eval_every * step_seconds
    details = {"width": args.width, "batch_size": args.batch_size, "eval_every": args.eval_every,
               "sparsity_examples": min(args.sparsity_examples, len(data.train_labels)), "test_images": n_test,
               "eval_seconds": seconds, "loop_s_per_step": step_seconds, "data": ctx["data_name"]}
    return record("eval_overhead", per_eval, period, "s", per_eval / period, ("<=", 0.15), details, [seconds])


EPOCH_IMAGES = 10000  # the CPU-sized deep-net runs train on 10 000 images


def bench_sharpness_cost(ctx):
    """Item 4b: one --sharpness-every measurement of train_resnet.py as it runs it (utils.hessian_top_eigenvalue with
    the default tolerance, model in training mode, the first 256 training images as one batch) on a fresh ResNet-18
    at --width 16, from a cold start (no previous eigenvector), against one epoch of 10 000 images at the training
    loop's seconds per step (item 1). Measuring every k epochs then costs about ratio / k of a run: at the target,
    ≤ 1, a measurement every 10 epochs stays under 10 %."""
    size, device, data = ctx["size"], ctx["device"], ctx["data"]
    args = train_resnet.build_parser().parse_args(
        train_argv(size, "unused", device, ["--sharpness-examples", str(size["sharpness_examples"])]))
    model = utils.apply_channels_last(args, train_resnet.ResNet18(data.num_classes, args.width).to(device), device)
    images, labels = fixed_batch(data, args.sharpness_examples, args.channels_last, device)
    seconds, estimates = [], []
    for _ in range(size["repeats"]):
        start = time.perf_counter()
        estimates.append(utils.hessian_top_eigenvalue(model, lambda: F.cross_entropy(model(images), labels)))
        sync(device)
        seconds.append(time.perf_counter() - start)
    per_measurement = min(seconds)
    step_seconds = ctx.get("loop_step_seconds") or loop_step_seconds(ctx)
    epoch_seconds = EPOCH_IMAGES // args.batch_size * step_seconds
    details = {"width": args.width, "sharpness_examples": args.sharpness_examples, "batch_size": args.batch_size,
               "rtol": utils.SHARPNESS_RTOL, "max_iters": utils.SHARPNESS_MAX_ITERS,
               "hvps": [e.hvps for e in estimates], "converged": [e.converged for e in estimates],
               "sharpness": estimates[-1].eigenvalue, "measurement_seconds": seconds,
               "seconds_per_hvp": per_measurement / estimates[-1].hvps, "loop_s_per_step": step_seconds,
               "epoch_images": EPOCH_IMAGES, "data": ctx["data_name"]}
    return record("sharpness_cost", per_measurement, epoch_seconds, "s", per_measurement / epoch_seconds, ("<=", 1.0),
                  details, [seconds])


def diag_net_seconds(seeds, iterations):
    """Seconds of diag_net.train, the vectorised SGD loop with its evaluations, for E1's constant run (η = 0.25) with
    these seeds as one batch, on one torch thread as diag_net.py runs it."""
    e1 = diag_net.PRESETS["e1"]
    data = diag_net.make_data(e1["n_train"], e1["input_dim"], e1["support_size"], e1["n_test"], e1["data_seed"])
    rank_of = diag_net.JacobianRank(data["X_test"][:2 * e1["input_dim"]])
    lrs = utils.toy_step_sizes(iterations, e1["lr"][0])
    evals = utils.eval_iterations(iterations, e1["eval_points"], diag_net.DENSE_EVALS)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start = time.perf_counter()
        diag_net.train(data, lrs, "sgd", list(seeds), evals, e1["init_scale"], rank_of)
        return time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)


def bench_seed_sweep(ctx):
    """Item 5: diag_net.py's E1 constant run with 16 seeds vs 1 seed (same iterations): what vectorising over seeds
    costs."""
    size = ctx["size"]
    times = {1: [], 16: []}

    def run_seeds(n):
        return lambda: times[n].append(diag_net_seconds(range(1, n + 1), size["seed_iterations"]))

    side_by_side(run_seeds(16), run_seeds(1), size["repeats"], warmup=0)
    many, one = min(times[16]), min(times[1])
    details = {"iterations": size["seed_iterations"], "run": "E1, η = 0.25 constant (diag_net.train)",
               "seconds_16_seeds": times[16], "seconds_1_seed": times[1]}
    return record("seed_sweep", many, one, "s", many / one, ("<=", 3.0), details, [times[16], times[1]])


def dense_peak(size, device):
    """Callables for the best dense float32 matrix products: torch.matmul (MKL/cuBLAS) and, on the CPU, numpy's matmul
    (OpenBLAS) and a 1×1 channels_last convolution (a GEMM run by oneDNN, the convolutions' library).
    Returns {name: (fn, flops)}."""
    n = size["peak_size"]
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    kernels = {"matmul": (lambda: a @ b, 2 * n ** 3)}
    if device.type == "cpu":
        a_np, b_np = a.numpy(), b.numpy()  # numpy's own BLAS (OpenBLAS), in case it beats torch's (MKL) here
        kernels["numpy_matmul"] = (lambda: a_np @ b_np, 2 * n ** 3)
        side = int(math.sqrt(n))  # a GEMM of (side² pixels) × n channels × n channels
        x = torch.randn(1, n, side, side).contiguous(memory_format=torch.channels_last)
        w = torch.randn(n, n, 1, 1).contiguous(memory_format=torch.channels_last)
        kernels["onednn_1x1_conv"] = (lambda: F.conv2d(x, w), 2 * n * n * side * side)
    return kernels


def step_flops(model, images, labels, device):
    """Forward + backward FLOPs of one bare training step, counted by torch (2 per multiply-add; convolutions and
    matrix products only, as is usual). Also serves as the step's warm-up."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        bare_step_loop(model, images, labels, 1, device)()
    return counter.get_total_flops()


def bench_compute_efficiency(ctx):
    """Item 6: FLOP/s of the bare ResNet-18 training step (width 64, channels_last) vs the machine's best dense
    float32 matrix product, timed alternately."""
    size, device, data = ctx["size"], ctx["device"], ctx["data"]
    width, batch, steps = size["efficiency_width"], size["efficiency_batch"], size["efficiency_steps"]
    torch.manual_seed(0)
    model = train_resnet.ResNet18(data.num_classes, width).to(device).to(memory_format=torch.channels_last)
    images, labels = fixed_batch(data, batch, True, device)
    flops = step_flops(model, images, labels, device)
    peak = dense_peak(size, device)
    peak_seconds = {name: [] for name in peak}

    def peak_round():
        for name, (fn, _) in peak.items():
            start = time.perf_counter()
            fn()
            sync(device)
            peak_seconds[name].append(time.perf_counter() - start)

    loop_min, _, pairs = side_by_side(bare_step_loop(model, images, labels, steps, device), peak_round, size["repeats"])
    step_seconds = loop_min / steps
    peaks = {name: f / min(peak_seconds[name][1:]) for name, (_, f) in peak.items()}  # [0]: warm-up
    achieved, best = flops / step_seconds, max(peaks.values())
    details = {"width": width, "batch_size": batch, "flops_per_step": flops, "step_s": step_seconds,
               "peak_gflops": {k: v / 1e9 for k, v in peaks.items()}, "peak_size": size["peak_size"],
               "repeats_s": pairs}
    if not ctx["quick"]:  # what channels_last buys: the same step in the default NCHW layout (one timed step)
        model = train_resnet.ResNet18(data.num_classes, width).to(device)
        nchw = bare_step_loop(model, *fixed_batch(data, batch, False, device), 1, device)
        nchw()
        start = time.perf_counter()
        nchw()
        details.update(nchw_step_s=time.perf_counter() - start)
        details.update(channels_last_speedup=details["nchw_step_s"] / step_seconds)
    if "bare_step_seconds" in ctx:  # item 1's width-16 bare step, for comparison
        model = train_resnet.ResNet18(data.num_classes, size["width"]).to(device).to(memory_format=torch.channels_last)
        flops16 = step_flops(model, *fixed_batch(data, size["batch"], True, device), device)
        details["width16_gflops"] = flops16 / ctx["bare_step_seconds"] / 1e9
    return record("compute_efficiency", achieved / 1e9, best / 1e9, "GFLOP/s", achieved / best, (">=", 0.5), details,
                  [[o for o, _ in pairs], *[peak_seconds[name][1:] for name in peak]])


# ======================================================================================================================
# Command line, table
# ======================================================================================================================


def environment(device, data_name, quick):
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else utils.cpu_name()
    return {"device": str(device), "device_name": name, "cpu_cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version(), "date": datetime.date.today().isoformat(), "data": data_name,
            "quick": quick, "git_commit": utils.environment_info(device)["git_commit"]}


def print_table(records):
    print(f"\n{'item':<20} {'ours':>11} {'baseline':>11} {'unit':<9} {'ratio':>7} {'target':>8}  verdict  data")
    for r in records:
        print(f"{r['name']:<20} {r['ours']:>11.4g} {r['baseline']:>11.4g} {r['unit']:<9} {r['ratio']:>7.3g} "
              f"{r['target']:>8}  {r['verdict']:<7}  {r['details'].get('data', '-')}")
        for reason in r["details"]["invalid_reasons"]:
            print(f"{'':<20} INVALID: {reason}")


# Which items depend on the CPU's instruction set, and why (the README's performance table says so next to each)
ISA_NOTES = {
    "train_step": "no: both sides run the same convolutions",
    "data_path": "little: memory-bound gathers on both sides",
    "sparsity_dedup": "yes: both sides are dominated by a correlation matrix product (ours float32, the reference "
                      "float64), whose speed follows the vector width",
    "sparsity_blocks": "no: the same convolutions, one pass vs five",
    "eval_overhead": "partly: evaluation and training steps use the same kernels",
    "sharpness_cost": "no: Hessian-vector products and training steps use the same kernels",
    "seed_sweep": "yes: 16 seeds are batched matrix products, 1 seed matrix-vector products",
    "compute_efficiency": "yes: the peak is the widest vector unit's matrix product",
}


def markdown_table(records):
    """The README's performance table from a benchmark.json: the machine, then one row per item."""
    env = records[0]["details"]["env"]
    lines = [f"`python benchmark.py` on {env['device_name']} ({env['cpu_cores']} cores, {env['torch_threads']} torch "
             f"threads), torch {env['torch']}, {env['date']}, commit {env['git_commit'][:7]}; minimum of "
             f"{records[0]['details'].get('repeats', MIN_REPEATS)} interleaved repeats per side:", "",
             "| item | ours | reference | ratio | target | verdict | data | load before → after | depends on the ISA |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        d = r["details"]
        before, after = d["load_avg_1min"]
        verdict = r["verdict"] + "".join(f" ({reason})" for reason in d["invalid_reasons"])
        data = d.get("data", "–").split(" from ")[0]  # the data set; the JSON keeps its folder on that machine
        lines.append(f"| {r['name']} | {r['ours']:.4g} {r['unit']} | {r['baseline']:.4g} {r['unit']} | "
                     f"{r['ratio']:.3g} | {r['target']} | {verdict} | {data} | {before:.1f} → "
                     f"{after:.1f} | {ISA_NOTES[r['name']]} |")
    return "\n".join(lines)


def build_parser():
    parser = utils.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="small sizes and few repeats (~30 s; used by the smoke test; ratios not meaningful)")
    parser.add_argument("--only", nargs="+", choices=ITEMS, default=None, metavar="ITEM",
                        help=f"run only these items (default: all): {', '.join(ITEMS)}")
    parser.add_argument("--out", default="benchmark.json", help="where to write the JSON list of records")
    parser.add_argument("--data-dir", default=None,
                        help="folder holding cifar-10-batches-py/ (default: ./data; the synthetic set if it has "
                             "none)")
    parser.add_argument("--repeats", type=utils.positive_int, default=None,
                        help=f"timed repeats per side and item (default: {MIN_REPEATS}, or 1 with --quick); the "
                             "minimum of each side is compared")
    parser.add_argument("--table", metavar="JSON", default=None,
                        help="print the README's markdown table from this benchmark.json and exit (no timing)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                        help="auto = CUDA if available, else MPS, else CPU")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.table:
        try:
            with open(args.table) as f:
                print(markdown_table(json.load(f)))
        except (OSError, ValueError, KeyError, IndexError) as err:
            utils.usage_error("--table", f"cannot read a benchmark.json from {args.table!r}: {err}")
        return None
    out_dir = os.path.dirname(os.path.abspath(args.out))
    utils.prepare_out_dir(out_dir, flag="--out")
    if args.data_dir is not None and find_cifar10(args.data_dir) is None:
        utils.usage_error("--data-dir", f"no cifar-10-batches-py/ with data_batch_1 in {args.data_dir!r}")
    try:
        device = utils.resolve_device(args.device)
    except ValueError as err:
        utils.usage_error("--device", str(err))
    if args.quick:  # a smoke test: on a shared machine every multi-threaded small op would wait for a busy core
        torch.set_num_threads(1)
    size = dict(QUICK if args.quick else FULL)
    if args.repeats is not None:
        size["repeats"] = args.repeats
    data, data_name = load_images(args, device)
    if data_name.startswith("cifar10"):
        size["cifar_dir"] = find_cifar10(args.data_dir)
    env = environment(device, data_name, args.quick)
    print(f"benchmark on {env['device_name']} ({env['cpu_cores']} cores, {env['torch_threads']} torch threads), "
          f"torch {env['torch']}, {env['date']}; data: {data_name}", flush=True)
    load = os.getloadavg()[0]
    if device.type == "cpu" and torch.get_num_threads() > 1 and load > (os.cpu_count() or 1) - 0.5:
        print(f"note: the machine is busy (1-min load {load:.1f} on {os.cpu_count()} cores): every multi-threaded "
              "op then waits for a busy core, so timings get slow and noisy; OMP_NUM_THREADS=1 (torch and numpy "
              "on one thread each) gives steadier numbers")
    ctx = {"size": size, "device": device, "data": data, "data_name": data_name, "quick": args.quick}
    benches = {"train_step": bench_train_step, "data_path": bench_data_path,
               "sparsity_dedup": bench_sparsity_dedup,
               "sparsity_blocks": bench_sparsity_blocks, "eval_overhead": bench_eval_overhead,
               "sharpness_cost": bench_sharpness_cost,
               "seed_sweep": bench_seed_sweep, "compute_efficiency": bench_compute_efficiency}
    records, start = [], time.perf_counter()
    for name in [item for item in ITEMS if args.only is None or item in args.only]:
        load_before, item_start = os.getloadavg()[0], time.perf_counter()
        result = benches[name](ctx)
        result["details"].update(load_avg_1min=[load_before, os.getloadavg()[0]],
                                 item_seconds=time.perf_counter() - item_start, repeats=size["repeats"], env=env)
        records.append(result)
        print(f"{name:<20} ratio {result['ratio']:.3g} (target {result['target']}: {result['verdict']}) in "
              f"{utils.format_seconds(result['details']['item_seconds'])}, load {load_before:.1f}", flush=True)
        utils.write_json_atomic(args.out, records)  # partial results survive an interrupted run
    print_table(records)
    print(f"\nwrote {args.out} ({len(records)} records) in {utils.format_seconds(time.perf_counter() - start)}")
    return records


if __name__ == "__main__":
    main()
