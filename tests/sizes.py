"""Every stage of a config at its real sizes: FLOPs, seconds and peak memory per step, the resident data, and the
projected time of the config's whole schedule (issue 34). A measurement tool, not a test.

    python tests/sizes.py --config configs/stanford_dogs.yaml                 # CUDA when present, else the CPU
    python tests/sizes.py --config configs/imagenet64.yaml --device cpu --steps 1 --train-images 20000
    python tests/sizes.py --device cuda --budget-s 480 --config configs/stanford_dogs.yaml configs/imagenet64.yaml
    make sizes CONFIG=configs/tiny_imagenet.yaml          make gpu-sizes   (the 64 px configs on a lent GPU)

The data are SYNTHETIC, of the real shapes: random uint8 images at the config's resolution (the train split's real
count, or --train-images of them; the test split's real count), random labels over its classes, standard-normal
teacher targets: memory and speed depend on shapes, not on pixels. Each stage runs in a new child process (spawned:
a new interpreter) that builds the data and then the stage: its
setup (network, set, pool, optimizer as the script builds them), then one step under FlopCounterMode (matrix
products and convolutions, forward and backward; also the warm-up), then --steps timed steps; a stage whose call has
a fixed cost (a student's network is built per call, the probe lays out its batches) is timed as the difference of
a (1 + steps)-step call and a 1-step call. Peak memory is the growth beyond the resident data, over setup and steps:
on CUDA torch.cuda.max_memory_allocated above what was allocated before the stage; on the CPU the child's peak
resident set size (VmHWM, reset through /proc/self/clear_refs) above its resident set before the stage.
An out-of-memory stage is reported in the table and the next stage runs; the command then ends with one line per
such stage naming the config, the stage and what lowers its memory (exit 2; a stage that failed otherwise, a bug:
its traceback, a line, exit 1). A stage is skipped with its reason
when the reference sizing (--plans folder/<config name>.json, default docs/sizes/: the CPU's figures) says it would
not fit the device (CUDA: the GPU's memory, known from the first stage on; the CPU: MemTotal), or when its FLOPs at
the slowest rate measured so far would not finish within --budget-s (a child still running at the deadline is
stopped and its stage reported as such).
Writes <out>/<config name>.json and .md (the table, the resident data, the schedule's projected time on this device,
on --ranks W ranks, and estimated for an H200 from the FLOPs and the H200 rates of 2026-12-04).
"""
import argparse
import json
import math
import multiprocessing
import random
import resource
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import main_distill  # noqa: E402
import main_evaluate  # noqa: E402
import models  # noqa: E402
import pretrain  # noqa: E402
import utils  # noqa: E402


# ============================================================================================
# Adapter: every call into the scripts, one function per stage. Each takes (cfg, data, T, device) and returns
# run(n), which runs n steps of the stage. When a script's signature changes, only this section changes.
# ============================================================================================
def teacher_step(cfg, data, T, device):
    """pretrain.py's step: a pretrain.batch_size batch in both views, ResNet-18 + projector, LARS."""
    pc = cfg["pretrain"]
    net, opt = pretrain.build(pc, cfg["network"]["width"], device)
    for group in opt.param_groups:
        group["lr"] = pretrain.lr_at(0, 1, pc)
    gen, x = models.make_generator(device, 0), data.train_x[:pc["batch_size"]]
    return lambda n: [pretrain.barlow_step(net, opt, x, data, pc, gen, device) for _ in range(n)]


def teacher_targets(cfg, data, T, device):
    """utils.teacher_targets' work on one data.eval_batch_size batch: a ResNet-18's features of its K views."""
    dc, angles = cfg["data"], [0] + cfg["augmentations"]["rotate"]
    teacher = models.channels_last_module(models.resnet18_cifar(cfg["network"]["width"]).to(device), device).eval()
    x = data.train_x[:dc["eval_batch_size"]]
    return lambda n: [utils.embed_all(teacher, x, data.mean, data.std, dc["eval_batch_size"], a,
                                      dc["target_precision"]) for _ in range(n) for a in angles]


def distill_state(cfg, data, T, device):
    """main_distill's set (m from the storage accounting), AdamW, schedule and model pool, as its main builds them."""
    m = main_distill.storage_accounting(cfg)["m"]
    return main_distill.build(cfg, data, T, m, device, models.make_generator(device, cfg["seed"]),
                              random.Random(cfg["seed"]))


