"""Pre-train ResNet-18 on each pre-training source, linear-probe it, and compare (SPEC 6).

    python main_evaluate.py --config configs/cifar10.yaml                  # every row
    python main_evaluate.py --config configs/cifar10.yaml --seeds 3        # mean +- std over 3 seeds
    python main_evaluate.py --config configs/cifar100.yaml --target CIFAR10  # transfer: probe on CIFAR-10
    python main_evaluate.py --config configs/cifar10.yaml --rows distilled,real_init,no_pretraining
    torchrun --nproc_per_node=4 main_evaluate.py --config configs/cifar10.yaml --seeds 4   # README, Several GPUs
    python main_evaluate.py --config configs/cifar10.yaml --protocol both --student resnet18,vgg11_bn,alexnet
    python main_evaluate.py --config configs/cifar10.yaml --protocol finetune --target TINY_IMAGENET

Rows (each pre-trained with the same recipe, `evaluation:`, and probed the same way, `probe:`):
    distilled        this method's distilled set: all K views, targets from the approximation MLPs
    init_only        the same set before its first outer step (same PCA, m, images; approximation MLPs fitted to
                     it): distilled - init_only is what the bilevel loop adds
    distilled_exact  the same images with the learned rotated targets C_y^k (over budget: the cost of the MLPs)
    real_init        the m real images the distilled set starts from, all K views, exact teacher targets
                     (over budget: the control distillation must beat)
    krr_st           the KRR-ST baseline set (main_distill.py --distillation.method=krr_st), if present
    random_subset    N random real images with their teacher targets: the same storage budget
    full_dataset     the whole train set, all K views, teacher targets, `evaluation.full_epochs` epochs
    teacher          the Barlow Twins teacher itself (upper reference)
    no_pretraining   random initialisation
Every row reports the probe's top-1, its teacher fit (R^2 of a ridge readout from its frozen features to the
teacher's, fit on the target's train split, scored on its test split: it measures what distillation transfers
and does not saturate where the probe does), its SGD steps and its storage.
Writes evaluation_models/<config name>_N<budget>[_to_<target>]/ (or --out): results.json, results.md,
config.json, <student>_distilled_dataset.pth, <student>_full_dataset.pth (reused unless --retrain-full), the student
being evaluation.student (resnet18 by default; --student a,b,c: one table per student in <out>/<student>/ and a
cross-architecture summary, students.md / students.json, in <out>/). results.json is rewritten after every (row, seed)
cell; --resume runs only the cells (and protocols) still missing, so it also adds seeds or a protocol to a table.
"""
import copy
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import models
import utils


