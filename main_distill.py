"""PCA-parameterized bilevel distillation with predefined rotations and approximation MLPs (SPEC 2-5).

    python main_distill.py --config configs/cifar10.yaml
    python main_distill.py --config configs/cifar10.yaml --distillation.method=krr_st   # KRR-ST baseline
    python main_distill.py --config configs/cifar10.yaml --resume
    python main_distill.py --config configs/digits.yaml --distillation.steps=50 --out /tmp/run

Needs the teacher from pretrain.py. Writes distilled_assets/<config name>_N<budget>[_krr_st]/ (or --out), the
config name being its file stem (cifar10, cifar10_cpu):
    distilled_data.pth        bases, means, coefficients, normalisation, rotations, storage table,
                              resolved config, teacher hash, step count (decode: utils.load_distilled)
    approx_net_rot_<a>.pth    one MLP per rotation a (SPEC 5)
    controls.pth              not stored data: the indices of the m real images the set started from and
                              the learned C_y^k, for main_evaluate's real_init and distilled_exact rows
    distilled_images.png      the decoded images, de-normalised
    config.json, log.jsonl, metrics.json (loss curve, storage, approximation errors), checkpoint.pth
"""
import math
import os
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
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
    args, rest = p.parse_known_args(argv)
    return args, utils.parse_overrides(rest)


# ============================================================================================
# SPEC 2: the distilled set, parameterized (ours) or free (KRR-ST)
# ============================================================================================
class PCADistilled(nn.Module):
    """x_i = up(mu_x + c_i^x B_x), y_i = mu_y + c_i^y B_y, y_i^k = mu_y + c_i^{y,k} B_y; views view-major."""

    def __init__(self, mu_x, B_x, C_x, mu_y, B_y, C_y, C_yk, rotations, resolution, learn_bases):
        super().__init__()
        self.register_buffer("mu_x", mu_x)
        self.register_buffer("mu_y", mu_y)
        self.B_x = nn.Parameter(B_x, requires_grad=learn_bases)
        self.B_y = nn.Parameter(B_y, requires_grad=learn_bases)
        self.C_x, self.C_y, self.C_yk = nn.Parameter(C_x), nn.Parameter(C_y), nn.Parameter(C_yk)  # C_yk: (K-1, m, V)
        self.rotations, self.resolution = list(rotations), resolution

    def images(self):
        return utils.decode_images(self.C_x, self.B_x, self.mu_x, self.resolution)

    def forward(self):
        """(K*m, 3, H, W) views and their (K*m, d_y) targets."""
        X = self.images()
        Y = utils.decode_targets(torch.cat([self.C_y[None], self.C_yk]).flatten(0, 1), self.B_y, self.mu_y)
        return utils.all_views(X, self.rotations), Y

    def param_groups(self, dc):
        """Coefficients and bases get their own rates: a B_x step moves every image at once (SPEC 4.5)."""
        groups = [([self.C_x], dc["lr_image"]), ([self.B_x], dc["lr_image_bases"]),
                  ([self.C_y, self.C_yk], dc["lr_repr"]), ([self.B_y], dc["lr_repr_bases"])]
        return [{"params": ps, "lr": lr} for ps, lr in groups if all(p.requires_grad for p in ps)]

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
        return [{"params": [self.X], "lr": dc["krr_st_lr_pixels"]}, {"params": [self.Y], "lr": dc["krr_st_lr_targets"]}]

    def export(self):
        return {"X": self.X.detach(), "Y": self.Y.detach(), "rotations": []}


