"""Training: H&E augmentations (dihedral, HSV and HED jitter), one member's training loop, the baseline fit."""
from __future__ import annotations

import time

import numpy as np

from .export import torch_predict
from .log import log
from .metrics import auc
from .network import _classes

BATCH_SIZE = 128
MAX_LR = 3e-3
EMA_DECAY = 0.998  # exponential moving average of weights (and BN buffers); the EMA model is exported
WEIGHT_DECAY = 5e-4

# recipe variants for `--ablation` (aug/width_mult go to train_member; stain and seed_offset are handled in build.py)
ABLATION_VARIANTS = {
    "default": {},
    "nohsv": {"aug": "nohsv"},
    "hed": {"aug": "hed"},
    "macenko": {"stain": "macenko"},
    "hedstrong": {"aug": "hedstrong"},
    "hsv": {"aug": "hsv"},  # the 0.3.0 recipe (no stain turn)
    "stainturn": {"aug": "stainturn"},  # the 0.4.0 recipe (no lab-shift augmentations)
    "rjturn": {"aug": "rjturn"},
    "wide": {"width_mult": 1.5},
    "seed2": {"seed_offset": 1},
}

AUGMENTATIONS = {
    "hsv": "dihedral (random flip + 90-degree rotation), HSV jitter (hue shift +-0.04 of the colour circle, "
           "saturation x0.75-1.25, value/brightness x0.9-1.1), contrast x0.9-1.1",
    "nohsv": "dihedral (random flip + 90-degree rotation), brightness x0.9-1.1, contrast x0.9-1.1 (no colour jitter)",
    "hed": "as hsv, then HED stain jitter (Tellez et al. 2019): colour deconvolution into haematoxylin, eosin and "
           "DAB optical densities (Ruifrok & Johnston), each scaled x(1+-0.05) and shifted +-0.05",
    "hedstrong": "as hed with scale x(1+-0.2) and shift +-0.2",
    "stainturn": "as hsv, then a stain turn in optical density on 90% of patches: each patch's OD split into "
                 "haematoxylin and eosin concentrations on the build's stain reference (least squares, the "
                 "residual kept), the H vector turned in the H&E plane by U(-10, +40) deg (positive = away from "
                 "eosin), the E vector by U(-10, +30) deg (away from H), each strength scaled by exp(U(-0.25, 0.25))",
    "rjturn": "as stainturn, then on half of the patches a second stain turn in an independent basis: the fixed "
              "Ruifrok & Johnston H, E, DAB basis (not the build's reference), its H vector turned in its H&E plane by "
              "U(-10, +40) deg away from eosin and its E vector by U(-10, +30) deg away from H, the stain "
              "concentrations kept; then HED jitter (each concentration x(1+-0.05), +-0.05) on every patch",
    "labshift": "as stainturn, plus what differs between labs and scanners, each on half of the patches: scale "
                "x0.8-1.2 (bilinear resampling about the centre, reflected edges), Gaussian blur sigma 0-1 px, "
                "brightness +-0.08, contrast x0.8-1.25, gamma 0.8-1.25, and JPEG compression at quality 60-95 "
                "(Pillow, 4:4:4) on the uint8 grid",
}
# the "labshift" additions: each applied to a patch with probability p, parameters uniform in the ranges
LAB_SHIFT = {"p": 0.5, "scale": (0.8, 1.2), "blur_sigma": (0.0, 1.0), "brightness": 0.08,
             "contrast": (0.8, 1.25), "gamma": (0.8, 1.25), "jpeg_quality": (60, 95)}
STAIN_TURN = {"p": 0.9, "h_deg": (-10.0, 40.0), "e_deg": (-10.0, 30.0), "log_strength": 0.25}
RJ_TURN = {"p": 0.5, "h_deg": (-10.0, 40.0), "e_deg": (-10.0, 30.0), "hed_sigma": 0.05}
# Ruifrok & Johnston (as in skimage.color): rows are the OD of pure haematoxylin, eosin, DAB in R, G, B
RGB_FROM_HED = [[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]]


def _rgb_to_hsv(x):
    import torch

    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    maxc, _ = x.max(1)
    minc, _ = x.min(1)
    delta = maxc - minc
    s = delta / maxc.clamp_min(1e-8)
    dc = delta.clamp_min(1e-8)
    rc, gc, bc = (maxc - r) / dc, (maxc - g) / dc, (maxc - b) / dc
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(delta > 0, torch.remainder(h / 6.0, 1.0), torch.zeros_like(h))
    return h, s, maxc