def parse_args(argv):
    p = utils.script_parser(__doc__)
    p.add_argument("--config", required=True)
    p.add_argument("--assets", default=None, help="distilled set folder (default: main_distill.py's)")
    p.add_argument("--krr-assets", default=None, help="KRR-ST folder (default: main_distill.py's for krr_st)")
    p.add_argument("--teacher", default=None, help="default: teacher_models/resnet18_barlow_twins_<config name>.pth")
    p.add_argument("--target", type=str.upper, choices=utils.DATASETS, default=None,
                   help="probe on this dataset instead of the source (same resolution)")
    p.add_argument("--rows", default=None, help=f"comma-separated subset of {','.join(ROWS)}")
    p.add_argument("--seeds", type=int, default=1, help="repeat the stochastic rows with this many seeds")
    p.add_argument("--protocol", choices=["probe", "finetune", "both"], default="probe",
                   help="linear probe on frozen features (default), fine-tuned transfer (finetune:), or both")
    p.add_argument("--student", default=None,
                   help=f"comma-separated students ({','.join(models.STUDENTS)}): one table each in <out>/<student>/ "
                        f"and a summary; default: evaluation.student alone, in <out>/")
    p.add_argument("--retrain-full", action="store_true", help="retrain the full-dataset model even if saved")
    p.add_argument("--out", default=None, help="default: evaluation_models/<config name>_N<budget>[_to_<target>]")
    utils.add_common_args(p, allow_changed=False)  # a table resumes only under its own config
    args, overrides = utils.parse_args(p, argv)
    args.rows_given = args.rows is not None
    rows = [r.strip() for r in (args.rows or ",".join(ROWS)).split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown or not rows:
        p.error(f"--rows: unknown {unknown}; choose from {','.join(ROWS)}")
    if args.seeds < 1:
        p.error(f"--seeds must be >= 1, got {args.seeds}")
    args.rows = rows
    args.protocol = ["probe", "finetune"] if args.protocol == "both" else [args.protocol]
    if args.student is not None:
        args.student = [x.strip() for x in args.student.split(",") if x.strip()]
        bad = [x for x in args.student if x not in models.STUDENTS]
        if bad or not args.student:
            p.error(f"--student: unknown {bad}; choose from {','.join(models.STUDENTS)}")
    return args, overrides


# ============================================================================================
# SPEC 6.1: one pre-training recipe for every (images, targets) set
# ============================================================================================
@dataclass(frozen=True)
class Recipe:
    """SPEC 6.1's recipe in one table: the evaluation: section, width, the source's normalisation, the command line
    (what a non-finite loss tells the user to run again)."""
    ec: dict
    width: int
    mean: torch.Tensor
    std: torch.Tensor
    argv: tuple = ()


def pretrain_on_set(images, targets, recipe, epochs, seed, desc, ranks=models.Ranks()):
    """The student + Linear(width -> d_y), MSE to `targets`, CosineSGD, a fresh crop + flip each epoch if `augment`:
    (backbone in eval mode, SGD steps). images: uint8 or normalised float. Under torchrun (full_dataset) this rank's
    share, DDP over the global batch. The loss is read one reading late (LateRead): the loop never waits."""
    ec, device = recipe.ec, targets.device
    torch.manual_seed(seed)
    gen = models.make_generator(device, seed + ranks.rank)
    net = models.Regressor(*models.student(ec["student"], recipe.width, images.shape[-1]), targets.shape[1])
    net = (models.sync_batchnorm(net, device) if ranks.world > 1 else net).to(device)
    net = models.channels_last_module(net, device)
    fwd = DDP(net, device_ids=[device.index] if device.type == "cuda" else None) if ranks.world > 1 else net
    n, B = len(images), ec["batch_size"] // ranks.world
    steps = math.ceil(n / B)
    opt = utils.CosineSGD(net.parameters(), ec, epochs * steps)
    net.train()
    bar = tqdm(range(epochs), desc=desc, leave=False, dynamic_ncols=True, disable=not ranks.main)
    logged = None  # (epoch, its mean loss on the way to the host)
    for epoch in bar:
        perm = torch.randperm(n, generator=gen, device=device)
        total = torch.zeros((), device=device)
        for i in range(steps):
            idx = perm[i * B:(i + 1) * B]
            x = utils.normalize(images[idx], recipe.mean, recipe.std) if images.dtype == torch.uint8 else images[idx]
            if ec["augment"]:
                x = random_crop_flip(x, ec["crop_pad"], gen)
            with models.autocast(device):
                loss = models.mse(fwd(models.to_channels_last(x, device)), targets[idx])
            total += opt.step(loss)
        if epoch % 10 == 0 or epoch == epochs - 1:
            if logged is not None:
                bar.set_postfix(loss=f"{check_loss(*logged, desc, recipe):.4f}")
            logged = (epoch, LateRead(total / steps))
    check_loss(*logged, desc, recipe)
    return net.backbone.eval(), epochs * steps


class LateRead:
    """A device scalar copied to the host without waiting, read (float(...)) when the device is long past it."""

    def __init__(self, t):
        t = t.detach()
        self.value, self.event = (t.to("cpu", non_blocking=True), torch.cuda.Event()) if t.is_cuda else (t, None)
        if self.event is not None:
            self.event.record()

    def __float__(self):
        if self.event is not None:
            self.event.synchronize()
        return float(self.value)


def check_loss(epoch, loss, desc, recipe):
    """A logged epoch's mean loss; a non-finite one stops the run with the command to rerun at a lower lr."""
    value = float(loss)
    if not math.isfinite(value):
        raise utils.non_finite_stop(f"pre-training loss {value} in {desc} epoch {epoch + 1}", "main_evaluate.py",
                                    recipe.argv, "evaluation.lr", recipe.ec["lr"])
    return value


def random_subset(data, T, n, seed):
    """n random real train images (un-rotated) with their teacher targets: the budget's real baseline."""
    gen = models.make_generator(data.train_x.device, seed)
    idx = torch.randperm(len(data.train_x), generator=gen, device=data.train_x.device)[:n]
    return data.train_x[idx], T[idx, 0]


def real_views(data, T, idx, rotations):
    """Real images idx in all K views (uint8, view-major) with their exact teacher targets, made per batch when
    indexed: as tensors, full_dataset's K N views at IMAGENET64 would not fit an 80 GB GPU."""
    idx, K = idx.to(data.train_x.device), 1 + len(rotations)

    def images(i, k):  # image idx[i] in view k
        x = out = data.train_x[idx[i]]
        for view, angle in enumerate(rotations, 1):
            out = torch.where((k == view).view(-1, 1, 1, 1), utils.rotate(x, angle), out)
        return out
    return ViewMajor(len(idx), K, images), ViewMajor(len(idx), K, lambda i, k: T[idx[i], k])


class ViewMajor:
    """The K n rows j = k n + i of a view-major set, row (i, k) = get(i, k), made when indexed; what pretrain_on_set
    reads of a tensor: len, shape, dtype, device, [index tensor]."""

    def __init__(self, n, K, get):
        self.n, self.get = n, get
        row = get(*torch.zeros(2, 1, dtype=torch.long))
        self.shape, self.dtype, self.device = (K * n, *row.shape[1:]), row.dtype, row.device

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, j):
        return self.get(j % self.n, j // self.n)


def full_dataset_backbone(ev):
    """ev.full = (backbone, SGD steps, cell info): the full-dataset student, trained once (every rank under torchrun)
    and reused while its settings match; another's is replaced only under --overwrite."""
    cfg, data, ranks, path = ev.cfg, ev.data, ev.ranks, ev.out / ev.run.keep[0]
    ec, width = cfg["evaluation"], cfg["network"]["width"]
    recipe = {k: v for k, v in ec.items() if k != "random_init_bn"}  # what it is trained with
    meta = {"dataset": cfg["dataset"], "teacher_hash": ev.hashes["teacher_hash"], "full_epochs": ec["full_epochs"],
            "rotations": ev.rotations, "evaluation": recipe, "seed": cfg["seed"], "data": cfg["data"], "width": width,
            "train_hash": data.fingerprint}
    if path.is_file() and not ev.args.retrain_full:
        saved = utils.read_pth(path, "a full-dataset backbone written by main_evaluate.py",
                               ["backbone", "meta", "train_time_s", "steps"], rebuild="pass --retrain-full")
        if saved["meta"] == meta:
            g = models.student(ec["student"], width, data.train_x.shape[-1])[0]
            utils.load_weights(g, saved["backbone"], path, f"a {ec['student']} student of width {width}")
            ranks.say(f"full_dataset: reusing {path} (trained in {saved['train_time_s']:.1f}s)")
            g = models.channels_last_module(g.to(ev.device), ev.device).eval()
            ev.full = g, saved["steps"], {"reused": True, "train_time_s": saved["train_time_s"], "time_s": 0.0}
            return
        if not ev.args.overwrite:
            raise utils.InputError(f"{path} was trained with other settings ({saved['meta']}); "
                                   f"pass --retrain-full or --overwrite to replace it")
        ranks.say(f"full_dataset: {path} was trained with other settings; retraining it (--overwrite)")
    t0 = time.time()
    views, targets = real_views(data, ev.T, models.shard(torch.arange(len(data.train_x)), ranks), ev.rotations)
    g, steps = pretrain_on_set(views, targets, ev.recipe, ec["full_epochs"], cfg["seed"], "full_dataset", ranks)
    train_time = time.time() - t0
    if ranks.main:
        utils.atomic_save({"backbone": {k: v.cpu() for k, v in g.state_dict().items()}, "meta": meta,
                           "train_time_s": train_time, "steps": steps}, path)
    ev.full = g, steps, {"reused": False, "train_time_s": train_time, "time_s": train_time}


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
    return utils.random_flip(out, 0.5, gen)


# ============================================================================================
# SPEC 6.2 and the other measurements of a pre-trained backbone: teacher fit, fine-tuning, BatchNorm recalibration
# ============================================================================================
def teacher_fit(features, teacher_features, ridge):
    """Test R^2 (SST around the train mean) of a ridge readout, fit on train, from frozen features to the teacher's:
    how much of the teacher a student reproduces on unseen images. (train, test) pairs; ridge x mean eigenvalue."""
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
            raise utils.RunStopped(f"{row}: the pre-trained backbone gives non-finite features on the {split} "
                                   f"split; its accuracy would be meaningless (lower evaluation.lr, or check "
                                   f"the teacher's target scale)")


@torch.no_grad()
def recalibrate_bn(net, data, batch_size):
    """BatchNorm statistics re-estimated exactly (momentum None) on data's train split; net back in eval mode. A random
    VGG-11 at its initial statistics gives features of scale ~1e-6 that the probe reads at chance."""
    norms = [m for m in net.modules() if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d))]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    net.train()
    dev = next(net.parameters()).device
    for part in data.train_x.split(batch_size):
        net(models.to_channels_last(utils.normalize(part.to(dev), data.mean, data.std), dev))  # float32 statistics
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    return net.eval()


