"""ResNet-18 on CIFAR-10/100 with large-step SGD (SPEC E7-E9); the full docstring is written by the lead."""
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