def _hsv_to_rgb(h, s, v):
    import torch

    h6 = h * 6.0
    i = torch.floor(h6)
    f = h6 - i
    i = i.long() % 6
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    idx = i.unsqueeze(0)
    r = torch.stack([v, q, p, p, t, v]).gather(0, idx)[0]
    g = torch.stack([t, v, v, q, p, p]).gather(0, idx)[0]
    b = torch.stack([p, p, t, v, v, q]).gather(0, idx)[0]
    return torch.stack([r, g, b], dim=1)


def _hed_jitter(x, u, sigma: float):
    """Stain augmentation in colour-deconvolved optical density (float NCHW in [0,1] -> same)."""
    import torch

    rgb_from_hed = torch.tensor(RGB_FROM_HED, dtype=torch.float32)
    rgb_from_hed = rgb_from_hed / rgb_from_hed.norm(dim=1, keepdim=True)
    hed_from_rgb = torch.linalg.inv(rgb_from_hed)
    od = -torch.log((x * 255.0 + 1.0) / 256.0)  # N3HW
    c = torch.einsum("nchw,cd->ndhw", od, hed_from_rgb)
    c = c * u(1 - sigma, 1 + sigma, 3, 1, 1) + u(-sigma, sigma, 3, 1, 1)
    od = torch.einsum("ndhw,dc->nchw", c, rgb_from_hed)
    return ((256.0 * torch.exp(-od) - 1.0) / 255.0).clamp_(0.0, 1.0)


def _turn(a, b, t):
    """Unit vectors a (n,3) turned by angles t (n,) in the plane of a and b, away from b."""
    import torch

    u = b - (b * a).sum(1, keepdim=True) * a
    u = u / u.norm(dim=1, keepdim=True)
    return torch.cos(t)[:, None] * a - torch.sin(t)[:, None] * u


def _stain_turn(x, u, he_ref):
    """Re-colour each patch (float NCHW in [0,1]) as another lab's H&E might look (AUGMENTATIONS["stainturn"]).
    he_ref: the build's stain reference, (3, 2) unit OD vectors of H and E."""
    import torch

    n = x.shape[0]
    he = torch.as_tensor(np.asarray(he_ref, np.float32))
    h0, e0 = he[:, 0].expand(n, 3), he[:, 1].expand(n, 3)
    st = STAIN_TURN
    h1 = _turn(h0, e0, torch.deg2rad(u(*st["h_deg"])))
    e1 = _turn(e0, h0, torch.deg2rad(u(*st["e_deg"])))
    scale = torch.exp(u(-st["log_strength"], st["log_strength"], 2))  # (n, 2)
    keep = u(0.0, 1.0) >= st["p"]
    new = torch.stack([h1, e1], 2) * scale[:, None, :]  # (n, 3, 2)
    new[keep] = he  # untouched patches: the same decomposition and recomposition (identity up to residual)
    od = -torch.log((x * 255.0 + 1.0) / 256.0)  # N3HW
    c = torch.einsum("dc,nchw->ndhw", torch.linalg.pinv(he), od)  # (n, 2, H, W) concentrations
    residual = od - torch.einsum("cd,ndhw->nchw", he, c)
    od = torch.einsum("ncd,ndhw->nchw", new, c) + residual
    return ((256.0 * torch.exp(-od.clamp_min(0.0)) - 1.0) / 255.0).clamp_(0.0, 1.0)


def _rj_turn(x, u):
    """Re-colour half of the patches (float NCHW in [0,1]) by turning the fixed Ruifrok & Johnston basis's H and E
    vectors (AUGMENTATIONS["rjturn"]): concentrations unmixed on that basis, recombined on the turned one."""
    import torch

    n = x.shape[0]
    basis = torch.tensor(RGB_FROM_HED, dtype=torch.float32)
    basis = basis / basis.norm(dim=1, keepdim=True)  # rows H, E, DAB (unit OD vectors)
    st = RJ_TURN
    h0, e0 = basis[0].expand(n, 3), basis[1].expand(n, 3)
    h1 = _turn(h0, e0, torch.deg2rad(u(*st["h_deg"])))
    e1 = _turn(e0, h0, torch.deg2rad(u(*st["e_deg"])))
    new = basis.expand(n, 3, 3).clone()  # (n, stain, rgb)
    turn = u(0.0, 1.0) < st["p"]
    new[turn, 0] = h1[turn]
    new[turn, 1] = e1[turn]
    od = -torch.log((x * 255.0 + 1.0) / 256.0)  # N3HW
    c = torch.einsum("nchw,cd->ndhw", od, torch.linalg.inv(basis))
    od = torch.einsum("ndhw,ndc->nchw", c, new)
    return ((256.0 * torch.exp(-od.clamp_min(0.0)) - 1.0) / 255.0).clamp_(0.0, 1.0)