def finetune(backbone, data, ft, seed, batch_size):
    """Fine-tuned transfer (KRR-ST's protocol): a copy of `backbone` + a Linear head trained on data's labels (SGD,
    cosine, crop + flip); test top-1 (%)."""
    dev = data.train_x.device
    torch.manual_seed(seed)
    gen = models.make_generator(dev, seed)
    net = copy.deepcopy(backbone).to(dev)
    with torch.no_grad():
        dim = net.eval()(utils.normalize(data.train_x[:2], data.mean, data.std)).shape[1]
    model = torch.nn.Sequential(net, torch.nn.Linear(dim, data.num_classes).to(dev)).train()
    opt = utils.CosineSGD(model.parameters(), ft, ft["iterations"])
    for idx in utils.batches(len(data.train_x), ft["batch_size"], ft["iterations"], gen):
        x = utils.normalize(data.train_x[idx], data.mean, data.std)
        x = random_crop_flip(x, ft["crop_pad"], gen) if ft["augment"] else x
        with models.autocast(dev):
            loss = F.cross_entropy(model(models.to_channels_last(x, dev)).float(), data.train_y[idx])
        opt.step(loss)
    model.eval()
    with torch.no_grad():
        correct = sum((model(models.to_channels_last(utils.normalize(x, data.mean, data.std), dev)).argmax(1) == y)
                      .sum() for x, y in zip(data.test_x.split(batch_size), data.test_y.split(batch_size)))
    return 100.0 * correct.item() / len(data.test_x)


# ============================================================================================
# SPEC 6.3: the rows. Each row is a source: what it pre-trains on (views, targets) and what it stores.
# ============================================================================================
@dataclass
class Inputs:
    """What every row of one table reads: config, processes, folders, data, teacher, sets, targets T, budget."""
    args: object
    cfg: dict
    ranks: models.Ranks
    device: torch.device
    out: Path
    rows: list
    seeds: list
    assets: Path
    krr_assets: Path
    data: object = None
    target: object = None
    teacher: torch.nn.Module = None
    teacher_file: Path = None
    budget: dict = None  # utils.storage_budget
    recipe: Recipe = None
    run: utils.RunFolder = None  # run_folder(ev), made once: a RunFolder registers itself for a stop's line
    hashes: dict = field(default_factory=dict)
    sets: dict = field(default_factory=dict)  # what each row with a folder read there (Row.load)
    T: torch.Tensor = None
    target_scale: float = None
    teacher_feats: tuple = None
    full: tuple = None  # the full_dataset row's (backbone, SGD steps, cell info): full_dataset_backbone

    @property
    def rotations(self):
        return self.cfg["augmentations"]["rotate"]


