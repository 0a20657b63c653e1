"""Shared helpers for pretrain.py, main_distill.py and main_evaluate.py, and the files two of them exchange
(each writer beside its reader).

Sections, in file order:
    Config                 SCHEMA, RANGES, load_config, overrides, the scripts' common arguments
    Seeding, device        set_seed, get_device
    Several processes      torchrun ranks, generators, autocast / TF32 / channels_last
    Data                   the dataset loaders (every file and split checked), normalisation
    Augmentation           batched random crops, jitter, flips, rotations (the views of SPEC 1 and 2)
    Storage accounting     SPEC 3: the budget and m; the default folder names
    Parameterization       SPEC 2: PCA, decoding, save_distilled / load_distilled, controls, approximation nets
    Teacher and features   save_teacher / load_teacher, teacher targets, frozen features
    Probes                 kNN, linear probe, teacher fit, fine-tuning, BatchNorm recalibration
    Checkpoints            atomic writes, run folders (lock, owner), resume checks, logs, NaN guards
"""
import argparse
import atexit
import copy
import hashlib
import json
import math
import os
import pickle
import random
import shlex
import socket
import sys
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml

import models

# ============================================================================================
# Config: one schema, YAML is the only source of hyperparameters (SPEC: every default in YAML)
# ============================================================================================
DATASETS = ("CIFAR10", "CIFAR100", "STANFORD_DOGS", "TINY_IMAGENET", "DIGITS")
PRECISIONS = ("float32", "tf32", "bfloat16")  # numerics of a frozen-network pass on CUDA (utils.precision)

# key -> type. A tuple of strings is a choice; [type] is a list of that type.
SCHEMA = {
    "dataset": DATASETS,
    "seed": int,
    "data": {"root": str, "resolution": int, "train_subset": int, "eval_batch_size": int, "target_rms": float,
             "target_precision": PRECISIONS},
    "network": {"width": int},
    "pretrain": {
        "epochs": int, "batch_size": int, "lr": float, "momentum": float, "weight_decay": float,
        "lars_eta": float, "warmup_epochs": int, "lambda_offdiag": float, "loss_scale": float,
        "projector_dims": [int], "crop_scale": [float], "jitter": [float], "jitter_p": float,
        "grayscale_p": float, "flip_p": float, "solarize_p": [float], "knn_every": int, "save_every": int, "knn_k": int,
        "knn_temperature": float, "compile": bool,
    },
    "parameterization": {"image_basis_size": int, "U": int, "V": int, "learn_bases": bool},
    "augmentations": {"rotate": [int]},
    "storage": {"budget_N": int, "m": int, "store_augmented_targets": bool},
    "distillation": {
        "method": ("ours", "krr_st"), "init": ("random", "kmeans", "herding"), "steps": int, "outer_batch_size": int,
        "real_views": ("all", "identity"), "lr_image": float, "lr_image_bases": float, "lr_repr": float,
        "lr_repr_bases": float, "krr_st_lr_pixels": float, "krr_st_lr_targets": float, "ridge": float,
        "krr_features": PRECISIONS, "support_chunk": int, "save_every": int, "log_every": int,
    },
    "model_pool": {
        "size_L": int, "inner_loop_steps_Z": int, "widths": [int], "lr": float, "momentum": float,
        "weight_decay": float,
    },
    "approximation": {"hidden": int, "steps": int, "lr": float},
    "evaluation": {
        "student": tuple(models.STUDENTS), "epochs": int, "full_epochs": int, "batch_size": int, "lr": float,
        "momentum": float, "weight_decay": float, "augment": bool, "crop_pad": int,
        "random_init_bn": ("recalibrate", "init"),
    },
    "probe": {"iterations": int, "batch_size": int, "lr": float, "momentum": float, "weight_decay": float,
              "teacher_fit_ridge": float, "labels_per_class": int},
    "finetune": {"iterations": int, "batch_size": int, "lr": float, "momentum": float, "weight_decay": float,
                 "augment": bool, "crop_pad": int},
}



def _range(lo=None, hi=None, lo_open=False, hi_open=False):
    """(predicate, text) for a numeric interval; None is unbounded."""
    ok = lambda v: ((lo is None or (v > lo if lo_open else v >= lo)) and
                    (hi is None or (v < hi if hi_open else v <= hi)))
    text = " and ".join(t for t in ((lo is not None and f"{'>' if lo_open else '>='} {lo}"),
                                    (hi is not None and f"{'<' if hi_open else '<='} {hi}")) if t)
    return ok, text


POSITIVE, NONNEG, PROB, MOMENTUM = _range(1), _range(0), _range(0, 1), _range(0, 1, hi_open=True)
POS_REAL = _range(0, lo_open=True)

# dotted key -> allowed range, checked on every element of a list. Keys not named here take any value of
# their type (seed, lrs that may be 0 to freeze a group, ...): one place for what "valid" means.
RANGES = {
    "seed": NONNEG, "data.resolution": POSITIVE, "data.train_subset": NONNEG, "data.eval_batch_size": POSITIVE,
    "data.target_rms": POS_REAL, "network.width": POSITIVE,
    "pretrain.epochs": POSITIVE, "pretrain.batch_size": _range(2), "pretrain.lr": NONNEG, "pretrain.momentum": MOMENTUM,
    "pretrain.weight_decay": NONNEG, "pretrain.lars_eta": POS_REAL, "pretrain.warmup_epochs": NONNEG,
    "pretrain.lambda_offdiag": NONNEG, "pretrain.loss_scale": POS_REAL, "pretrain.projector_dims": POSITIVE,
    "pretrain.crop_scale": _range(0, 1, lo_open=True), "pretrain.jitter": NONNEG, "pretrain.jitter_p": PROB,
    "pretrain.grayscale_p": PROB, "pretrain.flip_p": PROB, "pretrain.solarize_p": PROB, "pretrain.knn_every": POSITIVE,
    "pretrain.save_every": POSITIVE,
    "pretrain.knn_k": POSITIVE, "pretrain.knn_temperature": POS_REAL,
    "parameterization.image_basis_size": POSITIVE, "parameterization.U": POSITIVE, "parameterization.V": POSITIVE,
    "augmentations.rotate": (lambda v: v in (90, 180, 270), "one of 90, 180, 270"),
    "storage.budget_N": POSITIVE, "storage.m": NONNEG,
    "distillation.steps": POSITIVE, "distillation.outer_batch_size": POSITIVE, "distillation.lr_image": NONNEG,
    "distillation.lr_image_bases": NONNEG, "distillation.lr_repr": NONNEG, "distillation.lr_repr_bases": NONNEG,
    "distillation.krr_st_lr_pixels": NONNEG, "distillation.krr_st_lr_targets": NONNEG, "distillation.ridge": POS_REAL,
    "distillation.support_chunk": NONNEG, "distillation.save_every": POSITIVE, "distillation.log_every": POSITIVE,
    "model_pool.size_L": POSITIVE, "model_pool.inner_loop_steps_Z": POSITIVE, "model_pool.widths": POSITIVE,
    "model_pool.lr": NONNEG, "model_pool.momentum": MOMENTUM, "model_pool.weight_decay": NONNEG,
    "approximation.hidden": POSITIVE, "approximation.steps": POSITIVE, "approximation.lr": NONNEG,
    "evaluation.epochs": POSITIVE, "evaluation.full_epochs": POSITIVE, "evaluation.batch_size": POSITIVE,
    "evaluation.lr": NONNEG, "evaluation.momentum": MOMENTUM, "evaluation.weight_decay": NONNEG,
    "evaluation.crop_pad": NONNEG,
    "probe.iterations": POSITIVE, "probe.batch_size": POSITIVE, "probe.lr": POS_REAL, "probe.momentum": MOMENTUM,
    "probe.weight_decay": NONNEG, "probe.teacher_fit_ridge": POS_REAL, "probe.labels_per_class": NONNEG,
    "finetune.iterations": POSITIVE, "finetune.batch_size": POSITIVE, "finetune.lr": POS_REAL,
    "finetune.momentum": MOMENTUM, "finetune.weight_decay": NONNEG, "finetune.crop_pad": NONNEG,
}
LIST_LENGTHS = {"pretrain.crop_scale": (2, 2), "pretrain.jitter": (4, 4), "pretrain.solarize_p": (2, 2),
                "pretrain.projector_dims": (1, None), "model_pool.widths": (1, None), "augmentations.rotate": (0, 3)}


class ConfigError(ValueError):
    """A config file or override that does not match SCHEMA or RANGES."""


def _get(cfg, dotted):
    for k in dotted.split("."):
        cfg = cfg[k]
    return cfg


