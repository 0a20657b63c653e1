"""Shared helpers for pretrain.py, main_distill.py and main_evaluate.py, and the files two of them exchange
(each writer beside its reader).

Sections, in file order:
    Errors                 UserError and its kinds; cli: a user's mistake is one line
    Config                 SCHEMA (every key: type, range, meaning), load_config, overrides, the common arguments
    Seeding, device        set_seed, get_device, init_ranks (torchrun; the execution helpers are in models.py)
    Data                   the dataset loaders (every file and split checked), normalisation
    Augmentation           flips and rotations (the predefined views a_k of SPEC 2)
    Storage                SPEC 3's budget; the default folder names
    Distilled set files    SPEC 2's decoding, save_distilled / load_distilled, controls, approximation nets
    Teacher and features   save_teacher / load_teacher, frozen features, teacher targets
    Probe                  SPEC 6.2: CosineSGD, the linear probe on frozen features
    Checkpoints            atomic writes, run folders (lock, owner), resume checks, logs, the non-finite stop
"""
import argparse
import atexit
import datetime
import hashlib
import io
import json
import math
import os
import pickle
import random
import shlex
import shutil
import signal
import socket
import stat
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml

import models


# ============================================================================================
# Errors: a user's mistake is one line (cli), a bug keeps its traceback
# ============================================================================================
class UserError(Exception):
    """A mistake in what the user gave, or a run stopped on purpose: cli prints one line, no traceback."""
    exit_code = 2


class ConfigError(UserError, ValueError):
    """A config file or override that does not match SCHEMA."""


class DatasetError(UserError, FileNotFoundError):
    """A dataset folder that is missing or not in the expected layout."""


class InputError(UserError, ValueError):
    """A file read back that is not what it should be (teacher, set, checkpoint, results), or a refused --resume."""


class MissingInput(UserError, FileNotFoundError):
    """A file an earlier script writes is not there yet (teacher, distilled set, checkpoint)."""


class RunFolderError(UserError, FileExistsError):
    """A run folder that another run holds, or outputs that would be mixed or lost."""


class RunStopped(UserError):
    """A run stopped on a non-finite value: nothing of it was saved; the message says how to go on."""
    exit_code = 1


RUN = {}  # what a stop's line names: "at" (where the loop is), "folders" (RunFolders claimed); gloo: "side", "timeout"


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised as Python raises KeyboardInterrupt on SIGINT: the same unwinding."""
    signum = signal.SIGTERM


def _terminate(signum, frame):
    raise Terminated()


def cli(main, script):
    """Run main(): a user's mistake, a signal or a stalled collective is one line on stderr; a bug keeps its trace."""
    signal.signal(signal.SIGTERM, _terminate)
    speaks = rank0 = os.environ.get("RANK", "0") == "0"
    try:
        return main()
    except KeyboardInterrupt as e:
        for sig in (signal.SIGINT, signal.SIGTERM):  # a second signal while stopping: no traceback over the line
            signal.signal(sig, signal.SIG_IGN)
        signum = getattr(e, "signum", signal.SIGINT)
        error, code = f"stopped by {signal.Signals(signum).name}{_at()}; {_kept(script)}", 128 + signum
    except UserError as e:
        error, code = str(e), e.exit_code
    except RuntimeError as e:
        error, speaks, code = *_stalled(e, script, speaks), 1
    if speaks:  # after the except block: the traceback's progress bars are closed, the line starts afresh
        print(("" if rank0 else "\n") + f"{script}: error: {error}", file=sys.stderr)  # (rank 0's line may be cut)
    sys.exit(code)


def _at():
    return f" at {RUN['at']}" if RUN.get("at") else ""


def _kept(script):
    """What a stopped run kept, and the command that goes on from it (the one it was started with)."""
    argv = [a for a in sys.argv[1:] if a not in ("--resume", "--overwrite")]
    kept = [p for f in RUN.get("folders", []) if Path(p := f.checkpoint or f.outputs[0]).is_file()]
    if kept:
        return f"{kept[-1]} is kept (nothing after it was saved): continue with " \
            f"`{command(script, argv + ['--resume'])}`"
    return f"no checkpoint was written, the run folder is free: run it again with `{command(script, argv)}`"


def _stalled(e, script, speaks):
    """(line, whether this rank prints it) after a gloo collective timed out: each live rank sends rank 0 a word over
    RUN["side"]; rank 0 names the ranks it does not hear from."""
    text = str(e).lower()
    if "side" not in RUN or not ("timed out" in text or "closed" in text):
        raise e
    timeout, world = RUN["timeout"], torch.distributed.get_world_size()
    if torch.distributed.get_rank() == 0:
        words = [(r, torch.distributed.irecv(torch.zeros(1), r, group=RUN["side"])) for r in range(1, world)]
        missing, deadline = [], time.time() + timeout.total_seconds()
        for r, word in words:
            try:
                word.wait(datetime.timedelta(seconds=max(deadline - time.time(), 0.01)))
            except RuntimeError:
                missing.append(r)
    else:
        try:
            torch.distributed.isend(torch.zeros(1), 0, group=RUN["side"]).wait(timeout)
            time.sleep(2 * timeout.total_seconds())  # while rank 0 reports (and torchrun stops this process)
            missing = []
        except RuntimeError:
            missing, speaks = [0], world == 2 and "timed out" in text  # (a rank 0 gone spoke for itself)
    what = f"rank {', '.join(map(str, missing))} did not answer" if missing else \
        "every rank answered, but one was late"
    return f"{what} within distributed_timeout_s = {timeout.total_seconds():g} s{_at()} (stalled, stopped or gone; " \
        f"raise the key if a rank was only slow); {_kept(script)}", speaks


# ============================================================================================
# Config: one schema, YAML is the only source of hyperparameters (SPEC: every default in YAML)
# ============================================================================================
DATASETS = ("CIFAR10", "CIFAR100", "STANFORD_DOGS", "TINY_IMAGENET", "IMAGENET64", "DIGITS")
PRECISIONS = ("float32", "tf32", "bfloat16")  # numerics of a frozen-network pass on CUDA (models.precision)


def _range(lo=None, hi=None, lo_open=False, hi_open=False):
    """(predicate, text) for a numeric interval; None is unbounded."""
    ok = lambda v: ((lo is None or (v > lo if lo_open else v >= lo)) and
                    (hi is None or (v < hi if hi_open else v <= hi)))
    text = " and ".join(t for t in ((lo is not None and f"{'>' if lo_open else '>='} {lo}"),
                                    (hi is not None and f"{'<' if hi_open else '<='} {hi}")) if t)
    return ok, text


ANY, POSITIVE, NONNEG, PROB = None, _range(1), _range(0), _range(0, 1)
MOMENTUM, POS_REAL = _range(0, 1, hi_open=True), _range(0, lo_open=True)
ROTATION = (lambda v: v in (90, 180, 270), "one of 90, 180, 270")


@dataclass(frozen=True)
class Key:
    """A key's type (a tuple: a choice; [type]: a list), range (ANY: none), meaning (errors quote it), list length."""
    type: object
    range: tuple
    meaning: str
    length: tuple = None


