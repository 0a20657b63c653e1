"""Barlow Twins teacher g (SPEC 1): ResNet-18 (CIFAR stem) pre-trained on the unlabeled train split.

    python pretrain.py CIFAR10                     # configs/cifar10.yaml, pretrain: section
    python pretrain.py DIGITS --epochs 2           # CPU smoke run
    python pretrain.py CIFAR10 --resume            # continue an interrupted run
    python pretrain.py CIFAR10 --pretrain.knn_every=5 --out teacher_models
    python pretrain.py CIFAR10 --config configs/cifar10_cpu.yaml   # CPU scale: resnet18_barlow_twins_cifar10_cpu.pth
    torchrun --nproc_per_node=4 pretrain.py CIFAR10  # 4 GPUs: DDP, global batch pretrain.batch_size (README)

Writes, under --out (default teacher_models/), <name> being the config's file stem (cifar10, cifar10_cpu):
    resnet18_barlow_twins_<name>.pth            {'backbone': state_dict, 'meta': {...}}, loaded by utils.load_teacher
    resnet18_barlow_twins_<name>_run/           checkpoint.pth (every pretrain.save_every epochs, atomic, only if loss
                                                and weights are finite), config.json, log.jsonl (per-epoch loss,
                                                kNN), metrics.json (final probe), run.lock while running
The data sits on the device as uint8; both views are augmented there in one batched pass.
"""
import dataclasses
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import models
import utils


def parse_args(argv):
    p = utils.script_parser(__doc__)
    p.add_argument("dataset", type=str.upper, choices=utils.DATASETS)
    p.add_argument("--config", default=None, help="default: configs/<dataset>.yaml")
    p.add_argument("--epochs", type=int, default=None, help="overrides pretrain.epochs")
    p.add_argument("--batch-size", type=int, default=None, help="overrides pretrain.batch_size")
    p.add_argument("--out", default="teacher_models", help="folder for the teacher and its run folder")
    utils.add_common_args(p)
    args, overrides = utils.parse_args(p, argv)
    if args.epochs is not None:
        overrides["pretrain.epochs"] = args.epochs
    if args.batch_size is not None:
        overrides["pretrain.batch_size"] = args.batch_size
    return args, overrides


# ============================================================================================
# SPEC 1: the two asymmetric views, batched on the device (one random draw per sample, from a generator)
# ============================================================================================
def _uniform(n, lo, hi, gen, device):
    return torch.rand(n, generator=gen, device=device) * (hi - lo) + lo


