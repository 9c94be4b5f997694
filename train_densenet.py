"""DenseNet-BC-100-12 on CIFAR-10/100 and Tiny ImageNet with large-step SGD (the paper's DenseNet table; E10).

The paper's table checks that the effect seen with ResNet-18 (a longer large-step phase gives sparser features and a
lower test error) holds for another architecture: DenseNet-BC, depth 100, growth rate 12, compression 0.5, trained with
SGD, batch 256, and the same family of step-size schedules as train_resnet.py.

    python train_densenet.py --dataset cifar10 --lr 0.75 --warmup-exp 1.05 --large-lr-frac 0.5   # also 0.1, 0.3
    python train_densenet.py --dataset cifar10 --lr 0.01 --lr-schedule constant                  # small steps
    python train_densenet.py --dataset tinyimagenet ...                                          # 64×64, 200 classes
    python plots.py --logs runs/train_densenet --out-dir figures    # figures/densenet100-12_<dataset>.png
    torchrun --standalone --nproc-per-node=4 train_densenet.py --dataset tinyimagenet ...       # one run on 4 GPUs

Each run writes one JSON log and one checkpoint into --out-dir (add --download the first time); the same command again
finds them and stops: add --resume to continue, --restart to start over. Measured results and run times are in the
README, next to the commands and logs they come from.

Reading order: flags, then main(): device and data, model and optimizer, log (or resume), then the training loop —
the same loop as train_resnet.py, repeated on purpose so that each script is a complete experiment to read and copy.
Under torchrun the same loop runs in every process (utils.Processes): each trains on its share of the same global
batch, rank 0 evaluates, logs and checkpoints, and the processes agree on every decision that ends the loop.
The iteration-0 evaluation runs in eval mode with BatchNorm's initial running statistics (mean 0, variance 1),
through which the untrained network's activations grow with depth: its train loss reads ~22 at depth 40 and ~4e4 at
depth 100. From the first periodic evaluation on, the running statistics are the trained ones.
"""
import argparse
import math
import os
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

import utils

SCRIPT = "train_densenet"

# ======================================================================================================================
# Model
# ======================================================================================================================


def _norm_act(channels):
    """BN followed by ReLU, as one module (so that its output, a post-ReLU activation, can be hooked by name)."""
    return nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU(inplace=True))


class BottleneckLayer(nn.Module):
    """DenseNet-BC layer, pre-activation order: BN-ReLU-conv1×1 (to 4k channels), BN-ReLU-conv3×3 (to k channels).

    Returns the input with the k new feature maps appended along the channel axis: dense connectivity by plain
    concatenation, so a dense stage is just an nn.Sequential of these layers (no per-layer list of tensors to re-join).
    """

    def __init__(self, in_channels, growth_rate):
        super().__init__()
        self.norm_act1 = _norm_act(in_channels)
        self.conv1 = nn.Conv2d(in_channels, 4 * growth_rate, 1, bias=False)
        self.norm_act2 = _norm_act(4 * growth_rate)
        self.conv2 = nn.Conv2d(4 * growth_rate, growth_rate, 3, padding=1, bias=False)

    def forward(self, x):
        new = self.conv2(self.norm_act2(self.conv1(self.norm_act1(x))))
        return torch.cat([x, new], dim=1)


def _transition(in_channels, out_channels):
    """Transition between dense stages: BN-ReLU, 1×1 conv (compression), 2×2 average pool."""
    return nn.Sequential(OrderedDict([("norm_act", _norm_act(in_channels)),
                                      ("conv", nn.Conv2d(in_channels, out_channels, 1, bias=False)),
                                      ("pool", nn.AvgPool2d(2))]))