SCHEMA = {
    "dataset": Key(DATASETS, ANY, "the source dataset (SPEC 7)"),
    "seed": Key(int, NONNEG, "seeds python, numpy, torch and every augmentation generator"),
    "distributed_timeout_s": Key(float, POS_REAL, "torchrun: seconds a rank waits for the others at one collective "
                                 "before the job stops naming the rank that did not come"),
    "data": {
        "root": Key(str, ANY, "the folder that holds the dataset folders"),
        "resolution": Key(int, POSITIVE, "image side H = W in pixels"),
        "train_subset": Key(int, NONNEG, "keep this many train images (a fixed draw, seed 0); 0 = all"),
        "eval_batch_size": Key(int, POSITIVE, "batch of frozen-network passes (targets, features, kNN)"),
        "target_rms": Key(float, POS_REAL, "teacher targets scaled by one constant to this root-mean-square"),
        "target_precision": Key(PRECISIONS, ANY, "numerics of the teacher-target pass on CUDA"),
        "cache_dir": Key(str, ANY, "folder for decoded-image caches; '' = beside the data"),
        "shard": Key(bool, ANY, "main_distill.py under torchrun: each rank keeps only its 1/W of the train images "
                     "and teacher targets"),
    },
    "network": {
        "width": Key(int, POSITIVE, "first-stage channels of every ResNet-18 (64 = standard); d_y = 8 x width")},
    "pretrain": {
        "epochs": Key(int, POSITIVE, "Barlow Twins epochs"),
        "batch_size": Key(int, _range(2), "global batch (all processes)"),
        "lr": Key(float, NONNEG, "base LARS learning rate, scaled by batch_size / 256"),
        "momentum": Key(float, MOMENTUM, "LARS momentum"),
        "weight_decay": Key(float, NONNEG, "LARS weight decay (not on biases and norm parameters)"),
        "lars_eta": Key(float, POS_REAL, "LARS trust coefficient"),
        "warmup_epochs": Key(int, NONNEG, "linear warm-up epochs, then cosine to 0"),
        "lambda_offdiag": Key(float, NONNEG, "weight of the off-diagonal cross-correlation terms"),
        "loss_scale": Key(float, POS_REAL, "Barlow Twins loss scale"),
        "projector_dims": Key([int], POSITIVE, "projector widths (Linear-BN-ReLU..., Linear)", (1, None)),
        "crop_scale": Key([float], _range(0, 1, lo_open=True), "RandomResizedCrop area range [min, max]", (2, 2)),
        "jitter": Key([float], NONNEG, "ColorJitter brightness, contrast, saturation, hue", (4, 4)),
        "jitter_p": Key(float, PROB, "probability of colour jitter"),
        "grayscale_p": Key(float, PROB, "probability of grayscale"),
        "flip_p": Key(float, PROB, "probability of a horizontal flip"),
        "solarize_p": Key([float], PROB, "probability of solarization, per view", (2, 2)),
        "knn_every": Key(int, POSITIVE, "epochs between kNN monitors on the test split"),
        "save_every": Key(int, POSITIVE, "epochs between checkpoints (the last epoch always)"),
        "knn_k": Key(int, POSITIVE, "neighbours of the kNN monitor"),
        "knn_temperature": Key(float, POS_REAL, "temperature of the kNN monitor's votes"),
        "compile": Key(bool, ANY, "torch.compile the backbone + projector (CUDA only)"),
    },
    "parameterization": {
        "image_basis_size": Key(int, POSITIVE, "r_b: the image bases' side in pixels"),
        "U": Key(int, POSITIVE, "number of image bases (rows of B_x)"),
        "V": Key(int, POSITIVE, "number of representation bases (rows of B_y)"),
        "learn_bases": Key(bool, ANY, "learn B_x, B_y with the coefficients"),
    },
    "augmentations": {"rotate": Key([int], ROTATION, "predefined views besides the identity; K = 1 + len", (0, 3))},
    "storage": {
        "budget_N": Key(int, POSITIVE, "budget in images: N (3 H W + d_y) floats"),
        "m": Key(int, NONNEG, "distilled images; 0 = the largest m within the budget"),
        "store_augmented_targets": Key(bool, ANY, "ablation: store C_y^k instead of approximation MLPs"),
    },
    "distillation": {
        "method": Key(("ours", "krr_st"), ANY, "this method, or the KRR-ST baseline"),
        "steps": Key(int, POSITIVE, "outer steps"),
        "outer_batch_size": Key(int, POSITIVE, "real images per outer step"),
        "real_views": Key(("all", "identity"), ANY, "the real batch's views: all K, or the identity only"),
        "lr_image": Key(float, NONNEG, "AdamW lr of C_x"),
        "lr_image_bases": Key(float, NONNEG, "AdamW lr of B_x"),
        "lr_repr": Key(float, NONNEG, "AdamW lr of C_y, C_y^k"),
        "lr_repr_bases": Key(float, NONNEG, "AdamW lr of B_y"),
        "krr_st_lr_pixels": Key(float, NONNEG, "KRR-ST: AdamW lr of the free pixels"),
        "krr_st_lr_targets": Key(float, NONNEG, "KRR-ST: AdamW lr of the free targets"),
        "ridge": Key(float, POS_REAL, "KRR ridge = ridge x trace(K_ss)"),
        "krr_features": Key(PRECISIONS, ANY, "numerics of the pool's KRR features on CUDA"),
        "support_chunk": Key(int, NONNEG, "views per support-set pass; 0 = all at once"),
        "save_every": Key(int, POSITIVE, "steps between checkpoints"),
        "log_every": Key(int, POSITIVE, "steps between log lines"),
        "snapshot_steps": Key([int], POSITIVE, "write the set after these outer steps (gain against steps)", (0, None)),
        "real_features": Key(("same",) + PRECISIONS, ANY, "numerics of the real views' no-grad pass; same = krr_"
                             "features"),
        "fold_bn": Key(bool, ANY, "fold the frozen model's BatchNorm into its convs for the KRR passes"),
        "compile_features": Key(bool, ANY, "torch.compile the KRR feature passes (CUDA only)"),
    },
    "model_pool": {
        "size_L": Key(int, POSITIVE, "ConvNets in the pool"),
        "inner_loop_steps_Z": Key(int, POSITIVE, "a model is re-initialised at this age"),
        "widths": Key([int], POSITIVE, "Conv-BN-ReLU-AvgPool block widths", (1, None)),
        "lr": Key(float, NONNEG, "the pool's SGD learning rate"),
        "momentum": Key(float, MOMENTUM, "the pool's SGD momentum"),
        "weight_decay": Key(float, NONNEG, "the pool's SGD weight decay"),
    },
    "approximation": {
        "hidden": Key(int, POSITIVE, "hidden width of each approximation MLP"),
        "steps": Key(int, POSITIVE, "full-batch Adam steps"),
        "lr": Key(float, NONNEG, "Adam learning rate"),
    },
    "evaluation": {
        "student": Key(tuple(models.STUDENTS), ANY, "the pre-trained network of every row"),
        "epochs": Key(int, POSITIVE, "pre-training epochs on a distilled set or subset"),
        "full_epochs": Key(int, POSITIVE, "pre-training epochs on the whole train set"),
        "batch_size": Key(int, POSITIVE, "pre-training batch (global under torchrun)"),
        "lr": Key(float, NONNEG, "pre-training SGD learning rate (cosine)"),
        "momentum": Key(float, MOMENTUM, "pre-training SGD momentum"),
        "weight_decay": Key(float, NONNEG, "pre-training SGD weight decay"),
        "augment": Key(bool, ANY, "a fresh reflect-pad crop + flip of every view each epoch"),
        "crop_pad": Key(int, NONNEG, "reflect padding of that crop"),
        "random_init_bn": Key(("recalibrate", "init"), ANY, "no_pretraining: BatchNorm statistics"),
    },
    "probe": {
        "iterations": Key(int, POSITIVE, "linear-probe SGD steps"),
        "batch_size": Key(int, POSITIVE, "linear-probe batch"),
        "lr": Key(float, POS_REAL, "linear-probe learning rate (cosine)"),
        "momentum": Key(float, MOMENTUM, "linear-probe momentum"),
        "weight_decay": Key(float, NONNEG, "linear-probe weight decay"),
        "teacher_fit_ridge": Key(float, POS_REAL, "teacher-fit readout ridge x mean Gram eigenvalue"),
        "labels_per_class": Key(int, NONNEG, "labels per class the probe trains on (fixed stratified draw); 0 = all"),
    },
    "finetune": {
        "iterations": Key(int, POSITIVE, "fine-tuning SGD steps"),
        "batch_size": Key(int, POSITIVE, "fine-tuning batch"),
        "lr": Key(float, POS_REAL, "fine-tuning learning rate (cosine)"),
        "momentum": Key(float, MOMENTUM, "fine-tuning momentum"),
        "weight_decay": Key(float, NONNEG, "fine-tuning weight decay"),
        "augment": Key(bool, ANY, "reflect-pad crop + flip of every batch"),
        "crop_pad": Key(int, NONNEG, "reflect padding of that crop"),
    },
}


