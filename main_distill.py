"""PCA-parameterized bilevel distillation with predefined rotations and approximation MLPs (SPEC 2-5).

    python main_distill.py --config configs/cifar10.yaml
    python main_distill.py --config configs/cifar10.yaml --distillation.method=krr_st   # KRR-ST baseline
    python main_distill.py --config configs/cifar10.yaml --resume
    python main_distill.py --config configs/digits.yaml --distillation.steps=50 --out /tmp/run
    torchrun --standalone --nproc_per_node=8 main_distill.py --config configs/imagenet64.yaml   # one step, 8 ranks

Under torchrun every outer step is the single-process step spread over the ranks (README, Several GPUs); rank 0
writes. Needs the teacher from pretrain.py. Writes distilled_assets/<config name>_N<budget>[_krr_st]/ (or --out):
    distilled_data.pth        bases, means, coefficients, normalisation, rotations, storage table, resolved config,
                              teacher hash, step count (decode: utils.load_distilled)
    approx_net_rot_<a>.pth    one MLP per rotation a (SPEC 5)
    controls.pth              not stored data: the indices of the m real images the set started from and the
                              learned C_y^k, for main_evaluate's real_init and distilled_exact rows
    distilled_images.png      the decoded images, de-normalised
    config.json, log.jsonl, metrics.json (loss curve, storage, approximation errors), checkpoint.pth
    init_only/, snapshots/step_<n>/  the same files for the set at step 0 and at each of distillation.snapshot_steps
"""
import dataclasses
import functools
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

import models
import utils


def parse_args(argv):
    p = utils.script_parser(__doc__)
    p.add_argument("--config", required=True)
    p.add_argument("--out", default=None, help="default: distilled_assets/<config name>_N<budget>[_krr_st]")
    p.add_argument("--teacher", default=None, help="default: teacher_models/resnet18_barlow_twins_<config name>.pth")
    utils.add_common_args(p)
    return utils.parse_args(p, argv)


# ============================================================================================
# SPEC 2: the distilled set, parameterized (ours) or free (KRR-ST)
# ============================================================================================
class PCADistilled(nn.Module):
    """x_i = up(mu_x + c_i^x B_x), y_i = mu_y + c_i^y B_y, y_i^k = mu_y + c_i^{y,k} B_y; views view-major."""

    def __init__(self, t, rotations, resolution, learn_bases):
        """t: mu_x, B_x, C_x, mu_y, B_y, C_y and C_yk (K-1, m, V); the means are fixed (SPEC 2)."""
        super().__init__()
        self.register_buffer("mu_x", t["mu_x"])
        self.register_buffer("mu_y", t["mu_y"])
        self.B_x = nn.Parameter(t["B_x"], requires_grad=learn_bases)
        self.B_y = nn.Parameter(t["B_y"], requires_grad=learn_bases)
        self.C_x, self.C_y, self.C_yk = nn.Parameter(t["C_x"]), nn.Parameter(t["C_y"]), nn.Parameter(t["C_yk"])
        self.rotations, self.resolution = list(rotations), resolution

    def images(self):
        return utils.decode_images(self.C_x, self.B_x, self.mu_x, self.resolution)

    def forward(self):
        """(K*m, 3, H, W) views and their (K*m, d_y) targets."""
        X = self.images()
        Y = utils.decode_targets(torch.cat([self.C_y[None], self.C_yk]).flatten(0, 1), self.B_y, self.mu_y)
        return all_views(X, self.rotations), Y

    def param_groups(self, dc):
        """Coefficients and bases get their own rates: a B_x step moves every image at once (SPEC 4.5)."""
        groups = [([self.C_x], "lr_image", dc["lr_image"]), ([self.B_x], "lr_image_bases", dc["lr_image_bases"]),
                  ([self.C_y, self.C_yk], "lr_repr", dc["lr_repr"]), ([self.B_y], "lr_repr_bases", dc["lr_repr_bases"])]
        return [{"params": ps, "lr": lr, "key": key} for ps, key, lr in groups if all(p.requires_grad for p in ps)]

    def export(self):
        return {"mu_x": self.mu_x, "B_x": self.B_x.detach(), "C_x": self.C_x.detach(), "mu_y": self.mu_y,
                "B_y": self.B_y.detach(), "C_y": self.C_y.detach(), "rotations": self.rotations}


class FreeDistilled(nn.Module):
    """KRR-ST: free pixels X (m, 3, H, W) and free targets Y (m, d_y), no views."""

    def __init__(self, X, Y):
        super().__init__()
        self.X, self.Y = nn.Parameter(X), nn.Parameter(Y)
        self.rotations = []

    def images(self):
        return self.X

    def forward(self):
        return self.X, self.Y

    def param_groups(self, dc):
        return [{"params": [self.X], "lr": dc["krr_st_lr_pixels"], "key": "krr_st_lr_pixels"},
                {"params": [self.Y], "lr": dc["krr_st_lr_targets"], "key": "krr_st_lr_targets"}]

    def export(self):
        return {"X": self.X.detach(), "Y": self.Y.detach(), "rotations": []}


@torch.no_grad()
def init_distilled(cfg, data, T, m, gen):
    """Start from m distinct random real train images (SPEC 2): their PCA coefficients (or pixels) and targets."""
    idx = torch.randperm(len(T), generator=gen, device=gen.device)[:m].to(data.train_x.device)
    if cfg["distillation"]["method"] == "krr_st":
        distilled = FreeDistilled(utils.normalize(data.train_x[idx], data.mean, data.std), T[idx, 0].clone())
    else:
        distilled = pca_distilled(cfg, data, T, idx)
    distilled.init_indices = idx.cpu()  # the real images it starts from: main_evaluate's real_init row
    return distilled