def check_ranges(cfg, source):
    """Every value inside its RANGES interval, lists of the right length: refused before any work starts."""
    for dotted, (ok, text) in RANGES.items():
        value = _get(cfg, dotted)
        for v in (value if isinstance(value, list) else [value]):
            if not ok(v):
                raise ConfigError(f"{source}: {dotted} = {value!r}: expected {'each value ' if isinstance(value, list) else ''}{text}")
    for dotted, (lo, hi) in LIST_LENGTHS.items():
        n = len(_get(cfg, dotted))
        if n < lo or (hi is not None and n > hi):
            want = f"{lo}" if lo == hi else f"at least {lo}" + (f" and at most {hi}" if hi is not None else "")
            raise ConfigError(f"{source}: {dotted} has {n} values, expected {want}")
    lo, hi = cfg["pretrain"]["crop_scale"]
    if lo > hi:
        raise ConfigError(f"{source}: pretrain.crop_scale = {[lo, hi]}: expected [min, max] with min <= max")
    if len(set(cfg["augmentations"]["rotate"])) != len(cfg["augmentations"]["rotate"]):
        raise ConfigError(f"{source}: augmentations.rotate = {cfg['augmentations']['rotate']}: a rotation listed twice")
    if cfg["evaluation"]["crop_pad"] >= cfg["data"]["resolution"]:
        raise ConfigError(f"{source}: evaluation.crop_pad = {cfg['evaluation']['crop_pad']}: expected < data.resolution "
                          f"({cfg['data']['resolution']}; reflect padding needs it)")


def check_sizes(cfg, n_train, m=None):
    """Counts that must fit the loaded train split (known only after loading): m and budget_N images are
    drawn from it without replacement, so a larger value would silently shrink the set the table reports."""
    checks = {"storage.budget_N": cfg["storage"]["budget_N"], "storage.m": m if m is not None else cfg["storage"]["m"],
              "distillation.outer_batch_size": cfg["distillation"]["outer_batch_size"]}
    for dotted, value in checks.items():
        if value > n_train:
            raise ConfigError(f"{dotted} = {value} exceeds the {n_train} images of the {cfg['dataset']} train split "
                              f"(data.train_subset = {cfg['data']['train_subset']}); lower it")


def _check_value(value, spec, where):
    """Return `value` converted to `spec`'s type, or raise naming `where` (file: dotted.key)."""
    if isinstance(spec, tuple):
        if value not in spec:
            raise ConfigError(f"{where}: expected one of {list(spec)}, got {value!r}")
        return value
    if isinstance(spec, list):
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list of {spec[0].__name__}, got {value!r}")
        return [_check_value(v, spec[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if spec is float:  # PyYAML reads `1e-4` (no dot) as a string: convert it here, once.
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
        if not math.isfinite(value):  # YAML reads .inf and .nan as floats: no range check may see them
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return value
    if spec is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if not isinstance(value, spec):
        raise ConfigError(f"{where}: expected {spec.__name__}, got {value!r}")
    return value


def _check_section(cfg, schema, source, prefix=""):
    if not isinstance(cfg, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'top level'}: expected a mapping, got {cfg!r}")
    for key in cfg:
        if key not in schema:
            raise ConfigError(f"{source}: unknown key '{prefix}{key}' (known here: {sorted(schema)})")
    out = {}
    for key, spec in schema.items():
        if key not in cfg:
            raise ConfigError(f"{source}: missing key '{prefix}{key}'")
        if isinstance(spec, dict):
            out[key] = _check_section(cfg[key], spec, source, f"{prefix}{key}.")
        else:
            out[key] = _check_value(cfg[key], spec, f"{source}: {prefix}{key}")
    return out


def parse_overrides(items):
    """['--distillation.steps=200', '--seed=1'] -> {'distillation.steps': 200, 'seed': 1} (values parsed as YAML)."""
    out = {}
    for item in items:
        if not (item.startswith("--") and "=" in item):
            raise ConfigError(f"unrecognised argument {item!r}: overrides look like --section.key=value")
        key, value = item[2:].split("=", 1)
        out[key] = yaml.safe_load(value)
    return out


def load_config(path, overrides=None):
    """Read configs/<name>.yaml, apply dotted overrides, check everything against SCHEMA."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path} (the configs live in configs/<dataset>.yaml)")
    with open(path) as f:
        cfg = yaml.safe_load(f) or {}
    for dotted, value in (overrides or {}).items():
        node, keys = cfg, dotted.split(".")
        for k in keys[:-1]:
            if not isinstance(node.get(k), dict):
                raise ConfigError(f"{path}: override --{dotted}: unknown section '{k}'")
            node = node[k]
        if keys[-1] not in node:
            raise ConfigError(f"{path}: override --{dotted}: unknown key '{dotted}'")
        node[keys[-1]] = value
    cfg = _check_section(cfg, SCHEMA, str(path))
    check_ranges(cfg, str(path))
    return cfg


def script_parser(doc):
    """The three scripts' argument parser. No prefix matching: every --key=value it does not know is left over
    as a config override (otherwise main_evaluate would read --seed=1 as --seeds=1)."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter,
                                   allow_abbrev=False)


def add_common_args(parser):
    """--device/--resume/--overwrite/--allow-changed, shared by the three scripts."""
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--resume", action="store_true", help="continue from the run folder's checkpoint")
    parser.add_argument("--overwrite", action="store_true",
                        help="move the existing outputs aside (<out>.replaced-<time>-<id>/) and start afresh")
    parser.add_argument("--allow-changed", default="", type=lambda s: [k for k in s.split(",") if k],
                        help="with --resume: comma-separated config keys allowed to differ from the checkpoint's")
    return parser


def print_config(cfg, derived=None):
    print(json.dumps({"config": cfg, "derived": derived or {}}, indent=1, default=str))


# ============================================================================================
# Seeding, device
# ============================================================================================
def set_seed(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def get_device(name=None):
    """cuda when present (or as asked); on CUDA, cuDNN autotunes its kernels for our fixed shapes."""
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"--device {name} asked for, but torch sees no CUDA device")
    device = torch.device(name)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return device


# ============================================================================================
# Several processes (torchrun; nothing joins a process group unless WORLD_SIZE > 1), generators, numerics
# ============================================================================================
@dataclass(frozen=True)
class Ranks:
    """This process among torchrun's: rank 0 of 1 when a script is started plainly."""
    rank: int = 0
    world: int = 1

    @property
    def main(self):
        """Rank 0 alone writes files, logs and prints."""
        return self.rank == 0

    def say(self, *args, **kwargs):
        """print, on rank 0 only."""
        if self.main:
            print(*args, **kwargs)


def init_ranks(device_name=None):
    """(Ranks, device). Under torchrun (WORLD_SIZE > 1) every process joins the default process group: nccl on
    CUDA, one GPU per process (cuda:LOCAL_RANK), gloo on the CPU. A plain start: rank 0 of 1, no group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = get_device(device_name)
    if world == 1:
        return Ranks(), device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():  # once per process (main_evaluate --student a,b evaluates twice)
        # device_id binds the nccl group to this process's GPU (no barrier guesswork, no hang on some NCCL versions)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                             **({"device_id": device} if device.type == "cuda" else {}))
        atexit.register(lambda: torch.distributed.is_initialized() and torch.distributed.destroy_process_group())
    return Ranks(torch.distributed.get_rank(), world), device


def shard(x, ranks):
    """Rank r's equal share of x's rows: r, r + W, r + 2W, ... (the last len(x) mod W rows are left out)."""
    return x[ranks.rank:len(x) // ranks.world * ranks.world:ranks.world]


def gather_objects(obj, ranks):
    """[rank 0's obj, rank 1's obj, ...] on every rank (picklable objects; [obj] in a single process)."""
    if ranks.world == 1:
        return [obj]
    out = [None] * ranks.world
    torch.distributed.all_gather_object(out, obj)
    return out


def barrier(ranks):
    if ranks.world > 1:
        torch.distributed.barrier()


def make_generator(device, seed):
    """A torch.Generator on `device`: all augmentation randomness is drawn from it."""
    return torch.Generator(device=device).manual_seed(seed)


def autocast(device, enabled=True):
    """bf16 autocast on CUDA, a no-op on CPU (CPU bf16 convs are slower than fp32)."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=enabled and device.type == "cuda")


@contextmanager
def tf32(enabled):
    """TF32 tensor cores (10-bit mantissa inputs, float32 accumulation) for float32 convs and matmuls on CUDA,
    set explicitly: PyTorch's own defaults differ (on for cuDNN convs, off for matmuls). Restored on exit.
    The legacy allow_tf32 flags only: torch.compile on torch 2.9-2.11 still reads them, and mixing them with the
    newer fp32_precision API raises on a mixed read, so this repository never sets fp32_precision."""
    flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags


@contextmanager
def precision(device, name):
    """A forward pass in one of PRECISIONS: strict float32, float32 with TF32 tensor cores, or bf16 autocast.
    On the CPU all three are float32. Backward passes take `tf32(name == "tf32")` alone (no autocast)."""
    with tf32(name == "tf32"), autocast(device, enabled=name == "bfloat16"):
        yield


def to_channels_last(x, device):
    return x.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else x


def channels_last_module(net, device):
    """A network whose inputs are channels_last on CUDA gets its weights in that layout once, here: otherwise
    cuDNN converts every conv's weight on every call. Unchanged on the CPU."""
    return net.to(memory_format=torch.channels_last) if device.type == "cuda" else net


# ============================================================================================
# Data: uint8 (N, 3, H, W) tensors + int64 labels; normalised on the device
# ============================================================================================
@dataclass
class ImageData:
    name: str
    train_x: torch.Tensor  # uint8 (N, 3, H, W)
    train_y: torch.Tensor  # int64 (N,)
    test_x: torch.Tensor
    test_y: torch.Tensor
    mean: torch.Tensor  # float32 (3,), train-split per-channel mean in [0, 1]
    std: torch.Tensor
    num_classes: int
    fingerprint: str = ""  # hash of the train images and labels: what teachers, caches and assets were built from
    split: str = ""  # Stanford Dogs: "official" (the .mat lists) or "first100" (the fallback)

    def to(self, device):
        for k in ("train_x", "train_y", "test_x", "test_y", "mean", "std"):
            setattr(self, k, getattr(self, k).to(device))
        return self


CIFAR10_LAYOUT = ("data/cifar-10-python/{data_batch_1..5, test_batch, batches.meta} (official python pickles; "
                  "the archive's folder name cifar-10-batches-py works too)")
CIFAR100_LAYOUT = "data/data/cifar-100-python/{train, test, meta} (official python pickles, torchvision layout)"
DOGS_LAYOUT = ("data/stanford-dogs/images/Images/<wnid>-<Breed>/*.jpg (120 breed folders), "
               "optionally data/stanford-dogs/{train_list.mat, test_list.mat}")
TINY_LAYOUT = ("data/tiny-imagenet-200/{wnids.txt, train/<wnid>/images/*.JPEG, val/images/*.JPEG, "
               "val/val_annotations.txt} (the official tiny-imagenet-200.zip, 64x64)")
DOGS_TRAIN_PER_BREED = 100  # the official split's count, used when no .mat lists are present
DIGITS_TEST_FRACTION = 0.25  # fixed stratified split of scikit-learn's 1,797 digits


class DatasetError(FileNotFoundError):
    """A dataset folder that is missing or not in the expected layout."""


def channel_stats(x, chunk=8192):
    """Per-channel mean and std in [0, 1] of a uint8 (N, 3, H, W) tensor, in float64."""
    s = torch.zeros(3, dtype=torch.float64)
    s2 = torch.zeros(3, dtype=torch.float64)
    for part in x.split(chunk):
        p = part.to(torch.float64) / 255
        s += p.sum((0, 2, 3))
        s2 += (p * p).sum((0, 2, 3))
    n = x.shape[0] * x.shape[2] * x.shape[3]
    mean = s / n
    return mean.float(), (s2 / n - mean**2).sqrt().float()


def _unpickle(path):
    """Official CIFAR pickles; keys are bytes or str depending on who wrote the file."""
    with open(path, "rb") as f:
        d = pickle.load(f, encoding="bytes")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in d.items()}


def _cifar_arrays(path, label_key, layout, num_classes):
    """One official CIFAR pickle: 'data' uint8 (n, 3072) in R, G, B planes and n labels in [0, num_classes)."""
    if not path.is_file():
        raise DatasetError(f"missing {path}; expected layout: {layout}")
    try:
        d = _unpickle(path)
        data, labels = d["data"], d[label_key]
    except Exception as e:  # truncated file, not a pickle, wrong keys
        raise DatasetError(f"could not read {path} as a CIFAR pickle ({type(e).__name__}: {e}); "
                           f"expected layout: {layout}") from None
    data = np.asarray(data)
    if data.ndim != 2 or data.shape[1] != 3072 or data.dtype != np.uint8:
        raise DatasetError(f"{path}: 'data' is {data.dtype} of shape {data.shape}; expected uint8 (n, 3072) "
                           f"(32 x 32 x 3 channel planes per row); expected layout: {layout}")
    x = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
    return x, check_labels(labels, len(x), num_classes, f"{path}: '{label_key}'")


def check_labels(labels, n, num_classes, where):
    """n integer labels in [0, num_classes) as int64, or a DatasetError naming `where`."""
    y = np.asarray(labels)
    if y.shape != (n,) or not (np.issubdtype(y.dtype, np.integer) or y.size == 0):
        raise DatasetError(f"{where}: {y.shape[0] if y.ndim == 1 else y.shape} labels of type {y.dtype} for {n} "
                           f"images; expected {n} integer labels")
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise DatasetError(f"{where}: labels range over [{y.min()}, {y.max()}]; expected [0, {num_classes - 1}]")
    return torch.from_numpy(y.astype(np.int64))


def check_split(x, y, num_classes, where):
    """What every loader returns (and a decoded cache read back): uint8 (n > 0, 3, H, H) images and n integer
    labels in [0, num_classes)."""
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] != 3 or x.shape[2] != x.shape[3] or len(x) == 0:
        raise DatasetError(f"{where}: images {x.dtype} {tuple(x.shape)}; expected uint8 (n > 0, 3, H, H)")
    check_labels(y.numpy(), len(x), num_classes, where)