def leaves(schema=SCHEMA, prefix=""):
    """{dotted key: Key} of every key of the schema."""
    out = {}
    for k, v in schema.items():
        out.update(leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _check_value(value, key, where):
    """`value` as key.type and inside key.range, or a ConfigError naming where (its caller adds what key means)."""
    spec = key.type
    if isinstance(spec, list):
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list of {spec[0].__name__}, got {value!r}")
        value = [_check_type(v, spec[0], f"{where}[{i}]") for i, v in enumerate(value)]
        lo, hi = key.length
        if len(value) < lo or (hi is not None and len(value) > hi):
            want = f"{lo}" if lo == hi else f"at least {lo}" + (f" and at most {hi}" if hi is not None else "")
            raise ConfigError(f"{where} has {len(value)} values, expected {want}")
    else:
        value = _check_type(value, spec, where)
    if key.range is not None:
        ok, text = key.range
        if not all(ok(v) for v in (value if isinstance(value, list) else [value])):
            raise ConfigError(f"{where} = {value!r}: expected {'each value ' if isinstance(value, list) else ''}{text}")
    return value


def _check_type(value, spec, where):
    if isinstance(spec, tuple):
        if value not in spec:
            raise ConfigError(f"{where}: expected one of {list(spec)}, got {value!r}")
        return value
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
            try:
                out[key] = _check_value(cfg[key], spec, f"{source}: {prefix}{key}")
            except ConfigError as e:
                raise ConfigError(f"{e} ({spec.meaning})") from None
    return out


def _check_consistent(cfg, source):
    """Rules between keys, after each key passed its own."""
    lo, hi = cfg["pretrain"]["crop_scale"]
    if lo > hi:
        raise ConfigError(f"{source}: pretrain.crop_scale = {[lo, hi]}: expected [min, max] with min <= max")
    if len(set(cfg["augmentations"]["rotate"])) != len(cfg["augmentations"]["rotate"]):
        raise ConfigError(f"{source}: augmentations.rotate = {cfg['augmentations']['rotate']}: a rotation listed twice")
    P, d_y = cfg["parameterization"], models.resnet18_dim(cfg["network"]["width"])
    for key, n, of in (("U", 3 * P["image_basis_size"] ** 2, "3 x image_basis_size^2, the pixels of a basis image"),
                       ("V", d_y, "d_y = 8 x network.width, the teacher's feature width")):
        if P[key] > n:
            raise ConfigError(f"{source}: parameterization.{key} = {P[key]}: expected <= {n} ({of})")
    for section in ("evaluation", "finetune"):
        if cfg[section]["crop_pad"] >= cfg["data"]["resolution"]:
            raise ConfigError(f"{source}: {section}.crop_pad = {cfg[section]['crop_pad']}: expected < data.resolution "
                              f"({cfg['data']['resolution']}; reflect padding needs it)")
    late = [s for s in cfg["distillation"]["snapshot_steps"] if s > cfg["distillation"]["steps"]]
    if late:
        raise ConfigError(f"{source}: distillation.snapshot_steps {late}: after the last of distillation.steps = "
                          f"{cfg['distillation']['steps']}, never written; lower them or raise the steps")


def check_sizes(cfg, n_train, m=None):
    """Counts drawn from the loaded train split without replacement: a larger one would silently shrink the set."""
    checks = {"storage.budget_N": cfg["storage"]["budget_N"], "storage.m": m if m is not None else cfg["storage"]["m"],
              "distillation.outer_batch_size": cfg["distillation"]["outer_batch_size"]}
    for dotted, value in checks.items():
        if value > n_train:
            raise ConfigError(f"{dotted} = {value} exceeds the {n_train} images of the {cfg['dataset']} train split "
                              f"(data.train_subset = {cfg['data']['train_subset']}); lower it")


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys silently: this loader refuses them."""


def _unique_mapping(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise ConfigError(f"{loader.name}, line {key_node.start_mark.line + 1}: key '{key}' is written twice in "
                              f"its section; keep one")
        seen.add(key)
    return loader.construct_mapping(node, deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def parse_args(parser, argv):
    """(args, overrides): the parser's flags, every other --key=value a config override; --allow-changed checked."""
    args, rest = parser.parse_known_args(argv)
    changed = getattr(args, "allow_changed", [])
    if changed and not args.resume:
        raise ConfigError("--allow-changed acts only with --resume (the keys a resumed run may change); drop it")
    unknown = [k for k in changed if k not in leaves()]
    if unknown:
        raise ConfigError(f"--allow-changed: unknown config keys {unknown} (keys look like section.key)")
    return args, parse_overrides(rest)


def parse_overrides(items):
    """['--distillation.steps=200', '--seed=1'] -> {'distillation.steps': 200, 'seed': 1} (values parsed as YAML)."""
    out = {}
    for item in items:
        if not (item.startswith("--") and "=" in item):
            raise ConfigError(f"unrecognised argument {item!r}: overrides look like --section.key=value")
        key, value = item[2:].split("=", 1)
        try:
            out[key] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: the value is not YAML ({str(e).splitlines()[0]})") from None
    return out


def load_config(path, overrides=None):
    """Read configs/<name>.yaml, apply dotted overrides, check everything against SCHEMA."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path} (the configs live in configs/<dataset>.yaml)")
    raw = path.read_bytes()
    try:  # UTF-8, with or without a byte-order mark (UTF-16 has NUL bytes between ASCII letters)
        if b"\0" in raw:
            raise UnicodeError("it holds NUL bytes, as UTF-16 text does")
        text = raw.decode("utf-8-sig")
    except UnicodeError as e:
        where = f"byte {raw[e.start]:#04x} on line {raw[:e.start].count(10) + 1} is not UTF-8 (Latin-1?)" \
            if isinstance(e, UnicodeDecodeError) else e
        raise ConfigError(f"{path} is not UTF-8 text: {where}; save it as UTF-8") from None
    try:
        (f := io.StringIO(text)).name = str(path)  # errors name the file
        cfg = yaml.load(f, _UniqueKeyLoader) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {' '.join(str(e).split())}") from None
    for dotted, value in (overrides or {}).items():
        if dotted not in leaves():
            raise ConfigError(f"{path}: override --{dotted}: unknown key '{dotted}' (keys look like "
                              f"section.key: {', '.join(list(leaves())[:3])}, ...; README, Configuration)")
        node, keys = cfg, dotted.split(".")
        for k in keys[:-1]:
            if not isinstance(node.get(k), dict):
                raise ConfigError(f"{path}: override --{dotted}: section '{k}' missing from the file")
            node = node[k]
        node[keys[-1]] = value
    cfg = _check_section(cfg, SCHEMA, str(path))
    _check_consistent(cfg, str(path))
    return cfg


def script_parser(doc):
    """No prefix matching: an unknown --key=value is a config override (else --seed=1 would read as --seeds=1)."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter,
                                   allow_abbrev=False)


def add_common_args(parser, allow_changed=True):
    """--device/--resume/--overwrite, and --allow-changed for the scripts whose checkpoints continue a run."""
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--resume", action="store_true", help="continue from the run folder's checkpoint")
    parser.add_argument("--overwrite", action="store_true",
                        help="move the existing outputs aside (<out>.replaced-<time>-<id>/) and start afresh")
    if allow_changed:
        parser.add_argument("--allow-changed", default="", type=lambda s: [k for k in s.split(",") if k],
                            help="with --resume: comma-separated config keys allowed to differ from the checkpoint's "
                                 "(not those that change the checkpoint's tensors)")
    return parser


def print_config(cfg, derived=None):
    print(json.dumps({"config": cfg, "derived": derived or {}}, indent=1, default=str))