@torch.no_grad()
def select_init(features, m, how, gen):
    """Indices of the m distinct real train images the set starts from (`distillation.init`): `random` (SPEC 2),
    or spread over the teacher's feature space: `kmeans` (the image nearest each of m k-means centroids) or
    `herding` (greedy: each pick moves the running mean of the picks closest to the mean of all features)."""
    n = len(features)
    if how == "random":
        return torch.randperm(n, generator=gen, device=gen.device)[:m].to(features.device)
    X = features.double()
    if how == "herding":
        chosen, total, mu = [], torch.zeros_like(X[0]), X.mean(0)
        free = torch.ones(n, dtype=torch.bool, device=X.device)
        for t in range(1, m + 1):  # the next pick minimises ||mu - (total + x) / t|| over the free images
            score = ((t * mu - total)[None] - X).square().sum(1).masked_fill(~free, float("inf"))
            i = int(score.argmin())
            chosen.append(i)
            free[i] = False
            total += X[i]
        return torch.tensor(chosen, device=features.device)
    return kmeans_medoids(X, m, gen).to(features.device)


def kmeans_medoids(X, m, gen):
    """k-means++ seeding (drawn from `gen`), Lloyd's iterations until no assignment changes, then for each
    centroid the nearest image not already taken: m distinct indices."""
    n = len(X)
    centers = X[torch.randint(n, (1,), generator=gen, device=gen.device).to(X.device)]
    d2 = torch.cdist(X, centers).square().min(1).values
    for _ in range(m - 1):
        pick = torch.multinomial((d2 / d2.sum()).float().to(gen.device), 1, generator=gen).to(X.device)
        centers = torch.cat([centers, X[pick]])
        d2 = torch.minimum(d2, (X - X[pick]).square().sum(1))
    assign = None
    for _ in range(10 * n):  # Lloyd's iterations never cycle; the bound only guards against float ties
        new = torch.cdist(X, centers).argmin(1)
        if assign is not None and torch.equal(new, assign):
            break
        assign = new
        counts = torch.bincount(assign, minlength=m)[:, None]
        sums = torch.zeros_like(centers).index_add_(0, assign, X)
        centers = torch.where(counts > 0, sums / counts.clamp_min(1), centers)  # an empty cluster keeps its centre
    dist = torch.cdist(centers, X)
    taken = torch.zeros(n, dtype=torch.bool, device=X.device)
    chosen = []
    for c in dist.min(1).values.argsort().tolist():  # the tightest centroids choose first
        i = int(dist[c].masked_fill(taken, float("inf")).argmin())
        chosen.append(i)
        taken[i] = True
    return torch.tensor(chosen)


@torch.no_grad()
def init_distilled(cfg, data, T, m, gen):
    """Start from m real train images (`distillation.init`): their PCA coefficients / pixels and teacher targets."""
    idx = select_init(T[:, 0], m, cfg["distillation"]["init"], gen).to(data.train_x.device)
    if cfg["distillation"]["method"] == "krr_st":
        distilled = FreeDistilled(utils.normalize(data.train_x[idx], data.mean, data.std), T[idx, 0].clone())
    else:
        distilled = pca_distilled(cfg, data, T, idx)
    distilled.init_indices = idx.cpu()  # the real images it starts from: main_evaluate's real_init row
    return distilled


def pca_distilled(cfg, data, T, idx):
    """SPEC 2: PCA bases of the train images and teacher targets; coefficients of the real images idx."""
    P, bs = cfg["parameterization"], cfg["data"]["eval_batch_size"]
    X_low = torch.cat([utils.downsample(utils.normalize(x, data.mean, data.std), P["image_basis_size"])
                       for x in data.train_x.split(bs)])  # (N_train, 3 r_b^2)
    mu_x, B_x = utils.pca(X_low, P["U"])
    mu_y, B_y = utils.pca(T[:, 0], P["V"])
    C_x = (X_low[idx] - mu_x) @ B_x.T
    C_y = (T[idx, 0] - mu_y) @ B_y.T
    C_yk = (T[idx, 1:] - mu_y).transpose(0, 1) @ B_y.T  # (K-1, m, V)
    return PCADistilled(mu_x, B_x, C_x, mu_y, B_y, C_y, C_yk, cfg["augmentations"]["rotate"],
                        data.train_x.shape[-1], P["learn_bases"])


