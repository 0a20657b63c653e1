"""The end-to-end fixture's pipeline (tests/test_end_to_end.py: E2E on tests/tiny.py's config) at another pipeline
seed, printing the two margins its learning tests assert: how the fixture's margins hold beyond its pinned seed 0.

    python tests/e2e_margins.py --seed 1 --out /tmp/e2e_s1 [--set pretrain__epochs=10 ...]

Prints one JSON line: the phases' times, each row's unexplained teacher variance (1 - teacher fit R^2) and top-1.
"""
import argparse
import json
import sys
from contextlib import chdir
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from test_end_to_end import E2E, run_pipeline  # noqa: E402
from tiny import write_config  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--out", required=True, help="a new folder")
    p.add_argument("--set", nargs="*", default=[], help="more overrides, key__sub=JSON value")
    a = p.parse_args()
    work = Path(a.out)
    work.mkdir(parents=True)
    extra = {k: json.loads(v) for k, v in (s.split("=", 1) for s in a.set)}
    cfg = str(write_config(work, **{**E2E, "seed": a.seed, **extra}))
    times = {}
    with chdir(work):
        r = run_pipeline(cfg, times)
    unexplained = {k: round(1 - v["fit_mean"], 3) for k, v in r.items()}
    print(json.dumps({"seed": a.seed, "overrides": extra, "times_s": {k: round(v) for k, v in times.items()},
                      "unexplained": unexplained,
                      "fit_ratio": round(unexplained["distilled"] / unexplained["no_pretraining"], 3),
                      "top1": {k: round(v["mean"], 2) for k, v in r.items()}}))


if __name__ == "__main__":
    main()