# ============================================================================================
# Seeding, device, processes (torchrun; nothing joins a process group unless WORLD_SIZE > 1)
# ============================================================================================
def set_seed(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def get_device(name=None):
    """--device: cpu, or cuda / cuda:N of a GPU torch sees (default: cuda if present); anything else is refused."""
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    try:
        device = torch.device(name)
    except RuntimeError:
        device = torch.device("meta")  # not a device string: refused below
    if device.type not in ("cpu", "cuda") or device.type == "cuda" and (device.index or 0) >= gpus:
        raise UserError(f"--device {name}: expected cpu" + (f", cuda or cuda:0..{gpus - 1}" if gpus else
                                                            " (torch sees no CUDA device here)"))
    return device


def init_ranks(device_name=None, timeout_s=None):
    """(models.Ranks, device). Under torchrun each process joins the default group (nccl on CUDA, one GPU each; gloo on
    the CPU, where a wait past `timeout_s` raises and cli names the missing rank). A plain start: rank 0 of 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = get_device(device_name)
    if world == 1:
        return models.Ranks(), device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():  # once per process (main_evaluate --student a,b evaluates twice)
        # device_id binds the nccl group to this process's GPU (no barrier guesswork, no hang on some NCCL versions)
        timeout = {"timeout": datetime.timedelta(seconds=timeout_s)} if timeout_s else {}
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo", **timeout,
                                             **({"device_id": device} if device.type == "cuda" else {}))
        if device.type != "cuda" and timeout:
            RUN.update(side=torch.distributed.new_group(backend="gloo", **timeout), timeout=timeout["timeout"])
        atexit.register(lambda: torch.distributed.is_initialized() and torch.distributed.destroy_process_group())
    return models.Ranks(torch.distributed.get_rank(), world), device


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


CIFAR10_LAYOUT = ("data/cifar-10-python/{data_batch_1..5, test_batch, batches.meta} (the official python pickles of "
                  "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz; its folder name cifar-10-batches-py "
                  "works too)")
CIFAR100_LAYOUT = "data/data/cifar-100-python/{train, test, meta} (official python pickles, torchvision layout)"
DOGS_LAYOUT = ("data/stanford-dogs/images/Images/<wnid>-<Breed>/*.jpg (120 breed folders: "
               "http://vision.stanford.edu/aditya86/ImageNetDogs/images.tar unpacked into data/stanford-dogs/images/), "
               "optionally data/stanford-dogs/{train_list.mat, test_list.mat} (from .../ImageNetDogs/lists.tar)")
TINY_LAYOUT = ("data/tiny-imagenet-200/{wnids.txt, train/<wnid>/images/*.JPEG, val/images/*.JPEG, "
               "val/val_annotations.txt} (http://cs231n.stanford.edu/tiny-imagenet-200.zip unpacked into data/, 64x64)")
IMAGENET64_LAYOUT = ("data/imagenet64/{train_data_batch_1..10, val_data} (the downsampled ImageNet 64x64 release's "
                     "python pickles, Imagenet64_train_part1/2.zip and Imagenet64_val.zip unpacked into one folder: "
                     "'data' uint8 (n, 12288) in R, G, B planes, 'labels' 1..1000)")
IMAGENET64_TRAIN = [f"train_data_batch_{i}" for i in range(1, 11)]
DOGS_TRAIN_PER_BREED = 100  # the official split's count, used when no .mat lists are present
DIGITS_TEST_FRACTION = 0.25  # fixed stratified split of scikit-learn's 1,797 digits


def channel_stats(x, chunk=8192):
    """Per-channel mean and std in [0, 1] of a uint8 (N, 3, H, W) tensor, in float64."""
    s, s2 = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    for part in x.split(chunk):
        p = part.to(torch.float64) / 255
        s += p.sum((0, 2, 3))
        s2 += (p * p).sum((0, 2, 3))
    n = x.shape[0] * x.shape[2] * x.shape[3]
    mean = s / n
    return mean.float(), (s2 / n - mean**2).sqrt().float()


def _plane_arrays(path, label_key, layout, num_classes, side=32, kind="a CIFAR", first_label=0):
    """A CIFAR-format pickle (also Imagenet64x64's, 1-based labels): 'data' uint8 (n, 3 side^2) in R, G, B planes."""
    if not path.is_file():
        raise DatasetError(f"missing {path}; expected layout: {layout}")
    try:
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="bytes")  # keys are bytes or str, as the writer left them
        d = {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in d.items()}
        data, labels = d["data"], d[label_key]
    except Exception as e:  # truncated file, not a pickle, wrong keys
        raise DatasetError(f"could not read {path} as {kind} pickle ({type(e).__name__}: {e}); "
                           f"expected layout: {layout}") from None
    data = np.asarray(data)
    if data.ndim != 2 or data.shape[1] != 3 * side * side or data.dtype != np.uint8:
        raise DatasetError(f"{path}: 'data' is {data.dtype} of shape {data.shape}; expected uint8 (n, "
                           f"{3 * side * side}) ({side} x {side} x 3 channel planes per row); expected layout: "
                           f"{layout}")
    if first_label:
        labels = np.asarray(labels)
        if labels.size and np.issubdtype(labels.dtype, np.integer):
            if labels.min() < first_label or labels.max() >= first_label + num_classes:
                raise DatasetError(f"{path}: '{label_key}' range over [{labels.min()}, {labels.max()}]; the "
                                   f"release's labels are 1-based: 1..{num_classes}")
            labels = labels - first_label
    x = torch.from_numpy(data.reshape(-1, 3, side, side).copy())
    return x, check_labels(labels, len(x), num_classes, f"{path}: '{label_key}'")


def load_imagenet64(root):
    """Downsampled ImageNet at 64 px: ten train pickles and the val pickle (the test split); every file checked."""
    folder = Path(root) / "imagenet64"
    if not folder.is_dir():
        raise DatasetError(f"ImageNet 64x64 folder not found: {folder}; expected layout: {IMAGENET64_LAYOUT}")
    missing = [f for f in IMAGENET64_TRAIN + ["val_data"] if not (folder / f).is_file()]
    if missing:
        raise DatasetError(f"{folder} lacks {', '.join(missing)}; expected layout: {IMAGENET64_LAYOUT}")
    read = lambda f: _plane_arrays(folder / f, "labels", IMAGENET64_LAYOUT, 1000, 64, "an Imagenet64x64", 1)
    parts = [read(f) for f in IMAGENET64_TRAIN]
    test_x, test_y = read("val_data")
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), test_x, test_y, 1000


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
    """What every loader returns: uint8 (n > 0, 3, H, H) images and n integer labels in [0, num_classes)."""
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] != 3 or x.shape[2] != x.shape[3] or len(x) == 0:
        raise DatasetError(f"{where}: images {x.dtype} {tuple(x.shape)}; expected uint8 (n > 0, 3, H, H)")
    check_labels(y.numpy(), len(x), num_classes, where)


def download(what, dataset, root, folder, layout):
    """torchvision fetches `dataset` into `root` and checks its md5 sums; a failure is one line naming `folder`."""
    try:
        import torchvision.datasets
        getattr(torchvision.datasets, dataset)(root=str(root), train=True, download=True)
    except Exception as e:
        raise DatasetError(f"{what} not found at {folder} and the download failed ({type(e).__name__}: "
                           f"{first_line(e)}); put the files there by hand: {layout}") from None


def load_cifar10(root):
    folder = Path(root) / "cifar-10-python"
    if not folder.is_dir():  # else the official archive's folder name, into which torchvision downloads it
        if not (Path(root) / "cifar-10-batches-py").is_dir():
            download("CIFAR-10", "CIFAR10", root, folder, CIFAR10_LAYOUT)
        folder = Path(root) / "cifar-10-batches-py"
    parts = [_plane_arrays(folder / f"data_batch_{i}", "labels", CIFAR10_LAYOUT, 10) for i in range(1, 6)]
    test_x, test_y = _plane_arrays(folder / "test_batch", "labels", CIFAR10_LAYOUT, 10)
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), test_x, test_y, 10


def load_cifar100(root):
    folder = Path(root) / "data" / "cifar-100-python"
    if not all((folder / f).is_file() for f in ("train", "test")):
        off = [p for p in (Path(root) / "cifar-100-python", Path(root).parent / "cifar-100-python")
               if (p / "train").is_file()]
        if off:  # data.root one level off: say so instead of downloading a second copy
            raise DatasetError(f"CIFAR-100 not found at {folder}, but {off[0]} holds it: the layout is "
                               f"{CIFAR100_LAYOUT}, i.e. data.root must be the folder that holds data/cifar-100-python/"
                               f" (here {off[0].parent.parent}); set data.root or move the folder")
        download("CIFAR-100", "CIFAR100", Path(root) / "data", folder, CIFAR100_LAYOUT)  # into data/data/...
    train_x, train_y = _plane_arrays(folder / "train", "fine_labels", CIFAR100_LAYOUT, 100)
    test_x, test_y = _plane_arrays(folder / "test", "fine_labels", CIFAR100_LAYOUT, 100)
    return train_x, train_y, test_x, test_y, 100