# ============================================================================================
# SPEC 4: the model pool and one outer step
# ============================================================================================
class ModelPool:
    """L ConvNets, each with its own SGD state and age; a model is re-initialised at age Z.
    `chunk` (distillation.support_chunk): views per forward pass of the inner step, 0 = all at once."""

    def __init__(self, mp, resolution, d_y, device, chunk=0):
        self.mp, self.resolution, self.d_y, self.device, self.chunk = mp, resolution, d_y, device, chunk
        self.models, self.opts, self.ages = [None] * mp["size_L"], [None] * mp["size_L"], [0] * mp["size_L"]
        for j in range(mp["size_L"]):
            self.reset(j)

    def reset(self, j):
        f = utils.channels_last_module(models.ConvNet(self.mp["widths"], self.resolution, self.d_y).to(self.device),
                                       self.device)
        self.models[j] = f
        self.opts[j] = torch.optim.SGD(f.parameters(), lr=self.mp["lr"], momentum=self.mp["momentum"],
                                       weight_decay=self.mp["weight_decay"])
        self.ages[j] = 0

    def inner_step(self, j, X, Y):
        """One SGD step of model j on MSE(f(X_s), Y_s), train mode, X_s and Y_s detached (SPEC 4.6-7).
        With a chunk size, gradients accumulate over strided chunks (each holds every view alike), and
        BatchNorm normalises each chunk by its own statistics."""
        f, n = self.models[j].train(), math.ceil(len(X) / (self.chunk or len(X)))
        self.opts[j].zero_grad(set_to_none=True)
        for c in range(n):
            x, y = X[c::n].detach(), Y[c::n].detach()
            with utils.autocast(self.device):
                loss = models.mse(f(utils.to_channels_last(x, self.device)), y)
            (loss * (len(x) / len(X)) if n > 1 else loss).backward()  # the mean over all K m views
        self.opts[j].step()
        self.ages[j] += 1
        if self.ages[j] >= self.mp["inner_loop_steps_Z"]:
            self.reset(j)

    def stagger(self, X, Y, rng):
        """Model j starts at a random age in [0, Z), pre-trained that many steps on the initial set
        (about L x Z / 2 inner steps before the first outer step: shrink model_pool.size_L or Z to shorten it)."""
        ages = [rng.randrange(self.mp["inner_loop_steps_Z"]) for _ in self.models]
        with tqdm(total=sum(ages), desc="stagger pool", leave=False, dynamic_ncols=True) as bar:
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


def krr_predict(Phi_s, Phi_t, Y_s, ridge):
    """Yhat_t = K_ts (K_ss + ridge tr(K_ss) I)^-1 Y_s in float32 (float64 features stay float64), features
    with a constant-1 column."""
    dtype = torch.promote_types(Phi_s.dtype, torch.float32)
    Phi_s = torch.cat([Phi_s.to(dtype), Phi_s.new_ones(len(Phi_s), 1, dtype=dtype)], 1)
    Phi_t = torch.cat([Phi_t.to(dtype), Phi_t.new_ones(len(Phi_t), 1, dtype=dtype)], 1)
    K_ss = Phi_s @ Phi_s.T  # (m', m')
    K_ts = Phi_t @ Phi_s.T  # (b', m')
    lam = ridge * torch.trace(K_ss).detach()
    eye = torch.eye(len(K_ss), device=K_ss.device, dtype=dtype)
    # solve_ex: no host sync on CUDA to check for singularity (the ridge keeps K_ss + lam I positive
    # definite; a failed solve would surface as a non-finite loss at the next log step)
    return K_ts @ torch.linalg.solve_ex(K_ss + lam * eye, Y_s.to(dtype))[0]


