"""One short GPU job (`make gpu-session`): the GPU check, then CIFAR-10 end to end, within a deadline.

    python tests/gpu_session.py                    # on a CUDA machine; exits 1 without CUDA
    python tests/gpu_session.py --budget-s 300 --data-root /data --out gpu_session --work gpu_session_work

Made for a lent GPU that comes as one command of at most 10 minutes, with nothing kept afterwards:
1. the sections of tests/gpu_check.py (pipeline, precision, host syncs, rates), each a phase;
2. configs/cifar10_gpu.yaml end to end: teacher, distilled set, KRR-ST baseline, evaluation of the decisive rows
   (one seed), from a CIFAR-10 folder that may hold only the 20,000-image subset in the official layout.
Every phase estimates its time from the rates measured before it (the check's targets while none is measured)
and is skipped, with the reason, when it cannot finish in what is left of --budget-s. The report is rewritten
after every phase, so a job killed at its limit leaves a readable partial report; running the same command
again on the same machine skips the phases already done and resumes an interrupted script from its checkpoint.

Report (--out, at most 4 files, each under 1 MB): gpu_session.md and gpu_session.json (GPU, versions, rates
against their targets, peak GPU memory and wall time per phase, failures verbatim), results.md (the table) and
distilled_images.png. The scripts' own outputs stay in --work. tests/test_gpu_session.py runs all of it on the CPU
at tiny sizes.
"""
import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_check  # noqa: E402
import main_distill  # noqa: E402
import main_evaluate  # noqa: E402
import pretrain  # noqa: E402
import utils  # noqa: E402
from tiny import REPO  # noqa: E402

CONFIG = REPO / "configs" / "cifar10_gpu.yaml"
ROWS = "distilled,init_only,real_init,krr_st,random_subset,no_pretraining,full_dataset,teacher"
# A priori seconds of the check's sections on one H100 (no rate is measured before them); the reproduction's
# phases are estimated from the measured rates instead (estimate_s).
CHECK_ESTIMATE_S = {"pipeline": 60, "precision": 30, "syncs": 15, "rates": 45}
OVERHEAD = 1.25  # kNN monitors, checkpoints, probes, start-up: what the rates leave out
REPORT_FILES = ("gpu_session.md", "gpu_session.json", "results.md", "distilled_images.png")
MAX_FILE_BYTES = 1 << 20


def estimate_s(phase, cfg, rates):
    """Seconds a reproduction phase needs at `rates` (gpu_check's names): its views or steps over the rate."""
    n = cfg["data"]["train_subset"] or 50_000  # CIFAR-10's whole train split when the config keeps it all
    dc, mp, ec = cfg["distillation"], cfg["model_pool"], cfg["evaluation"]
    views_s, steps_s = rates["teacher_views_per_s"], rates["outer_steps_per_s"]
    K = 1 + len(cfg["augmentations"]["rotate"])
    if phase == "teacher":
        return OVERHEAD * cfg["pretrain"]["epochs"] * 2 * n / views_s
    if phase == "distill":  # the pool's stagger: ~L Z / 2 inner steps, each about a third of an outer step
        return OVERHEAD * (dc["steps"] + mp["size_L"] * mp["inner_loop_steps_Z"] / 6) / steps_s
    if phase == "krr_st":  # N support views instead of K m, un-rotated real views: about half an outer step
        return OVERHEAD * dc["steps"] / 2 / steps_s
    m = main_distill.storage_accounting(cfg, cfg["data"]["resolution"])["m"]
    N = cfg["storage"]["budget_N"]
    student_views = ec["epochs"] * (3 * K * m + 2 * N) + ec["full_epochs"] * K * n  # a student view ~ a teacher view
    return OVERHEAD * student_views / views_s