def _read_mat_list(path):
    """Official Stanford Dogs lists: file_list is an (N, 1) cell of 'wnid-Breed/name.jpg'."""
    from scipy.io import loadmat
    try:
        cells = loadmat(str(path))["file_list"].ravel()
    except Exception as e:
        raise DatasetError(f"could not read 'file_list' from {path} ({e!r}); expected the official list") from e
    return [str(np.asarray(c).ravel()[0]) for c in cells]


RGB_MODES = ("1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB")  # read at contrast


def _decode_image(path, size):
    """uint8 (3, size, size): 8-bit RGB at the file's contrast (16-bit greyscale scaled by 255 / 65535, which convert
    clips to white; 32-bit or float modes refused), the shorter side resized to `size` (antialiased), centre crop."""
    from PIL import Image
    with Image.open(path) as im:
        if im.mode in ("I;16", "I;16L", "I;16B", "I;16N") or im.mode == "I" and im.format == "PNG":
            im = Image.fromarray(np.round(np.asarray(im, dtype=np.float64) / 257).astype(np.uint8))
        elif im.mode not in RGB_MODES:
            raise ValueError(f"pixel mode {im.mode} has no 8-bit reading here (expected 8- or 16-bit greyscale, "
                             f"palette, RGB, RGBA, CMYK, YCbCr or LAB); save the image as 8-bit RGB")
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
    """What a decoded image cache was built from: split, classes, and every file's name, size and mtime."""
    h = hashlib.sha256(f"{split}|{'|'.join(breeds)}".encode())
    for f in files:
        st = (images / f).stat()
        h.update(f"|{f}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def decode_image_or_fail(path, size, hint):
    """_decode_image whose failure names the file (a truncated JPEG, a non-image with a .jpg name)."""
    try:
        return _decode_image(path, size)
    except Exception as e:
        raise DatasetError(f"cannot decode {path} ({type(e).__name__}: {e}){hint}") from e


def load_stanford_dogs(root, resolution, cache_dir=""):
    folder = Path(root) / "stanford-dogs"
    breeds, train_files, test_files, split = stanford_dogs_split(folder)
    images = folder / "images" / "Images"
    for name, files in (("train", train_files), ("test", test_files)):
        if not files:
            raise DatasetError(f"the Stanford Dogs {name} split ({split}) of {folder} is empty")
    missing = [f for f in train_files + test_files if not (images / f).is_file()]
    if missing:
        raise DatasetError(f"{len(missing)} listed images missing under {images}, e.g. {missing[0]}")
    key = files_key(images, breeds, train_files + test_files, split)  # a changed file or breed decodes afresh
    cache = Path(cache_dir or folder) / f"cache_{split}_{resolution}px_{key}.pt"
    index = {b: i for i, b in enumerate(breeds)}
    label = lambda files: [index[f.split("/")[0]] for f in files]
    return (*decoded_splits(cache, "Stanford Dogs", images, (train_files, label(train_files)),
                            (test_files, label(test_files)), resolution,
                            "; `python test_stanford_dogs.py` lists every unreadable file"), len(breeds), split)


def decoded_splits(cache, what, folder, train, test, resolution, hint):
    """(train_x, train_y, test_x, test_y) from `cache`, else decoded in threads (PIL frees the GIL) and cached."""
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
    save_cache(dict(zip(keys, parts)), cache, f"the decoded {what} images")
    return tuple(parts)


def tiny_imagenet_files(folder):
    """(wnids, train files, labels, val files, labels); val is the test split (the test images have no labels)."""
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


def load_tiny_imagenet(root, resolution, cache_dir=""):
    folder = Path(root) / "tiny-imagenet-200"
    wnids, train, train_y, val, val_y = tiny_imagenet_files(folder)
    cache = Path(cache_dir or folder) / f"cache_{resolution}px_{files_key(folder, wnids, train + val, 'val')}.pt"
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


def load_dataset(name, root, resolution, train_subset=0, cache_dir=""):
    """uint8 train/test tensors, labels and the train split's normalisation (SPEC 7). `train_subset` > 0 keeps a fixed
    draw (seed 0, whatever the run's seed, so every script sees the same images); the test split is always whole."""
    if name in ("CIFAR10", "CIFAR100") and not 1 <= resolution <= 32:
        raise ConfigError(f"{name} is 32x32; data.resolution must be in [1, 32], got {resolution}")
    loaders = {"CIFAR10": lambda: load_cifar10(root), "CIFAR100": lambda: load_cifar100(root),
               "STANFORD_DOGS": lambda: load_stanford_dogs(root, resolution, cache_dir),
               "TINY_IMAGENET": lambda: load_tiny_imagenet(root, resolution, cache_dir),
               "IMAGENET64": lambda: load_imagenet64(root), "DIGITS": lambda: load_digits(resolution)}
    if name not in loaders:
        raise ConfigError(f"unknown dataset {name!r}; expected one of {list(DATASETS)}")
    train_x, train_y, test_x, test_y, num_classes, *split = loaders[name]()
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
    """sha256 (16 hex digits) of CPU tensors' bytes, read in place (no copy of IMAGENET64's 15.7 GB)."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(str((tuple(t.shape), t.dtype)).encode())
        h.update(t.contiguous().numpy())
    return h.hexdigest()[:16]


def load_data(cfg):
    """The config's source dataset: load_dataset with its data: keys."""
    d = cfg["data"]
    return load_dataset(cfg["dataset"], d["root"], d["resolution"], d["train_subset"], d["cache_dir"])


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
# Augmentation: batched on the device, one random draw per sample, from a torch.Generator (pretrain.py: SPEC 1's)
# ============================================================================================
def coin(n, p, gen, device):
    return torch.rand(n, generator=gen, device=device) < p


def random_flip(x, p, gen):
    mask = coin(x.shape[0], p, gen, x.device).view(-1, 1, 1, 1)
    return torch.where(mask, x.flip(3), x)


def rotate(x, angle):
    """The exact predefined augmentation a_k: torch.rot90 on the spatial dims."""
    if angle % 90:
        raise ValueError(f"rotations must be multiples of 90 degrees, got {angle}")
    return torch.rot90(x, (angle // 90) % 4, dims=(-2, -1))


# ============================================================================================
# Storage (SPEC 3): the budget; the default folder names
# ============================================================================================
INIT_ONLY = "init_only"  # sub-folder: the same set at step 0, approximation nets fitted to it


def distilled_folder(cfg, name, method=None):
    """main_distill.py's default output: distilled_assets/<config name>_N<budget>[_krr_st] (`method`: the config's)."""
    suffix = "_krr_st" if (method or cfg["distillation"]["method"]) == "krr_st" else ""
    return Path("distilled_assets") / f"{name}_N{cfg['storage']['budget_N']}{suffix}"


def storage_budget(cfg):
    """SPEC 3, computed here alone: N images cost N (3 H W + d_y) floats; a real image with K targets 3 H W + K d_y."""
    pixels, d_y = 3 * cfg["data"]["resolution"] ** 2, models.resnet18_dim(cfg["network"]["width"])
    return {"floats_per_image": pixels + d_y, "budget": cfg["storage"]["budget_N"] * (pixels + d_y),
            "floats_per_real": pixels + d_y * (1 + len(cfg["augmentations"]["rotate"]))}


# ============================================================================================
# Distilled set files (SPEC 2): decoding, the writer and the reader
# ============================================================================================
def decode_images(C_x, B_x, mu_x, size):
    """x_i = bilinear_upsample(reshape(mu_x + c_i^x B_x)) -> (m, 3, size, size)."""
    r_b = int(round((mu_x.numel() / 3) ** 0.5))
    low = (mu_x + C_x @ B_x).view(-1, 3, r_b, r_b)
    return F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)


def decode_targets(C_y, B_y, mu_y):
    """y_i = mu_y + c_i^y B_y -> (m, d_y)."""
    return mu_y + C_y @ B_y


def save_distilled(folder, asset, controls, nets):
    """distilled_data.pth, controls.pth and approx_net_rot_<angle>.pth, each with the run id (load_distilled checks)."""
    folder = Path(folder)
    V = asset["C_y"].shape[1] if nets else None
    for angle, (net, err) in nets.items():
        atomic_save({"state_dict": {k: v.cpu() for k, v in net.state_dict().items()}, "V": V,
                     "hidden": net[0].out_features, "rotation": angle, "relative_error": err,
                     "run_id": asset["run_id"]}, folder / f"approx_net_rot_{angle}.pth")
    atomic_save(controls, folder / CONTROLS_FILE)
    atomic_save(asset, folder / "distilled_data.pth")


def load_distilled(folder, device, exact=False):
    """A distilled_assets folder -> (views (K*m, 3, H, W) view-major, targets (K*m, d_y), the stored dict); rotated
    targets from the MLPs (SPEC 5), the stored C_y^k (ablation), or with `exact` the learned C_y^k."""
    folder = Path(folder)
    path = folder / "distilled_data.pth"
    if not path.is_file():
        raise MissingInput(f"no distilled set at {path}; run main_distill.py with this config first")
    d = read_pth(path, "a distilled set written by main_distill.py", DISTILLED_KEYS, device,
                 rebuild="rerun main_distill.py")
    if d["method"] == "krr_st":
        return d["X"].float(), d["Y"].float(), d
    X = decode_images(d["C_x"], d["B_x"], d["mu_x"], d["resolution"])
    views, targets = [X], [decode_targets(d["C_y"], d["B_y"], d["mu_y"])]
    stored_C_yk = read_controls(folder, device, d["run_id"])["C_y_aug"] if exact else d.get("C_y_aug")
    for k, angle in enumerate(d["rotations"]):
        views.append(rotate(X, angle))
        if exact or d["store_augmented_targets"]:
            C_yk = stored_C_yk[k]
        else:
            net = load_approx_net(folder / f"approx_net_rot_{angle}.pth", device, d["run_id"])
            with torch.no_grad():
                C_yk = d["C_y"] + net(d["C_y"])
        targets.append(decode_targets(C_yk, d["B_y"], d["mu_y"]))
    return torch.cat(views), torch.cat(targets), d


CONTROLS_FILE = "controls.pth"  # init indices and learned C_y^k, outside distilled_data.pth and its budget
DISTILLED_KEYS = ["method", "dataset", "rotations", "resolution", "m", "storage", "config", "run_id", "teacher_hash",
                  "train_hash", "target_scale", "store_augmented_targets", "steps"]


def _run_file(path, what, keys, device, run_id, missing):
    """A file of a distilled_assets folder, from the run (`run_id`; None: unchecked) that wrote distilled_data.pth."""
    if not Path(path).is_file():
        raise MissingInput(missing)
    d = read_pth(path, what, keys, device, rebuild="rerun main_distill.py")
    if run_id is not None and d["run_id"] != run_id:
        raise InputError(f"{path} belongs to run {d['run_id']}, but distilled_data.pth beside it to run {run_id}: "
                         f"the folder mixes two runs; rerun main_distill.py into an empty folder (or --overwrite)")
    return d


def read_controls(folder, device="cpu", run_id=None):
    """controls.pth of a distilled_assets folder: init indices and learned C_y^k (not part of the set)."""
    path = Path(folder) / CONTROLS_FILE
    return _run_file(path, "the controls written by main_distill.py", ["init_indices", "run_id"], device, run_id,
                     f"no {path}: the real_init and distilled_exact rows need it; rerun main_distill.py")


def load_approx_net(path, device, run_id):
    s = _run_file(path, "an approximation net written by main_distill.py", ["state_dict", "V", "hidden", "run_id"],
                  device, run_id, f"approximation net missing: {path}; rerun main_distill.py")
    net = models.ApproxMLP(s["V"], s["hidden"]).to(device)
    load_weights(net, s["state_dict"], path, f"an approximation MLP {s['V']} -> {s['hidden']} -> {s['V']}")
    return net.eval()


# ============================================================================================
# Teacher and features: each frozen network runs once per input
# ============================================================================================
def config_name(config_path):
    """The file stem (cifar10_cpu): default outputs carry it, so two configs of one dataset never share them."""
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


TEACHER_META = ["dataset", "resolution", "width", "train_hash", "train_images", "split", "run_id"]


def load_teacher(path, cfg, device, data=None):
    """The frozen teacher g from pretrain.py, checked against the config and the train split it was trained on."""
    path, dataset, resolution, width = Path(path), cfg["dataset"], cfg["data"]["resolution"], cfg["network"]["width"]
    if not path.is_file():
        raise MissingInput(f"teacher not found: {path}; run `python pretrain.py {dataset}` first")
    d = read_pth(path, "a teacher file written by pretrain.py", ["backbone", "meta"],
                 rebuild="retrain it with pretrain.py")
    meta = d["meta"]
    missing = [k for k in TEACHER_META if not (isinstance(meta, dict) and k in meta)]
    if missing:
        raise InputError(f"{path} is not a teacher file of this version: its meta lacks {missing}; retrain it with "
                         f"pretrain.py")
    if meta["dataset"] != dataset or meta["resolution"] != resolution:
        raise InputError(f"{path} is a teacher for {meta['dataset']} at {meta['resolution']} px, "
                         f"but the config asks for {dataset} at {resolution} px")
    if meta["width"] != width:
        raise InputError(f"{path} is a ResNet-18 of width {meta['width']}, but the config asks for network.width "
                         f"{width}")
    if data is not None and meta["train_hash"] != data.fingerprint:
        raise InputError(f"{path} was trained on another {dataset} train split (hash {meta['train_hash']}, "
                         f"{meta['train_images']} images{', split ' + meta['split'] if meta['split'] else ''}) "
                         f"than the config loads (hash {data.fingerprint}, {len(data.train_x)} images"
                         f"{', split ' + data.split if data.split else ''}); retrain it with pretrain.py")
    g = models.resnet18_cifar(width)
    load_weights(g, d["backbone"], path, f"a ResNet-18 (CIFAR stem) of width {width}")
    return models.channels_last_module(g.to(device), device).eval(), meta


@torch.no_grad()
def embed_all(net, x, mean, std, batch_size, angle=0, precision_name="bfloat16"):
    """(N, d) float32 eval-mode features of uint8 (or normalised float) images, in `precision_name`."""
    net.eval()
    dev = next(net.parameters()).device
    out = []
    for part in x.split(batch_size):
        part = part.to(dev)
        part = normalize(part, mean, std) if part.dtype == torch.uint8 else part
        part = rotate(part, angle) if angle else part
        with models.precision(dev, precision_name):
            f = net(models.to_channels_last(part, dev))
        out.append(f.float())
    return torch.cat(out)


def teacher_targets(teacher, teacher_file, data, rotations, dcfg, fallback_dir, teacher_hash=None):
    """(T[i, k] = s g(a_k(x_i)) (N_train, K, d_y), s) (SPEC 4.1), cached beside the teacher (else in `fallback_dir`).
    s sets the identity views' RMS to data.target_rms: SGD diverges on a short teacher's 1e3-1e5 features."""
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
        if not (os.access(beside.parent, os.W_OK) and save_cache(T.cpu(), beside, "the teacher targets")):
            print(f"caching the teacher targets in the run folder instead: {fallback}")
            save_cache(T.cpu(), fallback, "the teacher targets")
    if T.shape[:2] != (len(data.train_x), 1 + len(rotations)) or not torch.isfinite(T).all():
        raise InputError(f"teacher targets from {teacher_file} are malformed or not finite (shape {tuple(T.shape)}); "
                         f"delete {found[0] if found else 'the cache'} or retrain the teacher")
    scale = dcfg["target_rms"] / T[:, 0].pow(2).mean().sqrt().clamp_min(1e-12).item()
    return T.mul_(scale), scale


# ============================================================================================
# Probe (SPEC 6.2): the linear probe on frozen features, for pretrain.py's teacher and every evaluation row
# ============================================================================================
def batches(n, batch_size, iterations, gen):
    """`iterations` index batches of min(batch_size, n), a fresh randperm from `gen` each epoch (shuffle, drop_last)."""
    b = min(batch_size, n)
    perm, pos = torch.randperm(n, generator=gen, device=gen.device), 0
    for _ in range(iterations):
        if pos + b > n:
            perm, pos = torch.randperm(n, generator=gen, device=gen.device), 0
        yield perm[pos:pos + b]
        pos += b


class CosineSGD:
    """SGD (a section's lr, momentum, weight_decay), cosine to 0: students (SPEC 6.1), probe (6.2), fine-tuning."""

    def __init__(self, params, c, steps):
        self.opt = torch.optim.SGD(params, lr=c["lr"], momentum=c["momentum"], weight_decay=c["weight_decay"])
        self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, steps)

    def step(self, loss):
        """One step down `loss`; returns it detached."""
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.sched.step()
        return loss.detach()


def train_linear_head(train_f, train_y, num_classes, probe, seed):
    """The linear probe's head (SPEC 6.2): Linear(d -> classes) on frozen features, cross-entropy, CosineSGD."""
    gen = models.make_generator(train_f.device, seed)
    torch.manual_seed(seed)
    head = torch.nn.Linear(train_f.shape[1], num_classes).to(train_f.device)
    opt = CosineSGD(head.parameters(), probe, probe["iterations"])
    for idx in batches(len(train_f), probe["batch_size"], probe["iterations"], gen):
        opt.step(F.cross_entropy(head(train_f[idx]), train_y[idx]))
    return head


def linear_probe(train_f, train_y, test_f, test_y, num_classes, probe, seed):
    """Linear(d -> classes) on frozen features (train_linear_head); test top-1 (%)."""
    head = train_linear_head(train_f, train_y, num_classes, probe, seed)
    with torch.no_grad():
        return 100.0 * (head(test_f).argmax(1) == test_y).float().mean().item()


def split_features(backbone, data, batch_size):
    """Frozen features of the train and test splits (normalised, un-augmented): what kNN and probe read."""
    return (embed_all(backbone, data.train_x, data.mean, data.std, batch_size),
            embed_all(backbone, data.test_x, data.mean, data.std, batch_size))


def labelled_subset(labels, num_classes, per_class):
    """Indices of `per_class` train images per class (0 = all) whose labels the probe reads: a draw fixed by seed 0,
    so every row and seed probes the same images, nested in k (each class's first k of one fixed order)."""
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
    """SPEC 6.2: both splits' features once (or passed in), the probe on probe.labels_per_class labels per class."""
    train_f, test_f = features if features is not None else split_features(backbone, data, batch_size)
    keep = labelled_subset(data.train_y, data.num_classes, probe["labels_per_class"])
    return linear_probe(train_f[keep], data.train_y[keep], test_f, data.test_y, data.num_classes, probe, seed)


# ============================================================================================
# Checkpoints, run folders (lock and owner), resume checks, logging, the non-finite stop
# ============================================================================================
def read_pth(path, what, keys=(), map_location="cpu", weights_only=True, rebuild=""):
    """torch.load whose failure, or a file without `keys`, names the file, what it should be and how to `rebuild` it."""
    try:
        d = torch.load(path, map_location=map_location, weights_only=weights_only)
    except Exception as e:
        raise InputError(f"{path} could not be read as {what}: {type(e).__name__}: {first_line(e)}") from None
    missing = [k for k in keys if not (isinstance(d, dict) and k in d)]
    if missing:
        raise InputError(f"{path} is not {what} of this version: keys {missing} missing"
                         + (f"; {rebuild}" if rebuild else ""))
    return d


def load_weights(net, state_dict, path, what):
    """load_state_dict(strict) whose failure names the file and the network it should hold."""
    try:
        net.load_state_dict(state_dict, strict=True)
    except (RuntimeError, TypeError, AttributeError) as e:
        raise InputError(f"{path} does not hold the weights of {what}: {first_line(e)}") from None


def _write_atomically(path, write):
    """write(tmp) beside `path`, then os.replace: a crash never leaves half a file; a failure names the path."""
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        os.replace(tmp, path)
    except Exception as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # a read-only folder: nothing was written there; the first error is the one to tell
            pass
        raise OSError(f"could not write {path} ({type(e).__name__}: {first_line(e)}); check free disk space and "
                      f"permissions there") from e


def first_line(e):
    return (str(e).strip().splitlines() or [""])[0]


def atomic_save(obj, path):
    _write_atomically(path, lambda tmp: torch.save(obj, tmp))


def write_json(obj, path):
    _write_atomically(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=1, default=str)))


