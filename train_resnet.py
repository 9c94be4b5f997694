"""ResNet-18 on CIFAR-10/100 and Tiny ImageNet with large-step SGD: experiments E7, E8, E9 of SPEC.md.

The paper's deep-network evidence (Figure 1): plain SGD (no momentum, no weight decay, no augmentation) whose step size
is warmed up exponentially and held large for a fraction T of training, then divided by 10 (and by 100 for the last
10 %), learns sparser features (a lower activation density of the late blocks, SPEC §1.1) and reaches a lower test
error than small steps; the longer the large-step phase, the sparser. Model: post-activation CIFAR ResNet-18 (SPEC §4).

Commands (from the repository root; each run writes one JSON log and a checkpoint into --out-dir, default
runs/train_resnet/; add --download the first time to fetch the data into --data-dir, default ./data):

    python train_resnet.py --lr 0.5 --warmup-exp 1.05                        # plain SGD, exp. warmup, T = 0.5 (GPU)
    python train_resnet.py --lr 0.75 --warmup-exp 1.05 --large-lr-frac 0.1   # E7 large steps (also 0.3, 0.5)
    python train_resnet.py --lr 0.01 --lr-schedule constant                  # E7 small steps
    python train_resnet.py --dataset cifar100 --lr 0.75 --warmup-exp 1.05    # E8 (same flags as E7)
    python train_resnet.py --momentum 0.9 --weight-decay 5e-4 --augment --lr 0.05 --warmup-exp 1 \
        --large-lr-frac 0.5                                                  # E9 (also 0.1, 0.3; and --lr 0.002 constant)
    python plots.py --logs runs/train_resnet --out figures                   # figures/resnet18_cifar10.png

Expected results. Full size (width 64, 50 000 images, 100 epochs): a GPU job, not run by us yet (no GPU on the
development machine); the paper's E9 numbers are in SPEC E9. CPU-sized E7 (measured; logs in results/deep/, figure
results/resnet18_cifar10.png), `--data-dir ../shared/data --width 16 --n-train 10000 --epochs 25
--sparsity-examples 2048 --eval-every 80`, seed 0, final test error / block-4 / block-5 de-duplicated density:
    η = 0.01 constant                        69.9 % / 63.7 % / 95.9 %
    η0 = 0.75, w = 1.05, decay at T = 10 %   50.4 % / 45.3 % / 98.5 %
    η0 = 0.75, w = 1.05, decay at T = 30 %   46.7 % / 25.0 % / 85.3 %
    η0 = 0.75, w = 1.05, decay at T = 50 %   42.1 % / 11.0 % / 51.6 %
    The longer the large-step phase, the lower the test error and the sparser blocks 4 and 5, as in the paper.
Runtime: each of these runs took 4.4-4.8 min on a 2-core x86-64 CPU (1 030-1 130 training images/s at width 16,
channels_last; evaluation every 2 epochs was ~13 % of the wall time). Full width on that CPU: ~125 images/s
(benchmark.py).

Design notes:
  * Everything after the flags (data on the device as uint8, the SPEC §2 step size set before every step, one-pass
    block sparsity with hooks, atomic logs and checkpoints, resume, divergence and Ctrl-C/SIGTERM handling) is
    utils.run_deep_net, shared with train_densenet.py; this file holds the model, its defaults and its flags.
  * `--lr` is η0, the step size BEFORE warmup: the peak is η0·w^(100T) (1.629, 4.322, 11.467 × η0 for w = 1.05 and
    T = 0.1, 0.3, 0.5).
"""
import torch.nn as nn
import torch.nn.functional as F

import utils

# ======================================================================================================================
# Model
# ======================================================================================================================


class BasicBlock(nn.Module):
    """Post-activation ("plain", He et al. 2016a) basic block: ReLU(BN(conv(ReLU(BN(conv(x))))) + shortcut(x)).

    The ReLU comes AFTER the residual sum, so a block's output is a post-ReLU activation — what the feature sparsity
    of SPEC §1.1 measures. Convs carry no bias because BN follows each of them.
    """

    def __init__(self, in_channels, out_channels, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        # SPEC §4: a 1×1 conv + BN projection only where the shape changes; identity otherwise.
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(out_channels))

    def forward(self, x):
        # In-place ops only touch fresh BN outputs, never `x`, which the shortcut and any forward hook still read.
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        return F.relu(out, inplace=True)


class ResNet18(nn.Module):
    """CIFAR ResNet-18 of SPEC §4: 3×3 stride-1 stem (no max-pool), BasicBlocks [2, 2, 2, 2] at widths w, 2w, 4w, 8w
    with strides 1, 2, 2, 2, global average pool, linear head. Inputs in [0, 1], no normalisation layer (SPEC §4).

    The pool is adaptive, so 64×64 inputs (Tiny ImageNet) work too. At w = 64 and 10 classes: 11 173 962 parameters.
    """

    # Feature-sparsity blocks of SPEC §1.1: log name -> submodule path whose forward OUTPUT is the activation (attach
    # forward hooks via model.get_submodule(path)). Blocks 1-4 = output of residual stage k (post-ReLU of its last
    # BasicBlock; 64·32·32, 128·16·16, 256·8·8, 512·4·4 at w = 64 on 32×32 inputs); block 5 = pooled features (8w).
    SPARSITY_BLOCKS = {"block1": "layer1", "block2": "layer2", "block3": "layer3", "block4": "layer4",
                       "block5": "pool"}

    def __init__(self, num_classes=10, width=64):
        super().__init__()
        for name, value in (("num_classes", num_classes), ("width", width)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ResNet18: {name} must be a positive integer, got {value!r}")
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, stride=1, padding=1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU(inplace=True))
        widths, strides = [width, 2 * width, 4 * width, 8 * width], [1, 2, 2, 2]
        in_channels = width
        for index, (channels, stride) in enumerate(zip(widths, strides), start=1):
            blocks = nn.Sequential(BasicBlock(in_channels, channels, stride), BasicBlock(channels, channels, 1))
            self.add_module(f"layer{index}", blocks)
            in_channels = channels
        # Pool + flatten as one named module, so that block 5 (the penultimate features) can be hooked.
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(in_channels, num_classes)
        self._initialise()

    def _initialise(self):
        """SPEC §4: Kaiming-normal (fan_out, ReLU) convs, BN weight 1 / bias 0, linear bias 0 (weight: torch default)."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)

    def forward(self, x):
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.pool(x))


# ======================================================================================================================
# Command line
# ======================================================================================================================


def build_parser():
    parser = utils.ArgumentParser(description=__doc__.split("\n\n")[0])
    utils.add_deep_net_arguments(parser, script="train_resnet", lr=0.75, warmup_exp=1.05)
    parser.add_argument("--width", type=utils.positive_int, default=64,
                        help="w: channels of the first stage (stages have w, 2w, 4w, 8w); 64 = standard ResNet-18")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    return utils.run_deep_net(args, lambda num_classes: ResNet18(num_classes, args.width), script="train_resnet",
                              model_name="resnet18", run_parts={"width": args.width})


if __name__ == "__main__":
    main()