class Session:
    """The phases, the deadline and the report (gpu_check.Report, rewritten after every phase)."""

    def __init__(self, out, work, device, budget_s, data_root, config=CONFIG, overrides=None, check_sizes=None,
                 check_estimates=None):
        self.t0, self.budget_s, self.device = time.time(), budget_s, device
        self.out, self.work, self.data_root = Path(out), Path(work), Path(data_root).resolve()
        self.config, self.check_sizes = Path(config).resolve(), check_sizes or gpu_check.SIZES
        self.check_estimates = check_estimates or CHECK_ESTIMATE_S
        self.overrides = [f"--data.root={self.data_root}"] + [f"--{k}={v}" for k, v in (overrides or {}).items()]
        self.cfg = utils.load_config(self.config, utils.parse_overrides(self.overrides))
        previous = self.out / "gpu_session.json"
        data = read_report(previous) if previous.is_file() else {}
        data.update(versions=gpu_check.versions(device), budget_s=budget_s)
        data.setdefault("phases", {})
        self.report = gpu_check.Report(self.out, "gpu_session", markdown, data)
        self.report.write()  # the import/version line first

    def left_s(self):
        return self.budget_s - (time.time() - self.t0)

    def rates(self):
        """The rates the check measured, else its targets (said in the report)."""
        r = self.report.data["phases"].get("check:rates", {})
        return r["rates"] if r.get("ok") else dict(gpu_check.TARGETS)

    def phase(self, name, fn, estimate, needs=()):
        """Run fn() as phase `name` unless it is done, a phase it needs did not succeed, or its estimate exceeds
        the time left; record status, wall time, peak GPU memory, and the error verbatim on failure."""
        phases = self.report.data["phases"]
        if phases.get(name, {}).get("status") == "ok":
            return
        failed = [n for n in needs if phases.get(n, {}).get("status") != "ok"]
        if failed:
            phases[name] = {"status": "skipped", "reason": f"needs {', '.join(failed)}, which did not succeed"}
        elif estimate > self.left_s():
            phases[name] = {"status": "skipped", "estimate_s": estimate,
                            "reason": f"needs ~{estimate:.0f} s by the rates measured, {max(0, self.left_s()):.0f} s "
                                      f"left of --budget-s {self.budget_s:g}"}
        else:
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            phases[name] = {"status": "running", "estimate_s": estimate}
            self.report.write()
            t0 = time.time()
            try:
                result = fn() or {}
                status = "ok" if result.get("ok", True) else "failed"
            except (Exception, SystemExit) as e:  # noqa: BLE001 - every failure is the report's content
                result, status = {"error": gpu_check.failure_text(e)}, "failed"
            peak = torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else None
            phases[name] = {**result, "status": status, "estimate_s": estimate, "seconds": time.time() - t0,
                            "peak_gpu_memory_gib": peak}
        self.report.write()

    # ------------------------------------------------------------------ the reproduction's scripts
    def script(self, main, argv, final, checkpoint):
        """A script's main, resumed when its checkpoint is there and its final file is not."""
        if Path(final).is_file():
            return {"note": f"{final} was there already"}
        resume = ["--resume"] if Path(checkpoint).is_file() else []
        main([*argv, "--device", self.device.type, *self.overrides, *resume])
        return {}

    def run(self):
        sections = gpu_check.sections(self.device, self.check_sizes, self.data_root)
        for name, fn in sections.items():
            self.phase(f"check:{name}", fn, self.check_estimates[name])
        w, cfg = self.work, str(self.config)
        teacher = w / "teacher" / f"resnet18_barlow_twins_{self.config.stem}.pth"
        sets = {"distill": w / "distilled", "krr_st": w / "krr_st"}
        self.phase("teacher", lambda: self.script(pretrain.main, ["CIFAR10", "--config", cfg, "--out",
                                                                  str(w / "teacher")],
                                                  teacher, teacher.with_name(teacher.stem + "_run") / "checkpoint.pth"),
                   estimate_s("teacher", self.cfg, self.rates()))
        for name, extra in (("distill", []), ("krr_st", ["--distillation.method=krr_st"])):
            self.phase(name, lambda extra=extra, out=sets[name]: self.script(
                main_distill.main, ["--config", cfg, "--teacher", str(teacher), "--out", str(out), *extra],
                out / "distilled_data.pth", out / "checkpoint.pth"),
                estimate_s(name, self.cfg, self.rates()), needs=("teacher",))
        self.phase("evaluate", lambda: self.evaluate(cfg, teacher, sets), estimate_s("evaluate", self.cfg, self.rates()),
                   needs=("teacher", "distill"))
        self.report.data["seconds"] = time.time() - self.t0
        self.report.write()
        return self.report.data

    def evaluate(self, cfg, teacher, sets):
        rows = ROWS if self.report.data["phases"].get("krr_st", {}).get("status") == "ok" else \
            ROWS.replace("krr_st,", "")
        out = self.work / "eval"
        main_evaluate.main(["--config", cfg, "--teacher", str(teacher), "--assets", str(sets["distill"]),
                            "--krr-assets", str(sets["krr_st"]), "--out", str(out), "--rows", rows, "--resume",
                            "--device", self.device.type, *self.overrides])
        shutil.copyfile(out / "results.md", self.out / "results.md")
        copy_within_limit(sets["distill"] / "distilled_images.png", self.out / "distilled_images.png")
        return {"table": (out / "results.md").read_text()}