def save_cache(obj, path, what):
    """A cache that cannot be written is skipped with one warning (the run goes on); returns whether it was."""
    try:
        atomic_save(obj, path)
        return True
    except OSError as e:
        print(f"warning: {what} not cached: {e}; the run goes on without it (set data.cache_dir to a writable "
              f"folder to keep it)", file=sys.stderr)
        return False


LOCK_FILE = "run.lock"
OWNER_FILE = "owner.json"  # which script and which run a run folder belongs to


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
    """The lock's record, None without a lock; an unreadable one is refused (_create_lock writes it in one step)."""
    path = Path(folder) / LOCK_FILE
    try:
        info = json.loads(path.read_text())
        if not isinstance(info, dict):
            raise ValueError("not a mapping")
        return info
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise RunFolderError(f"{path} cannot be read as a run lock ({type(e).__name__}: {first_line(e)}); if no run "
                             f"is using {folder}, delete {path}") from None


def read_owner(folder):
    """The owner record of a run folder ({script, run_id, started}), None if it has none; a corrupt one is refused."""
    path = Path(folder) / OWNER_FILE
    if not path.is_file():
        return None
    try:
        owner = json.loads(path.read_text())
        if not (isinstance(owner, dict) and all(isinstance(owner.get(k), str) for k in ("script", "run_id"))):
            raise ValueError("expected {script, run_id}")
    except (OSError, ValueError) as e:
        raise RunFolderError(f"{path} is not a run folder's owner record ({type(e).__name__}: {e}); the folder's "
                             f"owner is unknown: choose another --out, or --overwrite to move the folder "
                             f"aside") from None
    return owner


