"""One short GPU job (`make gpu-session`): the GPU check, the speed levers, then CIFAR-10 end to end, within a deadline.

    python tests/gpu_session.py                    # on a CUDA machine; exits 1 without CUDA
    python tests/gpu_session.py --budget-s 300 --data-root /data --out gpu_session --work gpu_session_work
    python tests/gpu_session.py --set distillation.compile_features=true --out gs_compiled --work gs_compiled_work

Made for a lent GPU that comes as one command of at most 10 minutes, with nothing kept afterwards. Phases, in order
(the cheap evidence first, torch.compile's last):
1. check:* - the sections of tests/gpu_check.py (pipeline, precision, host syncs, rates with FLOPs and the
   fraction of the bf16 / tf32 matrix-product ceilings);
2. lever:* - each speed lever of the outer step (gpu_check.LEVERS: bf16 real views, bf16 KRR features, folded
   BatchNorm) timed beside the default path, one phase each;
3. configs/cifar10_gpu.yaml end to end: teacher, distill (which writes the set's snapshots at
   distillation.snapshot_steps), evaluate (distilled, init_only, real_init, random_subset), snapshots (each
   snapshot's distilled row: the gain over init_only against outer steps, a table and a figure), each with as
   many evaluation seeds up to SEEDS as fit, then krr_st and evaluate:rest (krr_st, no_pretraining, full_dataset,
   teacher; one seed), from a CIFAR-10 folder that may hold only the 20,000-image subset in the official layout;
4. lever:compile_features, lever:all, teacher:compile (pretrain.compile: teacher steps eager and compiled, speed
   and loss curves).
Every phase estimates its time from the rates measured before it (the check's targets while none is measured)
and is skipped, with the reason, when it cannot finish in what is left of --budget-s; a phase that fails is
recorded with its error and the next one runs. The report is rewritten after every phase, so a job killed at its
limit leaves a readable partial report; running the same command again on the same machine skips the phases
already done and resumes an interrupted script from its checkpoint.

Report (--out, at most 4 files, each under 1 MB): gpu_session.md (GPU, versions, every phase's status, estimate,
wall time and peak GPU memory, rates and fractions of the machine, the levers, the tables, failures verbatim),
gpu_session.json (the same data), distilled_images.png and gain_vs_steps.png. The scripts' own outputs stay in
--work. tests/test_gpu_session.py runs all of it on the CPU at tiny sizes.
"""
import argparse
import json
import statistics
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
DECISIVE = ("distilled", "init_only", "real_init", "random_subset")  # evaluated with SEEDS seeds
REST = ("krr_st", "no_pretraining", "full_dataset", "teacher")  # one seed
SEEDS = 3
CHEAP_LEVERS = ("real_bf16", "krr_bf16", "fold_bn")
COMPILE_LEVERS = ("compile_features", "all")
# A priori seconds of the check's sections (no rate is measured before them; 2026-12-04 on an H200: 21, 27, 4, 3
# s, the rates section since then also measures the ceilings, the inner step and a student epoch).
CHECK_ESTIMATE_S = {"pipeline": 60, "precision": 30, "syncs": 15, "rates": 45}
OVERHEAD = 1.25  # kNN monitors, checkpoints, start-up: what the rates leave out
COMPILE_S = 90  # a torch.compile's first calls (a priori; lever:compile_features and teacher:compile measure it)
SETUP_S = 3  # a lever's two setups (distilled set, pool, optimizer at cifar10 sizes)
APPROX_FIT_S = 12  # one set's three approximation MLPs (2026-12-04: ~16 s of an idle GPU at the end of distill)
CELL_OVERHEAD_S = 3  # an evaluation cell besides its pre-training: features, probe, teacher fit (2026-12-04: 2-3 s)
REPORT_FILES = ("gpu_session.md", "gpu_session.json", "distilled_images.png", "gain_vs_steps.png")
MAX_FILE_BYTES = 1 << 20