@dataclass(frozen=True)
class Row:
    """One table row, all of it here: source(ev, row, seed) -> (backbone, SGD steps, cell extras); stored(ev, row) ->
    floats kept (None: not a set); seeded: run per --seeds seed; load(ev, row) -> what it reads from folder(ev) into
    ev.sets[row]; rotations / targets: needs rotated views / teacher targets T; optional: how its set is made (a missing
    one skipped unless --rows names it); prepare(ev): every rank, before the cells; keep: save its first seed's
    backbone; held(ev, row) -> (images, views) it pre-trains on."""
    source: object
    stored: object
    seeded: bool = True
    folder: object = None
    load: object = None
    rotations: bool = False
    targets: bool = False
    optional: str = ""
    prepare: object = None
    keep: bool = False
    held: object = lambda ev, row: (ev.sets[row][2]["m"], len(ev.sets[row][0]))  # a set's m images in its views


def pretrained(ev, row, seed, views):
    """A student pre-trained on the row's (images, targets) with the table's recipe, evaluation.epochs."""
    return (*pretrain_on_set(*views, ev.recipe, ev.cfg["evaluation"]["epochs"], seed, f"{row} s{seed}"), {})


def set_row(ev, row, seed):
    views, targets, _ = ev.sets[row]
    return pretrained(ev, row, seed, (views, targets))


def random_student(ev, row, seed):
    """no_pretraining: a random student, its BatchNorm statistics as evaluation.random_init_bn says."""
    ec = ev.cfg["evaluation"]
    torch.manual_seed(seed)
    g = models.student(ec["student"], ev.cfg["network"]["width"], ev.cfg["data"]["resolution"])[0]
    g = models.channels_last_module(g.to(ev.device), ev.device).eval()
    if ec["random_init_bn"] == "recalibrate":
        g = recalibrate_bn(g, ev.target, ev.cfg["data"]["eval_batch_size"])
    return g, 0, {}


def load_set(ev, row, exact=False):
    """A distilled set (decoded, checked against this table's inputs) and its file's hash among the inputs."""
    folder = ROWS[row].folder(ev)
    loaded = utils.load_distilled(folder, ev.device, exact=exact)
    check_assets(ev, folder, loaded[2])
    ev.hashes[f"{'distilled' if folder == ev.assets else row}_hash"] = utils.file_hash(folder / "distilled_data.pth")
    return loaded


def load_init(ev, row):
    """The indices of the m real images the distilled set started from (its controls.pth)."""
    d = utils.read_pth(ev.assets / "distilled_data.pth", "a distilled set written by main_distill.py",
                       ["run_id", "teacher_hash", "train_hash", "dataset", "config"])
    check_assets(ev, ev.assets, d)
    ev.hashes["distilled_hash"] = utils.file_hash(ev.assets / "distilled_data.pth")
    return utils.read_controls(ev.assets, run_id=d["run_id"])["init_indices"]


def set_floats(ev, row):
    return ev.sets[row][2]["storage"]["stored"]


def exact_floats(ev, row):
    """The set's floats with the learned C_y^k stored instead of the approximation nets."""
    d = ev.sets[row][2]
    return d["storage"]["stored"] + len(d["rotations"]) * d["m"] * d["C_y"].shape[1] \
        - d["storage"]["rows"].get("approximation nets", 0)


ROWS = {
    "distilled": Row(set_row, set_floats, folder=lambda ev: ev.assets, load=load_set, keep=True),
    "init_only": Row(set_row, set_floats, folder=lambda ev: ev.assets / utils.INIT_ONLY, load=load_set,
                     optional="main_distill.py writes it before its first step"),
    "distilled_exact": Row(set_row, exact_floats, folder=lambda ev: ev.assets, rotations=True,
                           load=lambda ev, row: load_set(ev, row, exact=True)),
    "real_init": Row(lambda ev, row, seed: pretrained(ev, row, seed, real_views(ev.data, ev.T, ev.sets[row],
                                                                                ev.rotations)),
                     lambda ev, row: len(ev.sets[row]) * ev.budget["floats_per_real"], folder=lambda ev: ev.assets,
                     load=load_init, rotations=True, targets=True,
                     held=lambda ev, row: (len(ev.sets[row]), (1 + len(ev.rotations)) * len(ev.sets[row]))),
    "krr_st": Row(set_row, set_floats, folder=lambda ev: ev.krr_assets, load=load_set,
                  optional="main_distill.py --distillation.method=krr_st"),
    "random_subset": Row(lambda ev, row, seed: pretrained(ev, row, seed, random_subset(
        ev.data, ev.T, ev.cfg["storage"]["budget_N"], seed)), lambda ev, row: ev.budget["budget"], targets=True,
                         held=lambda ev, row: (ev.cfg["storage"]["budget_N"],) * 2),
    "full_dataset": Row(lambda ev, row, seed: ev.full,
                        lambda ev, row: len(ev.data.train_x) * ev.budget["floats_per_real"], seeded=False, targets=True,
                        prepare=full_dataset_backbone,
                        held=lambda ev, row: (len(ev.data.train_x), (1 + len(ev.rotations)) * len(ev.data.train_x))),
    "teacher": Row(lambda ev, row, seed: (ev.teacher, 0, {}), lambda ev, row: None, seeded=False,
                   held=lambda ev, row: None),
    "no_pretraining": Row(random_student, lambda ev, row: 0, held=lambda ev, row: (0, 0)),
}