def load_cifar10(root):
    folder = Path(root) / "cifar-10-python"
    if not folder.is_dir() and (Path(root) / "cifar-10-batches-py").is_dir():
        folder = Path(root) / "cifar-10-batches-py"  # the official archive's folder name
    if not folder.is_dir():
        raise DatasetError(f"CIFAR-10 folder not found: {folder}; expected layout: {CIFAR10_LAYOUT}")
    parts = [_cifar_arrays(folder / f"data_batch_{i}", "labels", CIFAR10_LAYOUT, 10) for i in range(1, 6)]
    test_x, test_y = _cifar_arrays(folder / "test_batch", "labels", CIFAR10_LAYOUT, 10)
    train_x = torch.cat([p[0] for p in parts])
    train_y = torch.cat([p[1] for p in parts])
    return train_x, train_y, test_x, test_y, 10


def load_cifar100(root):
    folder = Path(root) / "data" / "cifar-100-python"
    if not all((folder / f).is_file() for f in ("train", "test")):
        off = [p for p in (Path(root) / "cifar-100-python", Path(root).parent / "cifar-100-python")
               if (p / "train").is_file()]
        if off:  # data.root one level off: say so instead of downloading a second copy
            raise DatasetError(f"CIFAR-100 not found at {folder}, but {off[0]} holds it: the layout is "
                               f"{CIFAR100_LAYOUT}, i.e. data.root must be the folder that holds data/cifar-100-python/ "
                               f"(here {off[0].parent.parent}); set data.root or move the folder")
        try:  # torchvision downloads into data/data/cifar-100-python
            from torchvision.datasets import CIFAR100
            CIFAR100(root=str(Path(root) / "data"), train=True, download=True)
        except Exception as e:
            first = (str(e).strip().splitlines() or [""])[0]
            raise DatasetError(f"CIFAR-100 not found at {folder} and the download failed ({type(e).__name__}: "
                               f"{first}); put the files there by hand: {CIFAR100_LAYOUT}") from None
    train_x, train_y = _cifar_arrays(folder / "train", "fine_labels", CIFAR100_LAYOUT, 100)
    test_x, test_y = _cifar_arrays(folder / "test", "fine_labels", CIFAR100_LAYOUT, 100)
    return train_x, train_y, test_x, test_y, 100


def _read_mat_list(path):
    """Official Stanford Dogs lists: file_list is an (N, 1) cell of 'wnid-Breed/name.jpg'."""
    from scipy.io import loadmat
    try:
        cells = loadmat(str(path))["file_list"].ravel()
    except Exception as e:
        raise DatasetError(f"could not read 'file_list' from {path} ({e!r}); expected the official list") from e
    return [str(np.asarray(c).ravel()[0]) for c in cells]


def _decode_image(path, size):
    """Resize the shorter side to `size` (antialiased), centre-crop to size x size, uint8 CHW."""
    from PIL import Image
    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        im = im.resize((nw, nh), Image.BICUBIC)
        left, top = (nw - size) // 2, (nh - size) // 2
        im = im.crop((left, top, left + size, top + size))
        return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1)


def stanford_dogs_split(folder):
    """(breeds, train_files, test_files, split_name): files relative to images/Images, official split if present."""
    images = folder / "images" / "Images"
    if not images.is_dir():
        raise DatasetError(f"Stanford Dogs images not found: {images}; expected layout: {DOGS_LAYOUT}")
    breeds = sorted(p.name for p in images.iterdir() if p.is_dir())
    if not breeds:
        raise DatasetError(f"no breed folders in {images}; expected layout: {DOGS_LAYOUT}")
    if (folder / "train_list.mat").is_file() and (folder / "test_list.mat").is_file():
        return breeds, _read_mat_list(folder / "train_list.mat"), _read_mat_list(folder / "test_list.mat"), "official"
    train, test = [], []
    for b in breeds:  # sorted file names are in no meaningful order: the first 100 go to train
        files = sorted(f"{b}/{p.name}" for p in (images / b).iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))
        if len(files) <= DOGS_TRAIN_PER_BREED:
            raise DatasetError(f"{images / b} has {len(files)} .jpg images; without train_list.mat / test_list.mat "
                               f"in {folder} the first {DOGS_TRAIN_PER_BREED} of each breed are train and the rest "
                               f"test, so every breed needs more than {DOGS_TRAIN_PER_BREED}")
        train += files[:DOGS_TRAIN_PER_BREED]
        test += files[DOGS_TRAIN_PER_BREED:]
    return breeds, train, test, f"first{DOGS_TRAIN_PER_BREED}"


