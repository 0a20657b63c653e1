"""Issue 26's evaluation loops before (tests/eval_reference.py, the code at 6b57518) and now, timed in one run.

    python tests/bench_evaluation.py                 # the sizes of the issue, on the CPU: ~10 min on 1 thread
    python tests/bench_evaluation.py --scale 0.05    # a smoke run at tiny sizes (tests/test_fast_eval.py)
    python tests/bench_evaluation.py --device cuda   # the same on a GPU (there the host work is what it removes)

Parts (each before and after, interleaved, --repeats times; the median wall time and after / before):
    probe           utils.linear_probe: 5,000 SGD steps, batch 512, on 512-d features of 20,000 train images
                    (10,000 test), 10 classes
    probe, tiny d   the same loop on 16-d features: arithmetic negligible, what is left is each step's host work
                    (Python, dispatch, launches): the part a GPU waits for
    approx MLPs     main_distill.fit_approx_nets at cifar10 sizes: m = 239, V = 200, hidden 4, 5,000 Adam steps
    one row         pretrain_on_set + split_features + probe + teacher fit of one evaluation row at small sizes
                    (ResNet-18 width 8 at 8 px, 160 views, 30 epochs; probe 1,000 steps on 2,000 / 1,000 images)
and the aten operations each step dispatches (views not counted): on CUDA, about one kernel launch each.
Wall times on a shared CPU move from run to run; compare the ratios within one run.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import eval_reference as before  # noqa: E402
import main_distill  # noqa: E402
import main_evaluate  # noqa: E402
import models  # noqa: E402
import utils  # noqa: E402


class CountOps(TorchDispatchMode):
    """Counts the aten operations dispatched inside the block (views excluded): on CUDA ~ kernel launches."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += not func.is_view
        return func(*args, **(kwargs or {}))


def timed(fn, device):
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def ops_per_step(fn, steps):
    with CountOps() as c:
        fn()
    return c.count / steps


def features(n, d, classes, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, d, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return (centres[y] + 2 * torch.randn(n, d, generator=g)).to(device), y.to(device)


def parts(scale, device):
    """{name: (before(), after(), steps per call)} at the issue's sizes times `scale`."""
    s = lambda v, lo=1: max(lo, round(v * scale))
    probe = {"iterations": s(5000, 20), "batch_size": 512, "lr": 0.2, "momentum": 0.9, "weight_decay": 0.0,
             "cuda_graph": False}
    (x, y), (xt, yt) = features(s(20000, 600), 512, 10, device), features(s(10000, 300), 512, 10, device, 1)
    (xs, ys), (xst, yst) = features(s(20000, 600), 16, 10, device), features(s(10000, 300), 16, 10, device, 1)
    out = {
        "probe": (lambda: before.linear_probe(x, y, xt, yt, 10, probe, 0),
                  lambda: utils.linear_probe(x, y, xt, yt, 10, probe, 0), None),  # its ops: the tiny d line
        "probe, tiny d": (lambda: before.linear_probe(xs, ys, xst, yst, 10, probe, 0),
                          lambda: utils.linear_probe(xs, ys, xst, yst, 10, probe, 0), probe["iterations"])}
    g = torch.Generator().manual_seed(0)
    C_y = torch.randn(239, 200, generator=g).to(device)
    C_yk = (0.5 * C_y + 0.1 * torch.randn(3, 239, 200, generator=g).to(device))
    ac = {"hidden": 4, "steps": s(5000, 20), "lr": 1e-3}
    out["approx MLPs"] = (lambda: before.fit_approx_nets(C_y, C_yk, ac, 0),
                          lambda: main_distill.fit_approx_nets(C_y, C_yk, ac, 0), ac["steps"])
    # one evaluation row at small sizes: a random 8 px "dataset", a student of width 8
    n_set, res, width = 160, 8, 8
    imgs = torch.randint(0, 256, (n_set, 3, res, res), dtype=torch.uint8, generator=g).to(device)
    targets = torch.randn(n_set, models.resnet18_dim(width), generator=g).to(device)
    train_x = torch.randint(0, 256, (s(2000, 64), 3, res, res), dtype=torch.uint8, generator=g)
    test_x = torch.randint(0, 256, (s(1000, 32), 3, res, res), dtype=torch.uint8, generator=g)
    data = utils.ImageData("BENCH", train_x, torch.randint(0, 10, (len(train_x),), generator=g), test_x,
                           torch.randint(0, 10, (len(test_x),), generator=g), torch.full((3,), 0.5),
                           torch.full((3,), 0.25), 10).to(device)
    teacher_feats = (torch.randn(len(train_x), 64, generator=g).to(device),
                     torch.randn(len(test_x), 64, generator=g).to(device))
    ec = {"student": "resnet18", "batch_size": 64, "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3,
          "augment": True, "crop_pad": 1, "cuda_graph": False}
    row_probe = {**probe, "iterations": s(1000, 20)}
    epochs = s(30, 2)

    def row(pretrain, probe_fn):
        g_net, _ = pretrain(imgs, targets, ec, epochs, data.mean, data.std, 0, "bench", width)
        feats = utils.split_features(g_net, data, 512)
        return probe_fn(*feats[:1], data.train_y, feats[1], data.test_y, 10, row_probe, 0), \
            main_evaluate.teacher_fit(feats, teacher_feats, 1e-3)
    out["one row"] = (lambda: row(before.pretrain_on_set, before.linear_probe),
                      lambda: row(main_evaluate.pretrain_on_set, utils.linear_probe), None)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", type=float, default=1.0, help="sizes (samples, steps) times this")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steadier on a shared box)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = []
    for name, (old, new, steps) in parts(args.scale, device).items():
        times = {"before": [], "after": []}
        for _ in range(args.repeats):  # interleaved: load on a shared machine hits both alike
            times["before"].append(timed(old, device))
            times["after"].append(timed(new, device))
        med = {k: statistics.median(v) for k, v in times.items()}
        ops = [ops_per_step(f, steps) if steps else None for f in (old, new)] if device.type == "cpu" else [None] * 2
        rows.append((name, med["before"], med["after"], *ops))
        print(f"{name}: before {times['before']}, after {times['after']}", file=sys.stderr)
    print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} thread(s), scale {args.scale}, "
          f"median of {args.repeats}\n")
    print("| part | before (s) | after (s) | after / before | ops per step before | after |")
    print("|---|---|---|---|---|---|")
    fmt = lambda v: "-" if v is None else f"{v:.1f}"
    for name, b, a, ob, oa in rows:
        print(f"| {name} | {b:.2f} | {a:.2f} | {a / b:.2f} | {fmt(ob)} | {fmt(oa)} |")
    return rows


if __name__ == "__main__":
    main()