def pca_distilled(cfg, data, T, idx):
    """SPEC 2: PCA bases of the train images and teacher targets; coefficients of the real images idx."""
    P = cfg["parameterization"]
    low = lambda x: downsample(utils.normalize(x, data.mean, data.std), P["image_basis_size"])  # (n, 3 r_b^2)
    mu_x, B_x = pca(lambda: (low(x) for x in data.train_x.split(PCA_ROWS)), P["U"])
    mu_y, B_y = pca(T[:, 0], P["V"])
    C_x = (low(data.train_x[idx]) - mu_x) @ B_x.T
    C_y = (T[idx, 0] - mu_y) @ B_y.T
    C_yk = (T[idx, 1:] - mu_y).transpose(0, 1) @ B_y.T  # (K-1, m, V)
    t = dict(mu_x=mu_x, B_x=B_x, C_x=C_x, mu_y=mu_y, B_y=B_y, C_y=C_y, C_yk=C_yk)
    return PCADistilled(t, cfg["augmentations"]["rotate"], data.train_x.shape[-1], P["learn_bases"])


PCA_ROWS = 65536  # rows per float64 chunk of pca(): O(D^2 + PCA_ROWS D) memory; CIFAR is one chunk (bit for bit)


def pca(X, k):
    """Top-k principal directions of X's rows: (mean (D,), orthonormal basis (k, D)). X is a tensor or a function
    returning row chunks (read twice), summed in float64 chunk by chunk: IMAGENET64's 1.28M rows never exist whole."""
    chunks = (lambda: X.split(PCA_ROWS)) if torch.is_tensor(X) else X
    n, total = 0, 0
    for x in chunks():
        n, total = n + len(x), total + x.double().sum(0)
    mu = total / n
    cov = sum(c.T @ c for c in (x.double() - mu for x in chunks())) / n
    if k > cov.shape[0]:
        raise utils.ConfigError(f"asked for {k} PCA components of {cov.shape[0]}-d data")
    evals, evecs = torch.linalg.eigh(cov)  # ascending
    return mu.float(), evecs[:, -k:].flip(1).T.contiguous().float()


def downsample(x, r_b):
    """Normalised images (n, 3, H, W) -> flattened antialiased r_b x r_b (n, 3 r_b^2)."""
    return F.interpolate(x, size=(r_b, r_b), mode="bilinear", antialias=True, align_corners=False).flatten(1)


# ============================================================================================
# SPEC 3: storage accounting decides m
# ============================================================================================
def storage_accounting(cfg):
    """Every stored float, in a table; m is the largest count within budget unless the config fixes it."""
    N, S, d_y = cfg["storage"]["budget_N"], cfg["storage"], models.resnet18_dim(cfg["network"]["width"])
    per_image, budget = (utils.storage_budget(cfg)[k] for k in ("floats_per_image", "budget"))
    if cfg["distillation"]["method"] == "krr_st":
        m = N
        rows = {"X (free pixels)": m * (per_image - d_y), "Y (free targets)": m * d_y}
        return {"budget_N": N, "floats_per_image": per_image, "budget": budget, "rows": rows, "m": m,
                "m_max": N, "stored": sum(rows.values())}
    P = cfg["parameterization"]
    r_b, U, V, A = P["image_basis_size"], P["U"], P["V"], len(cfg["augmentations"]["rotate"])
    h = cfg["approximation"]["hidden"]
    rows = {"B_x": U * 3 * r_b**2, "mu_x": 3 * r_b**2, "B_y": V * d_y, "mu_y": d_y}
    per_m = U + V + (A * V if S["store_augmented_targets"] else 0)
    if not S["store_augmented_targets"]:  # every parameter of the A approximation MLPs as built (SPEC 5)
        with torch.device("meta"):  # counted, not initialised: the global random state stays untouched
            rows["approximation nets"] = A * models.num_params(models.ApproxMLP(V, h))
    fixed = sum(rows.values())
    m_max = (budget - fixed) // per_m
    if m_max < 1:
        raise utils.ConfigError(
            f"storage: budget {budget:,} floats (N={N} images x {per_image:,}) cannot hold the bases, means and "
            f"approximation nets ({fixed:,} floats) plus one distilled image ({per_m} floats); "
            f"raise storage.budget_N or lower parameterization.U / V")
    m = S["m"] or m_max
    stored = fixed + m * per_m
    what = "C_x, C_y" + (", C_y^k" if S["store_augmented_targets"] else "")
    rows[f"{what} (m x {per_m})"] = m * per_m
    if stored > budget:
        raise utils.ConfigError(
            f"storage: m={m} needs {stored:,} floats > budget {budget:,} (N={N} images x {per_image:,} floats); "
            f"fixed cost {fixed:,}, {per_m} floats per distilled image, so the largest m within budget is {m_max}")
    return {"budget_N": N, "floats_per_image": per_image, "budget": budget, "rows": rows, "m": m,
            "m_max": m_max, "stored": stored}