def files_key(images, breeds, files, split):
    """What a decoded image cache (Stanford Dogs, Tiny ImageNet) was built from: split, classes, and every
    file's name, size and mtime."""
    h = hashlib.sha256(f"{split}|{'|'.join(breeds)}".encode())
    for f in files:
        st = (images / f).stat()
        h.update(f"|{f}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


DOGS_CHECKER = "; `python test_stanford_dogs.py` lists every unreadable file"


def decode_image_or_fail(path, size, hint):
    """_decode_image whose failure names the file (a truncated JPEG, a non-image with a .jpg name)."""
    try:
        return _decode_image(path, size)
    except Exception as e:
        raise DatasetError(f"cannot decode {path} ({type(e).__name__}: {e}){hint}") from e


def load_stanford_dogs(root, resolution):
    folder = Path(root) / "stanford-dogs"
    breeds, train_files, test_files, split = stanford_dogs_split(folder)
    images = folder / "images" / "Images"
    for name, files in (("train", train_files), ("test", test_files)):
        if not files:
            raise DatasetError(f"the Stanford Dogs {name} split ({split}) of {folder} is empty")
    missing = [f for f in train_files + test_files if not (images / f).is_file()]
    if missing:
        raise DatasetError(f"{len(missing)} listed images missing under {images}, e.g. {missing[0]}")
    # keyed by what it was decoded from: a changed, added or removed file or breed decodes afresh
    cache = folder / f"cache_{split}_{resolution}px_{files_key(images, breeds, train_files + test_files, split)}.pt"
    index = {b: i for i, b in enumerate(breeds)}
    label = lambda files: [index[f.split("/")[0]] for f in files]
    return (*decoded_splits(cache, "Stanford Dogs", images, (train_files, label(train_files)),
                            (test_files, label(test_files)), resolution, DOGS_CHECKER), len(breeds), split)


def decoded_splits(cache, what, folder, train, test, resolution, hint):
    """(train_x, train_y, test_x, test_y) of the (files, labels) pairs under `folder`: read from `cache` when it
    exists, else decoded in threads (PIL decodes without the GIL) and cached."""
    from concurrent.futures import ThreadPoolExecutor
    from tqdm import tqdm
    keys = ["train_x", "train_y", "test_x", "test_y"]
    if cache.is_file():
        d = read_pth(cache, f"a decoded {what} cache (delete it to re-decode)", keys)
        return tuple(d[k] for k in keys)
    parts = []
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        for files, labels in (train, test):
            x = list(tqdm(pool.map(lambda f: decode_image_or_fail(folder / f, resolution, hint), files),
                          total=len(files), desc="decode", leave=False))
            parts += [torch.stack(x), torch.tensor(labels, dtype=torch.int64)]
    atomic_save(dict(zip(keys, parts)), cache)
    return tuple(parts)


def tiny_imagenet_files(folder):
    """(wnids, train files, train labels, val files, val labels), files relative to tiny-imagenet-200/; the val
    split (labels in val/val_annotations.txt) is the test split, as the official test images have no labels."""
    wnids_file, ann = folder / "wnids.txt", folder / "val" / "val_annotations.txt"
    for p in (wnids_file, folder / "train", ann):
        if not p.exists():
            raise DatasetError(f"Tiny ImageNet: {p} not found; expected layout: {TINY_LAYOUT}")
    wnids = [w.strip() for w in wnids_file.read_text().splitlines() if w.strip()]
    if not wnids:
        raise DatasetError(f"{wnids_file} lists no classes; expected one wnid per line")
    train, train_y = [], []
    for i, w in enumerate(wnids):
        d = folder / "train" / w / "images"
        files = sorted(p.name for p in d.iterdir() if p.suffix.lower() in (".jpeg", ".jpg", ".png")) \
            if d.is_dir() else []
        if not files:
            raise DatasetError(f"Tiny ImageNet: no images in {d} (class {w} of {wnids_file}); expected layout: "
                               f"{TINY_LAYOUT}")
        train += [f"train/{w}/images/{f}" for f in files]
        train_y += [i] * len(files)
    index, val, val_y = {w: i for i, w in enumerate(wnids)}, [], []
    for n, line in enumerate(ann.read_text().splitlines(), 1):
        parts = line.split("\t")
        if len(parts) < 2 or parts[1] not in index:
            raise DatasetError(f"{ann}, line {n}: expected '<file>\\t<wnid>\\t...' with a wnid of {wnids_file.name}, "
                               f"got {line[:80]!r}")
        val.append(f"val/images/{parts[0]}")
        val_y.append(index[parts[1]])
    missing = [f for f in train + val if not (folder / f).is_file()]
    if missing or not val:
        raise DatasetError(f"Tiny ImageNet: {len(missing)} listed images missing under {folder}"
                           + (f", e.g. {missing[0]}" if missing else f"; {ann} lists no images"))
    return wnids, train, train_y, val, val_y


def load_tiny_imagenet(root, resolution):
    folder = Path(root) / "tiny-imagenet-200"
    wnids, train, train_y, val, val_y = tiny_imagenet_files(folder)
    cache = folder / f"cache_{resolution}px_{files_key(folder, wnids, train + val, 'val')}.pt"
    return (*decoded_splits(cache, "Tiny ImageNet", folder, (train, train_y), (val, val_y), resolution, ""),
            len(wnids))


def load_digits(resolution):
    """scikit-learn's bundled 8x8 digits, upsampled (bilinear) to resolution x resolution RGB."""
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split
    d = sk_digits()
    x = torch.from_numpy(d.images).float()[:, None] / 16  # (1797, 1, 8, 8) in [0, 1]
    x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)
    x = (x * 255).round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    y = torch.from_numpy(d.target).long()
    tr, te = train_test_split(np.arange(len(y)), test_size=DIGITS_TEST_FRACTION, stratify=d.target, random_state=0)
    return x[tr], y[tr], x[te], y[te], 10


def load_dataset(name, root, resolution, train_subset=0):
    """uint8 train/test tensors + labels + the train split's normalisation (SPEC 7).

    CIFAR below 32 px is downsampled (antialiased) once here; `train_subset` > 0 keeps that many train
    images, a fixed random draw (seed 0, whatever the run's seed, so teacher, distillation and evaluation
    see the same images), for the CPU-scale configs. The test split is always whole.
    """
    if name in ("CIFAR10", "CIFAR100") and not 1 <= resolution <= 32:
        raise ConfigError(f"{name} is 32x32; data.resolution must be in [1, 32], got {resolution}")
    if name == "CIFAR10":
        parts = load_cifar10(root)
    elif name == "CIFAR100":
        parts = load_cifar100(root)
    elif name == "STANFORD_DOGS":
        parts = load_stanford_dogs(root, resolution)
    elif name == "TINY_IMAGENET":
        parts = load_tiny_imagenet(root, resolution)
    elif name == "DIGITS":
        parts = load_digits(resolution)
    else:
        raise ConfigError(f"unknown dataset {name!r}; expected one of {list(DATASETS)}")
    train_x, train_y, test_x, test_y, num_classes, *split = parts
    for what, x, y in (("train", train_x, train_y), ("test", test_x, test_y)):
        check_split(x, y, num_classes, f"{name} {what} split (data.root {root})")
    if train_x.shape[-1] != resolution:
        train_x, test_x = resize_uint8(train_x, resolution), resize_uint8(test_x, resolution)
    if train_subset:
        if not 0 < train_subset <= len(train_x):
            raise ConfigError(f"data.train_subset: {train_subset} is not in [1, {len(train_x)}] "
                              f"(the {name} train split has {len(train_x)} images; 0 keeps them all)")
        keep = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(0))[:train_subset].sort().values
        train_x, train_y = train_x[keep], train_y[keep]
    mean, std = channel_stats(train_x)
    return ImageData(name, train_x, train_y, test_x, test_y, mean, std, num_classes,
                     tensor_hash(train_x, train_y), split[0] if split else "")


def tensor_hash(*tensors):
    """sha256 (16 hex digits) of CPU tensors' bytes: the identity of a train split."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(str((tuple(t.shape), t.dtype)).encode())
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def load_data(cfg):
    """The config's source dataset: load_dataset with its data: keys."""
    d = cfg["data"]
    return load_dataset(cfg["dataset"], d["root"], d["resolution"], d["train_subset"])


def resize_uint8(x, size, chunk=8192):
    """uint8 (N, 3, H, W) -> uint8 (N, 3, size, size), bilinear with antialiasing (a downsample keeps detail)."""
    return torch.cat([F.interpolate(p.float(), size=(size, size), mode="bilinear", antialias=True,
                                    align_corners=False).round().clamp(0, 255).to(torch.uint8)
                      for p in x.split(chunk)])


