"""tests/gpu_session.py (`make gpu-session`) on the CPU at tiny sizes: every phase runs (a failing lever is recorded
and the session goes on), the snapshots are evaluated into a table and a figure, the deadline skips what cannot
finish, a second run skips what is done, and the report stays within what one GPU job can bring back."""
import json
import subprocess
import sys

import pytest
import torch
from PIL import Image

import gpu_session
import pretrain
import utils
from conftest import make_cifar10
from test_gpu_check import TINY
from tiny import REPO

CPU = torch.device("cpu")
REPRODUCTION = {  # configs/cifar10_gpu.yaml at 8 px on a 200-image CIFAR-10 written by the test
    **TINY["overrides"], "data.train_subset": 160, "data.eval_batch_size": 256, "pretrain.epochs": 2,
    "pretrain.knn_every": 1, "pretrain.save_every": 1, "distillation.steps": 20, "distillation.save_every": 10,
    "distillation.log_every": 10, "distillation.outer_batch_size": 32, "distillation.snapshot_steps": [10],
    "approximation.steps": 50, "evaluation.epochs": 2, "evaluation.full_epochs": 1, "evaluation.crop_pad": 1,
    "probe.iterations": 50,
}
QUICK = {name: 0.0 for name in gpu_session.CHECK_ESTIMATE_S}
PHASES = (["check:pipeline", "check:precision", "check:syncs", "check:rates"]
          + [f"lever:{name}" for name in gpu_session.CHEAP_LEVERS]
          + ["teacher", "distill", "evaluate", "snapshots", "krr_st", "evaluate:rest"]
          + [f"lever:{name}" for name in gpu_session.COMPILE_LEVERS] + ["teacher:compile"])


def session(tmp_path, budget_s, estimates=QUICK, sizes=TINY, **overrides):
    make_cifar10(tmp_path / "data", per_batch=40)
    return gpu_session.Session(tmp_path / "report", tmp_path / "work", CPU, budget_s, tmp_path / "data",
                               overrides={**REPRODUCTION, **overrides}, check_sizes=sizes, check_estimates=estimates)


def test_the_whole_session_runs_reports_and_skips_what_is_done_on_a_rerun(tmp_path, monkeypatch):
    """Every phase in order; the lever that raises is recorded as failed and the phases after it run; the decisive
    rows get SEEDS seeds (2 here, for time); the snapshot at step 10 is written by main_distill and evaluated, and
    the gain over init_only at steps 0, 10 and 20 is a table in gpu_session.md and the figure gain_vs_steps.png."""
    monkeypatch.setattr(gpu_session, "SEEDS", 2)
    measure_lever = gpu_session.gpu_check.measure_lever

    def fold_bn_breaks(cfg_path, base, overrides, *args):
        if overrides == gpu_session.gpu_check.LEVERS["fold_bn"]:
            raise RuntimeError("lever fold_bn broke")
        return measure_lever(cfg_path, base, overrides, *args)

    monkeypatch.setattr(gpu_session.gpu_check, "measure_lever", fold_bn_breaks)
    report = session(tmp_path, budget_s=3600).run()
    phases = report["phases"]
    assert list(phases) == PHASES
    assert phases["lever:fold_bn"]["status"] == "failed" and "lever fold_bn broke" in phases["lever:fold_bn"]["error"]
    others = {n: p for n, p in phases.items() if n != "lever:fold_bn"}
    assert all(p["status"] == "ok" for p in others.values()), json.dumps(
        {n: p for n, p in others.items() if p["status"] != "ok"}, indent=1, default=str)[:5000]
    assert all(p["seconds"] > 0 and p["estimate_s"] >= 0 for p in phases.values())
    assert (tmp_path / "work" / "distilled" / "snapshots" / "step_10" / "distilled_data.pth").is_file()
    curve = phases["snapshots"]["curve"]
    assert [r["steps"] for r in curve] == [0, 10, 20] and curve[0]["gain_mean"] == 0.0
    assert phases["evaluate"]["seeds"] == 2 and all(len(r["accs"]) == 2 for r in phases["evaluate"]["rows"].values())
    files = sorted(p.name for p in (tmp_path / "report").iterdir())
    assert files == sorted(gpu_session.REPORT_FILES)
    assert all((tmp_path / "report" / f).stat().st_size < gpu_session.MAX_FILE_BYTES for f in files)
    with Image.open(tmp_path / "report" / "gain_vs_steps.png") as im:
        assert im.size == (640, 400)
    md = (tmp_path / "report" / "gpu_session.md").read_text()
    for row in gpu_session.DECISIVE + gpu_session.REST:
        assert f"| {row} |" in md, row
    for text in ("| teacher | ok |", "outer_steps_per_s", "fraction of bf16", "views aligned with their targets: ok",
                 "| real_bf16 | distillation.real_features=bfloat16 |", "Teacher under torch.compile",
                 "Gain over init_only against outer steps", "| 10 | ", "## lever:fold_bn failed"):
        assert text in md, text
    # the same command again: every phase that succeeded is done and not rerun (the failed lever runs again)
    monkeypatch.setattr(pretrain, "main", lambda *a, **k: pytest.fail("the teacher ran again"))
    monkeypatch.setattr(gpu_session.gpu_check, "check_pipeline", lambda *a: pytest.fail("the check ran again"))
    again = session(tmp_path, budget_s=3600).run()
    assert all(p["status"] == "ok" for n, p in again["phases"].items() if n != "lever:fold_bn")