# ============================================================================================
# SPEC 4: the model pool and one outer step
# ============================================================================================
class ModelPool:
    """L ConvNets, each with its own SGD state and age, re-initialised at age Z. `chunk`: views per inner-step pass
    (0 = all); under torchrun every rank holds the same pool, BatchNorm over all ranks' views, the step split."""

    def __init__(self, mp, resolution, d_y, device, chunk=0, ranks=models.Ranks()):
        self.mp, self.resolution, self.d_y, self.device = mp, resolution, d_y, device
        self.chunk, self.ranks = chunk, ranks
        self.models, self.opts, self.ages = [None] * mp["size_L"], [None] * mp["size_L"], [0] * mp["size_L"]
        for j in range(mp["size_L"]):
            self.reset(j)

    def reset(self, j):
        f = models.ConvNet(self.mp["widths"], self.resolution, self.d_y)
        if self.ranks.world > 1:  # the same weights (drawn on the CPU before the swap), BatchNorm over all ranks
            f = models.sync_batchnorm(f, self.device)
        f = models.channels_last_module(f.to(self.device), self.device)
        self.models[j] = f
        self.opts[j] = torch.optim.SGD(f.parameters(), lr=self.mp["lr"], momentum=self.mp["momentum"],
                                       weight_decay=self.mp["weight_decay"])
        self.ages[j] = 0

    def inner_step(self, j, X, Y):
        """One SGD step of model j on MSE(f(X_s), Y_s), train mode, detached (SPEC 4.6-7); gradients accumulate over
        strided chunks (BatchNorm per chunk). Under torchrun rank r takes its rank_slice of the K m views in as many
        chunks, its loss its share of the mean; one all_reduce sums the gradients, then the same SGD step."""
        f = self.models[j].train()
        n = min(math.ceil(len(X) / (self.chunk or len(X))), max(len(X) // self.ranks.world, 1))  # alike on all ranks
        part = rank_slice(len(X), self.ranks)
        X_r, Y_r = X[part], Y[part]
        self.opts[j].zero_grad(set_to_none=True)
        for c in range(n):
            x, y = X_r[c::n].detach(), Y_r[c::n].detach()
            with models.autocast(self.device):
                loss = models.mse(f(models.to_channels_last(x, self.device)), y)
            (loss * (len(x) / len(X)) if len(x) < len(X) else loss).backward()  # the mean over all K m views
        all_reduce_flat([p.grad for p in f.parameters() if p.grad is not None], self.ranks)
        self.opts[j].step()
        self.ages[j] += 1
        if self.ages[j] >= self.mp["inner_loop_steps_Z"]:
            self.reset(j)

    def stagger(self, X, Y, rng):
        """Model j starts at a random age in [0, Z), pre-trained that many steps on the initial set (~L Z / 2 steps)."""
        ages = [rng.randrange(self.mp["inner_loop_steps_Z"]) for _ in self.models]
        with tqdm(total=sum(ages), desc="stagger pool", leave=False, dynamic_ncols=True,
                  disable=not self.ranks.main) as bar:
            for j, age in enumerate(ages):
                for _ in range(age):
                    self.inner_step(j, X, Y)
                    bar.update(1)

    def state_dict(self):
        return {"models": [f.state_dict() for f in self.models], "opts": [o.state_dict() for o in self.opts],
                "ages": list(self.ages)}

    def load_state_dict(self, s):
        for j, (fs, os_) in enumerate(zip(s["models"], s["opts"])):
            self.reset(j)
            self.models[j].load_state_dict(fs, strict=True)
            self.opts[j].load_state_dict(os_)
        self.ages = list(s["ages"])


def cholesky_solve(L, Y):
    """(L L^T)^-1 Y by two triangular solves (cuBLAS trsm on CUDA, whatever the preferred linalg backend)."""
    return torch.linalg.solve_triangular(L.T, torch.linalg.solve_triangular(L, Y, upper=False), upper=True)


class PositiveDefiniteSolve(torch.autograd.Function):
    """X = A^-1 Y for a symmetric positive-definite A by its Cholesky factor: gY = A^-1 gX, gA = -gY X^T at O(n^2 k)
    (through the factor would add O(n^3)). No host sync: a failed factorisation makes X NaN, which the loop's next
    finiteness check stops on. The backward runs in strict float32, as torch's linalg backwards do."""

    @staticmethod
    def forward(ctx, A, Y):
        L, info = torch.linalg.cholesky_ex(A)
        X = torch.where(info == 0, cholesky_solve(L, Y), torch.nan)
        ctx.save_for_backward(L, X)
        return X

    @staticmethod
    def backward(ctx, gX):
        L, X = ctx.saved_tensors
        with models.tf32(False):
            gY = cholesky_solve(L, gX)
            return -gY @ X.T, gY


def krr_predict(Phi_s, Phi_t, Y_s, ridge):
    """Yhat_t = K_ts (K_ss + ridge tr(K_ss) I)^-1 Y_s in float32 (float64 stays), features with a constant-1 column;
    the ridge keeps the matrix positive definite for PositiveDefiniteSolve."""
    dtype = torch.promote_types(Phi_s.dtype, torch.float32)
    Phi_s = torch.cat([Phi_s.to(dtype), Phi_s.new_ones(len(Phi_s), 1, dtype=dtype)], 1)
    Phi_t = torch.cat([Phi_t.to(dtype), Phi_t.new_ones(len(Phi_t), 1, dtype=dtype)], 1)
    K_ss = Phi_s @ Phi_s.T  # (m', m')
    K_ts = Phi_t @ Phi_s.T  # (b', m')
    lam = ridge * torch.trace(K_ss).detach()
    eye = torch.eye(len(K_ss), device=K_ss.device, dtype=dtype)
    return K_ts @ PositiveDefiniteSolve.apply(K_ss + lam * eye, Y_s.to(dtype))

# ------------------------------------------------------------------ the frozen model's KRR passes, chosen at setup


def frozen_blocks(f, fold_bn):
    """The eval-mode pool ConvNet f as one (conv W, conv b, BN scale, BN shift) per block; with `fold_bn` the BN is
    folded into the conv (W scale, b scale + shift): the same function, one pass fewer over the activations."""
    layers = list(f.features)
    blocks = []
    for conv, bn in zip(layers[0::4], layers[1::4]):
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        shift = bn.bias - bn.running_mean * scale
        if fold_bn:
            blocks.append((conv.weight * scale.view(-1, 1, 1, 1), conv.bias * scale + shift, None, None))
        else:
            blocks.append((conv.weight, conv.bias, scale, shift))
    return blocks


def blocks_embed(x, blocks):
    """ConvNet.embed from frozen_blocks' tensors: a pure function, so one torch.compile graph serves every model."""
    for W, b, scale, shift in blocks:
        x = F.conv2d(x, W, b, padding=1)
        if scale is not None:
            x = x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
        x = F.avg_pool2d(F.relu(x), 2)
    return x.flatten(1)


def feature_pass(dc, device):
    """f -> the frozen pool model f's KRR feature function, chosen once at setup: f.embed, or blocks_embed with
    distillation.fold_bn and/or compile_features (torch.compile, CUDA only), the levers that paid."""
    compiled = dc["compile_features"] and device.type == "cuda"
    if not (dc["fold_bn"] or compiled):
        return lambda f: f.embed
    embed = torch.compile(blocks_embed, dynamic=False) if compiled else blocks_embed
    return lambda f: functools.partial(embed, blocks=frozen_blocks(f, dc["fold_bn"]))


def support_features(embed, X_s, chunk, device):
    """Phi_s = embed(X_s) in one pass, or chunk by chunk with activation checkpointing: the same values and gradients
    (f is in eval mode), the memory of one chunk and no tensor near 2^31 elements."""
    if not chunk or chunk >= len(X_s):
        return embed(models.to_channels_last(X_s, device))
    return torch.cat([checkpoint(embed, models.to_channels_last(x, device), use_reentrant=False)
                      for x in X_s.split(chunk)])


def real_precision(dc):
    """The precision of the real views' no-grad forward: `distillation.real_features`, `same` = krr_features."""
    return dc["krr_features"] if dc["real_features"] == "same" else dc["real_features"]


def krr_forward(embed, X_s, Y_s, x_t, dc, ranks=models.Ranks()):
    """SPEC 4.4: the KRR prediction of the real views x_t from (X_s, Y_s) through `embed`, each pass in its precision
    key, the solve in float32; under torchrun each rank passes its part of the support views (rank_rows)."""
    device = Y_s.device
    with models.precision(device, real_precision(dc)), torch.no_grad():
        Phi_t = embed(models.to_channels_last(x_t, device))
    with models.precision(device, dc["krr_features"]):
        Phi_s = rank_rows(lambda X: support_features(embed, X, dc["support_chunk"], device), X_s, ranks)
    with models.tf32(False):
        return krr_predict(Phi_s, Phi_t, Y_s, dc["ridge"])


def real_batch(data, T, dc, rotations, gen, ranks=models.Ranks(), sharded=False):
    """`outer_batch_size` real images in all K views (or identity only) with targets from T; under torchrun this
    rank's rank_slice of the batch all ranks draw alike, or with `sharded` its own draw from its shard."""
    b = dc["outer_batch_size"]
    if sharded:
        part = rank_slice(b, ranks)
        idx = torch.randperm(len(data.train_x), generator=gen, device=gen.device)[:part.stop - part.start]
    else:
        idx = torch.randperm(len(data.train_x), generator=gen, device=gen.device)[:b][rank_slice(b, ranks)]
    idx = idx.to(data.train_x.device)  # without replacement, as KRR-ST's shuffled loader
    x = utils.normalize(data.train_x[idx], data.mean, data.std)
    if dc["real_views"] == "identity":
        return x, T[idx, 0]
    return all_views(x, rotations), T[idx].transpose(0, 1).flatten(0, 1)  # view-major, as all_views


def all_views(x, rotations):
    """(B, ...) -> (K*B, ...), view-major: [x, a_1(x), ..., a_{K-1}(x)]."""
    return torch.cat([x] + [utils.rotate(x, a) for a in rotations])


def make_optimizer(distilled, dc):
    """AdamW (weight decay 0) on the learned distilled tensors, each group at its rate (SPEC 4.5)."""
    return torch.optim.AdamW(distilled.param_groups(dc), weight_decay=0.0)


def outer_step(state, data, T, dc):
    """SPEC 4.2-7: the KRR loss of one random pool model on a real batch, an AdamW step of the set, the model's inner
    step. Under torchrun every rank passes its part and takes the same step (the rank_ helpers)."""
    x_t, y_t = real_batch(data, T, dc, state.distilled.rotations, state.real_gen or state.gen, state.ranks,
                          state.real_gen is not None)  # (b K, 3, H, W), (b K, d_y)
    X_s, Y_s = state.distilled()  # (K m, 3, H, W), (K m, d_y)
    j = state.rng.randrange(len(state.pool.models))
    f = state.pool.models[j].eval().requires_grad_(False)  # the outer gradient is for the distilled set only
    Yhat_t = krr_forward(state.embed_of(f), X_s, Y_s, x_t, dc, state.ranks)
    loss = models.mse(Yhat_t, y_t) * rank_share(dc["outer_batch_size"], state.ranks)
    state.opt.zero_grad(set_to_none=True)
    with models.tf32(dc["krr_features"] == "tf32"):
        loss.backward()
    f.requires_grad_(True)
    loss = rank_sum(loss.detach(), state.opt, state.ranks)
    state.opt.step()
    state.sched.step()
    state.pool.inner_step(j, X_s, Y_s)
    return loss

# ------------------------------------------------------------------ under torchrun: the step's parts and their sums
# A single-process reader can skip this: with one process rank_rows is f(X), rank_share 1 and rank_sum the loss.


def rank_slice(n, ranks, rank=None):
    """Rank r's contiguous part of n rows, as torch.tensor_split cuts them (the first n mod W parts one longer)."""
    r = ranks.rank if rank is None else rank
    base, extra = divmod(n, ranks.world)
    start = r * base + min(r, extra)
    return slice(start, start + base + (r < extra))


def all_reduce_flat(tensors, ranks):
    """Sum each tensor over the ranks in place with ONE all_reduce over a flat buffer; nothing in one process."""
    if ranks.world == 1 or not tensors:
        return tensors
    flat = torch.cat([t.reshape(-1) for t in tensors])
    torch.distributed.all_reduce(flat)
    for t, part in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.copy_(part.view_as(t))
    return tensors


def rank_rows(f, X, ranks):
    """f(X) of every row from f of this rank's part (rank_slice), padded and gathered by models.gather_rows, whose
    backward hands each rank its rows' summed gradient: every rank forms the same K_ss."""
    if ranks.world == 1:
        return f(X)
    parts = [rank_slice(len(X), ranks, r) for r in range(ranks.world)]
    longest = max(p.stop - p.start for p in parts)
    Phi = f(X[parts[ranks.rank]])
    Phi = torch.cat([Phi, Phi.new_zeros(longest - len(Phi), Phi.shape[1])])
    keep = torch.cat([torch.arange(r * longest, r * longest + p.stop - p.start, device=Phi.device)
                      for r, p in enumerate(parts)])
    return models.gather_rows(Phi)[keep]


def rank_share(n, ranks):
    """This rank's share of a mean over n images (or all their views), its rank_slice of them: 1 in one process."""
    part = rank_slice(n, ranks)
    return (part.stop - part.start) / n


def rank_sum(loss, opt, ranks):
    """The loss and every distilled gradient summed over the ranks by ONE all_reduce (each rank computed its share)."""
    if ranks.world == 1:
        return loss
    params = [p for g in opt.param_groups for p in g["params"]]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    loss = loss.reshape(1)
    all_reduce_flat(grads + [loss], ranks)
    for p, g in zip(params, grads):
        p.grad = g
    return loss[0]


# ============================================================================================
# SPEC 5: approximation networks
# ============================================================================================
def fit_approx_nets(C_y, C_yk, ac, seed):
    """One MLP per rotation k, c^y -> c^{y,k} - c^y (SPEC 5), net k seeded seed + k: (nets, relative errors). The
    nets are stacked (torch.func.stack_module_state) and fitted by one Adam on the summed loss, each net's own fit
    (Adam acts per element) in one loop; seeded in a forked random state, leaving the run's draws alone."""
    (m, V), K = C_y.shape, len(C_yk)
    with torch.random.fork_rng(devices=[C_y.device.index or 0] if C_y.device.type == "cuda" else []):
        nets = []
        for k in range(K):
            torch.manual_seed(seed + k)
            nets.append(models.ApproxMLP(V, ac["hidden"]).to(C_y.device))
    params, _ = torch.func.stack_module_state(nets)  # name -> (K, ...) leaf tensors
    W1, b1, W2, b2 = (params[f"{i}.{w}"] for i in (0, 2) for w in ("weight", "bias"))
    X, shift = C_y.expand(K, m, V), C_yk - C_y
    opt = torch.optim.Adam(params.values(), lr=ac["lr"])
    for _ in range(ac["steps"]):
        H = torch.baddbmm(b1[:, None], X, W1.transpose(1, 2)).relu()  # (K, m, hidden): each net's Linear, ReLU
        loss = (torch.baddbmm(b2[:, None], H, W2.transpose(1, 2)) - shift).square().mean((1, 2)).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        for k, net in enumerate(nets):
            net.load_state_dict({name: p[k] for name, p in params.items()})
        errors = [((net(C_y) - s).norm() / s.norm().clamp_min(1e-12)).item() for net, s in zip(nets, shift)]
    return [net.eval() for net in nets], errors


def save_set(folder, distilled, base, cfg, data, recovery):
    """One set in `folder` (utils.save_distilled): `base` + its tensors, its approximation nets, controls and image
    grid; the nets' relative errors. `recovery` = (argv, checkpoint, its step), for a diverged fit's hint."""
    asset = {**base, **{k: v.cpu() if torch.is_tensor(v) else v for k, v in distilled.export().items()}}
    # Not part of the distilled set (nor of its budget): what main_evaluate's control rows need.
    controls = {"init_indices": distilled.init_indices, "teacher_hash": base["teacher_hash"], "run_id": base["run_id"]}
    nets, approx_errors = {}, {}
    if base["method"] == "ours" and distilled.rotations:
        C_y, C_yk = distilled.C_y.detach(), distilled.C_yk.detach()
        controls["C_y_aug"] = C_yk.cpu()  # the learned C_y^k: the distilled_exact row
        if cfg["storage"]["store_augmented_targets"]:
            asset["C_y_aug"] = C_yk.cpu()
        else:
            fitted, errors = fit_approx_nets(C_y, C_yk, cfg["approximation"], cfg["seed"])
            if not all(math.isfinite(e) for e in errors):  # the set itself is finite: only the nets are refit
                argv, checkpoint, saved = recovery
                raise utils.non_finite_stop(f"approximation nets for {folder} (relative errors {errors})",
                                            "main_distill.py", argv, "approximation.lr", cfg["approximation"]["lr"],
                                            checkpoint, saved)
            for angle, net, err in zip(distilled.rotations, fitted, errors):
                nets[angle] = (net, err)
                # the no-shift baseline predicts c^{y,k} = c^y: relative error 1 by definition
                approx_errors[f"rot_{angle}"] = {"relative_error": err, "no_shift_baseline": 1.0}
                print(f"approximation net rot {angle}: relative error {err:.4f} (no-shift baseline 1.0000)")
    utils.save_distilled(folder, asset, controls, nets)
    with torch.no_grad():
        save_grid(distilled.images(), data.mean, data.std, folder / "distilled_images.png")
    return approx_errors


def save_snapshot(state, job, saved):
    """The set at one of distillation.snapshot_steps in <run>/snapshots/step_<n>/, as the final set's files
    (main_evaluate --assets reads it); `saved`: the last checkpoint's step, for the recovery hint."""
    folder = job.run.folder / "snapshots" / f"step_{state.step}"
    folder.mkdir(parents=True, exist_ok=True)
    save_set(folder, state.distilled, {**job.base, "steps": state.step, "schedule": state.schedule}, job.cfg, job.data,
             (job.argv, job.run.checkpoint, saved))


def save_grid(images, mean, std, path, max_images=100, min_side=64):
    """The first images, de-normalised, in a square grid, each upscaled (nearest) to at least `min_side` pixels."""
    from torchvision.utils import save_image
    x = images[:max_images].detach().float().cpu() * std.view(1, -1, 1, 1).cpu() + mean.view(1, -1, 1, 1).cpu()
    scale = max(1, math.ceil(min_side / x.shape[-1]))
    x = torch.nn.functional.interpolate(x, scale_factor=scale, mode="nearest")
    save_image(x.clamp(0, 1), path, nrow=int(math.ceil(math.sqrt(len(x)))), padding=2)


# ============================================================================================
# main: arguments -> config -> checks -> run folder -> teacher targets -> set, pool -> loop -> assets
# ============================================================================================
@dataclass
class State:
    """What an outer step changes and a checkpoint keeps: the set, its optimizer and schedule, the pool, the
    random states, the step and loss curve, and the schedule's history (a resume that changes steps or rates)."""
    distilled: nn.Module
    opt: torch.optim.Optimizer
    sched: object
    pool: ModelPool
    gen: torch.Generator
    rng: random.Random
    run_id: str
    step: int = 0
    curve: list = field(default_factory=list)
    schedule: list = field(default_factory=list)
    scales: torch.Tensor = None  # each parameter group's largest |value| at the last finite check (check_finite)
    scales_start: torch.Tensor = None  # ... at the run's first step (kept in the checkpoint: resumes compare with it)
    scales_saved: torch.Tensor = None  # ... at the last checkpoint
    ranks: models.Ranks = models.Ranks()  # torchrun's processes: every rank holds all of the above alike
    real_gen: torch.Generator = None  # data.shard under torchrun: this rank's generator of its real batch
    embed_of: object = None  # f -> the KRR passes' feature function of pool model f (feature_pass, not saved)

    def checkpoint(self, cfg, inputs):
        """Every rank calls it (under data.shard it gathers each rank's batch generator); rank 0 writes it."""
        real = models.gather_objects(utils.rng_state(self.real_gen), self.ranks) if self.real_gen else None
        return {"distilled": self.distilled.state_dict(), "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(), "pool": self.pool.state_dict(), "rng": utils.rng_state(self.gen),
                "py_rng": self.rng.getstate(), "step": self.step, "curve": self.curve, "schedule": self.schedule,
                "config": cfg, "inputs": inputs, "run_id": self.run_id, "processes": self.ranks.world,
                "real_rng": real, "scales_start": self.scales_start}


@dataclass
class Job:
    """What a run works from besides its State: config, data, targets T, run folder, log, the command line (recovery
    hints) and what every set file carries (`base`, set by describe)."""
    cfg: dict
    data: object
    T: torch.Tensor
    target_scale: float
    inputs: dict
    run: utils.RunFolder
    argv: list
    log: object = None
    base: dict = None


def configure(argv):
    """(args, config, ranks, device, the run folder, the teacher file). Under torchrun rank 0 alone prints."""
    args, overrides = parse_args(argv)
    cfg = utils.load_config(args.config, overrides)
    name = utils.config_name(args.config)
    out = Path(args.out) if args.out else utils.distilled_folder(cfg, name)
    run = utils.RunFolder(out, "main_distill.py", outputs=(out / "distilled_data.pth", out / "checkpoint.pth",
                                                           out / "snapshots"), checkpoint=out / "checkpoint.pth")
    teacher_file = Path(args.teacher) if args.teacher else utils.teacher_path(name)
    ranks, device = utils.init_ranks(args.device, cfg["distributed_timeout_s"])
    if not ranks.main:
        sys.stdout = open(os.devnull, "w")  # one copy of every line (errors still reach stderr)
    return args, cfg, ranks, device, run, teacher_file


def rotations_of(cfg):
    return [] if cfg["distillation"]["method"] == "krr_st" else cfg["augmentations"]["rotate"]


def load_checked(args, cfg, run, table, teacher_file, device, ranks=models.Ranks()):
    """Everything that can refuse the run, before its folder is claimed: folder, data sizes, teacher, checkpoint."""
    if ranks.main:
        run.check(args.resume, args.overwrite)
    data = utils.load_data(cfg)
    utils.check_sizes(cfg, len(data.train_x), table["m"])
    data = data.to(device)
    teacher, _ = utils.load_teacher(teacher_file, cfg, device, data)
    inputs = {"teacher_hash": utils.file_hash(teacher_file), "train_hash": data.fingerprint}
    ckpt = utils.load_checkpoint(run.checkpoint, cfg, inputs, args.allow_changed) if args.resume else None
    if ckpt:
        check_processes(ckpt, cfg, ranks, run.checkpoint)
    if cfg["distillation"]["outer_batch_size"] < ranks.world:
        raise utils.ConfigError(f"distillation.outer_batch_size = {cfg['distillation']['outer_batch_size']}: each of "
                                f"the {ranks.world} torchrun processes needs at least one real image; raise it")
    return data, teacher, inputs, ckpt


def sharded(cfg, ranks):
    """data.shard takes effect under torchrun only (one process holds the whole set)."""
    return cfg["data"]["shard"] and ranks.world > 1


def check_processes(ckpt, cfg, ranks, path):
    """Another process count continues a run without data.shard (every rank draws alike); a sharded run's per-rank
    draws continue only with as many ranks."""
    wrote, real = ckpt.get("processes", 1), ckpt.get("real_rng")
    if sharded(cfg, ranks) and (real is None or len(real) != ranks.world) or (real and not sharded(cfg, ranks)):
        how = f"torchrun --nproc_per_node={wrote}" if wrote > 1 else "plain python (one process)"
        raise utils.InputError(
            f"--resume: {path} was written by {wrote} process(es) {'with' if real else 'without'} per-rank batch "
            f"generators (data.shard under torchrun), this run has {ranks.world} "
            f"{'with' if sharded(cfg, ranks) else 'without'}: each rank of a sharded run draws its real batch from its "
            f"own 1/W of the train set, so its draws continue only with as many ranks; resume with {how}")


def keep_shard(cfg, data, T, ranks):
    """data.shard: this rank keeps its models.shard of the images and targets, once the set is built from them all."""
    if not sharded(cfg, ranks):
        return data, T
    ranks.say(f"data.shard: each of the {ranks.world} ranks keeps {len(data.train_x) // ranks.world} of the "
              f"{len(data.train_x)} train images and their targets")
    return dataclasses.replace(data, train_x=models.shard(data.train_x, ranks).clone()), models.shard(T, ranks).clone()


def build(cfg, data, T, m, device, gen, rng, ranks=models.Ranks()):
    """SPEC 2 and 4: the set at its m starting images, AdamW with the linear decay to 0, the model pool (alike on
    every rank; with data.shard each rank's own real-batch generator)."""
    dc = cfg["distillation"]
    distilled = init_distilled(cfg, data, T, m, gen).to(device)
    opt = make_optimizer(distilled, dc)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / dc["steps"]))
    pool = ModelPool(cfg["model_pool"], data.train_x.shape[-1], T.shape[-1], device, dc["support_chunk"], ranks)
    real_gen = models.make_generator(device, cfg["seed"] + 1 + ranks.rank) if sharded(cfg, ranks) else None
    run_id = models.gather_objects(utils.new_run_id(), ranks)[0]  # rank 0's
    return State(distilled, opt, sched, pool, gen, rng, run_id, ranks=ranks, real_gen=real_gen,
                 schedule=[{"from_step": 0, "steps": dc["steps"], **rates(opt)}], embed_of=feature_pass(dc, device))