def estimate_s(phase, cfg, rates, seeds=SEEDS, sizes=gpu_check.SIZES):
    """Seconds a phase needs at `rates` (gpu_check's names): its views or steps over the rate, plus the fixed
    costs named above. `seeds`: the evaluation seeds of the evaluate and snapshots phases."""
    n = cfg["data"]["train_subset"] or 50_000  # CIFAR-10's whole train split when the config keeps it all
    dc, mp, ec = cfg["distillation"], cfg["model_pool"], cfg["evaluation"]
    views_s, steps_s, student_s = rates["teacher_views_per_s"], rates["outer_steps_per_s"], rates["student_views_per_s"]
    K = 1 + len(cfg["augmentations"]["rotate"])
    m = main_distill.storage_accounting(cfg)["m"]
    N = cfg["storage"]["budget_N"]
    cell = lambda views: OVERHEAD * views / student_s + CELL_OVERHEAD_S  # one (row, seed) of an evaluation
    snapshots = [s for s in dc["snapshot_steps"] if s < dc["steps"]]
    if phase == "teacher":
        return OVERHEAD * cfg["pretrain"]["epochs"] * 2 * n / views_s
    if phase == "distill":  # the pool's stagger: ~L Z / 2 inner steps, each about a third of an outer step
        loop = OVERHEAD * (dc["steps"] + mp["size_L"] * mp["inner_loop_steps_Z"] / 6) / steps_s
        return loop + (2 + len(snapshots)) * APPROX_FIT_S  # init_only, each snapshot and the final set
    if phase == "krr_st":  # N support views instead of K m, un-rotated real views: about half an outer step
        return OVERHEAD * dc["steps"] / 2 / steps_s
    if phase == "evaluate":
        return seeds * (3 * cell(ec["epochs"] * K * m) + cell(ec["epochs"] * N))
    if phase == "snapshots":
        return len(snapshots) * seeds * cell(ec["epochs"] * K * m)
    if phase == "evaluate:rest":
        return cell(ec["epochs"] * N) + cell(ec["full_epochs"] * K * n) + 2 * CELL_OVERHEAD_S
    if phase.startswith("lever:"):  # the default and the lever: a first step, a warm-up and the timed steps each
        compile_s = COMPILE_S if phase.split(":")[1] in COMPILE_LEVERS else 0
        return 2 * (SETUP_S + (sizes["lever_repeats"] + 2) / steps_s) + compile_s
    if phase == "teacher:compile":
        return COMPILE_S + 2 * sizes["teacher_compile_steps"] * 2 * cfg["pretrain"]["batch_size"] / views_s
    raise ValueError(f"no estimate for phase {phase}")


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
        if data and data.get("overrides", {}) != (overrides or {}):  # its finished phases ran other settings
            sys.exit(f"gpu_session: {previous} was written with --set {data.get('overrides', {})}, this run has "
                     f"{overrides or {}}: give it another --out and --work")
        data.update(versions=gpu_check.versions(device), budget_s=budget_s, overrides=overrides or {})
        data.setdefault("phases", {})
        self.report = gpu_check.Report(self.out, "gpu_session", markdown, data)
        self.report.write()  # the import/version line first

    def left_s(self):
        return self.budget_s - (time.time() - self.t0)

    def rates(self):
        """The rates the check measured, else its targets (said in the report)."""
        r = self.report.data["phases"].get("check:rates", {})
        return r["rates"] if r.get("ok") else dict(gpu_check.TARGETS)

    def estimate(self, phase, **kw):
        return estimate_s(phase, self.cfg, self.rates(), sizes=self.check_sizes, **kw)

    def seeds_that_fit(self, phase):
        """As many evaluation seeds, up to SEEDS, as `phase` can run in the time left (at least one: the phase
        itself is skipped when one does not fit)."""
        return next((s for s in range(SEEDS, 0, -1) if self.estimate(phase, seeds=s) <= self.left_s()), 1)

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
        for name in gpu_check.SECTIONS:
            self.phase(f"check:{name}", sections[name], self.check_estimates[name])
        for lever in CHEAP_LEVERS:
            self.phase(f"lever:{lever}", sections[f"lever:{lever}"], self.estimate(f"lever:{lever}"))
        w, cfg = self.work, str(self.config)
        teacher = w / "teacher" / f"resnet18_barlow_twins_{self.config.stem}.pth"
        sets = {"distill": w / "distilled", "krr_st": w / "krr_st"}
        self.phase("teacher", lambda: self.script(pretrain.main, ["CIFAR10", "--config", cfg, "--out",
                                                                  str(w / "teacher")],
                                                  teacher, teacher.with_name(teacher.stem + "_run") / "checkpoint.pth"),
                   self.estimate("teacher"))
        self.phase("distill", lambda: self.distill(cfg, teacher, sets["distill"], []), self.estimate("distill"),
                   needs=("teacher",))
        self.phase("evaluate", lambda: self.evaluate(cfg, teacher, sets, DECISIVE, self.seeds_that_fit("evaluate"),
                                                     w / "eval"),
                   self.estimate("evaluate", seeds=1), needs=("teacher", "distill"))
        self.phase("snapshots", lambda: self.snapshots(cfg, teacher, sets["distill"]),
                   self.estimate("snapshots", seeds=1), needs=("evaluate",))
        self.phase("krr_st", lambda: self.distill(cfg, teacher, sets["krr_st"], ["--distillation.method=krr_st"]),
                   self.estimate("krr_st"), needs=("teacher",))
        rest = REST if self.report.data["phases"].get("krr_st", {}).get("status") == "ok" else REST[1:]
        self.phase("evaluate:rest", lambda: self.evaluate(cfg, teacher, sets, rest, 1, w / "eval_rest"),
                   self.estimate("evaluate:rest"), needs=("teacher",))
        for lever in COMPILE_LEVERS:
            self.phase(f"lever:{lever}", sections[f"lever:{lever}"], self.estimate(f"lever:{lever}"))
        self.phase("teacher:compile", sections["teacher:compile"], self.estimate("teacher:compile"))
        self.report.data["seconds"] = time.time() - self.t0
        self.report.write()
        return self.report.data

    def distill(self, cfg, teacher, out, extra):
        result = self.script(main_distill.main, ["--config", cfg, "--teacher", str(teacher), "--out", str(out), *extra],
                             out / "distilled_data.pth", out / "checkpoint.pth")
        if not extra:  # the method's set: its image grid is one of the report's files
            copy_within_limit(out / "distilled_images.png", self.out / "distilled_images.png")
        return result

    def evaluate(self, cfg, teacher, sets, rows, seeds, out, assets=None):
        """main_evaluate on `rows` with `seeds` seeds into `out` (resumed: finished cells are kept): the table and
        each row's per-seed probe accuracies and teacher fits."""
        flags = (["--assets", str(assets or sets["distill"])] if set(rows) & {"distilled", "init_only",
                 "distilled_exact", "real_init"} else []) + (["--krr-assets", str(sets["krr_st"])] if "krr_st" in rows
                                                             else [])  # a flag no row reads is refused
        results = main_evaluate.main(["--config", cfg, "--teacher", str(teacher), *flags, "--out", str(out), "--rows",
                                      ",".join(rows), "--seeds", str(seeds), "--resume", "--device", self.device.type,
                                      *self.overrides])
        return {"table": (out / "results.md").read_text(), "seeds": seeds,
                "rows": {r: {"accs": v["accs"], "fits": v["fits"]} for r, v in results.items()}}

    def snapshots(self, cfg, teacher, assets):
        """Each snapshot's distilled row with as many seeds (up to SEEDS) as fit the time left; with init_only (step
        0) and the final set (distilled) from the evaluate phase: the gain over init_only against outer steps."""
        seeds = self.seeds_that_fit("snapshots")
        rows = self.report.data["phases"]["evaluate"]["rows"]
        points = {0: rows["init_only"]}
        for folder in sorted((assets / "snapshots").glob("step_*"), key=lambda p: int(p.name.split("_")[1])):
            step = int(folder.name.split("_")[1])
            points[step] = self.evaluate(cfg, teacher, {"krr_st": self.work / "krr_st"}, ["distilled"], seeds,
                                         self.work / "eval_snapshots" / folder.name, assets=folder)["rows"]["distilled"]
        points[self.cfg["distillation"]["steps"]] = rows["distilled"]
        curve = gain_curve(points)
        gain_figure(curve, self.out / "gain_vs_steps.png")
        return {"seeds": seeds, "curve": curve}