def run_cell(ev, row, seed, cell):
    """One (row, seed) cell: the backbone, then each protocol `cell` still lacks (its network trained again)."""
    t0, bs = time.time(), ev.cfg["data"]["eval_batch_size"]
    g, steps, info = ROWS[row].source(ev, row, seed)
    info = dict(info)
    t0 -= info.pop("time_s", 0.0)  # time spent on it before the cell (a full-dataset model trained now) counts
    cell.update(info)
    feats = ev.teacher_feats if g is ev.teacher else utils.split_features(g, ev.target, bs)
    check_features(feats, row)
    todo = missing(cell, ev.args.protocol)
    if "probe" in todo:
        cell["probe"] = utils.probe_backbone(g, ev.target, ev.cfg["probe"], seed, bs, features=feats)
        cell["fit"] = teacher_fit(feats, ev.teacher_feats, ev.cfg["probe"]["teacher_fit_ridge"])
    if "finetune" in todo:
        cell["finetune"] = finetune(g, ev.target, ev.cfg["finetune"], seed, bs)
    if ROWS[row].keep and seed == ev.seeds[0]:
        utils.atomic_save({k: v.cpu() for k, v in g.state_dict().items()},
                          ev.out / f"{ev.cfg['evaluation']['student']}_{row}_dataset.pth")
    cell.update(steps=steps, time_s=cell.get("time_s", 0.0) + time.time() - t0)
    print(f"{row} seed {seed}: " + ", ".join(f"{k} {cell[c]:.4g}" for k, c in (
        ("linear probe top-1 %", "probe"), ("teacher fit R^2", "fit"), ("fine-tune top-1 %", "finetune"))
        if c in cell) + (f" (rank {ev.ranks.rank})" if ev.ranks.world > 1 else ""))
    return cell


WANTED = {"probe": ("probe", "fit"), "finetune": ("finetune",)}  # what each protocol measures in a cell


def missing(cell, protocol):
    """The protocols a cell has not measured yet."""
    return [p for p in protocol if any(k not in cell for k in WANTED[p])]


# ============================================================================================
# The table
# ============================================================================================
MIN_GAIN_POINTS = 1.0  # gain recovered is shown only when full_dataset beats random init by more than this


def gain_defined(full, base):
    """Gain recovered is shown only where full_dataset - no_pretraining exceeds MIN_GAIN_POINTS and twice each std."""
    if None in (full.get("mean"), base.get("mean")):
        return False
    spread = 2 * max(full.get("std") or 0.0, base.get("std") or 0.0)
    return full["mean"] - base["mean"] > max(MIN_GAIN_POINTS, spread)


def summarize(results, budget):
    """Retention vs full_dataset, gain recovered over no_pretraining, storage in images and vs the budget."""
    full, base = results.get("full_dataset", {}), results.get("no_pretraining", {})
    for r in results.values():
        r["retention"] = r["mean"] / full["mean"] if full.get("mean") and r["mean"] is not None else None
        r["gain_recovered"] = (r["mean"] - base["mean"]) / (full["mean"] - base["mean"]) \
            if r["mean"] is not None and gain_defined(full, base) else None
        floats = r["storage_floats"]
        r["storage_images"] = None if floats is None else floats / budget["floats_per_image"]
        r["within_budget"] = None if floats is None else floats <= budget["budget"]
    return results


def mean_std(r, key, f):
    """A row's "mean ± std" of `key` ("" the probe, "fit", "finetune") in format f; "-" where it did not run."""
    mean, std = (r[key + "_mean"], r[key + "_std"]) if key else (r["mean"], r["std"])
    return "-" if mean is None else format(mean, f) + (f" ± {format(std, f)}" if r["seeds"] > 1 else "")


def markdown(results, header, protocol):
    """The table; the columns of a protocol that did not run are left out."""
    fmt = lambda v, f: "-" if v is None else format(v, f)
    reused = lambda r: f" (model reused, trained in {fmt(r['train_time_s'], '.1f')})" if r.get("reused") else ""
    budget = {True: "yes", False: "**over**", None: "-"}
    columns = ([("top-1 (%)", lambda r: mean_std(r, "", ".2f")),
                ("teacher fit R²", lambda r: mean_std(r, "fit", ".3f"))] if "probe" in protocol else []) + \
        ([("fine-tune top-1 (%)", lambda r: mean_std(r, "finetune", ".2f"))] if "finetune" in protocol else []) + [
        ("images (views)", lambda r: "-" if r.get("held") is None else "{:,} ({:,})".format(*r["held"])),
        ("seeds", lambda r: str(r["seeds"])), ("gain recovered", lambda r: fmt(r["gain_recovered"], ".1%")),
        ("retention", lambda r: fmt(r["retention"], ".1%")), ("SGD steps", lambda r: fmt(r["steps"], ",")),
        ("storage (floats)", lambda r: fmt(r["storage_floats"], ",")),
        ("storage (images)", lambda r: fmt(r["storage_images"], ",.1f")),
        ("within budget", lambda r: budget[r["within_budget"]]),
        ("time (s)", lambda r: f"{r['time_s']:.1f}{reused(r)}")]
    lines = [header, "", "| row | " + " | ".join(c for c, _ in columns) + " |", "|---" * (1 + len(columns)) + "|"]
    lines += [f"| {name} | " + " | ".join(f(r) for _, f in columns) + " |" for name, r in results.items()]
    note = (f"Gain recovered = (row - no_pretraining) / (full_dataset - no_pretraining), blank when full_dataset "
            f"beats no_pretraining by no more than {MIN_GAIN_POINTS:g} point or twice either row's std.")
    return "\n".join(lines + ["", note]) + "\n"