def rates(opt):
    """{config key: base learning rate} of each parameter group."""
    return {f"distillation.{g['key']}": g["initial_lr"] for g in opt.param_groups}


def restore(state, ckpt, cfg, path):
    """The checkpoint's state, at the config's rates and steps (--allow-changed): lr = base (1 - step / steps) from
    the resumed step, a change appended to the schedule's history."""
    state.distilled.load_state_dict(ckpt["distilled"], strict=True)
    bases = [g["initial_lr"] for g in state.opt.param_groups]  # this config's rates
    state.opt.load_state_dict(ckpt["optimizer"])
    state.sched.load_state_dict(ckpt["scheduler"])
    state.sched.base_lrs = bases
    for g, base, lam in zip(state.opt.param_groups, bases, state.sched.lr_lambdas):
        g["initial_lr"], g["lr"] = base, base * lam(ckpt["step"])
    state.pool.load_state_dict(ckpt["pool"])
    utils.set_rng_state(ckpt["rng"], state.gen, path)
    if state.real_gen is not None:  # check_processes: one per rank
        utils.set_rng_state(ckpt["real_rng"][state.ranks.rank], state.real_gen, path)
    state.rng.setstate(ckpt["py_rng"])
    state.step, state.curve, state.run_id = ckpt["step"], ckpt["curve"], ckpt["run_id"]
    state.schedule, state.scales_start = ckpt["schedule"], ckpt.get("scales_start")
    now = {"from_step": state.step, "steps": cfg["distillation"]["steps"], **rates(state.opt)}
    if {k: v for k, v in now.items() if k != "from_step"} != {k: v for k, v in state.schedule[-1].items()
                                                               if k != "from_step"}:
        state.schedule.append(now)
        print(f"resume: the schedule changed at step {state.step} (was {state.schedule[-2]}, now {now}): each rate "
              f"is base x (1 - step / {now['steps']}) from here")
    print(f"resumed run {state.run_id} from {path} at step {state.step}"
          + (f" (written by {ckpt.get('processes', 1)} process(es), continued by {state.ranks.world}: the same state "
             f"and draws)" if ckpt.get("processes", 1) != state.ranks.world else ""))