def outer_step(cfg, data, T, device):
    """main_distill.outer_step: the real batch in all K views, the KRR loss over the K m support views (in
    support_chunk chunks), AdamW, the inner step."""
    s = distill_state(cfg, data, T, device)
    return lambda n: [main_distill.outer_step(s, data, T, cfg["distillation"]) for _ in range(n)]


def inner_step(cfg, data, T, device):
    """ModelPool.inner_step alone: one SGD step of a pool model on the K m support views."""
    s = distill_state(cfg, data, T, device)
    with torch.no_grad():
        X_s, Y_s = s.distilled()
    return lambda n: [s.pool.inner_step(0, X_s, Y_s) for _ in range(n)]


def target_views(cfg):
    """K of the teacher targets main_distill computes for this config (1 for krr_st)."""
    return 1 + len(main_distill.rotations_of(cfg))


def student_step(cfg, data, T, device):
    """main_evaluate.pretrain_on_set on one evaluation.batch_size batch: n epochs are n SGD steps (each call
    builds a new student: a fixed cost per call)."""
    ec, width = cfg["evaluation"], cfg["network"]["width"]
    x = data.train_x[:ec["batch_size"]]
    y = torch.randn(len(x), models.resnet18_dim(width), device=device)
    recipe = main_evaluate.Recipe(ec, width, data.mean, data.std)
    return lambda n: main_evaluate.pretrain_on_set(x, y, recipe, n, 0, "sizes: student")


def full_dataset_views(cfg, data, T, device):
    """main_evaluate's full_dataset row's inputs: every train image in all K views with its targets (real_views)."""
    idx = torch.arange(len(data.train_x))
    return lambda n: [main_evaluate.real_views(data, T, idx, cfg["augmentations"]["rotate"]) for _ in range(n)]


def probe_step(cfg, data, T, device):
    """The linear probe (utils.linear_probe) on features of the train split: n SGD steps (a fixed cost per call:
    the batches and the loss's gradients laid out first)."""
    d = models.resnet18_dim(cfg["network"]["width"])
    gen = torch.Generator(device=device).manual_seed(0)
    train_f, test_f = (torch.randn(len(x), d, device=device, generator=gen) for x in (data.train_x, data.test_x))
    return lambda n: utils.linear_probe(train_f, data.train_y, test_f, data.test_y, data.num_classes,
                                        {**cfg["probe"], "iterations": n}, 0)


# ============================================================================================
# The stages
# ============================================================================================
@dataclass(frozen=True)
class Stage:
    """setup: an adapter function; targets: its setup needs the teacher targets T; held: how many copies of the
    whole T its script holds beside the images (the resident data it needs); fixed: a call has a fixed cost (timed
    as a difference); per_train: its memory grows with the train images (scaled to the real count in the
    report); min_steps: timed steps at least (a step too short to time alone); overrides: config keys of this
    stage; lower: the settings that lower its memory."""
    setup: object
    what: str
    lower: str
    held: int
    targets: bool = False
    fixed: bool = False
    per_train: bool = False
    min_steps: int = 0
    overrides: dict = field(default_factory=dict)


STAGES = {  # held: pretrain.py keeps the images; utils.teacher_targets T and its per-view parts while it stacks
    # them; main_distill and main_evaluate the images and T
    "teacher_step": Stage(teacher_step, "pretrain.barlow_step, pretrain.batch_size images x 2 views",
                          "pretrain.batch_size (or torchrun: the batch split over the ranks)", 0),
    "teacher_targets": Stage(teacher_targets, "the teacher on one data.eval_batch_size batch, all K views",
                             "data.eval_batch_size", 2),
    "outer_step": Stage(outer_step, "main_distill.outer_step at the real m, K, outer batch, support_chunk",
                        "distillation.support_chunk, distillation.outer_batch_size (or torchrun: both split)", 1,
                        targets=True),
    "inner_step": Stage(inner_step, "ModelPool.inner_step on the K m support views",
                        "distillation.support_chunk (or torchrun: the views split)", 1, targets=True),
    "outer_step_krr_st": Stage(outer_step, "the same with distillation.method=krr_st (m = N, no rotations)",
                               "distillation.outer_batch_size", 1, targets=True,
                               overrides={"distillation.method": "krr_st"}),
    "student_step": Stage(student_step, "main_evaluate.pretrain_on_set, one evaluation.batch_size step",
                          "evaluation.batch_size", 1, fixed=True),
    "full_dataset_views": Stage(full_dataset_views, "main_evaluate.real_views of every train image (the "
                                "full_dataset row's inputs)", "data.train_subset", 1, targets=True, per_train=True),
    "probe_step": Stage(probe_step, "utils.linear_probe, one probe.batch_size step, the train split's features",
                        "probe.labels_per_class (fewer train features)", 1, fixed=True, per_train=True,
                        min_steps=200),
}

