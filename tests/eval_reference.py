"""The evaluation's hot loops as they were before issue 26 (commit 6b57518), kept as references (the helpers they
called taken from where they live now): the rewritten ones are tested against them (tests/test_fast_eval.py)
and timed beside them (tests/bench_evaluation.py)."""
import math

import torch
import torch.nn.functional as F
from tqdm import tqdm

import main_evaluate
import models
import utils


def train_linear_head(train_f, train_y, num_classes, probe, seed):
    """utils.linear_probe's head at 6b57518: nn.Linear + autograd + torch.optim.SGD + CosineAnnealingLR."""
    dev = train_f.device
    gen = utils.make_generator(dev, seed)
    torch.manual_seed(seed)
    head = torch.nn.Linear(train_f.shape[1], num_classes).to(dev)
    opt = torch.optim.SGD(head.parameters(), lr=probe["lr"], momentum=probe["momentum"],
                          weight_decay=probe["weight_decay"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, probe["iterations"])
    for idx in main_evaluate.batches(len(train_f), probe["batch_size"], probe["iterations"], gen):
        loss = F.cross_entropy(head(train_f[idx]), train_y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return head


def linear_probe(train_f, train_y, test_f, test_y, num_classes, probe, seed):
    head = train_linear_head(train_f, train_y, num_classes, probe, seed)
    with torch.no_grad():
        return 100.0 * (head(test_f).argmax(1) == test_y).float().mean().item()


def fit_approx_nets(C_y, C_yk, ac, seed):
    """main_distill.fit_approx_nets at 6b57518: one ApproxMLP per rotation, each its own full-batch Adam loop."""
    devices = [C_y.device.index or 0] if C_y.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        nets, errors = [], []
        for k in range(len(C_yk)):
            torch.manual_seed(seed + k)
            net = models.ApproxMLP(C_y.shape[1], ac["hidden"]).to(C_y.device)
            opt = torch.optim.Adam(net.parameters(), lr=ac["lr"])
            shift = C_yk[k] - C_y
            for _ in range(ac["steps"]):
                loss = models.mse(net(C_y), shift)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            with torch.no_grad():
                errors.append(((net(C_y) - shift).norm() / shift.norm().clamp_min(1e-12)).item())
            nets.append(net.eval())
        return nets, errors


def pretrain_on_set(images, targets, ec, epochs, mean, std, seed, desc, width, ranks=utils.Ranks()):
    """main_evaluate.pretrain_on_set at 6b57518 (one process): its loss read on the host every 10 epochs."""
    device = targets.device
    torch.manual_seed(seed)
    gen = utils.make_generator(device, seed + ranks.rank)
    net = models.Regressor(*models.student(ec["student"], width, images.shape[-1]), targets.shape[1]).to(device)
    net = utils.channels_last_module(net, device)
    opt = torch.optim.SGD(net.parameters(), lr=ec["lr"], momentum=ec["momentum"], weight_decay=ec["weight_decay"])
    n, B = len(images), ec["batch_size"] // ranks.world
    steps = math.ceil(n / B)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * steps)
    net.train()
    bar = tqdm(range(epochs), desc=desc, leave=False, dynamic_ncols=True, disable=not ranks.main)
    for epoch in bar:
        perm = torch.randperm(n, generator=gen, device=device)
        total = torch.zeros((), device=device)
        for i in range(steps):
            idx = perm[i * B:(i + 1) * B]
            x = utils.normalize(images[idx], mean, std) if images.dtype == torch.uint8 else images[idx]
            if ec["augment"]:
                x = main_evaluate.random_crop_flip(x, ec["crop_pad"], gen)
            with utils.autocast(device):
                loss = models.mse(net(utils.to_channels_last(x, device)), targets[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.detach()
        if epoch % 10 == 0 or epoch == epochs - 1:
            loss = total / steps
            if not math.isfinite(float(loss)):  # utils.check_finite at 6b57518 (one read)
                raise SystemExit(f"non-finite loss {float(loss)} at {desc} epoch {epoch + 1}")
            bar.set_postfix(loss=f"{loss.item():.4f}")
    return net.backbone.eval(), epochs * steps