def _rescale(x, s):
    """Each patch (float NCHW) resampled by its factor s (n,) about its centre: s > 1 enlarges (as a scanner
    at a finer resolution would), s < 1 shrinks, edges reflected; bilinear."""
    import torch
    import torch.nn.functional as F

    n = x.shape[0]
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = 1.0 / s
    theta[:, 1, 1] = 1.0 / s
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _blur(x, sigma):
    """Each patch blurred by a Gaussian of its own sigma (n,) in pixels (5x5 kernel, reflected edges)."""
    import torch
    import torch.nn.functional as F

    n, c = x.shape[:2]
    r = torch.arange(-2, 3, dtype=torch.float32)
    g = torch.exp(-(r[None, :] ** 2) / (2 * sigma.clamp_min(1e-3)[:, None] ** 2))
    g = g / g.sum(1, keepdim=True)  # (n, 5)
    k = (g[:, :, None] * g[:, None, :]).repeat_interleave(c, 0)[:, None]  # (n*c, 1, 5, 5)
    y = F.conv2d(F.pad(x.reshape(1, n * c, *x.shape[2:]), (2, 2, 2, 2), mode="reflect"), k, groups=n * c)
    return y.reshape(x.shape)


def _jpeg(x_u8_nchw, quality):
    """Each uint8 patch through a JPEG encode/decode at its quality (Pillow, no chroma subsampling)."""
    import io

    import torch
    from PIL import Image

    out = x_u8_nchw.clone()
    for i, q in enumerate(quality.tolist()):
        buf = io.BytesIO()
        Image.fromarray(x_u8_nchw[i].permute(1, 2, 0).numpy()).save(buf, "JPEG", quality=int(q), subsampling=0)
        buf.seek(0)
        out[i] = torch.from_numpy(np.array(Image.open(buf).convert("RGB"))).permute(2, 0, 1)
    return out


def _lab_shift_geometry(x, u, pick):
    st = LAB_SHIFT
    m = pick()
    if m.any():
        x[m] = _rescale(x[m], u(*st["scale"])[m])
    m = pick()
    if m.any():
        x[m] = _blur(x[m], u(*st["blur_sigma"])[m])
    return x


def _lab_shift_tone(x, u, pick):
    st = LAB_SHIFT
    b = u(-st["brightness"], st["brightness"], 1, 1, 1) * pick()[:, None, None, None]
    x = (x + b).clamp_(0.0, 1.0)
    c = _where(pick(), u(*st["contrast"]), 1.0)
    m = x.mean(dim=(1, 2, 3), keepdim=True)
    x = ((x - m) * c[:, None, None, None] + m).clamp_(0.0, 1.0)
    g = _where(pick(), u(*st["gamma"]), 1.0)
    return x.clamp_min(0.0) ** g[:, None, None, None]


def _where(mask, a, b):
    import torch

    return torch.where(mask, a, torch.as_tensor(b, dtype=a.dtype))


def augment(xb_u8, gen, kind: str = "hsv", stain_he=None):
    """H&E-suited augmentation on a uint8 NHWC batch -> float NCHW in [0,1] on the uint8 grid.
    stain_he: the stain reference's (3, 2) H and E vectors, needed by kind "stainturn"."""
    import torch

    x = xb_u8.permute(0, 3, 1, 2).float().div_(255.0)
    n = x.shape[0]
    flip = torch.rand(n, generator=gen) < 0.5
    x[flip] = x[flip].flip(3)
    k = torch.randint(0, 4, (n,), generator=gen)
    for r in (1, 2, 3):
        m = k == r
        if m.any():
            x[m] = torch.rot90(x[m], r, dims=(2, 3))

    def u(lo, hi, *shape):
        return lo + (hi - lo) * torch.rand(n, *shape, generator=gen)

    def pick():
        return torch.rand(n, generator=gen) < LAB_SHIFT["p"]

    if kind == "labshift":
        x = _lab_shift_geometry(x, u, pick)
    if kind in ("hsv", "hed", "hedstrong", "stainturn", "rjturn", "labshift"):
        h, s, v = _rgb_to_hsv(x)
        h = torch.remainder(h + u(-0.04, 0.04, 1, 1), 1.0)
        s = (s * u(0.75, 1.25, 1, 1)).clamp_(0.0, 1.0)
        v = (v * u(0.9, 1.1, 1, 1)).clamp_(0.0, 1.0)
        x = _hsv_to_rgb(h, s, v)
    else:
        x = x * u(0.9, 1.1, 1, 1, 1)
    if kind in ("hed", "hedstrong"):
        x = _hed_jitter(x, u, 0.05 if kind == "hed" else 0.2)
    if kind in ("stainturn", "rjturn", "labshift"):
        x = _stain_turn(x, u, stain_he)
    if kind == "rjturn":
        x = _hed_jitter(_rj_turn(x, u), u, RJ_TURN["hed_sigma"])
    m = x.mean(dim=(1, 2, 3), keepdim=True)
    x = ((x - m) * u(0.9, 1.1, 1, 1, 1) + m).clamp_(0.0, 1.0)
    if kind == "labshift":
        x = _lab_shift_tone(x, u, pick)
        x8 = (x * 255.0).round_().to(torch.uint8)
        m = pick()
        q = torch.randint(LAB_SHIFT["jpeg_quality"][0], LAB_SHIFT["jpeg_quality"][1] + 1, (n,), generator=gen)
        if m.any():
            x8[m] = _jpeg(x8[m], q[m])
        return x8.float().div_(255.0)
    return (x * 255.0).round_().div_(255.0)  # the uint8 grid the deployed model sees


