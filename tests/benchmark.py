"""The hot steps' speed as a fraction of the machine, on any device (the CPU too): a benchmark, not a test.

    python tests/benchmark.py                                          # configs/cifar10.yaml; CUDA when present
    python tests/benchmark.py --device cpu --threads 1 --config configs/cifar10_cpu.yaml --train-images 2000
    python tests/benchmark.py --outer-batch 256 --m 64 --override distillation.fold_bn=true   # sizes, a lever
    python tests/benchmark.py --steps outer_step,inner_step --json /tmp/bench.json

Per step: its FLOPs, counted by torch.utils.flop_counter.FlopCounterMode around one call of the real step function
(matrix products and convolutions, forward and backward; elementwise work is not counted), seconds per call (a
warm-up call first, the device synchronised around the timed calls), steps/s, TFLOP/s and the fraction of the
bf16 and tf32 matrix-product ceilings (n x n x n, measured in the same run; on the CPU "tf32" is float32).
    outer_step     main_distill.outer_step (real batch, KRR loss and backward, AdamW, the inner step)
    inner_step     ModelPool.inner_step alone (one SGD step of a pool model on the K m support views)
    teacher_step   pretrain.barlow_step at pretrain.batch_size (two views per image)
    student_epoch  one epoch of main_evaluate.pretrain_on_set on the K m views (timed over --student-epochs)
tests/gpu_check.py's rates section and tests/test_gpu_check.py run the same functions.
"""
import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import main_distill  # noqa: E402
import main_evaluate  # noqa: E402
import models  # noqa: E402
import pretrain  # noqa: E402
import utils  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
STEPS = ("outer_step", "inner_step", "teacher_step", "student_epoch")


# ============================================================================================
# The machine's ceilings, a step's FLOPs and seconds
# ============================================================================================
def matmul_tflops(device, precision, n, repeats=5):
    """TFLOP/s of an n x n x n matrix product in `precision`: bfloat16, or tf32 (float32 inputs on TF32 tensor
    cores on CUDA; plain float32 on the CPU)."""
    dtype = torch.bfloat16 if precision == "bfloat16" else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)
    a, b = (torch.randn(n, n, device=device, dtype=dtype, generator=gen) for _ in range(2))
    with models.tf32(precision == "tf32"):
        seconds = timed(lambda: a @ b, repeats, device)
    return 2 * n ** 3 / seconds / 1e12


def count_flops(fn):
    """FLOPs of one call of fn (FlopCounterMode: matmuls and convolutions, forward and backward)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def timed(fn, repeats, device):
    """Seconds per call after one warm-up call, the device synchronised around the timed calls."""
    fn()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - t0) / repeats


# ============================================================================================
# The steps, each as a function of nothing
# ============================================================================================
def synthetic_data(cfg, n, device, seed=0):
    """n random uint8 train images at cfg's resolution and (n, K, d_y) standard-normal stand-in teacher targets:
    speed depends on the shapes, not on the pixels."""
    res, K = cfg["data"]["resolution"], 1 + len(cfg["augmentations"]["rotate"])
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, res, res), dtype=torch.uint8, generator=g)
    labels = torch.zeros(n, dtype=torch.long)
    mean, std = utils.channel_stats(x)
    data = utils.ImageData(cfg["dataset"], x, labels, x[:10], labels[:10], mean, std, 10).to(device)
    T = torch.randn(n, K, models.resnet18_dim(cfg["network"]["width"]), generator=g).to(device)
    return data, T


def built(cfg, data, T, device, seed=0):
    """main_distill.build's State at cfg's sizes: the distilled set, its AdamW and schedule, the model pool."""
    m = main_distill.storage_accounting(cfg)["m"]
    return main_distill.build(cfg, data, T, m, device, models.make_generator(device, seed), random.Random(seed))


def outer_step_setup(cfg, data, T, device, seed=0):
    """One outer step at cfg's sizes as a function of nothing."""
    state = built(cfg, data, T, device, seed)
    return lambda: main_distill.outer_step(state, data, T, cfg["distillation"])


def inner_step_setup(cfg, data, T, device, seed=0):
    """One inner step (SPEC 4.6) of pool model 0 on the initial support views, as a function of nothing."""
    state = built(cfg, data, T, device, seed)
    with torch.no_grad():
        X_s, Y_s = state.distilled()
    return lambda: state.pool.inner_step(0, X_s, Y_s)


def teacher_step_setup(cfg, data, device):
    """A ResNet-18 + projector + LARS at cfg's pretrain sizes and one batch: one teacher step."""
    pc = cfg["pretrain"]
    net, opt = pretrain.build(pc, cfg["network"]["width"], device)
    for group in opt.param_groups:
        group["lr"] = 0.1
    gen = models.make_generator(device, 0)
    x = data.train_x[torch.arange(pc["batch_size"], device=device) % len(data.train_x)]
    return lambda: pretrain.barlow_step(net, opt, x, data, pc, gen, device)


def student_setup(cfg, data, T, device, epochs, seed=0):
    """`epochs` epochs of the evaluation's student pre-training on the K m views of an initial distilled set (the
    distilled row's work per epoch), as a function of nothing; returns (fn, views per call)."""
    with torch.no_grad():
        X, Y = (t.detach() for t in built(cfg, data, T, device, seed).distilled())
    recipe = main_evaluate.Recipe(cfg["evaluation"], cfg["network"]["width"], data.mean, data.std)
    run = lambda: main_evaluate.pretrain_on_set(X, Y, recipe, epochs, seed, "benchmark student")
    return run, epochs * len(X)


