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
import json
import math
import statistics
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import models
import utils

ROWS = ("distilled", "init_only", "distilled_exact", "real_init", "krr_st", "random_subset", "full_dataset", "teacher",
        "no_pretraining")
SEEDED = ("distilled", "init_only", "distilled_exact", "real_init", "krr_st", "random_subset", "no_pretraining")
DISTILLED_ROWS = ("distilled", "init_only", "distilled_exact", "krr_st")  # rows read from a distilled_assets folder
NEEDS_ROTATIONS = ("distilled_exact", "real_init")  # rows that exist only when the set has rotated views


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
    utils.add_common_args(p)
    args, rest = p.parse_known_args(argv)
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
    return args, utils.parse_overrides(rest)


# ============================================================================================
# SPEC 6.1: one pre-training recipe for every (images, targets) set
# ============================================================================================
def pretrain_on_set(images, targets, ec, epochs, mean, std, seed, desc, width, ranks=utils.Ranks()):
    """The student (evaluation.student) + Linear(its width -> d_y), MSE to `targets`, SGD + cosine; a fresh
    crop + flip of every view each epoch when `augment`. images: uint8 (normalised per batch) or normalised float.
    Under torchrun with `ranks` (the full-dataset row), images and targets are this rank's share: DDP, global
    batch evaluation.batch_size, BatchNorm over it, crops drawn per rank. The loss every 10 epochs is read on the
    host one reading late (utils.LateRead): the loop never waits for the device.
    Returns the backbone (eval mode) and the number of SGD steps it took."""
    device = targets.device
    torch.manual_seed(seed)
    gen = utils.make_generator(device, seed + ranks.rank)
    net = models.Regressor(*models.student(ec["student"], width, images.shape[-1]), targets.shape[1])
    net = (models.sync_batchnorm(net, device) if ranks.world > 1 else net).to(device)
    net = utils.channels_last_module(net, device)
    fwd = DDP(net, device_ids=[device.index] if device.type == "cuda" else None) if ranks.world > 1 else net
    n, B = len(images), ec["batch_size"] // ranks.world
    steps = math.ceil(n / B)
    step = student_step(net, fwd, ec, epochs * steps, graphed=ec["cuda_graph"] and ranks.world == 1)
    net.train()
    bar = tqdm(range(epochs), desc=desc, leave=False, dynamic_ncols=True, disable=not ranks.main)
    logged = None  # (epoch, its mean loss on the way to the host)
    for epoch in bar:
        perm = torch.randperm(n, generator=gen, device=device)
        total = torch.zeros((), device=device)
        for i in range(steps):
            idx = perm[i * B:(i + 1) * B]
            x = utils.normalize(images[idx], mean, std) if images.dtype == torch.uint8 else images[idx]
            if ec["augment"]:
                x = utils.random_crop_flip(x, ec["crop_pad"], gen)
            total += step(utils.to_channels_last(x, device), targets[idx])
        if epoch % 10 == 0 or epoch == epochs - 1:
            if logged is not None:
                bar.set_postfix(loss=f"{check_loss(*logged, desc):.4f}")
            logged = (epoch, utils.LateRead(total / steps))
    check_loss(*logged, desc)
    return net.backbone.eval(), epochs * steps


def check_loss(epoch, loss, desc):
    """A logged epoch's mean loss as a float; a non-finite one stops the run (utils.check_finite)."""
    value = float(loss)
    utils.check_finite(value, f"{desc} epoch {epoch + 1}")
    return value