def support_features(f, X_s, chunk, device):
    """Phi_s = f.embed(X_s) in one pass, or chunk by chunk with each chunk's activations recomputed in
    backward (activation checkpointing): the same values and gradients (f is in eval mode), the memory of
    one chunk, and no tensor near 2^31 elements (Stanford Dogs' 4 x 1,993 views at 64 px)."""
    if not chunk or chunk >= len(X_s):
        return f.embed(utils.to_channels_last(X_s, device))
    return torch.cat([checkpoint(f.embed, utils.to_channels_last(x, device), use_reentrant=False)
                      for x in X_s.split(chunk)])


def krr_forward(f, X_s, Y_s, x_t, dc, device, numerics=utils.precision):
    """(KRR prediction of the real views x_t from the support set, support features): the features in
    `distillation.krr_features` (`numerics(device, name)` makes that precision's context), the kernels and the
    solve in float32. Its backward takes `utils.tf32(name == "tf32")`."""
    with numerics(device, dc["krr_features"]):
        with torch.no_grad():
            Phi_t = f.embed(utils.to_channels_last(x_t, device))
        Phi_s = support_features(f, X_s, dc["support_chunk"], device)
    with utils.tf32(False):
        return krr_predict(Phi_s, Phi_t, Y_s, dc["ridge"]), Phi_s


def real_batch(data, T, dc, rotations, gen):
    """`outer_batch_size` real images in all K views (or identity only) with targets from T."""
    idx = torch.randperm(len(data.train_x), generator=gen, device=gen.device)[:dc["outer_batch_size"]]
    idx = idx.to(data.train_x.device)  # without replacement, as KRR-ST's shuffled loader
    x = utils.normalize(data.train_x[idx], data.mean, data.std)
    if dc["real_views"] == "identity":
        return x, T[idx, 0]
    return utils.all_views(x, rotations), T[idx].transpose(0, 1).flatten(0, 1)  # view-major, as all_views


def outer_step(distilled, pool, data, T, dc, opt, sched, gen, rng):
    """SPEC 4.2-7: KRR loss of one random pool model on a real batch, AdamW step, then the inner step.
    The features and their backward run in `distillation.krr_features`; the kernels and the solve in float32."""
    dev = pool.device
    x_t, y_t = real_batch(data, T, dc, distilled.rotations, gen)
    X_s, Y_s = distilled()
    j = rng.randrange(len(pool.models))
    f = pool.models[j].eval().requires_grad_(False)  # the outer gradient is for the distilled set only
    loss = models.mse(krr_forward(f, X_s, Y_s, x_t, dc, dev)[0], y_t)
    opt.zero_grad(set_to_none=True)
    with utils.tf32(dc["krr_features"] == "tf32"):
        loss.backward()
    f.requires_grad_(True)
    opt.step()
    sched.step()
    pool.inner_step(j, X_s, Y_s)
    return loss.detach()


# ============================================================================================
# SPEC 5: approximation networks
# ============================================================================================
ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8  # torch.optim.Adam's defaults, which the nets were always fitted with


def fit_approx_nets(C_y, C_yk, ac, seed):
    """One MLP per rotation, full-batch Adam on (c^y -> c^{y,k} - c^y); relative errors ||err|| / ||shift||.
    Seeded per net inside a forked random state: fitting the init_only set's nets before the loop leaves the
    run's own random draws (pool re-initialisations) as they would be without it."""
    devices = [C_y.device.index or 0] if C_y.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        return _fit_approx_nets(C_y, C_yk, ac, seed)