def gain_curve(points):
    """{outer steps: {"accs", "fits"}} (step 0: init_only) -> one row per step: top-1 and fit (mean, std over its
    seeds) and the gain over init_only (mean, std of the differences seed by seed, over the seeds both have)."""
    base = points[0]["accs"]
    rows = []
    for step, p in sorted(points.items()):
        diffs = [a - b for a, b in zip(p["accs"], base)]
        sd = lambda v: statistics.pstdev(v) if len(v) > 1 else 0.0
        rows.append({"steps": step, "seeds": len(p["accs"]), "top1_mean": statistics.fmean(p["accs"]),
                     "top1_std": sd(p["accs"]), "fit_mean": statistics.fmean(p["fits"]), "fit_std": sd(p["fits"]),
                     "gain_mean": statistics.fmean(diffs), "gain_std": sd(diffs)})
    return rows


def gain_figure(curve, path, size=(640, 400), margin=60):
    """The gain in linear-probe top-1 over init_only (points, mean ± std over seeds) against outer steps, drawn with
    Pillow's primitives (the project needs no plotting library)."""
    from PIL import Image, ImageDraw
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    steps = [r["steps"] for r in curve]
    lo = min(min(r["gain_mean"] - r["gain_std"] for r in curve), 0.0) - 0.5
    hi = max(max(r["gain_mean"] + r["gain_std"] for r in curve), 0.0) + 0.5
    x = lambda s: margin + s / max(steps[-1], 1) * (size[0] - 2 * margin)
    y = lambda v: size[1] - margin - (v - lo) / (hi - lo) * (size[1] - 2 * margin)
    d.line([(margin, margin), (margin, size[1] - margin), (size[0] - margin, size[1] - margin)], fill="black")
    d.line([(margin, y(0)), (size[0] - margin, y(0))], fill=(160, 160, 160))
    for k in range(6):
        v = lo + k * (hi - lo) / 5
        d.line([(margin - 5, y(v)), (margin, y(v))], fill="black")
        d.text((5, y(v) - 6), f"{v:+.1f}", fill="black")
    for s in steps:
        d.line([(x(s), size[1] - margin), (x(s), size[1] - margin + 5)], fill="black")
        d.text((x(s) - 12, size[1] - margin + 10), f"{s:,}", fill="black")
    d.text((margin, 15), "gain in linear-probe top-1 over init_only (points) vs outer steps, mean +- std over seeds",
           fill="black")
    pts = [(x(r["steps"]), y(r["gain_mean"])) for r in curve]
    d.line(pts, fill=(200, 30, 30), width=3)
    for r, (px, py) in zip(curve, pts):
        d.line([(px, y(r["gain_mean"] - r["gain_std"])), (px, y(r["gain_mean"] + r["gain_std"]))], fill=(200, 30, 30))
        d.ellipse([px - 4, py - 4, px + 4, py + 4], fill=(200, 30, 30))
    img.save(path)


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