def student_step(net, fwd, ec, total_steps, graphed):
    """step(x, y) -> the batch's loss (detached): one SGD step (momentum, weight decay, cosine over total_steps) of
    `net` through `fwd` (net or its DDP wrapper). graphed (evaluation.cuda_graph, one process): forward, backward
    and utils.sgd_step replayed as one CUDA graph per full batch (utils.CudaGraphStep), each step's learning rate
    read from the device; the same numbers as torch.optim.SGD + CosineAnnealingLR (bit for bit on the CPU, where
    the step runs eagerly: tests/test_fast_eval.py)."""
    device = next(net.parameters()).device
    if graphed:
        params = list(net.parameters())
        bufs = [torch.zeros_like(p) for p in params]
        lrs = iter(utils.to_device(utils.cosine_lrs(ec["lr"], total_steps), device))

        def train(x, y, lr):
            for p in params:
                p.grad = None
            with utils.autocast(device, cache=False):  # a graph keeps no cast weights between replays
                loss = models.mse(fwd(x), y)
            loss.backward()
            utils.sgd_step(params, [p.grad for p in params], bufs, lr, ec["momentum"], ec["weight_decay"])
            return loss.detach()
        replay = utils.CudaGraphStep(train, enabled=True)
        return lambda x, y: replay(x, y, next(lrs))
    opt = torch.optim.SGD(net.parameters(), lr=ec["lr"], momentum=ec["momentum"], weight_decay=ec["weight_decay"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, total_steps)

    def step(x, y):
        with utils.autocast(device):
            loss = models.mse(fwd(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        return loss.detach()
    return step


def random_subset(data, T, n, seed):
    """n random real train images (un-rotated) with their teacher targets: the budget's real baseline."""
    gen = utils.make_generator(data.train_x.device, seed)
    idx = torch.randperm(len(data.train_x), generator=gen, device=data.train_x.device)[:n]
    return data.train_x[idx], T[idx, 0]


def real_views(data, T, idx, rotations):
    """Real images idx in all K views (uint8, view-major as all_views) with their exact teacher targets."""
    idx = idx.to(data.train_x.device)
    return utils.all_views(data.train_x[idx], rotations), T[idx].transpose(0, 1).flatten(0, 1)


def full_dataset_backbone(path, data, T, rotations, cfg, teacher_hash, retrain, replace_stale, ranks=utils.Ranks()):
    """The full-dataset row's ResNet-18, trained once and reused while its settings match; one trained with
    other settings (another teacher, another recipe) is replaced only under `replace_stale` (--overwrite).
    Under torchrun every rank trains it together (DDP, each on its share of the train images); rank 0 saves it.
    Returns it with its training time in seconds, its SGD steps and whether it was reused."""
    ec, width = cfg["evaluation"], cfg["network"]["width"]
    recipe = {k: v for k, v in ec.items() if k not in ("random_init_bn", "cuda_graph")}  # what it is trained with
    meta = {"dataset": cfg["dataset"], "teacher_hash": teacher_hash, "full_epochs": ec["full_epochs"],
            "rotations": rotations, "evaluation": recipe, "seed": cfg["seed"], "data": cfg["data"], "width": width,
            "train_hash": data.fingerprint}
    if path.is_file() and not retrain:
        saved = utils.read_pth(path, "a full-dataset backbone written by main_evaluate.py", ["backbone", "meta"])
        if saved["meta"] == meta:
            g = models.student(ec["student"], width, data.train_x.shape[-1])[0]
            g.load_state_dict(saved["backbone"], strict=True)
            ranks.say(f"full_dataset: reusing {path} (trained in {saved.get('train_time_s', float('nan')):.1f}s)")
            return utils.channels_last_module(g.to(T.device), T.device).eval(), saved.get("train_time_s"), \
                saved.get("steps"), True
        if not replace_stale:
            raise ValueError(f"{path} was trained with other settings ({saved['meta']}); "
                             f"pass --retrain-full or --overwrite to replace it")
        ranks.say(f"full_dataset: {path} was trained with other settings; retraining it (--overwrite)")
    t0 = time.time()
    views, targets = real_views(data, T, utils.shard(torch.arange(len(data.train_x)), ranks), rotations)
    g, steps = pretrain_on_set(views, targets, ec, ec["full_epochs"], data.mean, data.std, cfg["seed"],
                               "full_dataset", width, ranks)
    train_time = time.time() - t0
    if ranks.main:
        utils.atomic_save({"backbone": {k: v.cpu() for k, v in g.state_dict().items()}, "meta": meta,
                           "train_time_s": train_time, "steps": steps}, path)
    return g, train_time, steps, False


# ============================================================================================
# The table
# ============================================================================================
MIN_GAIN_POINTS = 1.0  # gain recovered is shown only when full_dataset beats random init by more than this


def gain_defined(full, base):
    """Gain recovered is a ratio over (full_dataset - no_pretraining): shown only when that margin exceeds both
    MIN_GAIN_POINTS and twice the spread of either row over its seeds (DIGITS: within noise, so it is blank)."""
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
    columns = ([("top-1 (%)", lambda r: mean_std(r, "", ".2f")), ("teacher fit R²", lambda r: mean_std(r, "fit", ".3f"))]
               if "probe" in protocol else []) + \
        ([("fine-tune top-1 (%)", lambda r: mean_std(r, "finetune", ".2f"))] if "finetune" in protocol else []) + [
        ("seeds", lambda r: str(r["seeds"])), ("gain recovered", lambda r: fmt(r["gain_recovered"], ".1%")),
        ("retention", lambda r: fmt(r["retention"], ".1%")), ("SGD steps", lambda r: fmt(r["steps"], ",")),
        ("storage (floats)", lambda r: fmt(r["storage_floats"], ",")),
        ("storage (images)", lambda r: fmt(r["storage_images"], ",.1f")),
        ("within budget", lambda r: budget[r["within_budget"]]), ("time (s)", lambda r: f"{r['time_s']:.1f}{reused(r)}")]
    lines = [header, "", "| row | " + " | ".join(c for c, _ in columns) + " |", "|---" * (1 + len(columns)) + "|"]
    lines += [f"| {name} | " + " | ".join(f(r) for _, f in columns) + " |" for name, r in results.items()]
    note = (f"Gain recovered = (row - no_pretraining) / (full_dataset - no_pretraining), blank when full_dataset "
            f"beats no_pretraining by no more than {MIN_GAIN_POINTS:g} point or twice either row's std.")
    return "\n".join(lines + ["", note]) + "\n"


def row_result(row_cells, protocol, storage_floats):
    """One table row from its (row, seed) cells: probe accuracies, teacher fits and fine-tune accuracies (None
    where that protocol was not asked for), their mean and (population) std over seeds."""
    values = lambda key, p: [c[key] if p in protocol else None for c in row_cells]
    mean = lambda v: None if None in v else statistics.fmean(v)
    std = lambda v: None if None in v else statistics.pstdev(v) if len(v) > 1 else 0.0
    accs, fits, finetunes = values("probe", "probe"), values("fit", "probe"), values("finetune", "finetune")
    extra = {k: row_cells[0][k] for k in ("reused", "train_time_s") if k in row_cells[0]}  # the full_dataset row's
    return {"mean": mean(accs), "std": std(accs), "accs": accs, "fit_mean": mean(fits), "fit_std": std(fits),
            "fits": fits, "finetune_mean": mean(finetunes), "finetune_std": std(finetunes), "finetunes": finetunes,
            "seeds": len(row_cells), "steps": row_cells[0]["steps"], "storage_floats": storage_floats,
            "time_s": sum(c["time_s"] for c in row_cells), **extra}


CELL_NUMBERS = {"probe": (0.0, 100.0), "fit": (None, 1.0), "finetune": (0.0, 100.0), "time_s": (0.0, None)}


def read_results(path):
    """results.json as main_evaluate.py writes it (save() in evaluate), every kept cell checked: a file that is
    not JSON, lacks a part, or holds a value that cannot be right is refused, naming the file and the entry."""
    def bad(what):
        raise ValueError(f"{path} is not a results.json written by main_evaluate.py: {what}; move it aside or "
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
    """The (row, seed) cells a previous run of this config wrote to `path` (none if it wrote nothing yet: a
    student of --student a,b,c that had not started); refused, naming what changed, when its config, target or
    inputs (teacher, train split, distilled sets) differ. Seeds, rows and protocols may differ: cells of other
    seeds or protocols are kept for a later run and only the missing ones run."""
    if not path.is_file():
        print(f"--resume: no {path} yet; every cell runs")
        return {}
    saved = read_results(path)
    if saved["config"] != cfg or saved["derived"]["target"] != target_name:
        changed = utils.config_changes(saved["config"], cfg)
        raise ValueError(f"--resume: {path} was written with another config or target"
                         + (f" (changed: {', '.join(changed)})" if changed else ""))
    old_inputs = saved["derived"].get("inputs", {})
    stale = [k for k in inputs if k in old_inputs and old_inputs[k] != inputs[k]]
    if stale:
        raise ValueError(f"--resume: {path} was computed from other inputs ({', '.join(stale)} changed since); "
                         f"rerun without --resume (--overwrite) to recompute every row")
    return saved["cells"]


def main(argv=None):
    """One table (evaluation.student), or one per `--student` plus the cross-architecture summary."""
    args, overrides = parse_args(argv)
    if args.student is None:
        return evaluate(args, overrides)[0]
    done = {s: evaluate(args, {**overrides, "evaluation.student": s}, sub=s) for s in args.student}
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


def evaluate(args, overrides, sub=None):
    """The table of every row for one student, written to <out>[/<sub>]: ({row: result}, out) on rank 0,
    (None, None) on the others."""
    cfg = utils.load_config(args.config, overrides)
    ec, N, width = cfg["evaluation"], cfg["storage"]["budget_N"], cfg["network"]["width"]
    ranks, device = utils.init_ranks(args.device)  # rank 0 of 1 unless started by torchrun
    if ec["batch_size"] % ranks.world:
        raise utils.ConfigError(f"{args.config}: evaluation.batch_size {ec['batch_size']} (the full-dataset row's "
                                f"global batch) is not divisible by the {ranks.world} torchrun processes")
    utils.set_seed(cfg["seed"])
    target_name = args.target or cfg["dataset"]
    suffix = f"_to_{target_name.lower()}" if target_name != cfg["dataset"] else ""
    name = utils.config_name(args.config)
    out = Path(args.out) if args.out else Path("evaluation_models") / f"{name}_N{N}{suffix}"
    out = out / sub if sub else out
    student, full_file = ec["student"], f"{ec['student']}_full_dataset.pth"
    run_folder = (out, [out / "results.json"], args.resume, args.overwrite, "main_evaluate.py")
    if ranks.main:  # refused before any work; claimed (lock, owner, --overwrite) once every other check passed
        utils.check_run_folder(*run_folder)
    assets = Path(args.assets) if args.assets else utils.distilled_folder(cfg, name)
    krr_cfg = {**cfg, "distillation": {**cfg["distillation"], "method": "krr_st"}}
    krr_assets = Path(args.krr_assets) if args.krr_assets else utils.distilled_folder(krr_cfg, name)
    rotations = cfg["augmentations"]["rotate"]
    rows = list(args.rows)
    if "krr_st" in rows and not args.rows_given and not (krr_assets / "distilled_data.pth").is_file():
        rows.remove("krr_st")  # optional by default; asked for by --rows, a missing set is an error
        ranks.say(f"krr_st: no assets at {krr_assets}, row skipped (run main_distill.py --distillation.method=krr_st)")
    init_only = assets / utils.INIT_ONLY / "distilled_data.pth"
    if "init_only" in rows and not args.rows_given and not init_only.is_file():
        rows.remove("init_only")
        ranks.say(f"init_only: no set at {init_only}, row skipped (main_distill.py writes it before its first step)")
    if not rotations and not args.rows_given:  # without rotations these rows repeat distilled / a real set
        rows = [r for r in rows if r not in NEEDS_ROTATIONS]
    seeds = [cfg["seed"] + i for i in range(args.seeds)]
    res, d_y = cfg["data"]["resolution"], models.resnet18_dim(width)

    # ---------------------------------------------------------------- source and target data, teacher
    data = utils.load_data(cfg)
    utils.check_sizes(cfg, len(data.train_x))
    data = data.to(device)
    target = data if target_name == cfg["dataset"] else utils.load_dataset(target_name, cfg["data"]["root"], res).to(device)
    teacher_file = Path(args.teacher) if args.teacher else utils.teacher_path(name)
    teacher, _ = utils.load_teacher(teacher_file, cfg, device, data)
    teacher_hash = utils.file_hash(teacher_file)
    # what the table was computed from: a resumed table must find the same inputs
    inputs = {"teacher_hash": teacher_hash, "train_hash": data.fingerprint}
    for key, folder, readers in (("distilled", assets, {"distilled", "distilled_exact", "real_init"}),
                                   ("init_only", assets / utils.INIT_ONLY, {"init_only"}),
                                   ("krr_st", krr_assets, {"krr_st"})):
        path = folder / "distilled_data.pth"
        if readers & set(rows) and path.is_file():
            inputs[f"{key}_hash"] = utils.file_hash(path)
    def check_assets(folder, d):
        """A distilled set is compared with the other rows only if it was built from the same inputs."""
        pairs = {"dataset": (d["dataset"], cfg["dataset"]), "teacher": (d["teacher_hash"], teacher_hash),
                 "train split": (d["train_hash"], data.fingerprint),
                 "data.target_rms": (d["config"]["data"]["target_rms"], cfg["data"]["target_rms"])}
        stale = [f"{k} ({str(a)[:16]} here {str(b)[:16]})" for k, (a, b) in pairs.items() if a != b]
        if stale:
            raise ValueError(f"{folder} was distilled from other inputs than this evaluation uses: {', '.join(stale)}; "
                             f"rerun main_distill.py with this config and teacher")

    def distilled_set(row):
        """(views, targets, storage floats) of a distilled row; checked against this teacher and split."""
        folder = {"krr_st": krr_assets, "init_only": assets / utils.INIT_ONLY}.get(row, assets)
        views, targets, d = utils.load_distilled(folder, device, exact=row == "distilled_exact")
        check_assets(folder, d)
        stored = d["storage"]["stored"]
        if row == "distilled_exact":  # learned C_y^k stored instead of the approximation nets
            stored += len(d["rotations"]) * d["m"] * d["C_y"].shape[1] - d["storage"]["rows"].get("approximation nets", 0)
        return views, targets, stored

    def real_init_indices():
        """The m train images the distilled set started from (its indices index this split: checked)."""
        d = utils.read_pth(assets / "distilled_data.pth", "a distilled set written by main_distill.py",
                           ["run_id", "teacher_hash", "train_hash", "dataset", "config"])
        check_assets(assets, d)
        return utils.read_controls(assets, run_id=d["run_id"])["init_indices"]

    # every set this table reads, loaded and checked before anything is written
    sets = {row: distilled_set(row) for row in rows if row in DISTILLED_ROWS}
    init_idx = real_init_indices() if "real_init" in rows else None

    bs = cfg["data"]["eval_batch_size"]
    cells = resumed_cells(out / "results.json", cfg, target_name, inputs) if args.resume else {}
    # the full-dataset model is a cache checked against its own metadata: it survives --overwrite
    lock = utils.claim_run_folder(*run_folder, keep=[full_file]) if ranks.main else None
    utils.barrier(ranks)
    T, target_scale = None, None
    if {"real_init", "random_subset", "full_dataset"} & set(rows):
        for turn in (True, False):  # rank 0 computes and caches the targets, then the others read the cache
            if ranks.main == turn:
                T, target_scale = utils.teacher_targets(teacher, teacher_file, data, rotations, cfg["data"], out,
                                                        teacher_hash)
            utils.barrier(ranks)
    derived = {"device": str(device), "rows": rows, "seeds": seeds, "target": target_name, "assets": str(assets),
               "krr_assets": str(krr_assets), "out": str(out), "inputs": inputs, "target_scale": target_scale,
               "processes": ranks.world, "protocol": args.protocol}
    if ranks.main:
        utils.print_config(cfg, derived)
        utils.write_json({"config": cfg, "derived": derived}, out / "config.json")
    teacher_feats = utils.split_features(teacher, target, bs)  # what every row's teacher fit is scored against
    budget = utils.storage_accounting(krr_cfg, res)  # N real images + targets: exactly the budget
    K = 1 + len(rotations)
    per_real = 3 * res * res + d_y * K  # a real image stored with its K teacher targets

    # ---------------------------------------------------------------- cells: one per (row, seed), saved as each ends
    # cells[row][seed] = {"probe", "fit", "finetune", "steps", "time_s"}: a cell keeps what each protocol measured
    if args.resume:
        ranks.say(f"resumed: {sum(len(c) for c in cells.values())} (row, seed) cells already done")
    wanted = {"probe": ("probe", "fit"), "finetune": ("finetune",)}
    missing = lambda cell: [p for p in args.protocol if any(k not in cell for k in wanted[p])]
    save = lambda **final: utils.write_json({"rows": results, "cells": cells, "config": cfg, "derived": derived,
                                             "complete": False, **final}, out / "results.json")
    results = {}
    for row in rows:
        row_seeds = seeds if row in SEEDED else [cfg["seed"]]
        done = cells.setdefault(row, {})
        todo = [s for s in row_seeds if missing(done.get(str(s), {}))]
        if row == "full_dataset" and todo:  # every rank trains it (DDP under torchrun); rank 0 probes it below
            g_full, train_time, full_steps, reused = full_dataset_backbone(
                out / full_file, data, T, rotations, cfg, teacher_hash, args.retrain_full, args.overwrite, ranks)
        if row in DISTILLED_ROWS:
            views, targets, stored = sets[row]
        elif row == "real_init":
            views, targets = real_views(data, T, init_idx, rotations)
            stored = len(init_idx) * per_real
        else:
            stored = {"random_subset": budget["budget"], "full_dataset": len(data.train_x) * per_real,
                      "no_pretraining": 0, "teacher": None}[row]
        # the seeds of a seeded row are spread over the ranks; the other rows are rank 0's
        for seed in todo[ranks.rank::ranks.world] if row in SEEDED else todo * ranks.main:
            t0, cell, feats, steps = time.time(), dict(done.get(str(seed), {})), None, 0
            if row in DISTILLED_ROWS + ("real_init",):
                g, steps = pretrain_on_set(views, targets, ec, ec["epochs"], data.mean, data.std, seed,
                                           f"{row} s{seed}", width)
                if row == "distilled" and seed == seeds[0]:
                    utils.atomic_save({k: v.cpu() for k, v in g.state_dict().items()},
                                      out / f"{student}_distilled_dataset.pth")
            elif row == "random_subset":
                x, y = random_subset(data, T, N, seed)
                g, steps = pretrain_on_set(x, y, ec, ec["epochs"], data.mean, data.std, seed, f"{row} s{seed}", width)
            elif row == "full_dataset":
                g, steps = g_full, full_steps
                cell.update(reused=reused, train_time_s=train_time)
                t0 -= 0 if reused else train_time  # a model trained now counts in the row's time
            elif row == "teacher":
                g, feats = teacher, teacher_feats
            else:  # no_pretraining: a random student, its BatchNorm statistics as evaluation.random_init_bn says
                torch.manual_seed(seed)
                g = utils.channels_last_module(models.student(student, width, res)[0].to(device), device).eval()
                g = utils.recalibrate_bn(g, target, bs) if ec["random_init_bn"] == "recalibrate" else g
            feats = feats if feats is not None else utils.split_features(g, target, bs)
            utils.check_features(feats, row)
            todo_p = missing(cell)  # a cell that has one protocol runs only the other (its network trained again)
            if "probe" in todo_p:
                cell["probe"] = utils.probe_backbone(g, target, cfg["probe"], seed, bs, features=feats)
                cell["fit"] = utils.teacher_fit(feats, teacher_feats, cfg["probe"]["teacher_fit_ridge"])
            if "finetune" in todo_p:
                cell["finetune"] = utils.finetune(g, target, cfg["finetune"], seed, bs)
            cell.update(steps=steps, time_s=cell.get("time_s", 0.0) + time.time() - t0)
            done[str(seed)] = cell
            print(f"{row} seed {seed}: " + ", ".join(f"{k} {cell[c]:.4g}" for k, c in (
                ("linear probe top-1 %", "probe"), ("teacher fit R^2", "fit"), ("fine-tune top-1 %", "finetune"))
                if c in cell) + (f" (rank {ranks.rank})" if ranks.world > 1 else ""))
            if ranks.world == 1:
                save()  # under torchrun the cells are gathered and written once the row ends
        for part in utils.gather_objects({str(s): c for s, c in done.items()}, ranks):
            done.update(part)  # every rank's cells
        results[row] = row_result([done[str(s)] for s in row_seeds], args.protocol, stored)
        if ranks.main:
            save()
    if not ranks.main:  # rank 0 writes the table
        return None, None

    # ---------------------------------------------------------------- table
    results = summarize({r: results[r] for r in rows}, budget)
    header = (f"{cfg['dataset']} -> {target_name}, budget N={N} ({budget['budget']:,} floats), student {student} "
              f"(width {width}; the teacher row is the ResNet-18 teacher) pre-trained {ec['epochs']} epochs "
              f"(full dataset {ec['full_epochs']}), "
              f"augment={ec['augment']}, protocol {'+'.join(args.protocol)} (linear probe {cfg['probe']['iterations']} "
              f"it., fine-tune {cfg['finetune']['iterations']} it.), seeds {seeds}"
              + (f"; {target_name} images at {res} px" if target_name != cfg["dataset"] else ""))
    md = markdown(results, header, args.protocol)
    print(md)
    (out / "results.md").write_text(md)
    save(header=header, complete=True)
    utils.release_run_folder(lock)
    return results, out


if __name__ == "__main__":
    main()