def train_member(x_tr, y_tr, mean, std, *, epochs, seed, aug="hsv", stain_he=None, width_mult=1.0, x_mon=None,
                 y_mon=None, tag=""):
    """Train one member from scratch; returns (EMA model in eval mode, history, seconds)."""
    import torch
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    IDCNet, Shipped = _classes()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = IDCNet(mean, std, width_mult).to(memory_format=torch.channels_last)
    pos_weight = float((y_tr == 0).sum() / (y_tr == 1).sum())
    crit = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor([pos_weight]))
    opt = torch.optim.AdamW(model.parameters(), lr=MAX_LR, weight_decay=WEIGHT_DECAY)
    steps = (len(x_tr) + BATCH_SIZE - 1) // BATCH_SIZE
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=MAX_LR, epochs=epochs, steps_per_epoch=steps,
                                                pct_start=0.2)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(EMA_DECAY), use_buffers=True)
    xt = torch.from_numpy(x_tr)
    yt = torch.from_numpy(y_tr).float().unsqueeze(1)
    history = []
    t_start = time.time()
    for epoch in range(epochs):
        model.train()
        t0 = time.time()
        perm = torch.randperm(len(xt), generator=gen)
        tot = 0.0
        for s in range(steps):
            idx = perm[s * BATCH_SIZE:(s + 1) * BATCH_SIZE]
            xb = augment(xt[idx], gen, aug, stain_he).contiguous(memory_format=torch.channels_last)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = model.forward_logits(xb)
            loss = crit(logits.float(), yt[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            ema.update_parameters(model)
            tot += loss.item() * len(idx)
        h = {"epoch": epoch + 1, "train_loss": round(tot / len(xt), 4), "seconds": round(time.time() - t0, 1)}
        # monitoring only (every 5th and the last epoch): the final-epoch EMA weights are used, no early stopping
        if x_mon is not None and ((epoch + 1) % 5 == 0 or epoch + 1 == epochs):
            h["oof_auc"] = round(auc(y_mon, torch_predict(Shipped([ema.module], False), x_mon)), 4)
        history.append(h)
        log(f"{tag} epoch {epoch + 1}/{epochs} loss {h['train_loss']:.4f}"
            + (f" OOF AUC {h['oof_auc']:.4f}" if "oof_auc" in h else "") + f" ({h['seconds']:.0f}s)")
    model = ema.module.to(memory_format=torch.contiguous_format).eval()
    return model, history, time.time() - t_start


def fit_logistic(f_tr, y_tr, l2: float = 1e-3, iters: int = 300):
    """L2-regularised logistic regression (class-weighted, standardised features) fitted with LBFGS."""
    import torch

    mu, sd = f_tr.mean(0), f_tr.std(0) + 1e-6
    X = torch.from_numpy((f_tr - mu) / sd).double()
    y = torch.from_numpy(y_tr.astype(np.float64))
    w = torch.zeros(X.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    pos_weight = torch.tensor((y_tr == 0).sum() / max((y_tr == 1).sum(), 1), dtype=torch.float64)
    opt = torch.optim.LBFGS([w, b], max_iter=iters, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(X @ w + b, y, pos_weight=pos_weight)
        loss = loss + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    w_, b_ = w.detach().numpy(), float(b.detach())
    return lambda f: 1.0 / (1.0 + np.exp(-(((f - mu) / sd) @ w_ + b_)))