def normalize(x, mean, std):
    """uint8 (or [0, 1] float) images -> float32 normalised with the dataset's mean/std."""
    if x.dtype == torch.uint8:
        x = x.float().div_(255)
    return (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


# ============================================================================================
# Augmentation: batched on the device, one random draw per sample, from a torch.Generator
# ============================================================================================
def _uniform(n, lo, hi, gen, device):
    return torch.rand(n, generator=gen, device=device) * (hi - lo) + lo


def _coin(n, p, gen, device):
    return torch.rand(n, generator=gen, device=device) < p


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
    return torch.where(_coin(B, p, gen, dev).view(B, 1, 1, 1), y, x)


def random_grayscale(x, p, gen):
    mask = _coin(x.shape[0], p, gen, x.device).view(-1, 1, 1, 1)
    return torch.where(mask, _gray(x).expand_as(x), x)


def random_flip(x, p, gen):
    mask = _coin(x.shape[0], p, gen, x.device).view(-1, 1, 1, 1)
    return torch.where(mask, x.flip(3), x)


def random_solarize(x, p, gen, threshold=0.5):
    mask = _coin(x.shape[0], p, gen, x.device).view(-1, 1, 1, 1)
    return torch.where(mask & (x >= threshold), 1 - x, x)


def barlow_views(x, mean, std, aug, gen):
    """Two asymmetric Barlow Twins views (SPEC 1) of a uint8 batch, normalised float32."""
    x = x.float() / 255
    views = []
    for solarize_p in aug["solarize_p"]:
        v = random_resized_crop(x, x.shape[-1], aug["crop_scale"], gen)
        v = color_jitter(v, *aug["jitter"], aug["jitter_p"], gen)
        v = random_grayscale(v, aug["grayscale_p"], gen)
        v = random_flip(v, aug["flip_p"], gen)
        v = random_solarize(v, solarize_p, gen)
        views.append(normalize(v, mean, std))
    return views


def random_crop_flip(x, pad, gen):
    """Reflect-pad by `pad`, random crop back to H x W and horizontal flip, per sample (SPEC 6.1)."""
    B, C, H, W = x.shape
    dev = x.device
    xp = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dy = torch.randint(0, 2 * pad + 1, (B,), generator=gen, device=dev)
    dx = torch.randint(0, 2 * pad + 1, (B,), generator=gen, device=dev)
    rows = (dy[:, None] + torch.arange(H, device=dev))[:, :, None]  # (B, H, 1)
    cols = (dx[:, None] + torch.arange(W, device=dev))[:, None, :]  # (B, 1, W)
    out = xp[torch.arange(B, device=dev)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)  # (B, C, H, W)
    return random_flip(out, 0.5, gen)


def rotate(x, angle):
    """The exact predefined augmentation a_k: torch.rot90 on the spatial dims."""
    if angle % 90:
        raise ValueError(f"rotations must be multiples of 90 degrees, got {angle}")
    return torch.rot90(x, (angle // 90) % 4, dims=(-2, -1))


def all_views(x, rotations):
    """(B, ...) -> (K*B, ...), view-major: [x, a_1(x), ..., a_{K-1}(x)]."""
    return torch.cat([x] + [rotate(x, a) for a in rotations])


# ============================================================================================
# Storage accounting (SPEC 3): the budget, and m within it
# ============================================================================================
INIT_ONLY = "init_only"  # sub-folder: the same set at step 0, approximation nets fitted to it


def distilled_folder(cfg, name):
    """main_distill.py's default output: distilled_assets/<config name>_N<budget>[_krr_st]"""
    suffix = "_krr_st" if cfg["distillation"]["method"] == "krr_st" else ""
    return Path("distilled_assets") / f"{name}_N{cfg['storage']['budget_N']}{suffix}"


def storage_accounting(cfg, resolution):
    """Every stored float, in a table; m is the largest count within budget unless the config fixes it."""
    N, S = cfg["storage"]["budget_N"], cfg["storage"]
    d_y = models.resnet18_dim(cfg["network"]["width"])  # the teacher's feature width
    per_image = 3 * resolution * resolution + d_y  # an image plus its target representation (KRR-ST)
    budget = N * per_image
    if cfg["distillation"]["method"] == "krr_st":
        m = N
        rows = {"X (free pixels)": m * 3 * resolution**2, "Y (free targets)": m * d_y}
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
        raise ConfigError(
            f"storage: budget {budget:,} floats (N={N} images x {per_image:,}) cannot hold the bases, means and "
            f"approximation nets ({fixed:,} floats) plus one distilled image ({per_m} floats); "
            f"raise storage.budget_N or lower parameterization.U / V")
    m = S["m"] or m_max
    stored = fixed + m * per_m
    what = "C_x, C_y" + (", C_y^k" if S["store_augmented_targets"] else "")
    rows[f"{what} (m x {per_m})"] = m * per_m
    if stored > budget:
        raise ConfigError(
            f"storage: m={m} needs {stored:,} floats > budget {budget:,} (N={N} images x {per_image:,} floats); "
            f"fixed cost {fixed:,}, {per_m} floats per distilled image, so the largest m within budget is {m_max}")
    return {"budget_N": N, "floats_per_image": per_image, "budget": budget, "rows": rows, "m": m,
            "m_max": m_max, "stored": stored}


def print_storage(table):
    print(f"storage budget: N={table['budget_N']} images x {table['floats_per_image']:,} floats = {table['budget']:,}")
    for k, v in table["rows"].items():
        print(f"  {k:<34s}{v:>12,}")
    print(f"  {'stored':<34s}{table['stored']:>12,}  ({100 * table['stored'] / table['budget']:.2f}% of budget)")
    print(f"  m = {table['m']} distilled images (largest within budget: {table['m_max']})")


# ============================================================================================
# Parameterization (SPEC 2): PCA bases, the distilled set's file (writer and reader)
# ============================================================================================
def pca(X, k):
    """Top-k principal directions of the rows of X: (mean (D,), basis (k, D) with orthonormal rows)."""
    X = X.double()
    mu = X.mean(0)
    Xc = X - mu
    evals, evecs = torch.linalg.eigh(Xc.T @ Xc / X.shape[0])  # ascending
    if k > X.shape[1]:
        raise ConfigError(f"asked for {k} PCA components of {X.shape[1]}-d data")
    return mu.float(), evecs[:, -k:].flip(1).T.contiguous().float()


def downsample(x, r_b):
    """Normalised images (n, 3, H, W) -> flattened antialiased r_b x r_b (n, 3 r_b^2)."""
    return F.interpolate(x, size=(r_b, r_b), mode="bilinear", antialias=True, align_corners=False).flatten(1)


def decode_images(C_x, B_x, mu_x, size):
    """x_i = bilinear_upsample(reshape(mu_x + c_i^x B_x)) -> (m, 3, size, size)."""
    r_b = int(round((mu_x.numel() / 3) ** 0.5))
    low = (mu_x + C_x @ B_x).view(-1, 3, r_b, r_b)
    return F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)


def decode_targets(C_y, B_y, mu_y):
    """y_i = mu_y + c_i^y B_y -> (m, d_y)."""
    return mu_y + C_y @ B_y


def save_distilled(folder, asset, controls, nets):
    """What main_distill.py writes and load_distilled reads back: distilled_data.pth (`asset`), controls.pth
    (`controls`) and approx_net_rot_<angle>.pth for each {angle: (ApproxMLP, relative error)} of `nets`; every
    file carries the run id, so a folder that mixes two runs is refused when read."""
    folder = Path(folder)
    V = asset["C_y"].shape[1] if nets else None
    for angle, (net, err) in nets.items():
        atomic_save({"state_dict": {k: v.cpu() for k, v in net.state_dict().items()}, "V": V,
                     "hidden": net[0].out_features, "rotation": angle, "relative_error": err,
                     "run_id": asset["run_id"]}, folder / f"approx_net_rot_{angle}.pth")
    atomic_save(controls, folder / CONTROLS_FILE)
    atomic_save(asset, folder / "distilled_data.pth")


def load_distilled(folder, device, exact=False):
    """A distilled_assets folder -> (views (K*m, 3, H, W), targets (K*m, d_y), the stored dict).

    Views are view-major as all_views; rotated targets come from the approximation MLPs
    (SPEC 5) or, for the ablation that stores them, from the stored coefficients. exact=True reads
    the learned C_y^k from controls.pth instead (the distilled_exact row: the cost of approximating).
    """
    folder = Path(folder)
    path = folder / "distilled_data.pth"
    if not path.is_file():
        raise FileNotFoundError(f"no distilled set at {path}; run main_distill.py with this config first")
    d = read_pth(path, "a distilled set written by main_distill.py",
                 ["method", "rotations", "resolution", "run_id", "train_hash", "target_scale"], device)
    if d["method"] == "krr_st":
        return d["X"].float(), d["Y"].float(), d
    X = decode_images(d["C_x"], d["B_x"], d["mu_x"], d["resolution"])
    views, targets = [X], [decode_targets(d["C_y"], d["B_y"], d["mu_y"])]
    stored_C_yk = read_controls(folder, device, d.get("run_id"))["C_y_aug"] if exact else d.get("C_y_aug")
    for k, angle in enumerate(d["rotations"]):
        views.append(rotate(X, angle))
        if exact or d["store_augmented_targets"]:
            C_yk = stored_C_yk[k]
        else:
            net = load_approx_net(folder / f"approx_net_rot_{angle}.pth", device, d.get("run_id"))
            with torch.no_grad():
                C_yk = d["C_y"] + net(d["C_y"])
        targets.append(decode_targets(C_yk, d["B_y"], d["mu_y"]))
    return torch.cat(views), torch.cat(targets), d


CONTROLS_FILE = "controls.pth"  # init indices and learned C_y^k, outside distilled_data.pth and its budget


def check_same_run(path, found, run_id):
    """A file of a distilled_assets folder must come from the run that wrote distilled_data.pth beside it."""
    if found != run_id:
        raise ValueError(f"{path} belongs to run {found}, but distilled_data.pth beside it to run {run_id}: the "
                         f"folder mixes two runs; rerun main_distill.py into an empty folder (or --overwrite)")


def read_controls(folder, device="cpu", run_id=None):
    """controls.pth of a distilled_assets folder: init indices and learned C_y^k (not part of the set)."""
    path = Path(folder) / CONTROLS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {path}: the real_init and distilled_exact rows need it; rerun main_distill.py")
    c = read_pth(path, "the controls written by main_distill.py", ["init_indices", "run_id"], device)
    if run_id is not None:
        check_same_run(path, c["run_id"], run_id)
    return c


def load_approx_net(path, device, run_id):
    if not Path(path).is_file():
        raise FileNotFoundError(f"approximation net missing: {path}; rerun main_distill.py")
    s = read_pth(path, "an approximation net written by main_distill.py", ["state_dict", "V", "hidden", "run_id"],
                 device)
    check_same_run(path, s["run_id"], run_id)
    net = models.ApproxMLP(s["V"], s["hidden"]).to(device)
    net.load_state_dict(s["state_dict"])
    return net.eval()


# ============================================================================================
# Teacher and features: each frozen network runs once per input
# ============================================================================================
def config_name(config_path):
    """A config's name, its file stem (cifar10, cifar10_cpu): default output names carry it, so runs of two
    configs of one dataset never share a teacher, a distilled set or a table."""
    return Path(config_path).stem


def teacher_path(name, folder="teacher_models"):
    return Path(folder) / f"resnet18_barlow_twins_{name}.pth"


def file_hash(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_teacher(path, backbone, cfg, data, run_id):
    """The teacher file load_teacher reads: the backbone's weights and what it was trained on."""
    width = cfg["network"]["width"]
    meta = {"dataset": cfg["dataset"], "resolution": cfg["data"]["resolution"], "epochs": cfg["pretrain"]["epochs"],
            "mean": data.mean.tolist(), "std": data.std.tolist(), "d_y": models.resnet18_dim(width),
            "width": width, "train_images": len(data.train_x), "train_hash": data.fingerprint, "split": data.split,
            "run_id": run_id}
    atomic_save({"backbone": {k: v.cpu() for k, v in backbone.state_dict().items()}, "meta": meta}, path)


def load_teacher(path, cfg, device, data=None):
    """The frozen Barlow Twins backbone g written by pretrain.py, checked against the config and, when the
    teacher recorded it, against the train split it was trained on (`data`: another subset or Dogs split
    would pair its targets with images it never saw)."""
    path, dataset, resolution, width = Path(path), cfg["dataset"], cfg["data"]["resolution"], cfg["network"]["width"]
    if not path.is_file():
        raise FileNotFoundError(f"teacher not found: {path}; run `python pretrain.py {dataset}` first")
    d = read_pth(path, "a teacher file written by pretrain.py", ["backbone", "meta"])
    meta = d["meta"]
    if meta["dataset"] != dataset or meta["resolution"] != resolution:
        raise ValueError(f"{path} is a teacher for {meta['dataset']} at {meta['resolution']} px, "
                         f"but the config asks for {dataset} at {resolution} px")
    if meta.get("width", 64) != width:
        raise ValueError(f"{path} is a ResNet-18 of width {meta.get('width', 64)}, but the config asks for "
                         f"network.width {width}")
    if data is not None and meta.get("train_hash") not in (None, data.fingerprint):
        raise ValueError(f"{path} was trained on another {dataset} train split (hash {meta['train_hash']}, "
                         f"{meta.get('train_images')} images{', split ' + meta['split'] if meta.get('split') else ''}) "
                         f"than the config loads (hash {data.fingerprint}, {len(data.train_x)} images"
                         f"{', split ' + data.split if data.split else ''}); retrain it with pretrain.py")
    g = models.resnet18_cifar(width)
    g.load_state_dict(d["backbone"], strict=True)
    return channels_last_module(g.to(device), device).eval(), meta


@torch.no_grad()
def embed_all(net, x, mean, std, batch_size, angle=0, precision_name="bfloat16"):
    """Features of every image of a uint8 (or normalised float) tensor, in eval mode: (N, d) float32,
    computed in `precision_name` (bf16 for probe features; the teacher targets take data.target_precision)."""
    net.eval()
    dev = next(net.parameters()).device
    out = []
    for part in x.split(batch_size):
        part = part.to(dev)
        part = normalize(part, mean, std) if part.dtype == torch.uint8 else part
        part = rotate(part, angle) if angle else part
        with precision(dev, precision_name):
            f = net(to_channels_last(part, dev))
        out.append(f.float())
    return torch.cat(out)


def teacher_targets(teacher, teacher_file, data, rotations, dcfg, fallback_dir, teacher_hash=None):
    """T[i, k] = s g(a_k(x_i)) for every train image and view: (N_train, K, d_y), and the scale s.

    The raw features are cached on disk beside the teacher (or in `fallback_dir`, the run folder, when the
    teacher's folder is read-only), keyed by the teacher file's hash, the train split's hash and the rotations
    (SPEC 4.1) and the precision `data.target_precision` they were computed in. s is one constant that sets the
    identity views' root-mean-square to `target_rms`: a short
    teacher's eval-mode features can be 1e3-1e5 large, and the SGD of the pool and of the students diverges
    on them, while the KRR fit and the linear probe are unchanged by s. Every script derives s from the same
    teacher and split, so all of them see the same targets; the assets record it. `dcfg`: the config's data
    section; `teacher_hash`: the teacher file's sha256 when the caller already has it (hashing it again is
    another full read)."""
    teacher_hash = teacher_hash or file_hash(teacher_file)
    key = f"{data.name.lower()}_n{len(data.train_x)}_{data.fingerprint}_{teacher_hash[:16]}_" \
          f"rot{'-'.join(map(str, rotations)) or 'none'}_{dcfg['target_precision']}"
    beside, fallback = Path(teacher_file).parent / f"targets_{key}.pt", Path(fallback_dir) / f"targets_{key}.pt"
    dev = next(teacher.parameters()).device
    found = [p for p in (beside, fallback) if p.is_file()]
    if found:
        T = read_pth(found[0], "cached teacher targets (delete it to recompute)", map_location=dev)
    else:
        T = torch.stack([embed_all(teacher, data.train_x, data.mean, data.std, dcfg["eval_batch_size"], a,
                                   dcfg["target_precision"]) for a in [0] + list(rotations)], dim=1)
        path = beside if os.access(beside.parent, os.W_OK) else fallback
        if path == fallback:
            print(f"teacher folder {beside.parent} is not writable: caching the targets in {fallback}")
        atomic_save(T.cpu(), path)
    if T.shape[:2] != (len(data.train_x), 1 + len(rotations)) or not torch.isfinite(T).all():
        raise ValueError(f"teacher targets from {teacher_file} are malformed or not finite (shape {tuple(T.shape)}); "
                         f"delete {found[0] if found else 'the cache'} or retrain the teacher")
    scale = dcfg["target_rms"] / T[:, 0].pow(2).mean().sqrt().clamp_min(1e-12).item()
    return T.mul_(scale), scale


# ============================================================================================
# Probes and transfer: kNN monitor, linear probe (SPEC 6.2), teacher fit, fine-tuning, BatchNorm recalibration
# ============================================================================================
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


def batches(n, batch_size, iterations, gen):
    """`iterations` random index batches of min(batch_size, n) from range(n), reshuffled each epoch (a
    DataLoader with shuffle=True and drop_last), drawn from `gen` on its device."""
    b = min(batch_size, n)
    perm, pos = torch.randperm(n, generator=gen, device=gen.device), 0
    for _ in range(iterations):
        if pos + b > n:
            perm, pos = torch.randperm(n, generator=gen, device=gen.device), 0
        yield perm[pos:pos + b]
        pos += b


def linear_probe(train_f, train_y, test_f, test_y, num_classes, probe, seed):
    """Linear(d -> classes) on frozen features: SGD + cosine for `iterations` steps; test top-1 (%)."""
    dev = train_f.device
    gen = make_generator(dev, seed)
    torch.manual_seed(seed)
    head = torch.nn.Linear(train_f.shape[1], num_classes).to(dev)
    opt = torch.optim.SGD(head.parameters(), lr=probe["lr"], momentum=probe["momentum"],
                          weight_decay=probe["weight_decay"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, probe["iterations"])
    for idx in batches(len(train_f), probe["batch_size"], probe["iterations"], gen):
        loss = F.cross_entropy(head(train_f[idx]), train_y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        return 100.0 * (head(test_f).argmax(1) == test_y).float().mean().item()


def teacher_fit(features, teacher_features, ridge):
    """R^2 on the test split of a ridge readout (fit on the train split) from a backbone's frozen features
    to the teacher's: 1 - SSE / SST, SST around the teacher's train mean. How much of the teacher a
    pre-trained student reproduces on unseen images (1 for the teacher itself). features and
    teacher_features are (train, test) pairs; ridge is relative to the mean eigenvalue of the Gram matrix."""
    (X, X_test), (Y, Y_test) = features, teacher_features
    ones = lambda A: torch.cat([A.double(), A.new_ones(len(A), 1, dtype=torch.float64)], 1)
    X, X_test, Y, Y_test = ones(X), ones(X_test), Y.double(), Y_test.double()
    G = X.T @ X
    lam = ridge * torch.trace(G) / len(G)
    W = torch.linalg.solve(G + lam * torch.eye(len(G), dtype=G.dtype, device=G.device), X.T @ Y)
    sse = (X_test @ W - Y_test).pow(2).sum()
    sst = (Y_test - Y.mean(0)).pow(2).sum()
    return (1 - sse / sst).item()


def check_features(features, row):
    """A backbone whose frozen features are not finite (a diverged student) is an error, never a probed number."""
    for split, f in zip(("train", "test"), features):
        if not torch.isfinite(f).all():
            raise FloatingPointError(f"{row}: the pre-trained backbone gives non-finite features on the {split} "
                                     f"split; its accuracy would be meaningless (lower evaluation.lr, or check "
                                     f"the teacher's target scale)")


@torch.no_grad()
def recalibrate_bn(net, data, batch_size):
    """Every BatchNorm's running statistics re-estimated on data's train split: a train-mode pass without
    gradients, averaged exactly over the batches (momentum None); weights untouched; returns net in eval mode.
    The no_pretraining row's option (`evaluation.random_init_bn: recalibrate`): at its initial statistics (mean
    0, var 1) an eval-mode random VGG-11 gives features of scale ~1e-6 that the SGD probe reads at chance."""
    norms = [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    net.train()
    dev = next(net.parameters()).device
    for part in data.train_x.split(batch_size):
        net(to_channels_last(normalize(part.to(dev), data.mean, data.std), dev))  # float32: statistics, once
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    return net.eval()


def split_features(backbone, data, batch_size):
    """Frozen features of the train and test splits (normalised, un-augmented): what kNN and probe read."""
    return (embed_all(backbone, data.train_x, data.mean, data.std, batch_size),
            embed_all(backbone, data.test_x, data.mean, data.std, batch_size))


def labelled_subset(labels, num_classes, per_class):
    """Indices of `per_class` train images of every class (0 = all) that the probe may read the labels of
    (probe.labels_per_class): a stratified draw fixed by seed 0, whatever the run's seed, so every row and seed
    probes from the same labelled images; nested in k (each class's first k of one fixed order)."""
    if per_class == 0:
        return torch.arange(len(labels), device=labels.device)
    gen, y = torch.Generator().manual_seed(0), labels.cpu()
    picks = []
    for c in range(num_classes):
        members = (y == c).nonzero().flatten()
        if len(members) < per_class:
            raise ConfigError(f"probe.labels_per_class = {per_class}: class {c} has only {len(members)} train "
                              f"images; lower it (0 = every label)")
        picks.append(members[torch.randperm(len(members), generator=gen)[:per_class]])
    return torch.cat(picks).sort().values.to(labels.device)


def probe_backbone(backbone, data, probe, seed, batch_size, features=None):
    """SPEC 6.2: features of both splits computed once (or passed in), then the linear probe, trained on
    probe.labels_per_class labels of each class (0 = the whole train split)."""
    train_f, test_f = features if features is not None else split_features(backbone, data, batch_size)
    keep = labelled_subset(data.train_y, data.num_classes, probe["labels_per_class"])
    return linear_probe(train_f[keep], data.train_y[keep], test_f, data.test_y, data.num_classes, probe, seed)


def finetune(backbone, data, ft, seed, batch_size):
    """Fine-tuned transfer (KRR-ST's protocol): a copy of `backbone` plus a new Linear head trained with the
    labels of data's train split (SGD + cosine, `iterations` steps, crop + flip), top-1 (%) on its test split.
    The pre-trained backbone itself is left unchanged."""
    dev = data.train_x.device
    torch.manual_seed(seed)
    gen = make_generator(dev, seed)
    net = copy.deepcopy(backbone).to(dev)
    with torch.no_grad():
        dim = net.eval()(normalize(data.train_x[:2], data.mean, data.std)).shape[1]
    model = torch.nn.Sequential(net, torch.nn.Linear(dim, data.num_classes).to(dev)).train()
    opt = torch.optim.SGD(model.parameters(), lr=ft["lr"], momentum=ft["momentum"], weight_decay=ft["weight_decay"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, ft["iterations"])
    for idx in batches(len(data.train_x), ft["batch_size"], ft["iterations"], gen):
        x = normalize(data.train_x[idx], data.mean, data.std)
        x = random_crop_flip(x, ft["crop_pad"], gen) if ft["augment"] else x
        with autocast(dev):
            loss = F.cross_entropy(model(to_channels_last(x, dev)).float(), data.train_y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    with torch.no_grad():
        correct = sum((model(to_channels_last(normalize(x, data.mean, data.std), dev)).argmax(1) == y).sum()
                      for x, y in zip(data.test_x.split(batch_size), data.test_y.split(batch_size)))
    return 100.0 * correct.item() / len(data.test_x)


# ============================================================================================
# Checkpoints, run folders (lock and owner), resume checks, logging, NaN guards
# ============================================================================================
def read_pth(path, what, keys=(), map_location="cpu", weights_only=True):
    """torch.load whose failure names the file and what it should have been (not an unpickling trace)."""
    try:
        d = torch.load(path, map_location=map_location, weights_only=weights_only)
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0]
        raise ValueError(f"{path} could not be read as {what}: {type(e).__name__}: {first}") from e
    missing = [k for k in keys if not (isinstance(d, dict) and k in d)]
    if missing:
        raise ValueError(f"{path} is not {what}: keys {missing} missing")
    return d


def _write_atomically(path, write):
    """write(tmp) to a temporary file beside `path`, then os.replace: a crash never leaves half a file, and a
    failed write (disk full, no permission) removes its .partial and says which path it could not write."""
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        os.replace(tmp, path)
    except Exception as e:
        tmp.unlink(missing_ok=True)
        first = (str(e).strip().splitlines() or [""])[0]
        raise OSError(f"could not write {path} ({type(e).__name__}: {first}); check free disk space and "
                      f"permissions there") from e


def atomic_save(obj, path):
    _write_atomically(path, lambda tmp: torch.save(obj, tmp))


def write_json(obj, path):
    _write_atomically(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=1, default=str)))


LOCK_FILE = "run.lock"


class RunFolderError(RuntimeError):
    """A run folder that another run holds, or outputs that would be mixed or lost."""


def _lock_owner_alive(info):
    """True unless the lock's process is known to be gone (same host, no such pid): a killed run's lock is stale."""
    if info.get("host") != socket.gethostname():
        return True  # another machine on a shared disk: we cannot tell
    if info.get("pid") == os.getpid():
        return False  # this process's own earlier run (a script called twice in one Python session)
    try:
        os.kill(int(info["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, KeyError, ValueError, TypeError):
        return True
    try:  # a killed process that nobody reaped (a container without an init) is a zombie: gone as well
        return Path(f"/proc/{int(info['pid'])}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _read_lock(folder):
    path = Path(folder) / LOCK_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {"pid": None, "host": None}


OWNER_FILE = "owner.json"  # which script and which run a run folder belongs to


def read_owner(folder):
    """The owner record of a run folder ({script, run_id, started}), None if it has none; a corrupt one is refused."""
    path = Path(folder) / OWNER_FILE
    if not path.is_file():
        return None
    try:
        owner = json.loads(path.read_text())
        if not (isinstance(owner, dict) and isinstance(owner.get("script"), str) and isinstance(owner.get("run_id"), str)):
            raise ValueError("expected {script, run_id}")
    except (OSError, ValueError) as e:
        raise RunFolderError(f"{path} is not a run folder's owner record ({type(e).__name__}: {e}); the folder's "
                             f"owner is unknown: choose another --out, or --overwrite to move the folder aside") from None
    return owner


def check_run_folder(folder, outputs, resume, overwrite, script):
    """The refusals of claim_run_folder, writing nothing: a live run's lock, outputs that exist without
    --resume/--overwrite, and a folder that belongs to another script (or, without --resume, another run).
    Returns the folder's owner record (None for a new folder)."""
    folder = Path(folder)
    if resume and overwrite:
        raise RunFolderError("pass --resume (continue the run) or --overwrite (replace it), not both")
    held = _read_lock(folder)
    if held is not None and _lock_owner_alive(held):
        raise RunFolderError(f"{folder} is in use by another run (pid {held.get('pid')} on {held.get('host')}, "
                             f"lock {folder / LOCK_FILE}); wait for it, choose another --out, or delete the lock "
                             f"if no run is using the folder")
    existing = [str(p) for p in outputs if Path(p).exists()]
    if existing and not (resume or overwrite):
        raise FileExistsError(f"outputs already exist: {existing}; pass --resume to continue the run, "
                              f"--overwrite to replace them, or choose another --out")
    owner = read_owner(folder)
    if owner is not None and not overwrite:
        if owner["script"] != script:
            raise RunFolderError(f"{folder} belongs to {owner['script']} (run {owner['run_id']}); {script} does not "
                                 f"write into another script's run folder: choose another --out (or --overwrite "
                                 f"to move that folder aside)")
        if not resume:
            raise FileExistsError(f"{folder} holds run {owner['run_id']} of {script}; pass --resume to continue "
                                  f"it, --overwrite to replace it, or choose another --out")
    return owner


def claim_run_folder(folder, outputs, resume, overwrite, script, also=(), keep=()):
    """A run folder belongs to one run of one script: check_run_folder's refusals first; then, under --overwrite,
    move the old folder (plus `also`, its files outside it) aside to <folder>.replaced-<time>-<id>/ in one rename
    before anything is written, so old and new never mix. `keep`: files in it that are caches checked by their
    own metadata (moved back). Writes the owner record (kept by --resume) and a lock; returns the lock path. The
    lock is removed at exit (release_run_folder), and a killed run's stale lock is taken over."""
    folder = Path(folder)
    owner = check_run_folder(folder, outputs, resume, overwrite, script)
    held = _read_lock(folder)
    old = [Path(p) for p in also if Path(p).exists()] + ([folder] if folder.is_dir() and any(folder.iterdir()) else [])
    if overwrite and old:
        aside = folder.with_name(f"{folder.name}.replaced-{new_run_id()}")  # unique, even twice in a second
        if folder.is_dir():
            os.rename(folder, aside)  # one step: the folder holds either the old run or nothing
        aside.mkdir(exist_ok=True)
        (aside / LOCK_FILE).unlink(missing_ok=True)
        for p in also:
            if Path(p).exists():
                os.rename(p, aside / Path(p).name)
        folder.mkdir(parents=True, exist_ok=True)
        for name in keep:
            if (aside / name).exists():
                os.rename(aside / name, folder / name)
        print(f"--overwrite: the previous outputs were moved to {aside} (delete it when no longer needed)")
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / LOCK_FILE
    info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    if held is not None or lock.exists():  # stale (its process is gone): take it over
        lock.unlink(missing_ok=True)
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        raise RunFolderError(f"{folder} was claimed by another run a moment ago (lock {lock})") from None
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(info))
    atexit.register(release_run_folder, lock)
    if owner is None or overwrite:
        write_json({"script": script, "run_id": new_run_id(), "started": info["started"]}, folder / OWNER_FILE)
    return lock


def release_run_folder(lock):
    """Remove this process's lock (at the end of a run, and at exit after a crash)."""
    info = _read_lock(Path(lock).parent)
    if info is not None and info.get("pid") == os.getpid() and info.get("host") == socket.gethostname():
        Path(lock).unlink(missing_ok=True)


def new_run_id():
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"


def config_changes(old, new, prefix=""):
    """Dotted keys whose values differ between two resolved configs."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_changes(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}")
    return out


def load_checkpoint(path, cfg, inputs, allow_changed=()):
    """Load a run checkpoint for --resume. It continues the same run, so the config and the inputs (file and
    data hashes) must be the ones it was written with; `allow_changed` names config keys the user changes on
    purpose (e.g. a lower learning rate after a divergence)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"--resume: no checkpoint at {path}")
    ckpt = read_pth(path, "a checkpoint of this script", ["config"], weights_only=False)
    changed = [k for k in config_changes(ckpt["config"], cfg) if k not in allow_changed]
    if changed:
        diff = ", ".join(f"{k}: {_get_or(ckpt['config'], k)!r} -> {_get_or(cfg, k)!r}" for k in changed)
        raise ValueError(f"--resume: {path} was written with another config ({diff}); resume with the same "
                         f"config, or name the keys you change on purpose: --allow-changed {','.join(changed)}")
    stale = [f"{k} ({ckpt.get('inputs', {}).get(k)} -> {v})" for k, v in inputs.items()
             if ckpt.get("inputs", {}).get(k) != v]
    if stale:
        raise ValueError(f"--resume: the inputs of {path} changed since it was written: {', '.join(stale)}; "
                         f"start a new run (--overwrite) or restore the original inputs")
    return ckpt


def _get_or(cfg, dotted):
    try:
        return _get(cfg, dotted)
    except (KeyError, TypeError):
        return None


def rng_state(gen):
    """The random states a checkpoint keeps, with the kind of device the run's generator lives on."""
    return {"torch": torch.get_rng_state(), "gen": gen.get_state(), "device": gen.device.type,
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state, gen, path="the checkpoint"):
    """Restore rng_state's states. A generator state of another device kind does not fit (a CPU and a CUDA
    generator's states differ in size): refused by name. CUDA states are restored for the GPUs both boxes have."""
    if state.get("device") != gen.device.type:
        raise ValueError(f"--resume: {path} was written by a run on {state.get('device', 'an unrecorded device')}, "
                         f"this run is on {gen.device.type}: resume it on the same kind of device "
                         f"(--device {state.get('device', 'cpu')}), or start afresh with --overwrite")
    torch.set_rng_state(state["torch"])
    gen.set_state(state["gen"])
    if state["cuda"] is not None and torch.cuda.is_available():
        for i, s in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)


class RunLog:
    """Appends one JSON object per line to <run>/log.jsonl (barlowtwins' stats.txt). On resume, rows past the
    checkpoint (`resume_at` = (key, value), written after the last save) are dropped, so none repeats.
    A non-finite value is refused: the file stays valid JSON."""

    def __init__(self, path, resume_at=None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_at is None:
            self.path.unlink(missing_ok=True)
        elif self.path.exists():
            key, last = resume_at
            rows = []
            for n, line in enumerate(self.path.read_text().splitlines(), 1):
                try:
                    value = json.loads(line).get(key, 0) if line.strip() else None
                    if value is not None and not isinstance(value, (int, float)):
                        raise ValueError(f"{key} is {value!r}")
                except (ValueError, AttributeError) as e:
                    raise ValueError(f"{self.path}, line {n}: not a log row of this run ({type(e).__name__}: {e}); "
                                     f"move the file aside to resume without it") from None
                if value is not None and value <= last:
                    rows.append(line)
            self.path.write_text("".join(r + "\n" for r in rows))
        self.t0 = time.time()

    def __call__(self, **row):
        row = {"time_s": round(time.time() - self.t0, 2), **row}
        with open(self.path, "a") as f:
            f.write(json.dumps(row, default=float, allow_nan=False) + "\n")
        return row


def check_finite(loss, where, recovery="lower the learning rate or check the data"):
    """Stop a run whose loss (a float or a 0-d tensor) is NaN or inf, saying where and what to do."""
    value = float(loss.detach()) if torch.is_tensor(loss) else float(loss)
    if not math.isfinite(value):
        sys.exit(f"non-finite loss {value} at {where}; {recovery}")


def all_finite(tensors):
    """One device-side reduction and one host sync for a whole list of tensors (parameters, losses)."""
    tensors = [t.detach() for t in tensors]
    return bool(torch.stack([t.isfinite().all() for t in tensors]).all()) if tensors else True


def resume_hint(checkpoint, step_name, script, argv, lr_key):
    """What a NaN stop tells the user: the command it was started with (every flag and override kept), changed
    to continue from the last good checkpoint with a lower `lr_key`, or to start afresh if none was written."""
    keep, allowed, args = [], [lr_key], list(argv)
    while args:
        a = args.pop(0)
        if a in ("--resume", "--overwrite") or a.startswith(f"--{lr_key}="):
            continue
        if a == "--allow-changed" and args:
            allowed += [k for k in args.pop(0).split(",") if k and k != lr_key]
        elif a.startswith("--allow-changed="):
            allowed += [k for k in a.split("=", 1)[1].split(",") if k and k != lr_key]
        else:
            keep.append(a)
    command = "python " + shlex.join([script] + keep)
    if not Path(checkpoint).is_file():
        return (f"no checkpoint was written before it; start again with a lower learning rate, e.g. "
                f"`{command} --overwrite --{lr_key}=<lower>`")
    return (f"the last good checkpoint {checkpoint} ({step_name}) is kept: continue from it with a lower "
            f"learning rate, e.g. `{command} --resume --allow-changed {','.join(allowed)} --{lr_key}=<lower>`")