@dataclass
class RunFolder:
    """One run of one script: `outputs` mean a run produced something, `checkpoint` is what --resume continues, `also`:
    outputs outside, moved aside with it; `keep`: caches --overwrite keeps. check() writes nothing; claim() locks."""
    folder: Path
    script: str
    outputs: tuple = ()
    checkpoint: Path = None
    also: tuple = ()
    keep: tuple = ()

    def __post_init__(self):
        RUN.setdefault("folders", []).append(self)  # what a stopped run names as kept (cli)

    def _hint(self):
        rest = "--overwrite to move it aside and start afresh, or choose another --out"
        if self.checkpoint is not None and Path(self.checkpoint).is_file():
            return f"pass --resume to continue it, {rest}"
        return f"it has nothing to resume from: pass {rest}"

    def check(self, resume, overwrite):
        """The folder's owner record (None for a folder holding no run), or a RunFolderError naming the folder."""
        folder = Path(self.folder)
        if resume and overwrite:
            raise RunFolderError("pass --resume (continue the run) or --overwrite (replace it), not both")
        try:
            if not stat.S_ISDIR(os.stat(folder).st_mode):
                raise RunFolderError(f"{folder} is a file, not a folder: choose another --out")
        except FileNotFoundError:
            pass  # a new folder
        except OSError as e:  # a parent that is a file, a name too long, no permission
            raise RunFolderError(f"--out {folder} cannot be a run folder ({type(e).__name__}: {first_line(e)}); "
                                 f"choose another --out") from None
        held = _read_lock(folder)
        if held is not None and _lock_owner_alive(held):
            raise RunFolderError(f"{folder} is in use by another run (pid {held.get('pid')} on {held.get('host')}, "
                                 f"lock {folder / LOCK_FILE}); wait for it, choose another --out, or delete the lock "
                                 f"if no run is using the folder")
        owner = read_owner(folder)
        if owner is not None and owner["script"] != self.script and not overwrite:
            raise RunFolderError(f"{folder} belongs to {owner['script']} (run {owner['run_id']}); {self.script} does "
                                 f"not write into another script's run folder: choose another --out (or --overwrite "
                                 f"to move that folder aside)")
        existing = [str(p) for p in self.outputs if Path(p).exists()]
        if not existing:
            owner = None  # a start refused, killed or stopped before its first checkpoint: no run to protect
        if not (resume or overwrite) and (existing or owner is not None):
            what = f"outputs already exist: {existing}" if existing else f"{folder} holds run {owner['run_id']}"
            raise RunFolderError(f"{what} of {self.script}; {self._hint()}")
        if resume and self.checkpoint is not None and not Path(self.checkpoint).is_file():
            raise MissingInput(f"--resume: no checkpoint at {self.checkpoint}, nothing to continue; "
                               + ("run without --resume" if owner is None and not existing
                                  else "pass --overwrite instead to move the folder aside and start afresh"))
        return owner

    def claim(self, resume, overwrite):
        """check(); --overwrite moves the old folder aside in one rename; then the lock and owner record. The lock."""
        folder = Path(self.folder)
        owner = self.check(resume, overwrite)
        created = not folder.exists()
        lock = folder / LOCK_FILE
        try:
            if overwrite and (any(Path(p).exists() for p in self.also) or (folder.is_dir() and any(folder.iterdir()))):
                self._move_aside(folder)
            folder.mkdir(parents=True, exist_ok=True)
            lock.unlink(missing_ok=True)  # check() found none, or a stale one: take it over
            _create_lock(lock)
            atexit.register(release_run_folder, lock)
            if owner is None or overwrite:
                started = time.strftime("%Y-%m-%d %H:%M:%S")
                write_json({"script": self.script, "run_id": new_run_id(), "started": started}, folder / OWNER_FILE)
        except (OSError, RunFolderError) as e:
            release_run_folder(lock)
            if created:
                shutil.rmtree(folder, ignore_errors=True)
            if isinstance(e, RunFolderError):
                raise
            raise RunFolderError(f"could not claim the run folder {folder}: {type(e).__name__}: {first_line(e)}; "
                                 f"check the path, free disk space and permissions") from None
        return lock

    def _move_aside(self, folder):
        aside = folder.with_name(f"{folder.name}.replaced-{new_run_id()}")  # unique, even twice in a second
        if folder.is_dir():
            os.rename(folder, aside)  # one step: the folder holds either the old run or nothing
        aside.mkdir(exist_ok=True)
        (aside / LOCK_FILE).unlink(missing_ok=True)
        for p in self.also:
            if Path(p).exists():
                os.rename(p, aside / Path(p).name)
        folder.mkdir(parents=True, exist_ok=True)
        for name in self.keep:
            if (aside / name).exists():
                os.rename(aside / name, folder / name)
        print(f"--overwrite: the previous outputs were moved to {aside} (delete it when no longer needed)")


