"""DenseNet-BC-100-12 on CIFAR-10/100 and Tiny ImageNet with large-step SGD: experiment E10 of SPEC.md.

The paper's table checks that the effect seen with ResNet-18 (a longer large-step phase gives sparser features and a
lower test error) holds for another architecture: DenseNet-BC, depth 100, growth rate 12, compression 0.5, trained with
SGD, batch 256, and the same family of step-size schedules as E7 (SPEC §2). The paper's values are not available to us
(SPEC E10): the deliverable is the capability and our own measured table.

Commands (from the repository root; each run writes one JSON log and a checkpoint into --out-dir, default
runs/train_densenet/; add --download the first time):

    python train_densenet.py --dataset cifar10 --lr 0.75 --warmup-exp 1.05 --large-lr-frac 0.5   # also 0.1, 0.3
    python train_densenet.py --dataset cifar10 --lr 0.01 --lr-schedule constant                  # small steps
    python train_densenet.py --dataset cifar100 ...   /   --dataset tinyimagenet ...             # 64×64, 200 classes
    python plots.py --logs runs/train_densenet --out figures    # figures/densenet100-12_<dataset>.png

Expected results. Full size: a GPU job, not run by us yet (no GPU on the development machine). CPU-sized variant
(measured; log in results/deep/): `--data-dir ../shared/data --depth 40 --n-train 5000 --epochs 10
--sparsity-examples 1024 --eval-every 20` (DenseNet-BC-40-12, 176 122 parameters), seed 0: test error 52.7 %,
de-duplicated density of blocks 1 / 2 / 3 / 4 = 48.0 / 46.2 / 23.2 / 86.6 %, 6.5 min on a 2-core x86-64 CPU (185
training images/s; its 11 evaluations of the 10 000 test images took 29 % of the wall time). DenseNet-BC-100 trains at
~20 images/s (batch 256) on that CPU: a GPU job.

Design notes:
  * The training loop, data, schedule, logs and checkpoints are utils.run_deep_net, shared with train_resnet.py; this
    file holds the model, its defaults and its flags.
  * Sparsity blocks: see DenseNetBC.SPARSITY_BLOCKS (the three dense stages after their BN-ReLU, and the pooled
    features).
  * The iteration-0 evaluation runs in eval mode with BatchNorm's initial running statistics (mean 0, variance 1),
    through which the untrained network's activations grow with depth: its train loss reads ~22 at depth 40 and ~4e4
    at depth 100. From the first periodic evaluation on, the running statistics are the trained ones.
"""
from collections import OrderedDict

import torch
import torch.nn as nn

import utils

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
    """DenseNet-BC (Huang et al. 2017) for 32×32 inputs, as used in SPEC E10: 3×3 stem conv to 2k channels, three
    dense stages of (depth − 4) / 6 bottleneck layers with growth rate k, compressing transitions between them, final
    BN-ReLU, global average pool (adaptive, so 64×64 Tiny ImageNet inputs work too), linear head.

    depth 100, k = 12, compression 0.5 (the paper's DenseNet-100-12) has 769 162 parameters for 10 classes (the
    DenseNet paper reports 0.8 M). Inputs in [0, 1], no normalisation layer, as for the ResNet (SPEC §4).
    Works with channels_last tensors: torch.cat keeps the memory format of its channels_last inputs.
    """

    # Feature-sparsity blocks (SPEC §1.1: "the outputs of the three dense stages (after their BN-ReLU) and the pooled
    # penultimate features"). A pre-activation dense stage ends with a concatenation, not a ReLU, so the post-ReLU view
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
    parser = utils.ArgumentParser(description=__doc__.split("\n\n")[0])
    utils.add_deep_net_arguments(parser, script="train_densenet", lr=0.75, warmup_exp=1.05)
    parser.add_argument("--depth", type=utils.positive_int, default=100,
                        help="DenseNet-BC depth, 6n + 4 (n bottleneck layers per dense stage); 100 = the paper's")
    parser.add_argument("--growth-rate", type=utils.positive_int, default=12,
                        help="k: feature maps each bottleneck layer adds")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.depth < 10 or (args.depth - 4) % 6:
        utils.usage_error("--depth", f"must be 6n + 4 with n >= 1 (10, 16, 22, ..., 100), got {args.depth}")
    return utils.run_deep_net(args, lambda num_classes: DenseNetBC(num_classes, args.depth, args.growth_rate),
                              script="train_densenet", model_name=f"densenet{args.depth}-{args.growth_rate}",
                              run_parts={"depth": args.depth, "k": args.growth_rate})


if __name__ == "__main__":
    main()
