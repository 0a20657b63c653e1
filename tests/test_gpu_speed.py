"""Throughput checks of the issues' GPU acceptance items; they run only where CUDA is present.

    python -m pytest -q -s tests/test_gpu_speed.py     # prints the measured rates
"""
import random
import time

import pytest
import torch

import main_distill
import models
import utils
from tiny import REPO

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def timed(fn, repeats):
    fn()  # warm-up
    torch.cuda.synchronize()
    t0 = time.time()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.time() - t0) / repeats


def cifar_like(n, device):
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, device=device)


def test_augmentation_of_50k_images_two_views_over_200k_per_s():
    dev = torch.device("cuda")
    cfg = utils.load_config(REPO / "configs" / "cifar10.yaml")
    x = cifar_like(50_000, dev)
    mean, std = torch.tensor([0.49, 0.48, 0.45], device=dev), torch.tensor([0.25, 0.24, 0.26], device=dev)
    gen = utils.make_generator(dev, 0)
    sec = timed(lambda: [utils.barlow_views(part, mean, std, cfg["pretrain"], gen) for part in x.split(10_000)], 3)
    rate = len(x) / sec
    print(f"\naugmentation: {rate:,.0f} images/s (two views each)")
    assert rate >= 200_000


def test_barlow_twins_step_over_30k_views_per_s():
    dev = torch.device("cuda")
    cfg = utils.load_config(REPO / "configs" / "cifar10.yaml")
    pc = cfg["pretrain"]
    x = cifar_like(pc["batch_size"], dev)
    mean, std = torch.tensor([0.49, 0.48, 0.45], device=dev), torch.tensor([0.25, 0.24, 0.26], device=dev)
    backbone = models.resnet18_cifar().to(dev).to(memory_format=torch.channels_last)
    proj = models.projector(512, pc["projector_dims"]).to(dev)
    opt = models.LARS(models.lars_param_groups(backbone, proj), lr=0.1, momentum=0.9, weight_decay=1e-4, eta=0.02)
    gen = utils.make_generator(dev, 0)

    def step():
        v1, v2 = (utils.to_channels_last(v, dev) for v in utils.barlow_views(x, mean, std, pc, gen))
        with utils.autocast(dev):
            loss = models.barlow_twins_loss(proj(backbone(v1)), proj(backbone(v2)), 0.0051, 0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    rate = 2 * pc["batch_size"] / timed(step, 20)
    print(f"\nBarlow Twins: {rate:,.0f} augmented views/s at batch {pc['batch_size']}")
    assert rate >= 30_000


def test_outer_step_over_20_per_s():
    dev = torch.device("cuda")
    cfg = utils.load_config(REPO / "configs" / "cifar10.yaml")
    x = cifar_like(20_000, dev)
    mean, std = utils.channel_stats(x.cpu())
    labels = torch.zeros(len(x), dtype=torch.long, device=dev)
    data = utils.ImageData("CIFAR10", x, labels, x[:10], labels[:10],
                           mean.to(dev), std.to(dev), 10)
    T = torch.randn(len(x), 4, 512, device=dev)
    gen, rng = utils.make_generator(dev, 0), random.Random(0)
    distilled = main_distill.init_distilled(cfg, data, T, 239, gen).to(dev)
    opt = torch.optim.AdamW(distilled.param_groups(cfg["distillation"]), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    pool = main_distill.ModelPool(cfg["model_pool"], 32, 512, dev)
    sec = timed(lambda: main_distill.outer_step(distilled, pool, data, T, cfg["distillation"], opt, sched, gen, rng), 50)
    print(f"\nouter step: {1 / sec:.1f} steps/s (m=239, K=4, outer batch 1024)")
    assert 1 / sec >= 20
