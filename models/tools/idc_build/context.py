"""The context stage: a second small model over the case's patch grid of first-stage probabilities.

Each cell of the grid is one 50 px patch position. The stage sees, for every cell, the first stage's logit
and for rings r = 1..RINGS around it (Chebyshev distance r, up to a (2*RINGS+1)^2 window): the fraction of
the ring that holds a scored patch, a has-neighbour flag, and, times that flag, the neighbours' mean logit
minus the cell's own and the largest logit within distance r minus the cell's own. The refined logit is the
cell's own logit plus a linear function of those 4*RINGS features (a logistic regression with the own logit
as a fixed offset). Every feature is a difference of logits or a count, so shifting all of a case's logits
by the same amount shifts the refined ones by exactly that: the stage cannot turn a slide whose whole tissue
scores a little high into a "region" (measured: with the neighbours' raw logits as features instead, the
per-fold AUC rose as much but the pooled AUC fell, because between-patient offsets were amplified).
Cells without neighbours keep their own score. (MODEL-NOTES.md: labels mark whole regions.)

The whole stage is one torch module (fixed ring convolutions, then a 1x1 convolution holding the fitted
regression), exported to ONNX and OpenVINO like the first stage:

    input  "grid"        float32 [1, 2, H, W]: channel 0 = first-stage probability, channel 1 = 1 where a
                         tissue patch was scored (0 = no tissue, not scanned, or outside the case)
    output "probability" float32 [1, 1, H, W]: refined probability (0 where the mask is 0)
"""
from __future__ import annotations

import numpy as np

RINGS = 4
LOGIT_CLIP = 8.0
N_FEATURES = 4 * RINGS  # besides the own logit (a fixed offset)


def ring_kernels(rings: int = RINGS) -> np.ndarray:
    """(rings, 1, 2R+1, 2R+1) kernels, 1 on the cells at Chebyshev distance exactly r from the centre."""
    size = 2 * rings + 1
    yy, xx = np.mgrid[:size, :size] - rings
    cheb = np.maximum(np.abs(yy), np.abs(xx))
    return np.stack([(cheb == r).astype(np.float32) for r in range(1, rings + 1)])[:, None]


def _module():
    import torch

    class ContextNet(torch.nn.Module):
        def __init__(self, mu=None, sd=None, weight=None, bias=0.0):
            super().__init__()
            k = torch.from_numpy(ring_kernels())
            self.register_buffer("rings", k)
            self.register_buffer("ring_size", k.sum((1, 2, 3)).view(1, RINGS, 1, 1))
            self.register_buffer("mu", torch.zeros(1, N_FEATURES, 1, 1) if mu is None else
                                 torch.as_tensor(np.asarray(mu, np.float32)).view(1, N_FEATURES, 1, 1))
            self.register_buffer("sd", torch.ones(1, N_FEATURES, 1, 1) if sd is None else
                                 torch.as_tensor(np.asarray(sd, np.float32)).view(1, N_FEATURES, 1, 1))
            self.head = torch.nn.Conv2d(N_FEATURES, 1, 1)
            with torch.no_grad():
                self.head.weight.zero_()
                if weight is not None:
                    self.head.weight.copy_(torch.as_tensor(np.asarray(weight, np.float32)).view(1, N_FEATURES, 1, 1))
                self.head.bias.fill_(float(bias))

        def own_and_features(self, grid):
            p, m = grid[:, 0:1], grid[:, 1:2]
            eps = 1e-6
            q = p.clamp(eps, 1 - eps)
            own = torch.log(q / (1 - q)).clamp(-LOGIT_CLIP, LOGIT_CLIP) * m
            sums = torch.nn.functional.conv2d(own, self.rings, padding=RINGS)
            counts = torch.nn.functional.conv2d(m, self.rings, padding=RINGS)
            flag = counts.clamp(max=1.0)
            mean = sums / counts.clamp(min=1.0)
            frac = counts / self.ring_size
            low = own * m + (m - 1.0) * 4 * LOGIT_CLIP  # absent cells far below any logit
            mx = torch.cat([torch.nn.functional.max_pool2d(low, 2 * r + 1, stride=1, padding=r)
                            for r in range(1, RINGS + 1)], 1)
            return own, torch.cat([frac, flag, (mean - own) * flag, (mx - own) * flag], 1)

        def forward(self, grid):
            own, f = self.own_and_features(grid)
            return torch.sigmoid(own + self.head((f - self.mu) / self.sd)) * grid[:, 1:2]

    return ContextNet


def to_grid(gx: np.ndarray, gy: np.ndarray, prob: np.ndarray) -> np.ndarray:
    """Cells (gx, gy >= 0) with probabilities -> the [1, 2, H, W] float32 input."""
    g = np.zeros((1, 2, int(gy.max()) + 1, int(gx.max()) + 1), np.float32)
    g[0, 0, gy, gx] = prob
    g[0, 1, gy, gx] = 1.0
    return g


def grid_features(gx, gy, prob) -> np.ndarray:
    """(n, 1 + N_FEATURES): each cell's own logit, then its features, by the exported module's own code."""
    import torch

    net = _module()()
    with torch.no_grad():
        own, f = net.own_and_features(torch.from_numpy(to_grid(gx, gy, prob)))
    return np.concatenate([own[0].numpy(), f[0].numpy()])[:, gy, gx].T.astype(np.float64)


def cells(xs: np.ndarray, ys: np.ndarray, size: int = 50):
    """Patch pixel positions -> grid cells relative to the patient's top-left patch."""
    return (xs - xs.min()) // size, (ys - ys.min()) // size


def fit_context(features: np.ndarray, labels: np.ndarray):
    """Class-weighted L2 logistic regression of the labels on the standardised features (grid_features'
    columns 1..), with the own logit (column 0) as a fixed offset -> (mu, sd, weight, bias)."""
    import torch

    own, f = features[:, 0], features[:, 1:]
    mu, sd = f.mean(0), f.std(0) + 1e-6
    X = torch.from_numpy((f - mu) / sd)
    offset = torch.from_numpy(own)
    y = torch.from_numpy(labels.astype(np.float64))
    w = torch.zeros(X.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    pos_weight = torch.tensor((labels == 0).sum() / max((labels == 1).sum(), 1), dtype=torch.float64)
    opt = torch.optim.LBFGS([w, b], max_iter=300, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(offset + X @ w + b, y, pos_weight=pos_weight)
        loss = loss + 1e-3 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return mu, sd, w.detach().numpy(), float(b.detach())


def build_module(params):
    mu, sd, w, b = params
    return _module()(mu, sd, w, b).eval()


def apply_context(params, gx, gy, prob) -> np.ndarray:
    """Refined probability of each cell, through the torch module (what is exported)."""
    import torch

    net = build_module(params)
    with torch.no_grad():
        out = net(torch.from_numpy(to_grid(gx, gy, prob)))[0, 0].numpy()
    return out[gy, gx].astype(np.float64)


def export_context(params, path):
    """The module to ONNX with dynamic grid height and width."""
    import torch

    net = build_module(params)
    dummy = torch.from_numpy(to_grid(np.array([0, 1, 2]), np.array([0, 1, 3]), np.array([0.2, 0.5, 0.9])))
    torch.onnx.export(net, dummy, str(path), input_names=["grid"], output_names=["probability"],
                      dynamic_axes={"grid": {2: "height", 3: "width"}, "probability": {2: "height", 3: "width"}},
                      opset_version=17, dynamo=False)