def row_result(row_cells, protocol, storage_floats):
    """One table row from its cells: each measure (None where its protocol did not run), mean and std over seeds."""
    values = lambda key, p: [c[key] if p in protocol else None for c in row_cells]
    mean = lambda v: None if None in v else statistics.fmean(v)
    std = lambda v: None if None in v else statistics.pstdev(v) if len(v) > 1 else 0.0
    accs, fits, finetunes = values("probe", "probe"), values("fit", "probe"), values("finetune", "finetune")
    extra = {k: row_cells[0][k] for k in ("reused", "train_time_s") if k in row_cells[0]}  # the full_dataset row's
    return {"mean": mean(accs), "std": std(accs), "accs": accs, "fit_mean": mean(fits), "fit_std": std(fits),
            "fits": fits, "finetune_mean": mean(finetunes), "finetune_std": std(finetunes), "finetunes": finetunes,
            "seeds": len(row_cells), "steps": row_cells[0]["steps"], "storage_floats": storage_floats,
            "time_s": sum(c["time_s"] for c in row_cells), **extra}


# a kept cell's numbers: accuracies in percent; R^2 in [-1, 1] (below -1 is a broken file, not a measurement)
CELL_NUMBERS = {"probe": (0.0, 100.0), "fit": (-1.0, 1.0), "finetune": (0.0, 100.0), "time_s": (0.0, None)}


def read_results(path):
    """results.json as save() writes it, every kept cell checked: anything else is refused naming file and entry."""
    def bad(what):
        raise utils.InputError(f"{path} is not a results.json written by main_evaluate.py: {what}; move it aside or "
                         f"rerun with --overwrite")
    try:
        saved = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        bad(f"{type(e).__name__}: {e}")
    if not isinstance(saved, dict) or not all(isinstance(saved.get(k), dict) for k in ("config", "derived", "cells")):
        bad("expected a mapping with 'config', 'derived' and 'cells' mappings")
    if not isinstance(saved["derived"].get("target"), str) or not isinstance(saved["derived"].get("inputs", {}), dict):
        bad("derived.target (a dataset name) or derived.inputs (a mapping) malformed")
    for row, by_seed in saved["cells"].items():
        if row not in ROWS or not isinstance(by_seed, dict):
            bad(f"cells.{row}: expected one of the rows {list(ROWS)} mapping seeds to cells")
        for seed, cell in by_seed.items():
            where = f"cells.{row}.{seed}"
            if not seed.isdigit() or not isinstance(cell, dict):
                bad(f"{where}: expected a seed number mapping to a cell")
            for key, (lo, hi) in CELL_NUMBERS.items():
                v = cell.get(key)
                if key in cell and not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                                        and (lo is None or v >= lo) and (hi is None or v <= hi)):
                    bad(f"{where}.{key} = {v!r}: expected a finite number" + (f" >= {lo}" if lo is not None else "")
                        + (f" <= {hi}" if hi is not None else ""))
            if not (isinstance(cell.get("steps"), int) and cell["steps"] >= 0):
                bad(f"{where}.steps = {cell.get('steps')!r}: expected a count of SGD steps")
    return saved


def resumed_cells(path, cfg, target_name, inputs):
    """The (row, seed) cells a previous run wrote to `path` (none yet: {}); refused if its config, target or inputs
    differ. Seeds, rows and protocols may differ: only the missing cells run."""
    if not path.is_file():
        print(f"--resume: no {path} yet; every cell runs")
        return {}
    saved = read_results(path)
    if saved["config"] != cfg or saved["derived"]["target"] != target_name:
        changed = utils.config_changes(saved["config"], cfg)
        raise utils.InputError(f"--resume: {path} was written with another config or target"
                         + (f" (changed: {', '.join(changed)})" if changed else ""))
    old_inputs = saved["derived"].get("inputs", {})
    stale = [k for k in inputs if k in old_inputs and old_inputs[k] != inputs[k]]
    if stale:
        raise utils.InputError(f"--resume: {path} was computed from other inputs ({', '.join(stale)} changed since); "
                         f"rerun without --resume (--overwrite) to recompute every row")
    return saved["cells"]