def copy_within_limit(src, dst):
    """The image grid, halved until it fits the size one job can bring back."""
    from PIL import Image
    with Image.open(src) as im:
        im.load()
    while True:
        im.save(dst)
        if Path(dst).stat().st_size < MAX_FILE_BYTES or min(im.size) < 64:
            return
        im = im.reduce(2)


def read_report(path):
    """A previous run's gpu_session.json (its finished phases are skipped), refused by name when unreadable."""
    try:
        data = json.loads(Path(path).read_text())
        if not isinstance(data, dict) or not isinstance(data.get("phases"), dict):
            raise ValueError("expected a mapping with a 'phases' mapping")
        return data
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is not a gpu_session.json report ({type(e).__name__}: {e}); move it aside to "
                         f"start the session afresh") from None


def markdown(report):
    """The report: versions, every phase (status, estimate, wall time, peak memory), the rates against their
    targets, the table, and each failure verbatim."""
    lines = ["# GPU session", "", " ".join(f"{k} `{v}`" for k, v in report["versions"].items()),
             f"budget {report['budget_s']:g} s" + (f", ran {report['seconds']:.0f} s" if "seconds" in report else ""),
             "", "| phase | status | estimate (s) | wall (s) | peak GPU memory (GiB) | note |", "|---|---|---|---|---|---|"]
    fmt = lambda v, f: "-" if v is None else format(v, f)
    for name, p in report["phases"].items():
        note = p.get("reason") or p.get("note") or ("see below" if "error" in p else "")
        lines.append(f"| {name} | {p['status']} | {fmt(p.get('estimate_s'), '.0f')} | {fmt(p.get('seconds'), '.1f')} | "
                     f"{fmt(p.get('peak_gpu_memory_gib'), '.2f')} | {note} |")
    rates = report["phases"].get("check:rates", {})
    if rates.get("ok"):
        lines += ["", f"Rates ({rates['data']}):", "", "| rate | measured | target |", "|---|---|---|"]
        lines += [f"| {k} | {v:,.1f} | {gpu_check.TARGETS[k]:,} |" for k, v in rates["rates"].items()]
    for name in ("check:pipeline", "check:precision", "check:syncs"):
        r = report["phases"].get(name, {})
        if "ok" in r:
            lines += ["", f"{name}: {'ok' if r['ok'] else 'FAILED'}"]
            lines += [f"- {k}: {'ok' if v else 'FAILED'}" for k, v in r.get("checks", {}).items()]
            lines += [f"- host syncs in {k}: {v or 'none'}" for k, v in r.get("syncs", {}).items()]
            lines += [f"- krr_features {k}: prediction rel. diff {v['prediction_rel_diff']:.2e} (tolerance "
                      f"{gpu_check.PREDICTION_TOLERANCE[k]}), gradient cosine {v['gradient_cosine']:.6f}"
                      for k, v in r.get("precisions", {}).items()]
    table = report["phases"].get("evaluate", {}).get("table")
    if table:
        lines += ["", table]
    for name, p in report["phases"].items():
        if "error" in p:
            lines += ["", f"## {name} failed", "", "```", p["error"].strip(), "```"]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget-s", type=float, default=480, help="deadline in seconds for the whole session")
    p.add_argument("--out", default="gpu_session", help="the report's folder (at most 4 small files)")
    p.add_argument("--work", default="gpu_session_work", help="the scripts' outputs (teacher, sets, evaluation)")
    p.add_argument("--data-root", default="data", help="the folder that holds cifar-10-python/")
    args = p.parse_args(argv)
    gpu_check.require_cuda("gpu_session")
    if not args.budget_s > 0:
        sys.exit(f"gpu_session: --budget-s must be > 0, got {args.budget_s}")
    report = Session(args.out, args.work, torch.device("cuda"), args.budget_s, args.data_root).run()
    print(markdown(report))
    bad = [n for n, ph in report["phases"].items() if ph["status"] == "failed"]
    if bad:
        sys.exit(f"gpu_session: FAILED: {', '.join(bad)} (details in {args.out}/gpu_session.md)")


if __name__ == "__main__":
    main()