def describe(job, table, state, args, device):
    """Print the resolved config and the storage table, write config.json; job.base: what every set file carries."""
    cfg, data = job.cfg, job.data
    derived = {"device": str(device), "m": table["m"], "K": 1 + len(rotations_of(cfg)), "out": str(job.run.folder),
               "run_id": state.run_id, "inputs": job.inputs, "target_scale": job.target_scale,
               "allow_changed": args.allow_changed, "processes": state.ranks.world, "shard": sharded(cfg, state.ranks)}
    utils.print_config(cfg, derived)
    print_storage(table)
    if state.ranks.main:
        utils.write_json({"config": cfg, "derived": derived, "storage": table}, job.run.folder / "config.json")
    job.base = {"method": cfg["distillation"]["method"], "dataset": cfg["dataset"], "m": table["m"],
                "resolution": data.train_x.shape[-1], "mean": data.mean.cpu(), "std": data.std.cpu(), "storage": table,
                "config": cfg, "teacher_hash": job.inputs["teacher_hash"], "train_hash": job.inputs["train_hash"],
                "run_id": state.run_id, "target_scale": job.target_scale,
                "store_augmented_targets": cfg["storage"]["store_augmented_targets"]}


def print_storage(table):
    print(f"storage budget: N={table['budget_N']} images x {table['floats_per_image']:,} floats = {table['budget']:,}")
    for k, v in table["rows"].items():
        print(f"  {k:<34s}{v:>12,}")
    print(f"  {'stored':<34s}{table['stored']:>12,}  ({100 * table['stored'] / table['budget']:.2f}% of budget)")
    print(f"  m = {table['m']} distilled images (largest within budget: {table['m_max']})")


