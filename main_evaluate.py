"""Pre-train ResNet-18 on each pre-training source, linear-probe it, and compare (SPEC 6).

    python main_evaluate.py --config configs/cifar10.yaml                  # every row
    python main_evaluate.py --config configs/cifar10.yaml --seeds 3        # mean +- std over 3 seeds
    python main_evaluate.py --config configs/cifar100.yaml --target CIFAR10  # transfer: probe on CIFAR-10
    python main_evaluate.py --config configs/cifar10.yaml --rows distilled,no_pretraining

Rows (each pre-trained with the same recipe, `evaluation:`, and probed the same way, `probe:`):
    distilled       this method's distilled set: all K views, targets from the approximation MLPs
    krr_st          the KRR-ST baseline set (main_distill.py --distillation.method=krr_st), if present
    random_subset   N random real images with their teacher targets: the same storage budget
    full_dataset    the whole train set, all K views, teacher targets, `evaluation.full_epochs` epochs
    teacher         the Barlow Twins teacher itself (upper reference)
    no_pretraining  random initialisation
Writes evaluation_models/<dataset>_N<budget>[_to_<target>]/ (or --out): results.json, results.md,
config.json, resnet18_distilled_dataset.pth, resnet18_full_dataset.pth (reused unless --retrain-full).
"""
import json
import math
import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm

import main_distill
import models
import utils

ROWS = ("distilled", "krr_st", "random_subset", "full_dataset", "teacher", "no_pretraining")
SEEDED = ("distilled", "krr_st", "random_subset", "no_pretraining")  # rows repeated by --seeds