# ============================================================================================
# main: check inputs -> load sets -> targets -> cells -> table
# ============================================================================================
def check_inputs(args, overrides, argv, sub):
    """The table's Inputs, everything that can refuse it checked before anything is written."""
    cfg = utils.load_config(args.config, overrides)
    ranks, device = utils.init_ranks(args.device, cfg["distributed_timeout_s"])  # rank 0 of 1 unless torchrun
    if cfg["evaluation"]["batch_size"] % ranks.world:
        raise utils.ConfigError(f"{args.config}: evaluation.batch_size {cfg['evaluation']['batch_size']} (the "
                                f"full-dataset row's global batch) is not divisible by the {ranks.world} processes")
    utils.set_seed(cfg["seed"])
    target_name, name = args.target or cfg["dataset"], utils.config_name(args.config)
    suffix = f"_to_{target_name.lower()}" if target_name != cfg["dataset"] else ""
    out = Path(args.out) if args.out else Path("evaluation_models") / f"{name}_N{cfg['storage']['budget_N']}{suffix}"
    out = out / sub if sub else out
    assets = Path(args.assets) if args.assets else utils.distilled_folder(cfg, name)
    krr_assets = Path(args.krr_assets) if args.krr_assets else utils.distilled_folder(cfg, name, "krr_st")
    ev = Inputs(args, cfg, ranks, device, out, args.rows, [cfg["seed"] + i for i in range(args.seeds)], assets,
                krr_assets, budget=utils.storage_budget(cfg))
    ev.rows, ev.run = available_rows(ev), run_folder(ev)
    if ranks.main:
        ev.run.check(args.resume, args.overwrite)
    ev.data = utils.load_data(cfg)
    utils.check_sizes(cfg, len(ev.data.train_x))
    ev.data = ev.data.to(device)
    dc = cfg["data"]
    ev.target = ev.data if target_name == cfg["dataset"] else \
        utils.load_dataset(target_name, dc["root"], dc["resolution"], 0, dc["cache_dir"]).to(device)
    utils.labelled_subset(ev.target.train_y, ev.target.num_classes, cfg["probe"]["labels_per_class"])
    ev.teacher_file = Path(args.teacher) if args.teacher else utils.teacher_path(name)
    ev.teacher, _ = utils.load_teacher(ev.teacher_file, cfg, device, ev.data)
    ev.hashes = {"teacher_hash": utils.file_hash(ev.teacher_file), "train_hash": ev.data.fingerprint}
    ev.recipe = Recipe(cfg["evaluation"], cfg["network"]["width"], ev.data.mean, ev.data.std, tuple(argv))
    return ev


def available_rows(ev):
    """The asked rows, less (without --rows) optional rows whose set is missing and rotation rows without rotations;
    a flag that no row to run reads is refused."""
    rows = list(ev.rows)
    if not ev.args.rows_given:
        rows = []
        for row in ev.rows:
            r = ROWS[row]
            if r.optional and not (row == "krr_st" and ev.args.krr_assets) and \
                    not (r.folder(ev) / "distilled_data.pth").is_file():
                ev.ranks.say(f"{row}: no set at {r.folder(ev)}, row skipped ({r.optional})")
            elif not (r.rotations and not ev.rotations):
                rows.append(row)
    for flag, readers in (("assets", ["distilled", "init_only", "distilled_exact", "real_init"]),
                          ("krr_assets", ["krr_st"]), ("retrain_full", ["full_dataset"])):
        if getattr(ev.args, flag) and not set(readers) & set(rows):
            raise utils.ConfigError(f"--{flag.replace('_', '-')}: read by the rows {readers} only, and none of them "
                                    f"runs (rows {rows}); add one to --rows or drop the flag")
    return rows


def run_folder(ev):
    """The table's folder; the full-dataset model in it is a cache --overwrite keeps (checked by its metadata)."""
    return utils.RunFolder(ev.out, "main_evaluate.py", outputs=(ev.out / "results.json",),
                           keep=(f"{ev.cfg['evaluation']['student']}_full_dataset.pth",))


def load_sets(ev):
    """What every row reads from its folder (Row.load), checked against this table's inputs, which its hash joins."""
    for row in ev.rows:
        if ROWS[row].load is not None:
            ev.sets[row] = ROWS[row].load(ev, row)


def check_assets(ev, folder, d):
    """A distilled set is compared with the other rows only if it was built from the same inputs."""
    pairs = {"dataset": (d["dataset"], ev.cfg["dataset"]), "teacher": (d["teacher_hash"], ev.hashes["teacher_hash"]),
             "train split": (d["train_hash"], ev.data.fingerprint),
             "data.target_rms": (d["config"]["data"]["target_rms"], ev.cfg["data"]["target_rms"])}
    stale = [f"{k} ({str(a)[:16]} here {str(b)[:16]})" for k, (a, b) in pairs.items() if a != b]
    if stale:
        raise utils.InputError(f"{folder} was distilled from other inputs than this evaluation uses: "
                               f"{', '.join(stale)}; rerun main_distill.py with this config and teacher")


def teacher_targets(ev):
    """T for the rows built from real images (rank 0 caches it first), and the teacher's features of the target
    (every row's teacher fit is scored against them)."""
    if any(ROWS[row].targets for row in ev.rows):
        with models.rank0_first(ev.ranks):
            ev.T, ev.target_scale = utils.teacher_targets(ev.teacher, ev.teacher_file, ev.data, ev.rotations,
                                                          ev.cfg["data"], ev.out, ev.hashes["teacher_hash"])
    ev.teacher_feats = utils.split_features(ev.teacher, ev.target, ev.cfg["data"]["eval_batch_size"])