def _fit_approx_nets(C_y, C_yk, ac, seed):
    """The K nets fitted together as one batched MLP: their weights stacked (net k initialised by seed + k, as
    when each was fitted alone) in one flat vector that one Adam update moves, forward and backward written out
    with batched matmuls. Each net's gradient is that of its own mean squared error, and Adam acts per element,
    so every net follows its separate fit (bit for bit on the CPU: tests/test_fast_eval.py) at a third of the
    steps' launches and none of autograd's or the optimizer's Python work."""
    (m, V), K = C_y.shape, len(C_yk)
    nets = []
    for k in range(K):
        torch.manual_seed(seed + k)
        nets.append(models.ApproxMLP(V, ac["hidden"]).to(C_y.device))
    layers = [[n[0].weight, n[0].bias, n[2].weight, n[2].bias] for n in nets]
    shapes = [(K, *p.shape) for p in layers[0]]
    theta = torch.cat([torch.stack(ps).detach().flatten() for ps in zip(*layers)])  # W1, b1, W2, b2 of every net
    grad, exp_avg, exp_avg_sq = torch.zeros_like(theta), torch.zeros_like(theta), torch.zeros_like(theta)
    view = lambda flat: [t.view(s) for t, s in zip(flat.split([math.prod(s) for s in shapes]), shapes)]
    (W1, b1, W2, b2), (dW1, db1, dW2, db2) = view(theta), view(grad)
    X, shift = C_y.expand(K, m, V), C_yk - C_y
    (beta1, beta2), lr = ADAM_BETAS, ac["lr"]
    for t in range(1, ac["steps"] + 1):
        Z = torch.baddbmm(b1[:, None], X, W1.transpose(1, 2))  # (K, m, hidden)
        H = Z.relu()
        d_out = (torch.baddbmm(b2[:, None], H, W2.transpose(1, 2)) - shift).mul_(2 / (m * V))  # d mse / d output
        torch.bmm(d_out.transpose(1, 2), H, out=dW2)
        torch.sum(d_out, 1, out=db2)
        d_Z = torch.bmm(d_out, W2).masked_fill_(Z <= 0, 0)
        torch.bmm(d_Z.transpose(1, 2), X, out=dW1)
        torch.sum(d_Z, 1, out=db1)
        # Adam, as torch.optim.Adam's single-tensor update computes it
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (exp_avg_sq.sqrt() / (1 - beta2 ** t) ** 0.5).add_(ADAM_EPS)
        theta.addcdiv_(exp_avg, denom, value=-(lr / (1 - beta1 ** t)))
    errors = []
    with torch.no_grad():
        for k, net in enumerate(nets):
            for p, fitted in zip(layers[k], (W1[k], b1[k], W2[k], b2[k])):
                p.copy_(fitted)
            errors.append(((net(C_y) - shift[k]).norm() / shift[k].norm().clamp_min(1e-12)).item())
    return [net.eval() for net in nets], errors


def save_set(folder, distilled, base, cfg, data):
    """One distilled set in `folder` (utils.save_distilled): `base` + the exported tensors, the approximation nets
    fitted to its C_y -> C_y^k (SPEC 5), the controls and the image grid. Returns the nets' relative errors."""
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
            if not all(math.isfinite(e) for e in errors):
                sys.exit(f"approximation nets for {folder} diverged (relative errors {errors}); the distilled set in "
                         f"its run folder's checkpoint.pth is kept: refit them with `--resume --allow-changed "
                         f"approximation.lr --approximation.lr=<lower>`")
            for angle, net, err in zip(distilled.rotations, fitted, errors):
                nets[angle] = (net, err)
                # the no-shift baseline predicts c^{y,k} = c^y: relative error 1 by definition
                approx_errors[f"rot_{angle}"] = {"relative_error": err, "no_shift_baseline": 1.0}
                print(f"approximation net rot {angle}: relative error {err:.4f} (no-shift baseline 1.0000)")
    utils.save_distilled(folder, asset, controls, nets)
    with torch.no_grad():
        save_grid(distilled.images(), data.mean, data.std, folder / "distilled_images.png")
    return approx_errors


def save_grid(images, mean, std, path, max_images=100, min_side=64):
    """The first images, de-normalised, in a square grid; each drawn at least `min_side` pixels wide (whole-pixel
    nearest upscaling), so a 16 px set is not a 170-pixel thumbnail."""
    from torchvision.utils import save_image
    x = images[:max_images].detach().float().cpu() * std.view(1, -1, 1, 1).cpu() + mean.view(1, -1, 1, 1).cpu()
    scale = max(1, math.ceil(min_side / x.shape[-1]))
    x = torch.nn.functional.interpolate(x, scale_factor=scale, mode="nearest")
    save_image(x.clamp(0, 1), path, nrow=int(math.ceil(math.sqrt(len(x)))), padding=2)