# The real splits (train, test, classes): the official releases' counts (DIGITS: scikit-learn's 1,797 split 3:1).
SPLITS = {"CIFAR10": (50_000, 10_000, 10), "CIFAR100": (50_000, 10_000, 100), "STANFORD_DOGS": (12_000, 8_580, 120),
          "TINY_IMAGENET": (100_000, 10_000, 200), "IMAGENET64": (1_281_167, 50_000, 1000), "DIGITS": (1_347, 450, 10)}

# One H200's rates (docs/results.md, 2026-12-04, the second GPU session, commit 5e36791, configs/cifar10.yaml sizes):
# TFLOP/s of tests/benchmark.py's steps (FlopCounterMode's FLOPs per measured second); the teacher's also for its
# frozen passes (the same network, forward only); the student's from the evaluation's pre-training, ~86 steps/s
# of batch 256 (the benchmark's student rate then included building the network) at this tool's 854.8 GFLOP a
# step; the probe by its measured time (5,000 steps in 1.19 s, eager), not by its FLOPs.
H200_TFLOPS = {"teacher_step": 123.1, "teacher_targets": 123.1, "outer_step": 63.27, "outer_step_krr_st": 63.27,
               "inner_step": 83.98, "student_step": 86 * 854.8e9 / 1e12}
H200_PROBE_S_PER_STEP = 1.19 / 5000
# A stage's time estimate before any rate is measured: CUDA well below the H200's slowest step above (an H100, or
# a step at other sizes, may be slower); the CPU about this box's 2 cores (docs/results.md, 2026-12-07)
A_PRIORI_TFLOPS = {"cuda": 25.0, "cpu": 0.02}
CHILD_START_S = 30.0  # a child's start-up before its first stage is measured (imports, CUDA, synthetic data)
GIB = 2**30


def split_sizes(cfg):
    """(train images, test images, classes) of the config's source: the real counts, data.train_subset applied."""
    n_train, n_test, classes = SPLITS[cfg["dataset"]]
    return cfg["data"]["train_subset"] or n_train, n_test, classes


def stage_config(path, name):
    return utils.load_config(path, STAGES[name].overrides)


# ============================================================================================
# One stage in a child process: synthetic data, setup, FLOPs, seconds, peak memory
# ============================================================================================
def synthetic_data(cfg, n_train, device, targets):
    """Random uint8 images of the config's shape (n_train train, the real test count), random labels over its
    classes, a fixed mean/std; with `targets`, standard-normal teacher targets (n_train, K, d_y), view by view."""
    res, (_, n_test, classes) = cfg["data"]["resolution"], split_sizes(cfg)
    gen = torch.Generator(device=device).manual_seed(0)
    images = lambda n: torch.randint(0, 256, (n, 3, res, res), dtype=torch.uint8, device=device, generator=gen)
    labels = lambda n: torch.randint(0, classes, (n,), device=device, generator=gen)
    stat = lambda v: torch.full((3,), v, device=device)
    data = utils.ImageData(cfg["dataset"], images(n_train), labels(n_train), images(n_test), labels(n_test),
                           stat(0.5), stat(0.29), classes)
    if not targets:
        return data, None
    T = torch.empty(n_train, target_views(cfg), models.resnet18_dim(cfg["network"]["width"]), device=device)
    for k in range(T.shape[1]):
        T[:, k].normal_(generator=gen)
    return data, T


