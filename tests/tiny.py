"""Tiny CPU settings shared by the script tests: a DIGITS config at 8 px and a random-init teacher."""
from pathlib import Path

import torch
import yaml

import models
import utils

REPO = Path(__file__).resolve().parents[1]

TINY = {  # dotted key -> value, applied to configs/digits.yaml
    "data.resolution": 8, "data.eval_batch_size": 512,
    "network.width": 16,  # as configs/digits.yaml: a ResNet-18 step costs ~1/15 of width 64's at 8 px on the CPU
    "pretrain.epochs": 2, "pretrain.batch_size": 256, "pretrain.projector_dims": [64, 64], "pretrain.knn_every": 1,
    "parameterization.image_basis_size": 4, "parameterization.U": 8, "parameterization.V": 8,
    "storage.budget_N": 10, "storage.m": 16,
    "distillation.steps": 50, "distillation.outer_batch_size": 64, "distillation.save_every": 10,
    "distillation.log_every": 10, "distillation.lr_image": 1.0e-2, "distillation.lr_repr": 1.0e-2,
    "distillation.lr_image_bases": 1.0e-3, "distillation.lr_repr_bases": 1.0e-3,
    "distillation.krr_st_lr_pixels": 1.0e-2, "distillation.krr_st_lr_targets": 1.0e-2,
    "model_pool.size_L": 2, "model_pool.inner_loop_steps_Z": 20, "model_pool.widths": [16, 32],
    "approximation.steps": 200, "evaluation.epochs": 2, "evaluation.full_epochs": 1, "evaluation.crop_pad": 1,
    "probe.iterations": 100,
}


def set_dotted(cfg, dotted, value):
    """cfg['a']['b'] = value for dotted = 'a.b' (a raw YAML dict, before the schema check)."""
    node, keys = cfg, dotted.split(".")
    for k in keys[:-1]:
        node = node[k]
    node[keys[-1]] = value


def write_config(tmp_path, **overrides):
    """configs/digits.yaml with TINY and `overrides` (dotted keys with '__' for '.') applied."""
    cfg = yaml.safe_load((REPO / "configs" / "digits.yaml").read_text())
    for dotted, value in {**TINY, **{k.replace("__", "."): v for k, v in overrides.items()}}.items():
        set_dotted(cfg, dotted, value)
    path = Path(tmp_path) / "digits.yaml"  # the config name sets the default output names, as for configs/digits.yaml
    path.write_text(yaml.safe_dump(cfg))
    utils.load_config(path)  # the tiny config passes the schema
    return path


def write_teacher(path, dataset="DIGITS", resolution=8, seed=0, width=TINY["network.width"], train_hash=None):
    """A random-init ResNet-18 (of `width`) saved in pretrain.py's teacher format; its train split is DIGITS' at
    `resolution` (another dataset's teacher is refused before its split is compared)."""
    torch.manual_seed(seed)
    g = models.resnet18_cifar(width)
    if train_hash is None and dataset == "DIGITS":
        train_hash = utils.load_dataset("DIGITS", "data", resolution).fingerprint
    meta = {"dataset": dataset, "resolution": resolution, "epochs": 0, "mean": [0.0] * 3, "std": [1.0] * 3,
            "d_y": models.resnet18_dim(width), "width": width, "train_hash": train_hash, "train_images": 0,
            "split": "", "run_id": f"test-teacher-{seed}"}
    utils.atomic_save({"backbone": g.state_dict(), "meta": meta}, path)
    return path