# ============================================================================================
# Measurement and report
# ============================================================================================
def measure(cfg, data, T, device, repeats, ceiling_n, student_epochs=2, steps=STEPS):
    """{"ceilings_tflops": {bfloat16, tf32}, "steps": {name: flops, seconds, per_s, tflops, fractions}, "rates":
    the rates gpu_check reports (outer steps/s, inner steps/s, teacher and student views/s)}."""
    ceilings = {p: matmul_tflops(device, p, ceiling_n) for p in ("bfloat16", "tf32")}
    out, rates = {}, {}
    for name in steps:
        if name == "student_epoch":  # a call builds a new student: an epoch is the difference of two calls
            # (2026-12-04, H200: one call over its epochs gave 7,888 views/s, 3x too slow for the evaluation)
            one, views = student_setup(cfg, data, T, device, 1)
            more, _ = student_setup(cfg, data, T, device, 1 + student_epochs)
            calls = max(1, repeats // 10)
            seconds = max(timed(more, calls, device) - timed(one, calls, device), 1e-9) / student_epochs
            flops = count_flops(one)  # one epoch's
            rates["student_views_per_s"] = views / seconds
        else:
            fn = {"outer_step": lambda: outer_step_setup(cfg, data, T, device),
                  "inner_step": lambda: inner_step_setup(cfg, data, T, device),
                  "teacher_step": lambda: teacher_step_setup(cfg, data, device)}[name]()
            seconds = timed(fn, repeats, device)
            flops = count_flops(fn)
            if name == "teacher_step":
                rates["teacher_views_per_s"] = 2 * cfg["pretrain"]["batch_size"] / seconds
            else:
                rates[f"{name.split('_')[0]}_steps_per_s"] = 1 / seconds
        tflops = flops / seconds / 1e12
        out[name] = {"flops": flops, "seconds": seconds, "per_s": 1 / seconds, "tflops": tflops,
                     "fraction_bfloat16": tflops / ceilings["bfloat16"], "fraction_tf32": tflops / ceilings["tf32"]}
    return {"ceilings_tflops": ceilings, "ceiling_n": ceiling_n, "steps": out, "rates": rates}


def markdown_lines(result):
    """The ceilings and the steps table of measure()'s result."""
    c = result["ceilings_tflops"]
    lines = [f"Matrix-product ceilings ({result['ceiling_n']}^3, same run): bf16 {c['bfloat16']:.4g} TFLOP/s, "
             f"tf32 {c['tf32']:.4g} TFLOP/s", "",
             "| step | FLOPs per call | per s | TFLOP/s | fraction of bf16 | fraction of tf32 |", "|---|---|---|---|---|---|"]
    for name, r in result["steps"].items():
        unit = "epochs" if name == "student_epoch" else "steps"
        lines.append(f"| {name} | {r['flops'] / 1e9:,.2f} G | {r['per_s']:.4g} {unit} | {r['tflops']:.4g} | "
                     f"{r['fraction_bfloat16']:.1%} | {r['fraction_tf32']:.1%} |")
    return lines


def sized_config(args):
    """The config with the command line's sizes and --override keys applied (the schema checks them all)."""
    overrides = {k: v for k, v in (("distillation.outer_batch_size", args.outer_batch), ("storage.m", args.m),
                                   ("pretrain.batch_size", args.teacher_batch)) if v is not None}
    for item in args.override:
        overrides.update(utils.parse_overrides([f"--{item}"]))
    return utils.load_config(args.config, overrides), overrides


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "configs" / "cifar10.yaml"))
    p.add_argument("--device", default=None, help="cuda when present, else cpu")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on the CPU")
    p.add_argument("--outer-batch", type=int, default=None, help="distillation.outer_batch_size")
    p.add_argument("--m", type=int, default=None, help="storage.m (distilled images; 0 = from the budget)")
    p.add_argument("--teacher-batch", type=int, default=None, help="pretrain.batch_size")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE", help="any dotted config key")
    p.add_argument("--train-images", type=int, default=20_000, help="random uint8 train images")
    p.add_argument("--repeats", type=int, default=10, help="timed calls per step (student: a tenth, at least 1)")
    p.add_argument("--student-epochs", type=int, default=2, help="epochs per timed student call")
    p.add_argument("--ceiling-n", type=int, default=None, help="matrix size of the ceilings (8192 CUDA, 1024 CPU)")
    p.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}")
    p.add_argument("--json", default=None, help="also write the result here")
    args = p.parse_args(argv)
    device = utils.get_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    steps = [s for s in args.steps.split(",") if s]
    if set(steps) - set(STEPS):
        p.error(f"--steps: unknown {sorted(set(steps) - set(STEPS))}; choose from {','.join(STEPS)}")
    cfg, overrides = sized_config(args)
    torch.manual_seed(0)
    data, T = synthetic_data(cfg, args.train_images, device)
    n = args.ceiling_n or (8192 if device.type == "cuda" else 1024)
    result = measure(cfg, data, T, device, args.repeats, n, args.student_epochs, steps)
    m = main_distill.storage_accounting(cfg)["m"]
    result.update(config=args.config, overrides=overrides, device=str(device), torch=torch.__version__,
                  threads=torch.get_num_threads(), m=m, train_images=args.train_images)
    print(f"{args.config} {overrides or ''} on {device} (torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads), m = {m}, {args.train_images:,} random train images")
    print("\n".join(markdown_lines(result)))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
