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
from pathlib import Path

import torch
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
    args, rest = p.parse_known_args(argv)
    overrides = utils.parse_overrides(rest)
    if args.epochs is not None:
        overrides["pretrain.epochs"] = args.epochs
    if args.batch_size is not None:
        overrides["pretrain.batch_size"] = args.batch_size
    return args, overrides


def lr_at(step, steps_per_epoch, pc):
    """Linear warm-up for `warmup_epochs`, then cosine to 0; lr scaled by batch / 256 (per step)."""
    peak = pc["lr"] * pc["batch_size"] / 256
    warm, total = pc["warmup_epochs"] * steps_per_epoch, pc["epochs"] * steps_per_epoch
    if step < warm:
        return peak * (step + 1) / warm
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def build(pc, width, device, ranks=utils.Ranks()):
    """The Barlow Twins network (ResNet-18 + projector) on `device` and its LARS (rates set per step by lr_at).
    Under torchrun every BatchNorm normalises over the global batch, as solo-learn's recipe (sync_batchnorm) does."""
    net = models.BarlowTwins(models.resnet18_cifar(width), models.projector(models.resnet18_dim(width),
                                                                           pc["projector_dims"]))
    net = (models.sync_batchnorm(net, device) if ranks.world > 1 else net).to(device)
    utils.channels_last_module(net.backbone, device)
    opt = models.LARS(models.lars_param_groups(net.backbone, net.projector), lr=0.0, momentum=pc["momentum"],
                      weight_decay=pc["weight_decay"], eta=pc["lars_eta"])
    return net, opt


def barlow_step(net, opt, x, data, pc, gen, device):
    """One Barlow Twins step on the uint8 batch x (two fresh views each): the detached loss, no host sync.
    Under torchrun x is this rank's part of the global batch, and the loss is that of the global batch."""
    v1, v2 = (utils.to_channels_last(v, device) for v in utils.barlow_views(x, data.mean, data.std, pc, gen))
    with utils.autocast(device):
        z1, z2 = net(v1, v2)
    loss = models.barlow_twins_loss(models.gather_rows(z1), models.gather_rows(z2), pc["lambda_offdiag"],
                                    pc["loss_scale"])
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()