# ============================================================================================
# main: arguments -> config -> data -> teacher targets -> distilled set -> pool -> loop -> assets
# ============================================================================================
def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)  # the command line, for the recovery hint
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.exit("main_distill.py runs in one process: the bilevel loop is sequential (each outer step starts from "
                 "the last one's set and pool). Start it with `python main_distill.py ...`, not torchrun; "
                 "pretrain.py and main_evaluate.py take torchrun (README, Several GPUs).")
    args, overrides = parse_args(argv)
    cfg = utils.load_config(args.config, overrides)
    dc, mp = cfg["distillation"], cfg["model_pool"]
    if dc["method"] == "krr_st":  # the baseline: no rotations, no bases (SPEC 6.3)
        cfg["augmentations"]["rotate"] = []
    device = utils.get_device(args.device)
    utils.set_seed(cfg["seed"])
    gen, rng = utils.make_generator(device, cfg["seed"]), random.Random(cfg["seed"])
    name = utils.config_name(args.config)
    out = Path(args.out) if args.out else utils.distilled_folder(cfg, name)
    res = cfg["data"]["resolution"]
    table = utils.storage_accounting(cfg, res)
    rotations = cfg["augmentations"]["rotate"]
    teacher_file = Path(args.teacher) if args.teacher else utils.teacher_path(name)
    lock = utils.claim_run_folder(out, [out / "distilled_data.pth", out / "checkpoint.pth"], args.resume, args.overwrite,
                                  "main_distill.py")

    # ---------------------------------------------------------------- data, teacher targets T (N, K, d_y)
    data = utils.load_data(cfg)
    utils.check_sizes(cfg, len(data.train_x), table["m"])
    data = data.to(device)
    teacher, _ = utils.load_teacher(teacher_file, cfg, device, data)
    inputs = {"teacher_hash": utils.file_hash(teacher_file), "train_hash": data.fingerprint}
    t0 = time.time()
    T, target_scale = utils.teacher_targets(teacher, teacher_file, data, rotations, cfg["data"], out,
                                            inputs["teacher_hash"])
    print(f"teacher targets {tuple(T.shape)} ready in {time.time() - t0:.1f}s, scaled by {target_scale:.4g} to "
          f"root-mean-square {cfg['data']['target_rms']} (mean norm {T[:, 0].norm(dim=1).mean().item():.3g})")
    del teacher

    # ---------------------------------------------------------------- distilled set, optimizer, pool
    distilled = init_distilled(cfg, data, T, table["m"], gen).to(device)
    opt = torch.optim.AdamW(distilled.param_groups(dc), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / dc["steps"]))
    pool = ModelPool(mp, res, T.shape[-1], device, dc["support_chunk"])
    step, curve, run_id = 0, [], utils.new_run_id()
    if args.resume:
        ckpt = utils.load_checkpoint(out / "checkpoint.pth", cfg, inputs, args.allow_changed)
        distilled.load_state_dict(ckpt["distilled"], strict=True)
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        pool.load_state_dict(ckpt["pool"])
        utils.set_rng_state(ckpt["rng"], gen, out / "checkpoint.pth")
        rng.setstate(ckpt["py_rng"])
        step, curve, run_id = ckpt["step"], ckpt["curve"], ckpt["run_id"]
        print(f"resumed run {run_id} from {out / 'checkpoint.pth'} at step {step}")
    log = utils.RunLog(out / "log.jsonl", resume_at=("step", step) if args.resume else None)
    derived = {"device": str(device), "m": table["m"], "K": 1 + len(rotations), "out": str(out), "run_id": run_id,
               "inputs": inputs, "target_scale": target_scale, "allow_changed": args.allow_changed}
    utils.print_config(cfg, derived)
    utils.print_storage(table)
    utils.write_json({"config": cfg, "derived": derived, "storage": table}, out / "config.json")
    base = {"method": dc["method"], "dataset": cfg["dataset"], "resolution": res, "m": table["m"],
            "mean": data.mean.cpu(), "std": data.std.cpu(), "storage": table, "config": cfg,
            "teacher_hash": inputs["teacher_hash"], "train_hash": inputs["train_hash"], "run_id": run_id,
            "target_scale": target_scale, "store_augmented_targets": cfg["storage"]["store_augmented_targets"]}
    if not args.resume:
        # the set before any outer step (main_evaluate's init_only row): what the bilevel loop adds is the difference
        (out / utils.INIT_ONLY).mkdir(exist_ok=True)
        save_set(out / utils.INIT_ONLY, distilled, {**base, "steps": 0}, cfg, data)
        t0 = time.time()
        X0, Y0 = distilled()
        pool.stagger(X0, Y0, rng)
        print(f"model pool staggered (ages {pool.ages}) in {time.time() - t0:.1f}s")

    def checkpoint():
        utils.atomic_save({"distilled": distilled.state_dict(), "optimizer": opt.state_dict(),
                           "scheduler": sched.state_dict(), "pool": pool.state_dict(), "rng": utils.rng_state(gen),
                           "py_rng": rng.getstate(), "step": step, "curve": curve, "config": cfg, "inputs": inputs,
                           "run_id": run_id}, out / "checkpoint.pth")

    def check_finite(losses, last_saved):
        """Every outer loss since the last check and the distilled tensors finite (one host sync), else stop
        with the last good checkpoint untouched."""
        if not utils.all_finite(losses + list(distilled.parameters())):
            sys.exit(f"non-finite outer loss or distilled tensors by step {step}; nothing of it was saved. "
                     + utils.resume_hint(out / "checkpoint.pth", f"step {last_saved}", "main_distill.py", argv,
                                         "distillation.lr_image"))

    # ---------------------------------------------------------------- the bilevel loop
    bar = tqdm(total=dc["steps"], initial=step, desc="distill", dynamic_ncols=True)
    window, unchecked, t_log, s_log, last_saved = [], [], time.time(), step, step
    while step < dc["steps"]:
        loss = outer_step(distilled, pool, data, T, dc, opt, sched, gen, rng)
        step += 1
        window.append(loss)
        unchecked.append(loss)
        bar.update(1)
        if step % dc["log_every"] == 0 or step == dc["steps"] or step == 1:
            check_finite(unchecked, last_saved)
            mean_loss, unchecked = torch.stack(window).mean().item(), []
            rate = (step - s_log) / (time.time() - t_log)
            curve.append((step, mean_loss))
            log(step=step, loss=mean_loss, lr_image=opt.param_groups[0]["lr"], steps_per_s=rate)
            bar.set_postfix(loss=f"{mean_loss:.4f}", steps_per_s=f"{rate:.1f}")
            window, t_log, s_log = [], time.time(), step
        if step % dc["save_every"] == 0 or step == dc["steps"]:
            check_finite(unchecked, last_saved)
            unchecked, last_saved = [], step
            checkpoint()
    bar.close()

    # ---------------------------------------------------------------- approximation nets and assets
    approx_errors = save_set(out, distilled, {**base, "steps": step}, cfg, data)
    metrics = {"steps": step, "loss_curve": curve, "loss_first": curve[0][1] if curve else None,
               "loss_last": curve[-1][1] if curve else None, "storage": table,
               "approximation": approx_errors, "out": str(out), "run_id": run_id, "target_scale": target_scale}
    utils.write_json(metrics, out / "metrics.json")
    utils.release_run_folder(lock)
    print(f"distilled set written to {out} (m={table['m']}, {step} steps)")
    return metrics


if __name__ == "__main__":
    main()