def _create_lock(lock):
    """Written beside the lock, then hard-linked into place (fails if one appeared): no reader sees an empty lock."""
    info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    tmp = lock.with_name(f"{lock.name}.{os.getpid()}.partial")
    try:
        tmp.write_text(json.dumps(info))
        os.link(tmp, lock)
    except FileExistsError:
        raise RunFolderError(f"{lock.parent} was claimed by another run a moment ago (lock {lock})") from None
    finally:
        tmp.unlink(missing_ok=True)


def release_run_folder(lock):
    """Remove this process's lock (at the end of a run, and at exit after a crash)."""
    try:
        info = _read_lock(Path(lock).parent)
    except RunFolderError:
        return
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


# Keys that change a checkpoint's tensors (shapes, or which exist): it cannot continue under them (--allow-changed)
STATE_KEYS = ("dataset", "data.resolution", "data.train_subset", "network.width", "pretrain.projector_dims",
              "parameterization.image_basis_size", "parameterization.U", "parameterization.V",
              "parameterization.learn_bases", "augmentations.rotate", "storage.budget_N", "storage.m",
              "storage.store_augmented_targets", "distillation.method", "model_pool.size_L", "model_pool.widths")


def load_checkpoint(path, cfg, inputs, allow_changed=()):
    """A checkpoint for --resume: its config and inputs must match, but for `allow_changed` keys (never STATE_KEYS)."""
    if not Path(path).is_file():
        raise MissingInput(f"--resume: no checkpoint at {path}")
    shaped = [k for k in allow_changed if k in STATE_KEYS]
    if shaped:
        one = len(shaped) == 1
        raise InputError(f"--allow-changed {','.join(shaped)}: {'this key changes' if one else 'these keys change'} "
                         f"the tensors of {path}, which cannot continue under {'it' if one else 'them'}; "
                         f"start a new run instead (--overwrite, or another --out)")
    ckpt = read_pth(path, "a checkpoint of this script", ["config", "inputs", "run_id"], weights_only=False)
    changed = [k for k in config_changes(ckpt["config"], cfg) if k not in allow_changed]
    if changed:
        diff = ", ".join(f"{k}: {_get_or(ckpt['config'], k)!r} -> {_get_or(cfg, k)!r}" for k in changed)
        fixable = [k for k in changed if k not in STATE_KEYS]
        raise InputError(f"--resume: {path} was written with another config ({diff}); resume with the same config"
                         + (f", or name the keys you change on purpose: --allow-changed {','.join(fixable)}"
                            if fixable == changed else "; a changed " + ", ".join(k for k in changed if k in STATE_KEYS)
                            + " needs a new run (--overwrite, or another --out)"))
    stale = [f"{k} ({ckpt['inputs'].get(k)} -> {v})" for k, v in inputs.items() if ckpt["inputs"].get(k) != v]
    if stale:
        raise InputError(f"--resume: the inputs of {path} changed since it was written: {', '.join(stale)}; "
                         f"start a new run (--overwrite) or restore the original inputs")
    return ckpt


def _get_or(cfg, dotted):
    try:
        for k in dotted.split("."):
            cfg = cfg[k]
        return cfg
    except (KeyError, TypeError):
        return None


def rng_state(gen):
    """The random states a checkpoint keeps, with the kind of device the run's generator lives on."""
    return {"torch": torch.get_rng_state(), "gen": gen.get_state(), "device": gen.device.type,
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state, gen, path="the checkpoint"):
    """Restore rng_state's states; a generator state of another device kind (another size) is refused by name."""
    if state["device"] != gen.device.type:
        raise InputError(f"--resume: {path} was written by a run on {state['device']}, this run is on "
                         f"{gen.device.type}: resume it on the same kind of device (--device {state['device']}), or "
                         f"start afresh with --overwrite")
    torch.set_rng_state(state["torch"])
    gen.set_state(state["gen"])
    if state["cuda"] is not None and torch.cuda.is_available():
        for i, s in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)


class RunLog:
    """One JSON object per line in <run>/log.jsonl; on resume the rows past `resume_at` = (key, value) are dropped."""

    def __init__(self, path, resume_at=None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_at is None:
            self.path.unlink(missing_ok=True)
        elif self.path.exists():
            (key, last), rows = resume_at, []
            for n, line in enumerate(self.path.read_text().splitlines(), 1):
                try:
                    value = json.loads(line).get(key, 0) if line.strip() else None
                    if value is not None and not isinstance(value, (int, float)):
                        raise ValueError(f"{key} is {value!r}")
                except (ValueError, AttributeError) as e:
                    raise InputError(f"{self.path}, line {n}: not a log row of this run ({type(e).__name__}: {e}); "
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


def all_finite(tensors):
    """One device-side reduction and one host sync for a whole list of tensors (parameters, losses)."""
    tensors = [t.detach() for t in tensors]
    return bool(torch.stack([t.isfinite().all() for t in tensors]).all()) if tensors else True


def command(script, args):
    """The command that runs `script` with `args` as this process was started (python, or torchrun alike)."""
    world, local = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if world <= 1:
        launcher = "python"
    elif world == local:
        launcher = f"torchrun --standalone --nproc_per_node={world}"
    else:
        launcher = f"torchrun --nnodes={world // local} --nproc_per_node={local} <your rendezvous flags>"
    return f"{launcher} " + shlex.join([script] + list(args))


def non_finite_stop(what, script, argv, lr_key, lr, checkpoint=None, saved=None):
    """The scripts' one stop at a non-finite value: a RunStopped with the command that goes on, the run's own with
    `lr_key` at a tenth of `lr`, resuming from the last good `checkpoint` (`saved`: its step) if there is one."""
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
    lower = f"--{lr_key}={lr / 10:.3g}"
    if checkpoint is None or not Path(checkpoint).is_file():
        hint = f"start again with a lower {lr_key}: `{command(script, keep + ['--overwrite', lower])}`"
    else:
        hint = (f"the last good checkpoint {checkpoint} ({saved}) is kept: continue from it with a lower {lr_key}: "
                f"`{command(script, keep + ['--resume', '--allow-changed', ','.join(allowed), lower])}`")
    return RunStopped(f"non-finite {what}; nothing of it was saved. {hint}")