class DenseNetBC(nn.Module):
    """DenseNet-BC (Huang et al. 2017) for 32×32 inputs, as in the paper's DenseNet table: 3×3 stem conv to 2k
    channels, three dense stages of (depth − 4) / 6 bottleneck layers with growth rate k, compressing transitions between them, final
    BN-ReLU, global average pool (adaptive, so 64×64 Tiny ImageNet inputs work too), linear head.

    depth 100, k = 12, compression 0.5 (the paper's DenseNet-100-12) has 769 162 parameters for 10 classes (the
    DenseNet paper reports 0.8 M). Inputs in [0, 1], no normalisation layer, as for the ResNet.
    Works with channels_last tensors: torch.cat keeps the memory format of its channels_last inputs.
    """

    # The blocks whose feature sparsity is measured: the outputs of the three dense stages (after their BN-ReLU) and
    # the pooled penultimate features. A pre-activation dense stage ends with a concatenation, not a ReLU, so the
    # post-ReLU view
    # of stage s is the BN-ReLU that the next module applies to it: the transition's BN-ReLU for stages 1-2, the final
    # BN-ReLU for stage 3. Block 4 = global-average-pooled features. Log name -> submodule whose OUTPUT is hooked.
    SPARSITY_BLOCKS = {"block1": "transition1.norm_act", "block2": "transition2.norm_act", "block3": "final_norm_act",
                       "block4": "pool"}

    def __init__(self, num_classes=10, depth=100, growth_rate=12, compression=0.5):
        super().__init__()
        self._validate(num_classes, depth, growth_rate, compression)
        layers_per_stage = (depth - 4) // 6  # 3 stages × 2 convs per bottleneck layer + stem, 2 transitions, head
        channels = 2 * growth_rate
        self.stem = nn.Conv2d(3, channels, 3, padding=1, bias=False)
        for stage in (1, 2, 3):
            layers = [BottleneckLayer(channels + i * growth_rate, growth_rate) for i in range(layers_per_stage)]
            self.add_module(f"stage{stage}", nn.Sequential(*layers))
            channels += layers_per_stage * growth_rate
            if stage < 3:
                compressed = int(compression * channels)  # floor, as in the original implementation
                self.add_module(f"transition{stage}", _transition(channels, compressed))
                channels = compressed
        self.final_norm_act = _norm_act(channels)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(channels, num_classes)
        self._initialise()

    @staticmethod
    def _validate(num_classes, depth, growth_rate, compression):
        """Clear errors for impossible architectures (the depth must be 6n + 4 with n >= 1 bottleneck layers)."""
        for name, value in (("num_classes", num_classes), ("depth", depth), ("growth_rate", growth_rate)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"DenseNetBC: {name} must be a positive integer, got {value!r}")
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"DenseNetBC: depth must be 6n + 4 with n >= 1 (10, 16, ..., 40, ..., 100), got {depth}")
        if not 0 < compression <= 1:
            raise ValueError(f"DenseNetBC: compression must be in (0, 1], got {compression!r}")

    def _initialise(self):
        """Common DenseNet practice (the authors' Torch code uses N(0, 2/(k·k·out_channels)) for convs, i.e. Kaiming
        fan_out): Kaiming-normal (fan_out, ReLU) convs, BN weight 1 / bias 0, linear bias 0 (weight: torch default)."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)

    def forward(self, x):
        x = self.transition1(self.stage1(self.stem(x)))
        x = self.transition2(self.stage2(x))
        x = self.final_norm_act(self.stage3(x))
        return self.fc(self.pool(x))


# ======================================================================================================================
# Command line
# ======================================================================================================================


def build_parser():
    """Every flag of the experiment; the defaults are the paper's plain-SGD setting (E7)."""
    parser = utils.ArgumentParser(description=__doc__.split("\n\n")[0])
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", default="cifar10", choices=utils.IMAGE_DATASETS,
                      help="image classification data set; 'synthetic' is a small generated set for offline tests")
    data.add_argument("--data-dir", default="./data",
                      help="folder holding cifar-10-batches-py/, cifar-100-python/ or tiny-imagenet-200/")
    data.add_argument("--download", action=argparse.BooleanOptionalAction, default=False,
                      help="download the data set into --data-dir if it is missing")
    data.add_argument("--n-train", type=utils.positive_int, default=None,
                      help="use only the first N training images (default: all)")
    optim = parser.add_argument_group("optimisation (the step size of every step: utils.deep_step_size)")
    optim.add_argument("--epochs", type=utils.positive_int, default=100, help="training epochs E")
    optim.add_argument("--batch-size", type=utils.positive_int, default=256, help="SGD mini-batch size")
    optim.add_argument("--lr", type=utils.positive_float, default=0.75,
                       help="η0: the initial step size, BEFORE warmup (the peak is η0·w^(100T) for w > 1)")
    optim.add_argument("--lr-schedule", default="piecewise", choices=["constant", "piecewise"],
                       help="constant η0, or a large-step phase for T·E epochs then ÷10, and ÷100 from 0.9·E")
    optim.add_argument("--warmup-exp", type=utils.positive_float, default=1.05,
                       help="w: exponential warmup η0·w^u if w > 1 (u = %% of training done), power warmup "
                            "η0·(1 + u^w) if w < 1, no warmup if w = 1 (piecewise schedule only)")
    optim.add_argument("--large-lr-frac", type=utils.positive_float, default=0.5,
                       help="T: fraction of training spent in the large-step phase, in (0, 0.9) (paper: 0.1, 0.3, 0.5)")
    optim.add_argument("--momentum", type=utils.nonnegative_float, default=0.0, help="SGD (heavy-ball) momentum, in [0, 1)")
    optim.add_argument("--weight-decay", type=utils.nonnegative_float, default=0.0,
                       help="L2 penalty coefficient on all parameters")
    optim.add_argument("--augment", action=argparse.BooleanOptionalAction, default=False,
                       help="random crop (4-pixel zero padding) and horizontal flip, done per batch on the device")
    optim.add_argument("--label-noise", type=utils.fraction, default=0.0,
                       help="P: label-noise SGD: at every step each image of the batch gets, with probability P, a "
                            "label drawn uniformly from all classes (possibly its own), fresh at every step and a "
                            "function of --seed and the step (utils.label_noise); evaluations and the sharpness use "
                            "the true labels")
    evaluation = parser.add_argument_group("evaluation")
    evaluation.add_argument("--eval-every", type=utils.positive_int, default=200,
                            help="iterations between evaluations (and checkpoints)")
    evaluation.add_argument("--sparsity-examples", type=utils.positive_int, default=10752,
                            help="fixed unaugmented training images used for the feature sparsity and the train "
                                 "loss/error (capped at the training-set size)")
    evaluation.add_argument("--sparsity-neurons", type=utils.positive_int, default=1000,
                            help="neurons sampled per block for the density and the de-duplicated density")
    evaluation.add_argument("--tau", type=utils.fraction, default=0.95,
                            help="τ: two neurons whose activations correlate above τ (in absolute value) are "
                                 "duplicates (the paper: 0.95 for deep nets)")
    evaluation.add_argument("--sharpness-every", type=utils.nonnegative_int, default=0,
                            help="K: log `sharpness` every K iterations, before that step's update (0 = off): the top "
                                 "eigenvalue λ_max of the Hessian, w.r.t. all parameters, of the mean cross-entropy of "
                                 "the first --sharpness-examples training images (unaugmented, true labels) as ONE "
                                 "batch, with BatchNorm in training mode (that batch's statistics, running statistics "
                                 "left unchanged): the loss an SGD step descends. Without autocast, by utils."
                                 "hessian_top_eigenvalue: Lanczos, warm-started from the previous measurement, until "
                                 f"an eigenvalue lies within {utils.SHARPNESS_RTOL:g} (relative) of the estimate, "
                                 f"at most {utils.SHARPNESS_MAX_ITERS} Hessian-vector products. Compare it with 2/lr")
    evaluation.add_argument("--sharpness-examples", type=utils.positive_int, default=256,
                            help="the fixed training images of the sharpness, one batch (capped at the training-set "
                                 "size); the default, 256, is the default --batch-size: the batch statistics are "
                                 "those of an SGD batch")
    evaluation.add_argument("--eval-batch-size", type=utils.positive_int, default=None,
                            help="images per forward pass during evaluation (default: 128 on CPU, 512 on GPU; see "
                                 "utils.default_eval_batch_size); lower it if memory is short")
    run = parser.add_argument_group("run")
    run.add_argument("--seed", type=utils.nonnegative_int, default=0,
                     help="seeds the initialisation, batches and augmentation")
    run.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                     help="auto = CUDA if available, else MPS, else CPU")
    run.add_argument("--out-dir", default=os.path.join("runs", SCRIPT),
                     help="folder for the JSON log and the checkpoint of this run")
    # a run whose log or checkpoint is already in --out-dir is refused without one of these (utils.check_earlier_run)
    earlier = run.add_mutually_exclusive_group()
    earlier.add_argument("--resume", action="store_true",
                         help="continue this run (same flags) from its last checkpoint in --out-dir; on a completed "
                              "run it only reports that the run is complete")
    earlier.add_argument("--restart", action="store_true",
                         help="start this run over from iteration 0, deleting its log and checkpoint in --out-dir. "
                              "Without --resume or --restart, a run whose log or checkpoint is already there "
                              "(stopped, crashed, completed or diverged) is refused, never overwritten")
    run.add_argument("--stop-at-epoch", type=utils.positive_int, default=None,
                     help="checkpoint and stop after this many epochs (e.g. to fit a job time limit); "
                          "continue later with --resume")
    run.add_argument("--precision", default="fp32", choices=["fp32", "tf32", "bf16"],
                     help="CUDA matmul/conv precision: exact fp32, TF32 tensor cores, or bf16 autocast "
                          "(CPU always runs fp32)")
    run.add_argument("--compile", action="store_true", help="torch.compile the training forward/backward")
    run.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                     help="NHWC memory format for images and conv weights (faster convolutions on CPU and GPU)")
    run.add_argument("--deterministic", action="store_true",
                     help="deterministic CUDA kernels (cuDNN benchmark off); slower, bit-reproducible on one GPU")
    run.add_argument("--sync-bn", action=argparse.BooleanOptionalAction, default=None,
                     help="under torchrun (N processes, each on B/N images of the --batch-size B): SyncBatchNorm, "
                          "BatchNorm statistics over the whole batch as in one process (default on CUDA). On the CPU "
                          "torch's SyncBatchNorm does not run: each process normalises its own B/N images (logged as "
                          "config.batchnorm_share). No effect in a single process")
    model = parser.add_argument_group("model")
    model.add_argument("--depth", type=utils.positive_int, default=100,
                       help="DenseNet-BC depth, 6n + 4 (n bottleneck layers per dense stage); 100 = the paper's")
    model.add_argument("--growth-rate", type=utils.positive_int, default=12,
                       help="k: feature maps each bottleneck layer adds")
    return parser