def lever_lines(phases):
    """One row per lever phase that ran: the default's and the lever's outer steps/s, side by side."""
    done = {n: p for n, p in phases.items() if n.startswith("lever:") and "speedup" in p}
    if not done:
        return []
    lines = ["", "Levers of the outer step (configs/cifar10.yaml sizes, each beside the default path in its own "
                 "phase; first-step loss against the default's):", "",
             "| lever | overrides | default steps/s | lever steps/s | speedup | first-step loss rel. diff |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {n.split(':')[1]} | {', '.join(f'{k}={v}' for k, v in p['overrides'].items())} | "
              f"{p['default']['outer_steps_per_s']:.2f} | {p['lever']['outer_steps_per_s']:.2f} | {p['speedup']:.2f}x | "
              f"{p['first_loss_rel_diff']:.1e} |" for n, p in done.items()]
    return lines


def teacher_compile_lines(p):
    if "speedup" not in p:
        return []
    fmt = lambda v, f: "-" if v is None else format(v, f)
    return ["", f"Teacher under torch.compile ({p['steps']} steps each, timed after the first): eager "
                f"{fmt(p['eager']['views_per_s'], ',.0f')} views/s, compiled {fmt(p['compiled']['views_per_s'], ',.0f')} "
                f"views/s ({fmt(p['speedup'], '.2f')}x); mean loss of the last steps differs by "
                f"{p['last_window_rel_diff']:.2%} (curves match within 5%: {'yes' if p['curves_match'] else 'NO'})"]


def snapshot_lines(p):
    if "curve" not in p:
        return []
    lines = ["", "Gain over init_only against outer steps (the distilled row of each snapshot; step 0 is init_only, "
                 "the last the final set; figure gain_vs_steps.png):", "",
             "| outer steps | seeds | top-1 (%) | teacher fit R² | gain over init_only (points) |", "|---|---|---|---|---|"]
    lines += [f"| {r['steps']:,} | {r['seeds']} | {r['top1_mean']:.2f} ± {r['top1_std']:.2f} | {r['fit_mean']:.3f} ± "
              f"{r['fit_std']:.3f} | {r['gain_mean']:+.2f} ± {r['gain_std']:.2f} |" for r in p["curve"]]
    return lines