class Peak:
    """Peak memory growth from its creation on: CUDA, max_memory_allocated above the allocation then; the CPU, the
    process's peak resident set (VmHWM, reset through /proc/self/clear_refs) above its resident set then."""

    def __init__(self, device):
        self.device = device
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            self.base, self.method = torch.cuda.memory_allocated(device), "torch.cuda.max_memory_allocated"
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.method = "peak resident set (VmHWM, reset before the stage) growth"
        except OSError:
            self.method = "peak resident set since the child started (ru_maxrss) growth"
        self.base = proc_status("VmRSS")

    def bytes(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self.base
        peak = proc_status("VmHWM") if "VmHWM" in self.method else \
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return max(0, peak - self.base)


def proc_status(key):
    """A /proc/self/status memory line in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise OSError(f"/proc/self/status has no {key}")


def timed(run, n, device):
    """Seconds of run(n), the device synchronised around it."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    run(n)
    sync()
    return time.perf_counter() - t0


class GlobalOnly:
    """FlopCounterMode's module tracker reduced to the one total this tool reads: the tracker's backward hooks kept
    the step's activations alive (Stanford Dogs' outer step: killed at 23 GB, 9.9 GB without the counter)."""
    parents = {"Global"}

    def __enter__(self):
        return self

    def __exit__(self, *args):
        return False


def flop_counter():
    """FlopCounterMode counting the total FLOPs only (GlobalOnly): the same count, the step's own memory."""
    counter = FlopCounterMode(display=False)
    counter.mod_tracker = GlobalOnly()
    return counter


def measure(cfg, name, n_train, device, steps):
    """One stage: setup, one step under FlopCounterMode (the warm-up), `steps` timed steps; its peak memory."""
    stage = STAGES[name]
    data, T = synthetic_data(cfg, n_train, device, stage.targets)
    peak = Peak(device)
    run = stage.setup(cfg, data, T, device)
    setup_bytes = peak.bytes()
    with flop_counter() as counter:
        counted = timed(run, 1, device)
    steps, note = max(steps, stage.min_steps), None
    if steps == 0:  # the counted call timed (a CPU step of minutes: the counter's cost is small against it)
        seconds, note = counted, "the step under the FLOP counter, no warm-up" + (
            ", with the call's fixed cost" if stage.fixed else "")
    elif stage.fixed:  # the fixed cost of a call cancels
        more = timed(run, 1 + steps, device)
        seconds = (more - timed(run, 1, device)) / steps
        if seconds <= 0:
            seconds, note = more / (1 + steps), "the difference was within the timing noise: a call's time per step"
    else:
        seconds = timed(run, steps, device) / steps
    out = {"status": "ok", "flops": counter.get_total_flops(), "seconds": seconds, "note": note,
           "peak_bytes": peak.bytes(),
           "setup_peak_bytes": setup_bytes, "memory": peak.method, "steps": steps, "train_images": n_train}
    if device.type == "cuda":
        out.update(peak_allocated_bytes=torch.cuda.max_memory_allocated(device),
                   device_bytes=torch.cuda.get_device_properties(device).total_memory)
    return out


def host_bytes():
    """The machine's memory (MemTotal): what a CPU stage can use at most."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return None


OOM_TEXT = ("out of memory", "can't allocate memory", "Cannot allocate memory")


def child(path, name, stage, device, steps, n_train, result):
    """In the child process: measure one stage (the parent's STAGES[name], passed on: a spawned child imports this
    file afresh) and write its result (JSON) to `result`; running out of memory is a result too, any other error its
    traceback (on stderr) and its first line."""
    STAGES[name] = stage
    try:
        out = measure(stage_config(path, name), name, n_train, utils.get_device(device), steps)
    except Exception as e:  # noqa: BLE001 - every failure is the report's content
        oom = isinstance(e, (torch.OutOfMemoryError, MemoryError)) or any(t in str(e) for t in OOM_TEXT)
        if not oom:
            traceback.print_exc()
        out = {"status": "out of memory" if oom else "failed", "error": utils.first_line(e)}
    Path(result).write_text(json.dumps(out))


# ============================================================================================
# The parent: every stage of every config, the budget, the projection, the report
# ============================================================================================
def launch(args, timeout):
    """child(*args) in a new process; its exit code (negative: killed by that signal), None when out of time."""
    proc = multiprocessing.get_context("spawn").Process(target=child, args=args)  # (a fork of a process that ran
    # torch's thread pools can hang on a lock held at the fork, as it did under pytest; CUDA needs spawn anyway)
    proc.start()
    proc.join(None if math.isinf(timeout) else max(timeout, 0))
    if proc.is_alive():
        proc.kill()
        proc.join()
        return None
    return proc.exitcode


def run_stage(path, name, args, n_train, timeout):
    """One stage in a fresh child; its result, or why it has none (killed, out of time)."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        t0 = time.time()
        code = launch((str(path), name, STAGES[name], args.device, args.steps, n_train, str(result)), timeout)
        wall = time.time() - t0
        if result.is_file():
            return {**json.loads(result.read_text()), "wall_s": wall}
    if code is None:
        return {"status": "skipped", "error": f"did not finish within the {timeout:.0f} s left of --budget-s"}
    return {"status": "out of memory" if code == -9 else "failed",
            "error": f"the child ended with exit code {code}" + (" (killed by signal 9: the kernel's out-of-memory "
                                                                 "killer, most likely)" if code == -9 else "")}


def resident(cfg, n_train, world):
    """Bytes of the data a run keeps: the images (uint8, train + test), the teacher targets (float32, N x K x d_y),
    and per rank under data.shard (main_distill under torchrun, after the set is built from the whole split)."""
    res, (_, n_test, _) = cfg["data"]["resolution"], split_sizes(cfg)
    image = 3 * res * res
    targets = n_train * (1 + len(cfg["augmentations"]["rotate"])) * models.resnet18_dim(cfg["network"]["width"]) * 4
    per_rank = n_train // world * image + n_test * image + targets // world if cfg["data"]["shard"] else None
    return {"images": (n_train + n_test) * image, "targets": targets, "per_rank_sharded": per_rank, "ranks": world}


def schedule(cfg, seeds):
    """The config's whole run as (part, steps, stage, scale, split over ranks): `steps` steps of `stage` at `scale`
    of its measured time each. Not counted: PCA, the approximation MLPs' fits, checkpoints, the kNN's top-k."""
    n, n_test, _ = split_sizes(cfg)
    pc, dc, mp, ec = cfg["pretrain"], cfg["distillation"], cfg["model_pool"], cfg["evaluation"]
    K, N, B, eb = 1 + len(cfg["augmentations"]["rotate"]), cfg["storage"]["budget_N"], ec["batch_size"], \
        cfg["data"]["eval_batch_size"]
    m = main_distill.storage_accounting(cfg)["m"]
    stagger = mp["size_L"] * (mp["inner_loop_steps_Z"] - 1) / 2  # the pool's random ages' expectation
    epochs = lambda views: ec["epochs"] * math.ceil(views / B)
    seeded = 4 * epochs(K * m) + 2 * epochs(N)  # distilled, init_only, distilled_exact, real_init; krr_st, random
    cells = 7 * seeds + 2  # seeded rows (+ no_pretraining) x seeds, full_dataset, the teacher's features
    passes = math.ceil((n + n_test) / eb)  # frozen batches over both splits (one view)
    return [("teacher: epochs x N // batch steps", pc["epochs"] * (n // pc["batch_size"]), "teacher_step", 1, True),
            ("teacher: kNN monitors' features", pc["epochs"] // pc["knn_every"] * passes, "teacher_targets", 1 / K,
             False),
            ("teacher targets: N images x K views", math.ceil(n / eb), "teacher_targets", 1, False),
            ("distillation: outer steps", dc["steps"], "outer_step", 1, True),
            ("distillation: pool stagger, L (Z - 1) / 2 inner steps", stagger, "inner_step", 1, True),
            ("krr_st: outer steps", dc["steps"], "outer_step_krr_st", 1, True),
            ("krr_st: pool stagger (inner steps scaled to N views)", stagger, "inner_step", N / (K * m), True),
            (f"evaluation: students of the seeded rows x {seeds} seeds", seeds * seeded, "student_step", 1, True),
            ("evaluation: full_dataset student", ec["full_epochs"] * math.ceil(K * n / B), "student_step", 1, True),
            (f"evaluation: probe features, {cells} cells", cells * passes, "teacher_targets", 1 / K, True),
            (f"evaluation: probe steps, {cells} cells", cells * cfg["probe"]["iterations"], "probe_step", 1, True)]


def h200_seconds(name, r):
    """A step's seconds estimated for one H200 from its FLOPs and the H200 rates of 2026-12-04 (None: no rate)."""
    if name == "probe_step":
        return H200_PROBE_S_PER_STEP
    return r["flops"] / (H200_TFLOPS[name] * 1e12) if name in H200_TFLOPS and r.get("flops") else None


def projection(cfg, stages, seeds, world):
    """Each part of the schedule: its steps and projected seconds on this device, on `world` ranks (ideal: the
    split parts / W, no communication counted), and on one H200 (estimated); None where a stage did not run."""
    rows = []
    for part, steps, name, scale, split in schedule(cfg, seeds):
        r = stages.get(name, {})
        here = steps * scale * r["seconds"] if r.get("status") == "ok" else None
        h200 = h200_seconds(name, r) if r.get("status") == "ok" else None
        rows.append({"part": part, "steps": steps, "stage": name, "seconds": here,
                     "ranks_seconds": None if here is None else here / (world if split else 1),
                     "h200_seconds": None if h200 is None else steps * scale * h200})
    total = lambda key: sum(r[key] for r in rows) if all(r[key] is not None for r in rows) else None
    return {"parts": rows, "seconds": total("seconds"), "ranks_seconds": total("ranks_seconds"),
            "h200_seconds": total("h200_seconds")}


def needs(name, r, rep):
    """Bytes a stage needs at the real split: its peak (scaled to the real train images where it grows with them)
    and the resident data its script holds (the images, and `held` copies of the teacher targets)."""
    res = rep["resident"]
    scale = rep["real_train_images"] / rep["train_images"] if STAGES[name].per_train else 1
    return r["peak_bytes"] * scale + res["images"] + STAGES[name].held * res["targets"]


def would_not_fit(name, plan, n_train, res_bytes, device_bytes):
    """The reason the plan's peak (scaled to these train images where it grows with them) plus the resident data
    exceeds the device's memory, else None (also when either is unknown)."""
    p = plan.get("stages", {}).get(name, {})
    if device_bytes is None or p.get("status") != "ok":
        return None
    need = p["peak_bytes"] * (n_train / p["train_images"] if STAGES[name].per_train else 1) + res_bytes
    if need <= device_bytes:
        return None
    return (f"needs ~{need / GIB:.1f} GiB ({p['peak_bytes'] / GIB:.1f} GiB by the reference sizing on "
            f"{plan.get('device')}, + {res_bytes / GIB:.1f} GiB of resident data), the device has "
            f"{device_bytes / GIB:.1f} GiB; lower {STAGES[name].lower}")


def checked(path, args):
    """(config, train images, reference sizing) of one config, every value checked before any work."""
    cfg = utils.load_config(path)
    n_train = args.train_images or split_sizes(cfg)[0]
    utils.check_sizes(cfg, n_train, main_distill.storage_accounting(cfg)["m"])
    return cfg, n_train, read_plan(Path(args.plans) / f"{Path(path).stem}.json")


def size_config(path, args, deadline, n_train, plan):
    """Every asked stage of one config, each in a child, within the deadline: the report's data."""
    cfg = utils.load_config(path)
    n_real, n_test, _ = split_sizes(cfg)
    # the GPU's memory is known from the first child (the parent never starts CUDA: its children could not)
    device_bytes = host_bytes() if args.device == "cpu" else None
    stages, rates, starts = {}, [], []  # FLOP/s and start-up seconds of the stages measured so far
    for name in args.stages:
        left = deadline - time.time()
        data = resident(stage_config(path, name), n_train, 1)
        res_bytes = data["images"] + (data["targets"] if STAGES[name].targets else 0)
        flops = plan.get("stages", {}).get(name, {}).get("flops") or 0
        timed_steps = max(args.steps, STAGES[name].min_steps)
        calls = 1 + timed_steps + (2 if STAGES[name].fixed and timed_steps else 0)  # counted, timed, difference
        slowest = min(rates, default=A_PRIORI_TFLOPS[args.device] * 1e12)
        estimate = max(starts, default=CHILD_START_S) + calls * flops / slowest
        reason = would_not_fit(name, plan, n_train, res_bytes, device_bytes)
        if reason:
            stages[name] = {"status": "out of memory", "skipped": True, "error": f"skipped: {reason}"}
        elif estimate > left:
            stages[name] = {"status": "skipped", "error": f"needs ~{estimate:.0f} s ({flops / 1e12:.1f} TFLOP a "
                                                          f"step), {max(left, 0):.0f} s left of --budget-s"}
        else:
            print(f"sizes: {path} {name} ...", flush=True)
            stages[name] = r = run_stage(path, name, args, n_train, left)
            if r["status"] == "ok":
                device_bytes = r.get("device_bytes", device_bytes)
                starts.append(r["wall_s"] - calls * r["seconds"])  # start-up, data, setup
                rates += [r["flops"] / r["seconds"]] if r["flops"] > 1e9 else []  # not the memory-bound stages
        print(f"sizes: {path} {name}: {stage_line(name, stages[name])}", flush=True)
    return {"config": str(path), "dataset": cfg["dataset"], "device": args.device, "steps": args.steps,
            "train_images": n_train, "real_train_images": n_real, "test_images": n_test, "seeds": args.seeds,
            "ranks": args.ranks, "m": main_distill.storage_accounting(cfg)["m"],
            "stages": stages, "resident": resident(cfg, n_real, args.ranks),
            "resident_this_run": resident(cfg, n_train, 1), "projection": projection(cfg, stages, args.seeds,
                                                                                     args.ranks),
            "commit": commit(), "torch": torch.__version__, "threads": torch.get_num_threads()}


def read_plan(path):
    """A reference sizing (this tool's JSON, e.g. the CPU's in docs/sizes/), {} when there is none; a file that is
    not one is refused by name."""
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        plan = json.loads(path.read_text())
        if not isinstance(plan, dict) or not isinstance(plan.get("stages"), dict):
            raise ValueError("expected a mapping with a 'stages' mapping")
        return plan
    except ValueError as e:
        raise utils.InputError(f"--plans: {path} is not a sizes.py JSON ({e})") from None


def commit():
    try:
        return subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# ============================================================================================
# Report
# ============================================================================================
def gib(b):
    return "-" if b is None else f"{b / GIB:,.3f}"


def duration(s):
    if s is None:
        return "-"
    return f"{s:,.1f} s" if s < 120 else f"{s / 60:,.1f} min" if s < 7200 else f"{s / 3600:,.1f} h" \
        if s < 3 * 86400 else f"{s / 86400:,.1f} d"


def note(r):
    return f" ({r['note']})" if r.get("note") else ""


def stage_line(name, r):
    if r.get("status") != "ok":
        return f"{r['status']}: {r.get('error', '')}"
    return (f"{r['flops'] / 1e9:,.1f} GFLOP, {r['seconds']:.4g} s a step, peak {gib(r['peak_bytes'])} GiB "
            f"({r['memory']})")


def markdown(rep):
    """The stages' table, the resident data and the schedule's projection."""
    res, here = rep["resident"], rep["resident_this_run"]
    W = rep["ranks"]
    lines = [f"# {rep['config']} ({rep['dataset']}) on {rep['device']}", "",
             f"tests/sizes.py at commit {rep['commit']}, torch {rep['torch']}, {rep['steps']} timed step(s) a stage "
             f"after one under FlopCounterMode (0: that one timed). **Synthetic data of the real shapes** (random "
             f"uint8 images, standard-normal targets): {rep['train_images']:,} train images (the real split: "
             f"{rep['real_train_images']:,}), {rep['test_images']:,} test images; m = {rep['m']:,}.", "",
             "| stage | what | FLOPs per step | s per step | peak memory (GiB) | needs at the real split (GiB) | "
             "status |", "|---|---|---|---|---|---|---|"]
    for name, r in rep["stages"].items():
        ok = r.get("status") == "ok"
        lines.append(f"| {name} | {STAGES[name].what} | {r['flops'] / 1e9:,.1f} G | {r['seconds']:.4g} | "
                     f"{gib(r['peak_bytes'])} | {gib(needs(name, r, rep))} | {'ok' + note(r)} |" if ok else
                     f"| {name} | {STAGES[name].what} | - | - | - | - | **{r['status']}**: {r.get('error', '')} |")
    method = next((r["memory"] for r in rep["stages"].values() if r.get("status") == "ok"), "-")
    lines += ["", f"Peak memory: {method}, beyond the resident data, over the stage's setup and steps. Needs: that "
              f"peak (full_dataset_views and probe_step scaled to the real train images, linear in them) + the "
              f"resident data the stage's script holds at the real split (the images; the teacher targets once, "
              f"twice for teacher_targets while it stacks the views, none for the teacher step).", "",
              f"Resident data at the real split: images {gib(res['images'])} GiB (uint8, train + test), teacher "
              f"targets {gib(res['targets'])} GiB (float32, N x K x d_y)"
              + (f"; per rank under data.shard with {W} ranks {gib(res['per_rank_sharded'])} GiB (after the set is "
                 f"built from the whole split, which every rank holds first)" if res["per_rank_sharded"] else "")
              + (f". This run held {gib(here['images'])} + {gib(here['targets'])} GiB." if here != res else "."), "",
              f"Projected time of the whole schedule at these rates (this device; {W} ranks: the parts split over "
              f"ranks / {W}, no communication, a lower bound; one H200: estimated from these FLOPs and the H200 "
              f"rates of 2026-12-04):", "", f"| part | steps | stage | this device | {W} ranks | H200 (estimated) |",
              "|---|---|---|---|---|---|"]
    p = rep["projection"]
    lines += [f"| {r['part']} | {r['steps']:,.0f} | {r['stage']} | {duration(r['seconds'])} | "
              f"{duration(r['ranks_seconds'])} | {duration(r['h200_seconds'])} |" for r in p["parts"]]
    lines.append(f"| **total** | | | **{duration(p['seconds'])}** | **{duration(p['ranks_seconds'])}** | "
                 f"**{duration(p['h200_seconds'])}** |")
    return "\n".join(lines) + "\n"


# ============================================================================================
# Command line
# ============================================================================================
def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", nargs="+", required=True, help="one or more configs/*.yaml")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument("--steps", type=int, default=None, help="timed steps a stage after the counted one (default 1 on "
                   "the CPU, 10 on CUDA; 0: the counted step is the timed one)")
    p.add_argument("--train-images", type=int, default=0, help="synthetic train images (default: the real count)")
    p.add_argument("--out", default="sizes", help="folder of <config name>.json and .md")
    p.add_argument("--ranks", type=int, default=8, help="W of the projection on W ranks")
    p.add_argument("--seeds", type=int, default=3, help="evaluation seeds of the projection")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    p.add_argument("--budget-s", type=float, default=math.inf, help="deadline of the whole command (seconds)")
    p.add_argument("--plans", default=str(REPO / "docs" / "sizes"), help="folder of the reference sizings, "
                   "<config name>.json (this tool's JSON): a stage they say would not fit is skipped")
    args = p.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device not in ("cpu", "cuda"):
        raise utils.UserError(f"--device {args.device}: expected cpu or cuda")
    utils.get_device(args.device)  # cuda without CUDA: one line
    args.steps = (10 if args.device == "cuda" else 1) if args.steps is None else args.steps
    args.stages = [s for s in args.stages.split(",") if s]
    bad = [s for s in args.stages if s not in STAGES]
    checks = {"--stages": (bad or not args.stages, f"unknown {bad}; choose from {','.join(STAGES)}"),
              "--steps": (args.steps < 0, f"must be >= 0, got {args.steps}"),
              "--train-images": (args.train_images < 0, f"must be >= 0, got {args.train_images}"),
              "--ranks": (args.ranks < 1, f"must be >= 1, got {args.ranks}"),
              "--seeds": (args.seeds < 1, f"must be >= 1, got {args.seeds}"),
              "--budget-s": (not args.budget_s > 0, f"must be > 0, got {args.budget_s}")}
    for flag, (bad_value, message) in checks.items():
        if bad_value:
            raise utils.UserError(f"{flag} {message}")
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else list(argv))
    inputs = {path: checked(path, args) for path in args.config}  # every config checked before any work
    deadline, out, reports = time.time() + args.budget_s, Path(args.out), {}
    out.mkdir(parents=True, exist_ok=True)
    for path, (_, n_train, plan) in inputs.items():
        rep = reports[path] = size_config(path, args, deadline, n_train, plan)
        utils.write_json(rep, out / f"{Path(path).stem}.json")
        (out / f"{Path(path).stem}.md").write_text(markdown(rep))
        print(markdown(rep))
    ended = [(path, n, r) for path, rep in reports.items() for n, r in rep["stages"].items()]
    for path, name, r in ended:
        if r["status"] == "out of memory":
            print(f"sizes.py: error: {path}: stage {name} ran out of memory ({r['error']}); lower "
                  f"{STAGES[name].lower}", file=sys.stderr)
        elif r["status"] == "failed":
            print(f"sizes.py: {path}: stage {name} FAILED: {r['error']}", file=sys.stderr)
    statuses = {r["status"] for _, _, r in ended}
    if statuses & {"out of memory", "failed"}:
        sys.exit(2 if "out of memory" in statuses else 1)
    return reports


if __name__ == "__main__":
    utils.cli(main, "sizes.py")