def parse_args(argv):
    p = utils.script_parser(__doc__)
    p.add_argument("--config", required=True)
    p.add_argument("--assets", default=None, help="distilled set folder (default: main_distill.py's)")
    p.add_argument("--krr-assets", default=None, help="KRR-ST folder (default: main_distill.py's for krr_st)")
    p.add_argument("--teacher", default=None, help="default: teacher_models/resnet18_barlow_twins_<dataset>.pth")
    p.add_argument("--target", type=str.upper, choices=utils.DATASETS, default=None,
                   help="probe on this dataset instead of the source (same resolution)")
    p.add_argument("--rows", default=None, help=f"comma-separated subset of {','.join(ROWS)}")
    p.add_argument("--seeds", type=int, default=1, help="repeat the stochastic rows with this many seeds")
    p.add_argument("--retrain-full", action="store_true", help="retrain the full-dataset model even if saved")
    p.add_argument("--out", default=None, help="default: evaluation_models/<dataset>_N<budget>[_to_<target>]")
    utils.add_common_args(p)
    args, rest = p.parse_known_args(argv)
    args.rows_given = args.rows is not None
    rows = [r.strip() for r in (args.rows or ",".join(ROWS)).split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown or not rows:
        p.error(f"--rows: unknown {unknown}; choose from {','.join(ROWS)}")
    args.rows = rows
    return args, utils.parse_overrides(rest)


# ============================================================================================
# SPEC 6.1: one pre-training recipe for every (images, targets) set
# ============================================================================================
def pretrain_on_set(images, targets, ec, epochs, mean, std, seed, desc):
    """ResNet-18 + Linear(512 -> d_y), MSE to `targets`, SGD + cosine; a fresh crop + flip of every
    view each epoch when `augment`. images: uint8 (normalised per batch) or normalised float."""
    device = targets.device
    torch.manual_seed(seed)
    gen = utils.make_generator(device, seed)
    net = models.Regressor(models.resnet18_cifar(), models.RESNET18_DIM, targets.shape[1]).to(device)
    if device.type == "cuda":
        net = net.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(net.parameters(), lr=ec["lr"], momentum=ec["momentum"], weight_decay=ec["weight_decay"])
    n, B = len(images), ec["batch_size"]
    steps = math.ceil(n / B)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * steps)
    net.train()
    bar = tqdm(range(epochs), desc=desc, leave=False, dynamic_ncols=True)
    for epoch in bar:
        perm = torch.randperm(n, generator=gen, device=device)
        total = torch.zeros((), device=device)
        for i in range(steps):
            idx = perm[i * B:(i + 1) * B]
            x = utils.normalize(images[idx], mean, std) if images.dtype == torch.uint8 else images[idx]
            if ec["augment"]:
                x = utils.random_crop_flip(x, ec["crop_pad"], gen)
            with utils.autocast(device):
                loss = models.mse(net(utils.to_channels_last(x, device)), targets[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.detach()
        if epoch % 10 == 0 or epoch == epochs - 1:
            loss = total / steps
            utils.check_finite(loss, f"{desc} epoch {epoch + 1}")
            bar.set_postfix(loss=f"{loss.item():.4f}")
    return net.backbone.eval()


def random_subset(data, T, n, seed):
    """n random real train images (un-rotated) with their teacher targets: the budget's real baseline."""
    gen = utils.make_generator(data.train_x.device, seed)
    idx = torch.randperm(len(data.train_x), generator=gen, device=data.train_x.device)[:n]
    return data.train_x[idx], T[idx, 0]


def full_dataset_backbone(path, data, T, rotations, cfg, teacher_hash, retrain, replace_stale):
    """The full-dataset row's ResNet-18, trained once and reused while its settings match; one trained with
    other settings (another teacher, another recipe) is replaced only under `replace_stale` (--overwrite).
    Returns it with its training time in seconds and whether it was reused."""
    ec = cfg["evaluation"]
    meta = {"dataset": cfg["dataset"], "teacher_hash": teacher_hash, "full_epochs": ec["full_epochs"],
            "rotations": rotations, "evaluation": ec, "seed": cfg["seed"]}
    if path.is_file() and not retrain:
        saved = utils.read_pth(path, "a full-dataset backbone written by main_evaluate.py", ["backbone", "meta"])
        if saved["meta"] == meta:
            g = models.resnet18_cifar()
            g.load_state_dict(saved["backbone"], strict=True)
            print(f"full_dataset: reusing {path} (trained in {saved.get('train_time_s', float('nan')):.1f}s)")
            return g.to(T.device).eval(), saved.get("train_time_s"), True
        if not replace_stale:
            raise ValueError(f"{path} was trained with other settings ({saved['meta']}); "
                             f"pass --retrain-full or --overwrite to replace it")
        print(f"full_dataset: {path} was trained with other settings; retraining it (--overwrite)")
    t0 = time.time()
    views = utils.all_views(data.train_x, rotations)  # uint8 (K*N, 3, H, W), view-major
    targets = T.transpose(0, 1).flatten(0, 1)
    g = pretrain_on_set(views, targets, ec, ec["full_epochs"], data.mean, data.std, cfg["seed"], "full_dataset")
    train_time = time.time() - t0
    utils.atomic_save({"backbone": {k: v.cpu() for k, v in g.state_dict().items()}, "meta": meta,
                       "train_time_s": train_time}, path)
    return g, train_time, False


# ============================================================================================
# The table
# ============================================================================================
def summarize(results, table_storage):
    """Mean/std per row, retention vs full_dataset, gain recovered over no_pretraining."""
    full = results.get("full_dataset", {}).get("mean")
    base = results.get("no_pretraining", {}).get("mean")
    for name, r in results.items():
        r["retention"] = r["mean"] / full if full else None
        r["gain_recovered"] = (r["mean"] - base) / (full - base) if full is not None and base is not None \
            and full > base else None  # undefined when the full dataset does not beat random init
        r["storage_floats"] = table_storage.get(name, r.get("storage_floats"))
        r["storage_images"] = None if r["storage_floats"] is None else r["storage_floats"] / table_storage["per_image"]
    return results


def markdown(results, header):
    fmt = lambda v, f: "-" if v is None else format(v, f)
    reused = lambda r: f" (model reused, trained in {fmt(r['train_time_s'], '.1f')})" if r.get("reused") else ""
    lines = [header, "", "| row | top-1 (%) | seeds | retention | gain recovered | storage (floats) | "
             "storage (images) | time (s) |", "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        acc = f"{r['mean']:.2f}" + (f" ± {r['std']:.2f}" if len(r["accs"]) > 1 else "")
        lines.append(f"| {name} | {acc} | {len(r['accs'])} | {fmt(r['retention'], '.1%')} | "
                     f"{fmt(r['gain_recovered'], '.1%')} | {fmt(r['storage_floats'], ',')} | "
                     f"{fmt(r['storage_images'], ',.1f')} | {r['time_s']:.1f}{reused(r)} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    args, overrides = parse_args(argv)
    cfg = utils.load_config(args.config, overrides)
    ec, N = cfg["evaluation"], cfg["storage"]["budget_N"]
    device = utils.get_device(args.device)
    utils.set_seed(cfg["seed"])
    target_name = args.target or cfg["dataset"]
    suffix = f"_to_{target_name.lower()}" if target_name != cfg["dataset"] else ""
    out = Path(args.out) if args.out else Path("evaluation_models") / f"{cfg['dataset'].lower()}_N{N}{suffix}"
    utils.guard_outputs([out / "results.json"], args.resume, args.overwrite)
    assets = Path(args.assets) if args.assets else main_distill.default_out(cfg)
    krr_cfg = {**cfg, "distillation": {**cfg["distillation"], "method": "krr_st"}}
    krr_assets = Path(args.krr_assets) if args.krr_assets else main_distill.default_out(krr_cfg)
    rows = list(args.rows)
    if "krr_st" in rows and not args.rows_given and not (krr_assets / "distilled_data.pth").is_file():
        rows.remove("krr_st")  # optional by default; asked for by --rows, a missing set is an error
        print(f"krr_st: no assets at {krr_assets}, row skipped (run main_distill.py --distillation.method=krr_st)")
    seeds = [cfg["seed"] + i for i in range(args.seeds)]
    res = cfg["data"]["resolution"]
    derived = {"device": str(device), "rows": rows, "seeds": seeds, "target": target_name, "assets": str(assets),
               "krr_assets": str(krr_assets), "out": str(out)}
    utils.print_config(cfg, derived)
    utils.write_json({"config": cfg, "derived": derived}, out / "config.json")

    # ---------------------------------------------------------------- source and target data, teacher
    data = utils.load_dataset(cfg["dataset"], cfg["data"]["root"], res).to(device)
    target = data if target_name == cfg["dataset"] else utils.load_dataset(target_name, cfg["data"]["root"], res).to(device)
    teacher_file = Path(args.teacher) if args.teacher else utils.teacher_path(cfg)
    teacher, _ = utils.load_teacher(teacher_file, cfg["dataset"], res, device)
    teacher_hash = utils.file_hash(teacher_file)
    rotations = cfg["augmentations"]["rotate"]
    bs = cfg["data"]["eval_batch_size"]
    T = None
    if {"random_subset", "full_dataset"} & set(rows):
        T = utils.teacher_targets(teacher, teacher_file, data, rotations, bs)
    budget = main_distill.storage_accounting(krr_cfg, res)  # N real images + targets: exactly the budget
    storage = {"per_image": budget["floats_per_image"], "random_subset": budget["budget"], "no_pretraining": 0,
               "full_dataset": len(data.train_x) * (3 * res * res + main_distill.D_Y * (1 + len(rotations)))}

    def distilled_set(folder, row):
        views, targets, d = utils.load_distilled(folder, device)
        if d["dataset"] != cfg["dataset"] or d["teacher_hash"] != teacher_hash:
            raise ValueError(f"{folder} was distilled for {d['dataset']} with another teacher "
                             f"(hash {d['teacher_hash'][:12]}); rerun main_distill.py with this config")
        storage[row] = d["storage"]["stored"]
        return views, targets

    # ---------------------------------------------------------------- rows (results saved after each one)
    results = {}
    if args.resume:  # keep the rows a previous run of the same config finished
        saved = json.loads((out / "results.json").read_text()) if (out / "results.json").is_file() else None
        if saved is None or saved["config"] != cfg or saved["derived"]["seeds"] != seeds:
            raise ValueError(f"--resume: {out / 'results.json'} is missing or was written with another config/seeds")
        results = {k: v for k, v in saved["rows"].items() if k in rows}
        print(f"resumed: rows {list(results)} already done")
    for row in [r for r in rows if r not in results]:
        t0, accs, extra = time.time(), [], {}
        if row in ("distilled", "krr_st"):
            views, targets = distilled_set(assets if row == "distilled" else krr_assets, row)
        for seed in (seeds if row in SEEDED else [cfg["seed"]]):
            if row in ("distilled", "krr_st"):
                g = pretrain_on_set(views, targets, ec, ec["epochs"], data.mean, data.std, seed, f"{row} s{seed}")
                if row == "distilled" and seed == seeds[0]:
                    utils.atomic_save({k: v.cpu() for k, v in g.state_dict().items()},
                                      out / "resnet18_distilled_dataset.pth")
            elif row == "random_subset":
                x, y = random_subset(data, T, N, seed)
                g = pretrain_on_set(x, y, ec, ec["epochs"], data.mean, data.std, seed, f"{row} s{seed}")
            elif row == "full_dataset":
                g, train_time, reused = full_dataset_backbone(out / "resnet18_full_dataset.pth", data, T, rotations,
                                                              cfg, teacher_hash, args.retrain_full, args.overwrite)
                extra = {"reused": reused, "train_time_s": train_time}
            elif row == "teacher":
                g = teacher
            else:  # no_pretraining
                torch.manual_seed(seed)
                g = models.resnet18_cifar().to(device).eval()
            accs.append(utils.probe_backbone(g, target, cfg["probe"], seed, bs))
            print(f"{row} seed {seed}: linear probe top-1 {accs[-1]:.2f}%")
        results[row] = {"mean": statistics.fmean(accs), "std": statistics.pstdev(accs) if len(accs) > 1 else 0.0,
                        "accs": accs, "time_s": time.time() - t0, **extra}
        utils.write_json({"rows": results, "config": cfg, "derived": derived, "complete": False}, out / "results.json")

    # ---------------------------------------------------------------- table
    results = summarize({r: results[r] for r in rows}, storage)
    header = (f"{cfg['dataset']} -> {target_name}, budget N={N}, ResNet-18 pre-trained {ec['epochs']} epochs "
              f"(full dataset {ec['full_epochs']}), augment={ec['augment']}, linear probe {cfg['probe']['iterations']} it.")
    md = markdown(results, header)
    print(md)
    (out / "results.md").write_text(md)
    utils.write_json({"header": header, "rows": results, "config": cfg, "derived": derived, "complete": True},
                     out / "results.json")
    return results


if __name__ == "__main__":
    main()