def group_scales(opt):
    """The largest |value| of each parameter group (a device tensor: read it back with the finite check)."""
    return torch.stack([torch.stack([p.detach().abs().max() for p in g["params"] if p.numel()]).max()
                        for g in opt.param_groups])  # (C_y^k is empty without rotations)


SOUND_GROWTH = 10.0  # a checkpoint with a group grown past this x its start is diverging already (DIGITS: 1.04x)


def check_finite(state, losses, argv, run, saved):
    """The outer losses since the last check and the set finite (one host sync); else stop naming the group that had
    grown the most by the last check, the command lowering its rate from the last sound checkpoint (SOUND_GROWTH)."""
    scales = group_scales(state.opt)
    if utils.all_finite(losses + [scales]):  # the check's host sync
        state.scales = scales.cpu()
        return
    growth, grown = (s / state.scales_start.clamp_min(1e-12) for s in (state.scales, state.scales_saved))
    group = state.opt.param_groups[int(growth.argmax())]
    sound = grown.max() <= SOUND_GROWTH
    raise utils.non_finite_stop(f"outer loss or distilled tensors by step {state.step} (the group of "
                                f"distillation.{group['key']} grew the most, {growth.max():.3g}x, by the last check"
                                + ("" if sound else f"; at step {saved} a group had grown {grown.max():.3g}x "
                                   f"already, past {SOUND_GROWTH:g}x: that checkpoint is not resumed") + ")",
                                "main_distill.py", argv, f"distillation.{group['key']}", group["initial_lr"],
                                run.checkpoint if sound else None, f"step {saved}")