def train_one_epoch(net, opt, data, pc, epoch, gen, device, ranks=utils.Ranks()):
    """One pass over the train split in random batches (last partial batch dropped): mean loss, views/s (of
    this process). Under torchrun `data` holds this rank's shard and each step takes batch_size / world of it.
    The loss is read back once, at the end of the epoch."""
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


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)  # the command line, for the recovery hint
    args, overrides = parse_args(argv)
    cfg_path = args.config or f"configs/{args.dataset.lower()}.yaml"
    cfg = utils.load_config(cfg_path, overrides)
    if cfg["dataset"] != args.dataset:
        raise utils.ConfigError(f"{cfg_path}: dataset is {cfg['dataset']}, but the command asked for {args.dataset}")
    pc = cfg["pretrain"]
    ranks, device = utils.init_ranks(args.device)  # rank 0 of 1 unless started by torchrun
    if pc["batch_size"] % ranks.world:
        raise utils.ConfigError(f"{cfg_path}: pretrain.batch_size {pc['batch_size']} (the global batch) is not "
                                f"divisible by the {ranks.world} torchrun processes")
    utils.set_seed(cfg["seed"])
    gen = utils.make_generator(device, cfg["seed"] + ranks.rank)  # each rank draws its own augmentations
    out = Path(args.out)
    teacher_file = utils.teacher_path(utils.config_name(cfg_path), out)
    run = teacher_file.with_name(teacher_file.stem + "_run")
    lock = utils.claim_run_folder(run, [teacher_file, run / "checkpoint.pth"], args.resume, args.overwrite,
                                  "pretrain.py", also=[teacher_file]) if ranks.main else None
    utils.barrier(ranks)

    # ---------------------------------------------------------------- data (uint8 on the device)
    data = utils.load_data(cfg)
    if len(data.train_x) < pc["batch_size"]:
        raise utils.ConfigError(f"{cfg_path}: pretrain.batch_size {pc['batch_size']} > {len(data.train_x)} train images")
    inputs = {"train_hash": data.fingerprint}  # what --resume must find unchanged
    ranks.say(f"{data.name}: {len(data.train_x)} train / {len(data.test_x)} test images at {data.train_x.shape[-1]} px"
              + (f"; {ranks.world} processes, each with {len(data.train_x) // ranks.world} of them"
                 if ranks.world > 1 else ""))
    local = dataclasses.replace(data, train_x=utils.shard(data.train_x, ranks)) if ranks.world > 1 else data
    local.to(device)  # this rank's share (all of it in one process)
    data = data.to(device) if ranks.main else None  # rank 0 alone runs the kNN monitor and the probe

    # ---------------------------------------------------------------- model, optimizer
    width = cfg["network"]["width"]
    net, opt = build(pc, width, device, ranks)
    backbone, proj = net.backbone, net.projector
    fwd = DDP(net, device_ids=[device.index] if device.type == "cuda" else None) if ranks.world > 1 else net
    if pc["compile"] and device.type == "cuda":
        fwd = torch.compile(fwd)

    # ---------------------------------------------------------------- resume
    start_epoch, knn, run_id = 0, None, utils.new_run_id()
    if args.resume:
        ckpt = utils.load_checkpoint(run / "checkpoint.pth", cfg, inputs, args.allow_changed)
        backbone.load_state_dict(ckpt["backbone"], strict=True)
        proj.load_state_dict(ckpt["projector"], strict=True)
        opt.load_state_dict(ckpt["optimizer"])
        rngs = ckpt["rng"] if isinstance(ckpt["rng"], list) else [ckpt["rng"]]  # one generator state per rank
        if len(rngs) != ranks.world:
            raise ValueError(f"{run / 'checkpoint.pth'} was written by {len(rngs)} process(es); resume it with as "
                             f"many (torchrun --nproc_per_node={len(rngs)}; plain python for 1)")
        utils.set_rng_state(rngs[ranks.rank], gen, run / "checkpoint.pth")
        start_epoch, knn, run_id = ckpt["epoch"], ckpt["knn_top1"], ckpt["run_id"]
        ranks.say(f"resumed run {run_id} from {run / 'checkpoint.pth'} at epoch {start_epoch}")
    run_id = utils.gather_objects(run_id, ranks)[0]  # rank 0's
    log = utils.RunLog(run / "log.jsonl", resume_at=("epoch", start_epoch) if args.resume else None) \
        if ranks.main else None
    derived = {"device": str(device), "peak_lr": pc["lr"] * pc["batch_size"] / 256, "teacher_file": str(teacher_file),
               "run_id": run_id, "inputs": inputs, "allow_changed": args.allow_changed, "processes": ranks.world}
    if ranks.main:
        utils.print_config(cfg, derived)
        utils.write_json({"config": cfg, "derived": derived}, run / "config.json")

    # ---------------------------------------------------------------- loop
    feats, t_start, saved_epoch = None, time.time(), start_epoch
    for epoch in range(start_epoch, pc["epochs"]):
        loss, rate = train_one_epoch(fwd, opt, local, pc, epoch, gen, device, ranks)
        rate *= ranks.world  # views/s of all processes
        weights = [v for m in (backbone, proj) for v in m.state_dict().values() if v.is_floating_point()]
        if not (math.isfinite(loss) and utils.all_finite(weights)):  # checked before anything of it is saved
            sys.exit(f"non-finite loss or weights in epoch {epoch + 1} (mean loss {loss}); nothing of it was saved. "
                     + utils.resume_hint(run / "checkpoint.pth", f"after epoch {saved_epoch}", "pretrain.py", argv,
                                         "pretrain.lr"))
        eta_min = (time.time() - t_start) / (epoch + 1 - start_epoch) * (pc["epochs"] - epoch - 1) / 60
        row = {"epoch": epoch + 1, "loss": loss, "views_per_s": rate, "lr": opt.param_groups[0]["lr"], "eta_min": eta_min}
        if ranks.main and ((epoch + 1) % pc["knn_every"] == 0 or epoch + 1 == pc["epochs"]):
            feats = utils.split_features(backbone, data, cfg["data"]["eval_batch_size"])
            knn = utils.knn_accuracy(feats[0], data.train_y, feats[1], data.test_y, data.num_classes,
                                     pc["knn_k"], pc["knn_temperature"])
            row["knn_top1"] = knn
        if (epoch + 1) % pc["save_every"] == 0 or epoch + 1 == pc["epochs"]:
            rngs = utils.gather_objects(utils.rng_state(gen), ranks)  # every rank's augmentation generator
            if ranks.main:
                utils.atomic_save({"backbone": backbone.state_dict(), "projector": proj.state_dict(),
                                   "optimizer": opt.state_dict(), "epoch": epoch + 1, "rng": rngs,
                                   "knn_top1": knn, "config": cfg, "inputs": inputs, "run_id": run_id},
                                  run / "checkpoint.pth")
            saved_epoch = epoch + 1
        if ranks.main:
            log(**row)
            ranks.say(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
    if not ranks.main:  # the other processes are done: the weights they helped train are rank 0's too
        return None

    # ---------------------------------------------------------------- teacher file and probe
    utils.save_teacher(teacher_file, backbone, cfg, data, run_id)
    t0 = time.time()
    probe = utils.probe_backbone(backbone, data, cfg["probe"], cfg["seed"], cfg["data"]["eval_batch_size"],
                                 features=feats)  # the last epoch's kNN features (None after a finished resume)
    metrics = {"linear_probe_top1": probe, "knn_top1": knn, "epochs": pc["epochs"], "teacher_file": str(teacher_file),
               "probe_time_s": time.time() - t0, "run_id": run_id}
    utils.write_json(metrics, run / "metrics.json")
    utils.release_run_folder(lock)
    print(f"teacher written to {teacher_file}; linear probe top-1 {probe:.2f}%"
          + (f" (kNN {knn:.2f}%)" if knn is not None else ""))
    return metrics


if __name__ == "__main__":
    main()