# ======================================================================================================================
# Training
# ======================================================================================================================


def main(argv=None):
    args = build_parser().parse_args(argv)
    utils.check_deep_net_args(args)
    if args.depth < 10 or (args.depth - 4) % 6:
        utils.usage_error("--depth", f"must be 6n + 4 with n >= 1 (10, 16, 22, ..., 100), got {args.depth}")
    try:
        device = utils.resolve_device(args.device)
    except ValueError as err:
        utils.usage_error("--device", str(err))
    processes = utils.Processes.start(args, device)  # this process alone, or torchrun's N (then: cuda:LOCAL_RANK)
    device = processes.device
    precision = utils.configure_backend(args, device)
    utils.prepare_out_dir(args.out_dir)
    utils.seed_everything(args.seed)  # the same seed in every process: the same initial weights

    # ---- data, model, optimizer ----
    data = utils.load_data(args, device)
    model = DenseNetBC(data.num_classes, args.depth, args.growth_rate).to(device)
    model = utils.apply_channels_last(args, model, device)
    blocks = model.SPARSITY_BLOCKS
    train_model = processes.wrap(model)  # under torchrun: DistributedDataParallel (and SyncBatchNorm, see --sync-bn)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    train_forward = torch.compile(train_model) if args.compile else train_model  # evaluation runs eager (hooks)
    autocast = precision == "bf16"
    n_train = len(data.train_labels)
    steps_per_epoch = n_train // args.batch_size  # full batches only (see utils.epoch_batches)
    total_steps = args.epochs * steps_per_epoch
    stop_step = total_steps if args.stop_at_epoch is None else args.stop_at_epoch * steps_per_epoch

    # ---- log, checkpoint, resume ----
    experiment = f"densenet{args.depth}-{args.growth_rate}_{args.dataset}"
    path = os.path.join(args.out_dir, utils.run_name(args, experiment, depth=args.depth, k=args.growth_rate))
    log_path, checkpoint_path = path + ".json", path + ".pt"
    step, window_loss, window_steps, elapsed_before, history = 0, 0.0, 0, 0.0, []
    sharpness_vector = None  # the last sharpness measurement's eigenvector: the next one's warm start
    processes.on_main(utils.check_earlier_run, args, log_path, checkpoint_path)  # the files are shared: rank 0 decides
    if args.resume:  # every process loads the same checkpoint
        state = utils.load_checkpoint(checkpoint_path, args, device, processes.batchnorm_share)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, window_loss, window_steps = state["step"], state["window_loss"], state["window_steps"]
        elapsed_before, history = state["elapsed"], utils.logged_history(log_path, state["step"])
        sharpness_vector = state.get("sharpness_vector")
        print(f"resuming {log_path} at iteration {step} (epoch {step / steps_per_epoch:.2f})")
        if stop_step <= step < total_steps:
            utils.usage_error("--stop-at-epoch", f"the checkpoint is at epoch {step / steps_per_epoch:.2f} already; "
                                                 "give a later epoch, or none to train to the end")
    config = {key: value for key, value in vars(args).items() if key not in ("resume", "restart")}
    config.update(n_train=n_train, n_test=len(data.test_labels), num_classes=data.num_classes,
                  steps_per_epoch=steps_per_epoch, total_steps=total_steps, precision_used=precision,
                  sparsity_examples_used=min(args.sparsity_examples, n_train), blocks=list(blocks),
                  sharpness_examples_used=min(args.sharpness_examples, n_train), sharpness_rtol=utils.SHARPNESS_RTOL,
                  sharpness_max_iters=utils.SHARPNESS_MAX_ITERS, batchnorm_share=processes.batchnorm_share)
    env = dict(utils.environment_info(device), n_params=sum(p.numel() for p in model.parameters()),
               deterministic=args.deterministic, compile=args.compile, channels_last=args.channels_last,
               precision=precision, **processes.info())
    log = utils.RunLog(log_path if processes.is_main else None, SCRIPT, config, env, history=history,
                       experiment=experiment, run=utils.schedule_label(args), seed=args.seed)
    if step >= total_steps:
        print(f"this run is already complete: {log_path}")
        log.finish("completed")
        processes.close()
        return "completed"
    print(f"{log.data['run']} | {data.name}: {n_train} train / {len(data.test_labels)} test images | "
          f"{env['n_params']:,} parameters | {total_steps} iterations ({steps_per_epoch}/epoch) on {device}"
          f"{f' and {processes.world_size - 1} more processes' if processes.world_size > 1 else ''}\nlog: {log_path}")

    # ---- the training loop ----
    window_loss = torch.tensor(window_loss, device=device)  # summed mini-batch losses since the last evaluation,
    last_logged = history[-1]["iter"] if history else -1  # kept on the device: no host sync per step
    clock, first_step, batches, status = utils.RunClock(elapsed_before), step, None, "completed"
    stop_signal = 0  # the signal (Ctrl-C, SIGTERM) on which every process has agreed to stop

    def checkpoint():  # rank 0's: the weights and the loss window are the same in every process
        if processes.is_main:
            utils.save_checkpoint(checkpoint_path, model=model.state_dict(), optimizer=optimizer.state_dict(),
                                  step=step, window_loss=window_loss.item(), window_steps=window_steps,
                                  elapsed=clock.elapsed(), args=vars(args), torch_rng=torch.get_rng_state(),
                                  sharpness_vector=sharpness_vector, batchnorm_share=processes.batchnorm_share)

    def measure_sharpness():
        """The --sharpness-every measurement (see its help). The model is in training mode here, as in the SGD step;
        eager (compiled graphs have no double backward) and without autocast."""
        nonlocal sharpness_vector
        n = min(args.sharpness_examples, n_train)
        images, labels = utils.images_to_float(data.train_images[:n], args.channels_last), data.train_labels[:n]
        estimate = utils.hessian_top_eigenvalue(model, lambda: F.cross_entropy(model(images), labels),
                                                sharpness_vector)
        sharpness_vector = estimate.vector
        return {"sharpness": estimate.eigenvalue, "sharpness_hvps": estimate.hvps,
                "sharpness_converged": estimate.converged}

    def diverged(loss, logged=False):  # large step sizes do diverge: keep everything up to here, say so, stop
        if not logged:  # a record without `lr`: no step was taken at this iteration
            log.record(iter=step, epoch=step / steps_per_epoch, train_loss_batches=float(loss), train_loss=None)
        print(f"DIVERGED at iteration {step} (epoch {step / steps_per_epoch:.2f}): training loss is {float(loss)}; "
              f"the step size ({optimizer.param_groups[0]['lr']:.4g} at the last update) is too large for this "
              f"setting. Log: {log_path}")
        return "diverged"

    with log, utils.StopOnSignal(repeat_aborts=processes.world_size == 1) as stop:
        while True:
            # the step size of step `step`, computed once: logged with this step's evaluation, used by its update
            lr = utils.deep_step_size(step / steps_per_epoch, args.epochs, args.lr, args.lr_schedule,
                                      args.warmup_exp, args.large_lr_frac)
            # evaluate before the update of every --eval-every-th step, and at the end; the sharpness before the update
            # of every --sharpness-every-th step, in the evaluation's record when both fall on one step
            measuring = args.sharpness_every and step % args.sharpness_every == 0 and step > last_logged
            if (step % args.eval_every == 0 or step == total_steps) and step > last_logged:
                if not torch.isfinite(window_loss):  # (the loss window is the same in every process)
                    status = diverged(window_loss / window_steps)
                    break
                train_loss = 0.0
                with clock.evaluating():
                    if processes.is_main:  # under torchrun, rank 0 evaluates the network as one process does
                        record = {"iter": step, "epoch": step / steps_per_epoch, "lr": lr,
                                  **(measure_sharpness() if measuring else {}),
                                  **utils.evaluate_classifier(model, data, blocks, args, autocast)}
                        if window_steps:  # mean mini-batch loss (train mode, augmented) since the last evaluation
                            record["train_loss_batches"] = window_loss.item() / window_steps
                        log.record(**record, wall_time=clock.elapsed(), images_per_sec=clock.images_per_sec())
                        train_loss = record["train_loss"]
                    window_loss, window_steps = torch.zeros((), device=device), 0
                    if step > 0:
                        checkpoint()
                if processes.is_main:
                    eta = clock.remaining_seconds(step, stop_step, total_steps, args.eval_every)
                    print(utils.progress_line(log.data["final"], total_steps, list(blocks)[-1], clock, eta),
                          flush=True)
                # rank 0's verdict reaches every process (which also waits here until rank 0 has evaluated)
                if processes.from_main(not math.isfinite(train_loss)):
                    status = diverged(train_loss, logged=True)
                    break
            elif measuring and processes.is_main:  # a record of its own, between evaluations (no checkpoint)
                with clock.evaluating():
                    record = {"iter": step, "epoch": step / steps_per_epoch, "lr": lr, **measure_sharpness()}
                    log.record(**record, wall_time=clock.elapsed(), images_per_sec=clock.images_per_sec())
                print(f"iter {step:>6}/{total_steps} ep {record['epoch']:6.2f} | lr {lr:.4g} | sharpness "
                      f"{record['sharpness']:.4g} (2/lr {2 / lr:.4g}) from {record['sharpness_hvps']} Hessian-vector "
                      f"products{'' if record['sharpness_converged'] else ' (not converged)'}", flush=True)
            # Ctrl-C or SIGTERM: one process stops at once; torchrun's processes agree on it every
            # DIVERGENCE_CHECK_EVERY steps (one all_reduce of one number: no host sync at every step)
            if processes.world_size == 1 or step % utils.DIVERGENCE_CHECK_EVERY == 0:
                stop_signal = processes.any_rank(stop.requested)
            if step >= stop_step or stop_signal:
                break

            # one SGD step on the next full batch of this epoch's seeded permutation
            epoch, index = divmod(step, steps_per_epoch)
            if index == 0 or batches is None:
                batches = utils.epoch_batches(n_train, args.batch_size, epoch, args.seed, device)
            batch = batches[index]
            images = data.train_images[batch]
            if args.augment:
                images = utils.augment_batch(images, args.seed, step)
            labels = data.train_labels[batch]
            if args.label_noise:
                labels = utils.label_noise(labels, data.num_classes, args.label_noise, args.seed, step)
            # under torchrun: this process's B/N images, cut from the global batch after its seeded draws
            images, labels = processes.share(images), processes.share(labels)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                logits = train_forward(utils.images_to_float(images, args.channels_last))
                loss = F.cross_entropy(logits.float(), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # under torchrun DDP averages the processes' gradients: that of the global batch's mean
            optimizer.step()
            window_loss += processes.mean(loss.detach())  # the global batch's mean loss, in every process
            window_steps += 1
            step += 1
            clock.add_step(len(batch))
            if step % utils.DIVERGENCE_CHECK_EVERY == 0 and not torch.isfinite(window_loss):
                status = diverged(window_loss / window_steps)
                break
            if step == first_step + min(10, stop_step - first_step):  # early, once the first steps are timed
                eta = clock.remaining_seconds(step, stop_step, total_steps, args.eval_every)
                print(f"projected wall time for this run: {utils.format_seconds(clock.elapsed() + eta)} "
                      f"({clock.images_per_sec():.0f} training images/s, evaluation every {args.eval_every} "
                      "iterations)", flush=True)

        if status == "completed" and step < total_steps:  # stopped by --stop-at-epoch, Ctrl-C or SIGTERM
            checkpoint()
            status = "interrupted"
            print(f"stopped at iteration {step}; checkpoint saved, continue with --resume")
        log.finish(status)
    processes.close()
    if stop_signal or stop.requested:  # the shell's convention (130 for Ctrl-C), so a sweep loop stops too
        raise SystemExit(128 + (stop_signal or stop.requested))
    return status


if __name__ == "__main__":
    main()
