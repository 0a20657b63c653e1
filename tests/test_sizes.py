"""tests/sizes.py (`make sizes`, `make gpu-sizes`) on the CPU at a tiny config, and the real-size failures it found,
each fixed and tested at a size the CPU runs."""
import json
import os
import time
from types import SimpleNamespace

import pytest
import torch

import benchmark
import main_evaluate
import sizes
import utils
from tiny import REPO, write_config

CPU = torch.device("cpu")
COMPUTE = ("teacher_step", "teacher_targets", "outer_step", "inner_step", "outer_step_krr_st", "student_step")


# ---------------------------------------------------------------------------------- the full_dataset row's views
def test_real_views_are_all_views_and_their_targets_made_per_batch():
    """main_evaluate.real_views gives, at any index batch, the rows of utils.all_views of the images and of their
    teacher targets view-major, without making them: the full_dataset row's 4 x 1.28M views of IMAGENET64 and their
    targets were 63 + 10.5 GB beside the data (tests/sizes.py, the full_dataset_views stage)."""
    g = torch.Generator().manual_seed(0)
    data = SimpleNamespace(train_x=torch.randint(0, 256, (50, 3, 8, 8), dtype=torch.uint8, generator=g))
    T = torch.randn(50, 4, 16, generator=g)
    idx = torch.randperm(50, generator=g)[:30]
    views, targets = main_evaluate.real_views(data, T, idx, [90, 180, 270])
    made_views, made_targets = utils.all_views(data.train_x[idx], [90, 180, 270]), T[idx].transpose(0, 1).flatten(0, 1)
    assert len(views) == len(targets) == 120 and views.shape == made_views.shape and views.dtype == torch.uint8
    assert targets.shape == made_targets.shape and targets.device == T.device
    j = torch.randint(0, 120, (77,), generator=g)
    assert torch.equal(views[j], made_views[j]) and torch.equal(targets[j], made_targets[j])
    assert torch.equal(views[torch.arange(120)], made_views)


def test_a_student_pretrained_on_real_views_is_the_one_on_the_made_views():
    """pretrain_on_set reads the views and targets per batch: the same network to the last bit as on the tensors."""
    g = torch.Generator().manual_seed(1)
    data = SimpleNamespace(train_x=torch.randint(0, 256, (12, 3, 8, 8), dtype=torch.uint8, generator=g))
    T = torch.randn(12, 4, 6, generator=g)
    idx = torch.arange(12)
    ec = {"student": "resnet18", "batch_size": 16, "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3,
          "augment": True, "crop_pad": 1, "cuda_graph": False}
    mean, std = torch.full((3,), 0.5), torch.full((3,), 0.25)
    made = (utils.all_views(data.train_x, [90, 180, 270]), T.transpose(0, 1).flatten(0, 1))
    nets = [main_evaluate.pretrain_on_set(*views, ec, 3, mean, std, 0, "views", 4)[0].state_dict()
            for views in (main_evaluate.real_views(data, T, idx, [90, 180, 270]), made)]
    assert all(torch.equal(nets[0][k], nets[1][k]) for k in nets[0])


def test_real_views_of_every_image_take_no_memory_of_their_own():
    """The peak resident memory that real_views of 20,000 32 px images in 4 views adds (sizes.Peak): below a tenth
    of what making them as tensors adds in the same test (~400 MB: 246 MB of views, 164 MB of targets)."""
    g = torch.Generator().manual_seed(0)
    data = SimpleNamespace(train_x=torch.randint(0, 256, (20_000, 3, 32, 32), dtype=torch.uint8, generator=g))
    T = torch.randn(20_000, 4, 512, generator=g)
    idx, rotations = torch.arange(20_000), [90, 180, 270]
    peak = sizes.Peak(CPU)
    views = main_evaluate.real_views(data, T, idx, rotations)
    lazy = peak.bytes()
    del views
    peak = sizes.Peak(CPU)
    views = utils.all_views(data.train_x[idx], rotations), T[idx].transpose(0, 1).flatten(0, 1)
    made = peak.bytes()
    assert made > 300e6 and lazy < made / 10, (lazy, made)