def run_cells(ev, cells):
    """The missing (row, seed) cells, seeded rows' dealt to the ranks, results.json rewritten after each; the rows."""
    def row_seeds(row):
        return ev.seeds if ROWS[row].seeded else [ev.cfg["seed"]]
    todo = [(r, s) for r in ev.rows for s in row_seeds(r) if missing(cells.setdefault(r, {}).get(str(s), {}),
                                                                       ev.args.protocol)]
    for row in dict.fromkeys(r for r, _ in todo):
        if ROWS[row].prepare is not None:  # every rank (the full-dataset model: DDP under torchrun)
            ROWS[row].prepare(ev)
    seeded = [c for c in todo if ROWS[c[0]].seeded]
    for row, seed in seeded[ev.ranks.rank::ev.ranks.world] + [c for c in todo if not ROWS[c[0]].seeded] * ev.ranks.main:
        utils.RUN["at"] = f"the cell {row} seed {seed}"
        cells[row][str(seed)] = run_cell(ev, row, seed, dict(cells[row].get(str(seed), {})))
        if ev.ranks.main:
            save(ev, cells, {})
    for part in models.gather_objects(cells, ev.ranks):  # every rank's cells
        for row, by_seed in part.items():
            cells[row].update(by_seed)
    return {row: dict(row_result([cells[row][str(s)] for s in row_seeds(row)], ev.args.protocol,
                                 ROWS[row].stored(ev, row)), held=ROWS[row].held(ev, row)) for row in ev.rows}


def save(ev, cells, results, **final):
    utils.write_json({"rows": results, "cells": cells, "config": ev.cfg, "derived": derived(ev), "complete": False,
                      **final}, ev.out / "results.json")


def derived(ev):
    return {"device": str(ev.device), "rows": ev.rows, "seeds": ev.seeds, "target": ev.target.name,
            "assets": str(ev.assets), "krr_assets": str(ev.krr_assets), "out": str(ev.out), "inputs": ev.hashes,
            "target_scale": ev.target_scale, "processes": ev.ranks.world, "protocol": ev.args.protocol}


def write_table(ev, results, cells):
    """results.md and the final results.json; returns the table's rows."""
    cfg, ec, budget = ev.cfg, ev.cfg["evaluation"], ev.budget
    results = summarize(results, budget)
    header = (f"{cfg['dataset']} -> {ev.target.name}, budget N={cfg['storage']['budget_N']} ({budget['budget']:,} "
              f"floats), student {ec['student']} (width {cfg['network']['width']}; the teacher row is the ResNet-18 "
              f"teacher) pre-trained {ec['epochs']} epochs (full dataset {ec['full_epochs']}), "
              f"augment={ec['augment']}, protocol {'+'.join(ev.args.protocol)} (linear probe "
              f"{cfg['probe']['iterations']} it., fine-tune "
              f"{cfg['finetune']['iterations']} it.), seeds {ev.seeds}"
              + (f"; {ev.target.name} images at {cfg['data']['resolution']} px" if ev.target is not ev.data else ""))
    md = markdown(results, header, ev.args.protocol)
    print(md)
    (ev.out / "results.md").write_text(md)
    save(ev, cells, results, header=header, complete=True)
    return results


def evaluate(args, overrides, argv, sub=None):
    """One student's table in <out>[/<sub>]: ({row: result}, out) on rank 0, (None, None) on the others."""
    ev = check_inputs(args, overrides, argv, sub)
    load_sets(ev)
    cells = resumed_cells(ev.out / "results.json", ev.cfg, ev.target.name, ev.hashes) if args.resume else {}
    lock = ev.run.claim(args.resume, args.overwrite) if ev.ranks.main else None
    models.barrier(ev.ranks)
    teacher_targets(ev)
    if ev.ranks.main:
        utils.print_config(ev.cfg, derived(ev))
        utils.write_json({"config": ev.cfg, "derived": derived(ev)}, ev.out / "config.json")
        if args.resume:
            print(f"resumed: {sum(len(c) for c in cells.values())} (row, seed) cells already done")
    results = run_cells(ev, cells)
    if not ev.ranks.main:  # rank 0 writes the table
        return None, None
    results = write_table(ev, results, cells)
    utils.release_run_folder(lock)
    return results, ev.out


def main(argv=None):
    """One table (evaluation.student), or one per `--student` plus the cross-architecture summary."""
    argv = sys.argv[1:] if argv is None else list(argv)  # the command line, for the recovery hint
    args, overrides = parse_args(argv)
    if args.student is None:
        return evaluate(args, overrides, argv)[0]
    done = {s: evaluate(args, {**overrides, "evaluation.student": s}, argv, sub=s) for s in args.student}
    if next(iter(done.values()))[1] is None:  # not rank 0
        return None
    tables, out = {s: t for s, (t, _) in done.items()}, next(iter(done.values()))[1].parent
    rows = list(dict.fromkeys(r for t in tables.values() for r in t))
    cell = lambda r: " / ".join("-" if r is None else mean_std(r, k, ".2f")
                                for k, p in (("", "probe"), ("finetune", "finetune")) if p in args.protocol)
    what = " / ".join({"probe": "linear-probe", "finetune": "fine-tune"}[p] for p in args.protocol)
    md = [f"{what} top-1 (%) by pre-training source (rows) and student (columns); each student's own table "
          "is in <out>/<student>/results.md.", "", "| row | " + " | ".join(args.student) + " |",
          "|---" * (1 + len(args.student)) + "|"]
    md += [f"| {r} | " + " | ".join(cell(tables[s].get(r)) for s in args.student) + " |" for r in rows]
    (out / "students.md").write_text("\n".join(md) + "\n")
    utils.write_json(tables, out / "students.json")
    print("\n".join(md))
    return tables


if __name__ == "__main__":
    utils.cli(main, "main_evaluate.py")
