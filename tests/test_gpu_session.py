"""tests/gpu_session.py (`make gpu-session`) on the CPU at tiny sizes: every phase runs, the deadline skips what
cannot finish, a second run skips what is done, and the report stays within what one GPU job can bring back."""
import json
import subprocess
import sys

import pytest
import torch

import gpu_session
import pretrain
from conftest import make_cifar10
from test_gpu_check import TINY
from tiny import REPO

CPU = torch.device("cpu")
REPRODUCTION = {  # configs/cifar10_gpu.yaml at 8 px on a 200-image CIFAR-10 written by the test
    **TINY["overrides"], "data.train_subset": 160, "data.eval_batch_size": 256, "pretrain.epochs": 2,
    "pretrain.knn_every": 1, "pretrain.save_every": 1, "distillation.steps": 20, "distillation.save_every": 10,
    "distillation.log_every": 10, "distillation.outer_batch_size": 32, "approximation.steps": 50,
    "evaluation.epochs": 2, "evaluation.full_epochs": 1, "evaluation.crop_pad": 1, "probe.iterations": 50,
}
QUICK = {name: 0.0 for name in gpu_session.CHECK_ESTIMATE_S}


def session(tmp_path, budget_s, estimates=QUICK, **overrides):
    make_cifar10(tmp_path / "data", per_batch=40)
    return gpu_session.Session(tmp_path / "report", tmp_path / "work", CPU, budget_s, tmp_path / "data",
                               overrides={**REPRODUCTION, **overrides}, check_sizes=TINY, check_estimates=estimates)


def test_the_whole_session_runs_reports_and_skips_what_is_done_on_a_rerun(tmp_path, monkeypatch):
    report = session(tmp_path, budget_s=3600).run()
    phases = report["phases"]
    assert list(phases) == ["check:pipeline", "check:precision", "check:syncs", "check:rates", "teacher", "distill",
                            "krr_st", "evaluate"]
    assert all(p["status"] == "ok" for p in phases.values()), json.dumps(phases, indent=1, default=str)
    assert all(p["seconds"] > 0 and p["estimate_s"] >= 0 for p in phases.values())
    files = sorted(p.name for p in (tmp_path / "report").iterdir())
    assert files == sorted(gpu_session.REPORT_FILES)
    assert all((tmp_path / "report" / f).stat().st_size < gpu_session.MAX_FILE_BYTES for f in files)
    table = (tmp_path / "report" / "results.md").read_text()
    for row in gpu_session.ROWS.split(","):
        assert f"| {row} |" in table, row
    md = (tmp_path / "report" / "gpu_session.md").read_text()
    assert "| teacher | ok |" in md and "outer_steps_per_s" in md and "| init_only |" in md
    assert "views aligned with their targets: ok" in md
    # the same command again: every phase is done, no script runs
    monkeypatch.setattr(pretrain, "main", lambda *a, **k: pytest.fail("the teacher ran again"))
    monkeypatch.setattr(gpu_session.gpu_check, "check_pipeline", lambda *a: pytest.fail("the check ran again"))
    again = session(tmp_path, budget_s=3600).run()
    assert all(p["status"] == "ok" for p in again["phases"].values())


def test_a_phase_that_cannot_finish_is_skipped_with_its_reason(tmp_path):
    """A budget too small for the check's sections and for a 100,000-epoch teacher: each is skipped by name with
    the arithmetic (the teacher's from the check's target rates, as no rate was measured), the phases that need
    the teacher are skipped as well, and the report is still written."""
    run = session(tmp_path, budget_s=120, estimates={k: 1e6 for k in QUICK}, **{"pretrain.epochs": 100_000})
    report = run.run()
    for name in ("check:pipeline", "check:precision", "check:syncs", "check:rates"):
        p = report["phases"][name]
        assert p["status"] == "skipped" and "needs ~1000000 s" in p["reason"] and "--budget-s 120" in p["reason"]
    teacher = report["phases"]["teacher"]
    expected = gpu_session.estimate_s("teacher", run.cfg, gpu_session.gpu_check.TARGETS)
    assert teacher["status"] == "skipped" and f"needs ~{expected:.0f} s" in teacher["reason"]
    assert report["phases"]["distill"]["reason"] == "needs teacher, which did not succeed"
    md = (tmp_path / "report" / "gpu_session.md").read_text()
    assert "| check:pipeline | skipped |" in md and "needs ~1000000 s" in md
    assert all(p.stat().st_size < gpu_session.MAX_FILE_BYTES for p in (tmp_path / "report").iterdir())


def test_estimates_follow_the_rates():
    import utils
    cfg = utils.load_config(gpu_session.CONFIG)
    rates = dict(gpu_session.gpu_check.TARGETS)
    slow = {k: v / 2 for k, v in rates.items()}
    for phase in ("teacher", "distill", "krr_st", "evaluate"):
        fast_s, slow_s = gpu_session.estimate_s(phase, cfg, rates), gpu_session.estimate_s(phase, cfg, slow)
        assert 0 < fast_s < 300 and slow_s == pytest.approx(2 * fast_s), phase  # the config's arithmetic
    total = sum(gpu_session.estimate_s(p, cfg, rates) for p in ("teacher", "distill", "krr_st", "evaluate"))
    assert total + sum(gpu_session.CHECK_ESTIMATE_S.values()) < 480  # the default --budget-s at the targets


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_the_command_refuses_without_cuda(tmp_path):
    run = subprocess.run([sys.executable, str(REPO / "tests" / "gpu_session.py"), "--out", str(tmp_path / "r")],
                         capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 1 and "no CUDA device" in run.stderr and not (tmp_path / "r").exists()