def _gray(x):
    """ITU-R 601 luma, as torchvision's rgb_to_grayscale. (B, 3, H, W) -> (B, 1, H, W)."""
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def random_resized_crop(x, size, scale, gen, ratio=(3 / 4, 4 / 3)):
    """Per-sample RandomResizedCrop via one affine matrix per image and grid_sample."""
    B, dev = x.shape[0], x.device
    area = _uniform(B, scale[0], scale[1], gen, dev)
    log_r = _uniform(B, np.log(ratio[0]), np.log(ratio[1]), gen, dev)
    w = (area * log_r.exp()).sqrt().clamp(max=1)  # crop width/height as fractions of the side
    h = (area / log_r.exp()).sqrt().clamp(max=1)
    cx = _uniform(B, -1, 1, gen, dev) * (1 - w)  # crop centre in [-1, 1] coordinates
    cy = _uniform(B, -1, 1, gen, dev) * (1 - h)
    theta = torch.zeros(B, 2, 3, device=dev)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = w, cx, h, cy
    grid = F.affine_grid(theta, (B, x.shape[1], size, size), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def rgb_to_hsv(x):
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(1), x.amin(1)
    delta = maxc - minc
    s = delta / maxc.clamp_min(1e-8)
    d = delta.clamp_min(1e-8)
    h = torch.where(maxc == r, (g - b) / d, torch.where(maxc == g, 2 + (b - r) / d, 4 + (r - g) / d))
    h = torch.where(delta > 0, (h / 6) % 1, torch.zeros_like(h))
    return h, s, maxc


def hsv_to_rgb(h, s, v):
    """The offsets 5, 3, 1 (R, G, B) are Python numbers: no host-to-device copy of a constant per call."""
    k = torch.stack([(n + h * 6) % 6 for n in (5.0, 3.0, 1.0)], 1)
    return v.unsqueeze(1) - v.unsqueeze(1) * s.unsqueeze(1) * torch.minimum(k, 4 - k).clamp(0, 1)


def color_jitter(x, brightness, contrast, saturation, hue, p, gen):
    """torchvision ColorJitter with per-sample factors, applied (in this fixed order) with prob. p."""
    B, dev = x.shape[0], x.device
    f = lambda a: _uniform(B, 1 - a, 1 + a, gen, dev).view(B, 1, 1, 1)
    y = (x * f(brightness)).clamp(0, 1)
    m = _gray(y).mean((1, 2, 3), keepdim=True)
    y = ((y - m) * f(contrast) + m).clamp(0, 1)
    g = _gray(y)
    y = ((y - g) * f(saturation) + g).clamp(0, 1)
    h, s, v = rgb_to_hsv(y)
    y = hsv_to_rgb((h + _uniform(B, -hue, hue, gen, dev).view(B, 1, 1)) % 1, s, v)
    return torch.where(utils.coin(B, p, gen, dev).view(B, 1, 1, 1), y, x)


def random_grayscale(x, p, gen):
    mask = utils.coin(x.shape[0], p, gen, x.device).view(-1, 1, 1, 1)
    return torch.where(mask, _gray(x).expand_as(x), x)


def random_solarize(x, p, gen, threshold=0.5):
    mask = utils.coin(x.shape[0], p, gen, x.device).view(-1, 1, 1, 1)
    return torch.where(mask & (x >= threshold), 1 - x, x)


def barlow_views(x, mean, std, aug, gen):
    """Two asymmetric Barlow Twins views (SPEC 1) of a uint8 batch, normalised float32."""
    x = x.float() / 255
    views = []
    for solarize_p in aug["solarize_p"]:
        v = random_resized_crop(x, x.shape[-1], aug["crop_scale"], gen)
        v = color_jitter(v, *aug["jitter"], aug["jitter_p"], gen)
        v = random_grayscale(v, aug["grayscale_p"], gen)
        v = utils.random_flip(v, aug["flip_p"], gen)
        v = random_solarize(v, solarize_p, gen)
        views.append(utils.normalize(v, mean, std))
    return views


@torch.no_grad()
def knn_accuracy(train_f, train_y, test_f, test_y, num_classes, k, temperature, chunk=1024):
    """Weighted kNN (cosine similarity, exp(sim / T) votes), top-1 in percent."""
    train_f = F.normalize(train_f, dim=1)
    test_f = F.normalize(test_f, dim=1)
    k = min(k, len(train_f))
    correct = 0
    for f, y in zip(test_f.split(chunk), test_y.split(chunk)):
        sim, idx = (f @ train_f.T).topk(k, dim=1)
        votes = torch.zeros(len(f), num_classes, device=f.device)
        votes.scatter_add_(1, train_y[idx], (sim / temperature).exp())
        correct += (votes.argmax(1) == y).sum().item()
    return 100.0 * correct / len(test_f)


# ============================================================================================
# SPEC 1: the network, LARS, the warm-up + cosine schedule, one step, one epoch
# ============================================================================================
def lr_at(step, steps_per_epoch, pc):
    """Linear warm-up for `warmup_epochs`, then cosine to 0; lr scaled by batch / 256 (per step)."""
    peak = pc["lr"] * pc["batch_size"] / 256
    warm, total = pc["warmup_epochs"] * steps_per_epoch, pc["epochs"] * steps_per_epoch
    if step < warm:
        return peak * (step + 1) / warm
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def build(pc, width, device, ranks=models.Ranks()):
    """The Barlow Twins network (ResNet-18 + projector) on `device` and its LARS (rates set per step by lr_at).
    Under torchrun every BatchNorm normalises over the global batch, as solo-learn's recipe (sync_batchnorm) does."""
    net = models.BarlowTwins(models.resnet18_cifar(width), models.projector(models.resnet18_dim(width),
                                                                           pc["projector_dims"]))
    net = (models.sync_batchnorm(net, device) if ranks.world > 1 else net).to(device)
    models.channels_last_module(net.backbone, device)
    opt = models.LARS(models.lars_param_groups(net.backbone, net.projector), lr=0.0, momentum=pc["momentum"],
                      weight_decay=pc["weight_decay"], eta=pc["lars_eta"])
    return net, opt


def barlow_step(net, opt, x, data, pc, gen, device):
    """One Barlow Twins step on the uint8 batch x (two fresh views each): the detached loss, no host sync.
    Under torchrun x is this rank's part of the global batch, and the loss is that of the global batch."""
    v1, v2 = (models.to_channels_last(v, device) for v in barlow_views(x, data.mean, data.std, pc, gen))
    with models.autocast(device):
        z1, z2 = net(v1, v2)
    loss = models.barlow_twins_loss(models.gather_rows(z1), models.gather_rows(z2), pc["lambda_offdiag"],
                                    pc["loss_scale"])
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()


def train_one_epoch(net, opt, data, pc, epoch, gen, device, ranks=models.Ranks()):
    """One pass in random batches (last partial dropped; under torchrun this rank's shard, batch_size / world each):
    (mean loss, read back once; this process's views/s)."""
    net.train()
    N, B = len(data.train_x), pc["batch_size"] // ranks.world
    steps = N // B
    perm = torch.randperm(N, generator=gen, device=device)
    total, t0 = torch.zeros((), device=device), time.time()
    for i in tqdm(range(steps), desc=f"epoch {epoch + 1}/{pc['epochs']}", leave=False, disable=not ranks.main):
        for g in opt.param_groups:
            g["lr"] = lr_at(epoch * steps + i, steps, pc)
        total += barlow_step(net, opt, data.train_x[perm[i * B:(i + 1) * B]], data, pc, gen, device)
    mean_loss = total.item() / steps
    return mean_loss, 2 * steps * B / (time.time() - t0)


# ============================================================================================
# main: arguments -> config -> checks -> run folder -> network -> resume -> epochs -> teacher file and probe
# ============================================================================================
def configure(argv):
    """(args, config path, config) with every value checked; ranks and device; the run folder it writes."""
    args, overrides = parse_args(argv)
    cfg_path = args.config or f"configs/{args.dataset.lower()}.yaml"
    cfg = utils.load_config(cfg_path, overrides)
    if cfg["dataset"] != args.dataset:
        raise utils.ConfigError(f"{cfg_path}: dataset is {cfg['dataset']}, but the command asked for {args.dataset}")
    ranks, device = utils.init_ranks(args.device, cfg["distributed_timeout_s"])  # rank 0 of 1 unless torchrun
    if cfg["pretrain"]["batch_size"] % ranks.world:
        raise utils.ConfigError(f"{cfg_path}: pretrain.batch_size {cfg['pretrain']['batch_size']} (the global batch) "
                                f"is not divisible by the {ranks.world} torchrun processes")
    teacher_file = utils.teacher_path(utils.config_name(cfg_path), Path(args.out))
    folder = teacher_file.with_name(teacher_file.stem + "_run")
    run = utils.RunFolder(folder, "pretrain.py", outputs=(teacher_file, folder / "checkpoint.pth"),
                          checkpoint=folder / "checkpoint.pth", also=(teacher_file,))
    return args, cfg_path, cfg, ranks, device, teacher_file, run


def load_checked(args, cfg_path, cfg, run, ranks):
    """Everything that can refuse the run, before its folder is claimed: folder, data, batch size, the probe's labels
    per class, and under --resume the checkpoint."""
    if ranks.main:
        run.check(args.resume, args.overwrite)
    data = utils.load_data(cfg)
    utils.labelled_subset(data.train_y, data.num_classes, cfg["probe"]["labels_per_class"])
    if len(data.train_x) < cfg["pretrain"]["batch_size"]:
        raise utils.ConfigError(f"{cfg_path}: pretrain.batch_size {cfg['pretrain']['batch_size']} > "
                                f"{len(data.train_x)} train images")
    inputs = {"train_hash": data.fingerprint}  # what --resume must find unchanged
    ckpt = None
    if args.resume:
        ckpt = utils.load_checkpoint(run.checkpoint, cfg, inputs, args.allow_changed)
        if not isinstance(ckpt["rng"], list):
            raise utils.InputError(f"{run.checkpoint} was written by an older version of pretrain.py (one generator "
                                   f"state, not one per process); start afresh with --overwrite")
        if len(ckpt["rng"]) != ranks.world:  # one generator state per rank
            raise utils.InputError(f"{run.checkpoint} was written by {len(ckpt['rng'])} process(es); resume it with "
                                   f"as many (torchrun --nproc_per_node={len(ckpt['rng'])}; plain python for 1)")
    return data, inputs, ckpt


def place_data(data, ranks, device):
    """(this rank's share of the train split on the device, the whole split on rank 0 for kNN and probe)."""
    ranks.say(f"{data.name}: {len(data.train_x)} train / {len(data.test_x)} test images at {data.train_x.shape[-1]} px"
              + (f"; {ranks.world} processes, each with {len(data.train_x) // ranks.world} of them"
                 if ranks.world > 1 else ""))
    local = dataclasses.replace(data, train_x=models.shard(data.train_x, ranks)) if ranks.world > 1 else data
    local.to(device)
    return local, (data.to(device) if ranks.main else None)


def restore(ckpt, net, opt, gen, ranks, path):
    """The checkpoint's weights, optimizer and this rank's generator: (first epoch, last kNN, run id)."""
    net.backbone.load_state_dict(ckpt["backbone"], strict=True)
    net.projector.load_state_dict(ckpt["projector"], strict=True)
    opt.load_state_dict(ckpt["optimizer"])
    utils.set_rng_state(ckpt["rng"][ranks.rank], gen, path)
    ranks.say(f"resumed run {ckpt['run_id']} from {path} at epoch {ckpt['epoch']}")
    return ckpt["epoch"], ckpt["knn_top1"], ckpt["run_id"]


@dataclass
class Job:
    """What the epochs work with besides the network: config, device, ranks, this rank's share (`local`) and the
    whole split (`data`, rank 0's: kNN, probe), run folder, id, inputs, log, command line (the recovery hint)."""
    cfg: dict
    device: torch.device
    ranks: models.Ranks
    local: object
    data: object
    run: utils.RunFolder
    run_id: str
    inputs: dict
    log: object
    argv: list


def fit(net, fwd, opt, gen, job, start, knn):
    """The epochs from `start`: a non-finite epoch stops before anything of it is saved; kNN every knn_every
    epochs (rank 0); a checkpoint every save_every. Returns the last kNN and its features."""
    cfg, ranks, data, run = job.cfg, job.ranks, job.data, job.run
    pc, feats, t_start, saved = cfg["pretrain"], None, time.time(), start
    for epoch in range(start, pc["epochs"]):
        utils.RUN["at"] = f"epoch {epoch + 1}"
        loss, rate = train_one_epoch(fwd, opt, job.local, pc, epoch, gen, job.device, ranks)
        weights = [v for m in (net.backbone, net.projector) for v in m.state_dict().values() if v.is_floating_point()]
        if not (math.isfinite(loss) and utils.all_finite(weights)):
            raise utils.non_finite_stop(f"loss or weights in epoch {epoch + 1} (mean loss {loss})", "pretrain.py",
                                        job.argv, "pretrain.lr", pc["lr"], run.checkpoint, f"after epoch {saved}")
        eta_min = (time.time() - t_start) / (epoch + 1 - start) * (pc["epochs"] - epoch - 1) / 60
        row = {"epoch": epoch + 1, "loss": loss, "views_per_s": rate * ranks.world, "lr": opt.param_groups[0]["lr"],
               "eta_min": eta_min}
        if ranks.main and ((epoch + 1) % pc["knn_every"] == 0 or epoch + 1 == pc["epochs"]):
            feats = utils.split_features(net.backbone, data, cfg["data"]["eval_batch_size"])
            knn = knn_accuracy(feats[0], data.train_y, feats[1], data.test_y, data.num_classes, pc["knn_k"],
                               pc["knn_temperature"])
            row["knn_top1"] = knn
        if (epoch + 1) % pc["save_every"] == 0 or epoch + 1 == pc["epochs"]:
            rngs = models.gather_objects(utils.rng_state(gen), ranks)  # every rank's augmentation generator
            if ranks.main:
                utils.atomic_save({"backbone": net.backbone.state_dict(), "projector": net.projector.state_dict(),
                                   "optimizer": opt.state_dict(), "epoch": epoch + 1, "rng": rngs, "knn_top1": knn,
                                   "config": cfg, "inputs": job.inputs, "run_id": job.run_id}, run.checkpoint)
            saved = epoch + 1
        if ranks.main:
            job.log(**row)
            ranks.say(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
    return knn, feats


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)  # the command line, for the recovery hint
    args, cfg_path, cfg, ranks, device, teacher_file, run = configure(argv)
    utils.set_seed(cfg["seed"])
    gen = models.make_generator(device, cfg["seed"] + ranks.rank)  # each rank draws its own augmentations
    data, inputs, ckpt = load_checked(args, cfg_path, cfg, run, ranks)

    # ---------------------------------------------------------------- claim the run folder, data on the device
    lock = run.claim(args.resume, args.overwrite) if ranks.main else None
    models.barrier(ranks)
    local, data = place_data(data, ranks, device)

    # ---------------------------------------------------------------- network, optimizer, resume
    net, opt = build(cfg["pretrain"], cfg["network"]["width"], device, ranks)
    fwd = DDP(net, device_ids=[device.index] if device.type == "cuda" else None) if ranks.world > 1 else net
    if cfg["pretrain"]["compile"] and device.type == "cuda":
        fwd = torch.compile(fwd)
    start, knn, run_id = restore(ckpt, net, opt, gen, ranks, run.checkpoint) if ckpt else (0, None, utils.new_run_id())
    run_id = models.gather_objects(run_id, ranks)[0]  # rank 0's
    log = utils.RunLog(run.folder / "log.jsonl", resume_at=("epoch", start) if args.resume else None) \
        if ranks.main else None
    derived = {"device": str(device), "peak_lr": cfg["pretrain"]["lr"] * cfg["pretrain"]["batch_size"] / 256,
               "teacher_file": str(teacher_file), "run_id": run_id, "inputs": inputs,
               "allow_changed": args.allow_changed, "processes": ranks.world}
    if ranks.main:
        utils.print_config(cfg, derived)
        utils.write_json({"config": cfg, "derived": derived}, run.folder / "config.json")

    # ---------------------------------------------------------------- epochs
    job = Job(cfg, device, ranks, local, data, run, run_id, inputs, log, argv)
    knn, feats = fit(net, fwd, opt, gen, job, start, knn)
    if not ranks.main:  # the other processes are done: the weights they helped train are rank 0's too
        return None

    # ---------------------------------------------------------------- teacher file and probe
    utils.save_teacher(teacher_file, net.backbone, cfg, data, run_id)
    t0 = time.time()
    probe = utils.probe_backbone(net.backbone, data, cfg["probe"], cfg["seed"], cfg["data"]["eval_batch_size"],
                                 features=feats)  # the last epoch's kNN features (None after a finished resume)
    metrics = {"linear_probe_top1": probe, "knn_top1": knn, "epochs": cfg["pretrain"]["epochs"],
               "teacher_file": str(teacher_file), "probe_time_s": time.time() - t0, "run_id": run_id}
    utils.write_json(metrics, run.folder / "metrics.json")
    utils.release_run_folder(lock)
    print(f"teacher written to {teacher_file}; linear probe top-1 {probe:.2f}%"
          + (f" (kNN {knn:.2f}%)" if knn is not None else ""))
    return metrics


if __name__ == "__main__":
    utils.cli(main, "pretrain.py")