def markdown(report):
    """The report: versions, every phase (status, estimate, wall time, peak memory), the rates and fractions of the
    machine, the checks, the levers, the tables, and each failure verbatim."""
    lines = ["# GPU session", "", " ".join(f"{k} `{v}`" for k, v in report["versions"].items()),
             f"budget {report['budget_s']:g} s" + (f", ran {report['seconds']:.0f} s" if "seconds" in report else "")
             + (f"; the reproduction's scripts ran with --set {report['overrides']}" if report.get("overrides") else ""),
             "", "| phase | status | estimate (s) | wall (s) | peak GPU memory (GiB) | note |", "|---|---|---|---|---|---|"]
    fmt = lambda v, f: "-" if v is None else format(v, f)
    phases = report["phases"]
    for name, p in phases.items():
        note = p.get("reason") or p.get("note") or ("see below" if "error" in p else "")
        lines.append(f"| {name} | {p['status']} | {fmt(p.get('estimate_s'), '.0f')} | {fmt(p.get('seconds'), '.1f')} | "
                     f"{fmt(p.get('peak_gpu_memory_gib'), '.2f')} | {note} |")
    rates = phases.get("check:rates", {})
    if rates.get("ok"):
        lines += [""] + gpu_check.rates_lines(rates)
    for name in ("check:pipeline", "check:precision", "check:syncs"):
        r = phases.get(name, {})
        if "ok" in r:
            lines += ["", f"{name}: {'ok' if r['ok'] else 'FAILED'}"]
            lines += [f"- {k}: {'ok' if v else 'FAILED'}" for k, v in r.get("checks", {}).items()]
            lines += [f"- host syncs in {k}: {v or 'none'}" for k, v in r.get("syncs", {}).items()]
            lines += [f"- located in {k} (\"error\" mode): {v}" for k, v in r.get("located", {}).items()]
            if "precisions" in r:
                lines += [""] + gpu_check.precision_lines(r)
    lines += lever_lines(phases)
    lines += teacher_compile_lines(phases.get("teacher:compile", {}))
    for name in ("evaluate", "evaluate:rest"):
        if phases.get(name, {}).get("table"):
            lines += ["", f"{name}:", "", phases[name]["table"].strip()]
    lines += snapshot_lines(phases.get("snapshots", {}))
    for name, p in phases.items():
        if "error" in p:
            lines += ["", f"## {name} failed", "", "```", p["error"].strip(), "```"]
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    """(arguments, the --set overrides as a dict), every override checked against the config's schema."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget-s", type=float, default=480, help="deadline in seconds for the whole session")
    p.add_argument("--out", default="gpu_session", help="the report's folder (at most 4 small files)")
    p.add_argument("--work", default="gpu_session_work", help="the scripts' outputs (teacher, sets, evaluation)")
    p.add_argument("--data-root", default="data", help="the folder that holds cifar-10-python/")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for the reproduction's scripts (repeatable), e.g. "
                        "--set distillation.compile_features=true: the whole cifar10_gpu run with a lever on")
    args = p.parse_args(argv)

    def refuse(message):  # a user's mistake: one line, exit 2 (as the scripts' utils.cli)
        print(f"gpu_session: {message}", file=sys.stderr)
        sys.exit(2)

    if not args.budget_s > 0:
        refuse(f"--budget-s must be > 0, got {args.budget_s}")
    try:
        overrides = utils.parse_overrides([f"--{s}" for s in args.set])
        utils.load_config(CONFIG, overrides)
    except utils.UserError as e:
        refuse(f"--set: {utils.first_line(e)}")
    return args, overrides


def main(argv=None):
    args, overrides = parse_args(argv)
    gpu_check.require_cuda("gpu_session")
    report = Session(args.out, args.work, utils.get_device("cuda"), args.budget_s, args.data_root,
                     overrides=overrides).run()
    print(markdown(report))
    bad = [n for n, ph in report["phases"].items() if ph["status"] == "failed"]
    if bad:
        sys.exit(f"gpu_session: FAILED: {', '.join(bad)} (details in {args.out}/gpu_session.md)")


if __name__ == "__main__":
    main()