def ranks_hash(tensors):
    """Per tensor the wrapping sums of its 32-bit words and of words x position: any changed bit changes them."""
    out = []
    for t in tensors:
        w = t.detach().float().contiguous().view(-1).view(torch.int32).long()
        out += [w.sum(), (w * torch.arange(1, len(w) + 1, device=w.device)).sum()]
    return torch.stack(out).cpu()


def check_ranks_agree(state):
    """Under torchrun, at each log step: a rank whose set or pool (ranks_hash) differs from rank 0's stops the run."""
    if state.ranks.world == 1:
        return
    tensors = list(state.distilled.parameters()) + [p for f in state.pool.models for p in f.parameters()]
    hashes = models.gather_objects((ranks_hash(tensors), list(state.pool.ages)), state.ranks)
    differ = [r for r, (h, ages) in enumerate(hashes) if not torch.equal(h, hashes[0][0]) or ages != hashes[0][1]]
    if differ:
        raise utils.RunStopped(f"the ranks diverged by step {state.step}: rank(s) {differ} hold other distilled "
                               f"tensors or pool than rank 0 (a non-deterministic kernel, or a rank that skipped a "
                               f"collective); nothing of it was saved. Continue from the last checkpoint with "
                               f"--resume, or run with one process")


def distill(state, job):
    """SPEC 4: outer steps until distillation.steps; values checked finite at each log line, checkpoint and snapshot."""
    dc, run, argv = job.cfg["distillation"], job.run, job.argv
    state.scales = state.scales_saved = group_scales(state.opt).cpu()
    state.scales_start = state.scales if state.scales_start is None else state.scales_start
    bar = tqdm(total=dc["steps"], initial=state.step, desc="distill", dynamic_ncols=True, disable=not state.ranks.main)
    window, unchecked, t_log, s_log, saved = [], [], time.time(), state.step, state.step
    while state.step < dc["steps"]:
        utils.RUN["at"] = f"outer step {state.step + 1}"
        loss = outer_step(state, job.data, job.T, dc)
        state.step += 1
        window.append(loss)
        unchecked.append(loss)
        bar.update(1)
        if state.step % dc["log_every"] == 0 or state.step == dc["steps"] or state.step == 1:
            check_finite(state, unchecked, argv, run, saved)
            check_ranks_agree(state)
            mean_loss, unchecked = torch.stack(window).mean().item(), []
            rate = (state.step - s_log) / (time.time() - t_log)
            state.curve.append((state.step, mean_loss))
            job.log(step=state.step, loss=mean_loss, lr_image=state.opt.param_groups[0]["lr"], steps_per_s=rate)
            bar.set_postfix(loss=f"{mean_loss:.4f}", steps_per_s=f"{rate:.1f}")
            window, t_log, s_log = [], time.time(), state.step
        if state.step % dc["save_every"] == 0 or state.step == dc["steps"]:
            check_finite(state, unchecked, argv, run, saved)
            unchecked, saved, state.scales_saved = [], state.step, state.scales
            ckpt = state.checkpoint(job.cfg, job.inputs)
            if state.ranks.main:
                utils.atomic_save(ckpt, run.checkpoint)
        if state.step in dc["snapshot_steps"] and state.step < dc["steps"] and state.ranks.main:  # final: by main
            check_finite(state, unchecked, argv, run, saved)
            save_snapshot(state, job, f"step {saved}")
    bar.close()


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)  # the command line, for the recovery hint
    args, cfg, ranks, device, run, teacher_file = configure(argv)
    utils.set_seed(cfg["seed"])
    gen, rng = models.make_generator(device, cfg["seed"]), random.Random(cfg["seed"])
    table = storage_accounting(cfg)
    data, teacher, inputs, ckpt = load_checked(args, cfg, run, table, teacher_file, device, ranks)

    # ---------------------------------------------------------------- run folder, teacher targets T (N, K, d_y)
    lock = run.claim(args.resume, args.overwrite) if ranks.main else None  # rank 0 alone writes
    models.barrier(ranks)
    t0 = time.time()
    with models.rank0_first(ranks):  # rank 0 computes and caches them, the others read the cache
        T, target_scale = utils.teacher_targets(teacher, teacher_file, data, rotations_of(cfg), cfg["data"],
                                                run.folder, inputs["teacher_hash"])
    print(f"teacher targets {tuple(T.shape)} ready in {time.time() - t0:.1f}s, scaled by {target_scale:.4g} to "
          f"root-mean-square {cfg['data']['target_rms']} (mean norm {T[:, 0].norm(dim=1).mean().item():.3g})")
    del teacher

    # ---------------------------------------------------------------- distilled set, optimizer, pool, resume
    state = build(cfg, data, T, table["m"], device, gen, rng, ranks)
    data, T = keep_shard(cfg, data, T, ranks)  # under data.shard the whole split is let go here
    job = Job(cfg, data, T, target_scale, inputs, run, argv)
    if ckpt:
        restore(state, ckpt, cfg, run.checkpoint)
    job.log = utils.RunLog(run.folder / "log.jsonl", resume_at=("step", state.step) if args.resume else None) \
        if ranks.main else (lambda **row: row)
    describe(job, table, state, args, device)
    if not args.resume:
        # the set before any outer step (main_evaluate's init_only row): what the bilevel loop adds is the difference
        if ranks.main:
            save_set(run.folder / utils.INIT_ONLY, state.distilled, {**job.base, "steps": 0, "schedule": []}, cfg,
                     data, (argv, None, None))
        t0 = time.time()
        state.pool.stagger(*state.distilled(), state.rng)
        print(f"model pool staggered (ages {state.pool.ages}) in {time.time() - t0:.1f}s")

    # ---------------------------------------------------------------- the bilevel loop, then the assets
    distill(state, job)
    if not ranks.main:  # rank 0 writes the assets
        return None
    approx_errors = save_set(run.folder, state.distilled, {**job.base, "steps": state.step, "schedule": state.schedule},
                             cfg, data, (argv, run.checkpoint, f"step {state.step}"))
    c = state.curve
    metrics = {"steps": state.step, "loss_curve": c, "loss_first": c[0][1] if c else None,
               "loss_last": c[-1][1] if c else None, "storage": table, "approximation": approx_errors,
               "schedule": state.schedule, "out": str(run.folder), "run_id": state.run_id, "target_scale": target_scale}
    utils.write_json(metrics, run.folder / "metrics.json")
    utils.release_run_folder(lock)
    print(f"distilled set written to {run.folder} (m={table['m']}, {state.step} steps)")
    return metrics


if __name__ == "__main__":
    utils.cli(main, "main_distill.py")