def test_a_phase_that_cannot_finish_is_skipped_with_its_reason(tmp_path):
    """A budget too small for the check's sections, the levers and a 100,000-epoch teacher: each is skipped by
    name with the arithmetic (the teacher's from the check's target rates, as no rate was measured), the phases
    that need the teacher are skipped as well, and the report is still written."""
    huge = {**TINY, "lever_repeats": 10**6, "teacher_compile_steps": 10**6}
    run = session(tmp_path, budget_s=120, estimates={k: 1e6 for k in QUICK}, sizes=huge,
                  **{"pretrain.epochs": 100_000})
    report = run.run()
    assert list(report["phases"]) == PHASES
    for name in ("check:pipeline", "check:precision", "check:syncs", "check:rates"):
        p = report["phases"][name]
        assert p["status"] == "skipped" and "needs ~1000000 s" in p["reason"] and "--budget-s 120" in p["reason"]
    assert all(p["status"] == "skipped" for n, p in report["phases"].items() if n.startswith(("lever:", "teacher")))
    teacher = report["phases"]["teacher"]
    expected = gpu_session.estimate_s("teacher", run.cfg, gpu_session.gpu_check.TARGETS)
    assert f"needs ~{expected:.0f} s" in teacher["reason"]
    for name in ("distill", "krr_st", "evaluate:rest"):
        assert report["phases"][name]["reason"] == "needs teacher, which did not succeed"
    assert report["phases"]["snapshots"]["reason"] == "needs evaluate, which did not succeed"
    md = (tmp_path / "report" / "gpu_session.md").read_text()
    assert "| check:pipeline | skipped |" in md and "needs ~1000000 s" in md
    assert all(p.stat().st_size < gpu_session.MAX_FILE_BYTES for p in (tmp_path / "report").iterdir())


def test_estimates_follow_the_rates():
    """Slower rates, longer estimates: proportionally for the rate-bound phases, plus the fixed costs for the
    others; more evaluation seeds, a longer evaluation."""
    cfg = utils.load_config(gpu_session.CONFIG)
    rates = dict(gpu_session.gpu_check.TARGETS)
    slow = {k: v / 2 for k, v in rates.items()}
    est = lambda phase, r, **kw: gpu_session.estimate_s(phase, cfg, r, **kw)
    for phase in ("teacher", "krr_st"):
        assert 0 < est(phase, rates) < 300 and est(phase, slow) == pytest.approx(2 * est(phase, rates)), phase
    for phase in ("distill", "evaluate", "snapshots", "evaluate:rest", "lever:fold_bn", "lever:compile_features",
                  "teacher:compile"):
        assert 0 < est(phase, rates) < est(phase, slow) < 2 * est(phase, rates), phase
    assert est("evaluate", rates, seeds=3) == pytest.approx(3 * est("evaluate", rates, seeds=1))
    assert est("lever:compile_features", rates) - est("lever:fold_bn", rates) == gpu_session.COMPILE_S
    with pytest.raises(ValueError, match="no estimate"):
        est("unknown", rates)


def test_the_gain_curve_pairs_seeds_with_init_only():
    """Gain over init_only seed by seed, over the seeds both have (a snapshot may have fewer)."""
    points = {0: {"accs": [50.0, 52.0, 51.0], "fits": [0.6] * 3}, 500: {"accs": [53.0], "fits": [0.7]},
              1500: {"accs": [54.0, 55.0, 53.0], "fits": [0.7] * 3}}
    curve = gpu_session.gain_curve(points)
    assert [r["gain_mean"] for r in curve] == [0.0, 3.0, pytest.approx(3.0)]
    assert curve[1]["seeds"] == 1 and curve[1]["gain_std"] == 0.0  # 53 - 50, the one seed both have
    assert curve[2]["gain_std"] == pytest.approx((2 / 3) ** 0.5)  # differences 4, 3, 2
    assert curve[2]["top1_mean"] == pytest.approx(54.0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_the_command_refuses_without_cuda(tmp_path):
    run = subprocess.run([sys.executable, str(REPO / "tests" / "gpu_session.py"), "--out", str(tmp_path / "r")],
                         capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 1 and "no CUDA device" in run.stderr and not (tmp_path / "r").exists()


def test_set_overrides_reach_the_scripts_and_a_bad_one_is_one_line(tmp_path):
    """--set runs the whole reproduction with a lever on (the evidence a default needs); a key or value the
    schema refuses stops before anything runs, in one line."""
    _, overrides = gpu_session.parse_args(["--set", "distillation.compile_features=true",
                                           "--set", "distillation.real_features=bfloat16"])
    assert overrides == {"distillation.compile_features": True, "distillation.real_features": "bfloat16"}
    run = subprocess.run([sys.executable, str(REPO / "tests" / "gpu_session.py"), "--set", "distillation.fold=true",
                          "--out", str(tmp_path / "r")], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 2 and run.stderr.startswith("gpu_session: --set: ") and "distillation.fold" in run.stderr
    assert "Traceback" not in run.stderr and len(run.stderr.strip().splitlines()) == 1 and not (tmp_path / "r").exists()


def test_a_report_of_other_overrides_is_not_continued(tmp_path):
    """A rerun skips the phases its report has done: with other --set overrides those would be other settings'."""
    args = (tmp_path / "r", tmp_path / "w", torch.device("cpu"), 10, tmp_path)
    gpu_session.Session(*args, overrides={"distillation.fold_bn": True})
    gpu_session.Session(*args, overrides={"distillation.fold_bn": True})  # the same: continued
    assert "ran with --set {'distillation.fold_bn': True}" in (tmp_path / "r" / "gpu_session.md").read_text()
    with pytest.raises(SystemExit, match="written with --set .*fold_bn.*another --out and --work"):
        gpu_session.Session(*args)
