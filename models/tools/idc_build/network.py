"""The network: one compact ResNet member, the shipped averaging graph, and its description."""
from __future__ import annotations

from .split import K_FOLDS

STEM_WIDTH = 32
WIDTHS = (32, 64, 96, 128)
STRIDES = (1, 2, 2, 2)
# TTA multiplies inference cost by 8, and the triage pipeline is inference-bound (issue 5's R1 workload is ~97k
# patches per case), so it goes into the shipped graph only if it raises pooled OOF AUC by at least this.
TTA_MIN_GAIN = 0.005
ARCHITECTURE = (
    "compact ResNet (BasicBlock) from scratch: in-graph normalisation, lossless space-to-depth stem "
    "(PixelUnshuffle 2: 50x50x3 -> 25x25x12) + 3x3 conv 32ch, 4 stages of one block each, widths 32/64/96/128, "
    "strides 1/2/2/2 (25->25->13->7->4), global average pool, linear -> 1 logit, sigmoid in graph"
)


def _classes():
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.short = None
            if stride != 1 or cin != cout:
                self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            y = F.relu(self.bn1(self.conv1(x)))
            y = self.bn2(self.conv2(y))
            return F.relu(y + (x if self.short is None else self.short(x)))

    class IDCNet(nn.Module):
        """One member: forward_logits(float NCHW in [0,1]) -> logit [N,1]."""

        def __init__(self, mean, std, width_mult: float = 1.0):
            super().__init__()
            self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
            sw = int(round(STEM_WIDTH * width_mult))
            self.stem = nn.Sequential(nn.PixelUnshuffle(2), nn.Conv2d(12, sw, 3, 1, 1, bias=False),
                                      nn.BatchNorm2d(sw), nn.ReLU(inplace=True))
            layers, cin = [], sw
            for w, s in zip(WIDTHS, STRIDES):
                w = int(round(w * width_mult))
                layers.append(Block(cin, w, s))
                cin = w
            self.stages = nn.Sequential(*layers)
            self.head = nn.Linear(cin, 1)

        def forward_logits(self, x01):
            x = (x01 - self.mean) / self.std
            x = self.stages(self.stem(x))
            return self.head(x.mean(dim=(2, 3)))

    class Shipped(nn.Module):
        """forward(image uint8 NHWC [N,50,50,3]) -> probability [N,1]: mean over members (and over the 8
        flips/rotations if tta) of sigmoid(logit)."""

        def __init__(self, members, tta: bool):
            super().__init__()
            self.members = nn.ModuleList(members)
            self.tta = tta

        def forward(self, image):
            x = image.permute(0, 3, 1, 2).to(torch.float32) / 255.0
            if self.tta:
                t = x.transpose(2, 3)
                x = torch.cat([x, x.flip(3), x.flip(2), x.flip(2).flip(3),
                               t, t.flip(3), t.flip(2), t.flip(2).flip(3)], dim=0)
            probs = []
            for m in self.members:
                p = torch.sigmoid(m.forward_logits(x))
                if self.tta:
                    p = p.reshape(8, -1, 1).mean(dim=0)
                probs.append(p)
            return probs[0] if len(probs) == 1 else torch.stack(probs, dim=0).mean(dim=0)

    return IDCNet, Shipped


def build_model(mean, std, n_members: int = K_FOLDS, tta: bool = True, width_mult: float = 1.0):
    """The shipped network (random weights): n_members fold models averaged in one graph.
    Its trained state_dict is models/idc-resnet/work/model.pt["model"]."""
    IDCNet, Shipped = _classes()
    return Shipped([IDCNet(mean, std, width_mult) for _ in range(n_members)], tta)
