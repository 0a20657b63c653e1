"""Outer steps/s of main_distill.py in one process against torchrun on the same box (the CPU: gloo, one thread per
process), at a stated size; each setting's rate is the mean of its log rows after the first `--skip` steps.

    python tests/bench_distill_ranks.py --out /tmp/bench [--repeats 2] [--steps 60]

A random-init teacher and the DIGITS split at 16 px, m = 64 (K = 4: 256 support views), 256 real images in all
4 views per step, a pool of two [32, 64] ConvNets. Prints one table row per setting and writes bench.json.
"""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from tiny import REPO, write_config, write_teacher  # noqa: E402

SIZE = {"data__resolution": 16, "storage__m": 64, "distillation__outer_batch_size": 256,
        "model_pool__widths": [32, 64], "model_pool__inner_loop_steps_Z": 10, "approximation__steps": 10}
SETTINGS = {  # name: (command prefix, OMP threads)
    "1 process, 1 thread": ([sys.executable], "1"),
    "1 process, 2 threads": ([sys.executable], "2"),
    "torchrun, 2 processes x 1 thread": ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                          "--nproc_per_node=2"], "1"),
}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--skip", type=int, default=20)
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = write_config(out, **SIZE, distillation__steps=a.steps, distillation__log_every=10,
                       distillation__save_every=a.steps)
    teacher = write_teacher(out / "teacher.pth", resolution=16)
    rates = {name: [] for name in SETTINGS}
    for rep in range(a.repeats):  # interleaved, so a busy moment of the box falls on every setting alike
        for name, (prefix, threads) in SETTINGS.items():
            run = out / f"run_{len(rates[name])}_{name.split(',')[0].replace(' ', '_')}_{threads}"
            subprocess.run(prefix + ["main_distill.py", "--config", str(cfg), "--teacher", str(teacher), "--device",
                                     "cpu", "--out", str(run), "--overwrite"], cwd=REPO, check=True,
                           env={**os.environ, "OMP_NUM_THREADS": threads}, capture_output=True)
            rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
            rates[name].append(sum(r["steps_per_s"] for r in rows if r["step"] > a.skip) /
                               len([r for r in rows if r["step"] > a.skip]))
    base = sum(rates["1 process, 1 thread"]) / a.repeats
    for name, r in rates.items():
        mean = sum(r) / len(r)
        print(f"| {name} | {mean:.2f} | {' / '.join(f'{v:.2f}' for v in r)} | {mean / base:.2f}x |")
    (out / "bench.json").write_text(json.dumps({"size": SIZE, "steps": a.steps, "rates": rates}, indent=1))


if __name__ == "__main__":
    main()
