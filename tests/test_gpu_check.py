"""tests/gpu_check.py (`make gpu-check`) on the CPU at tiny sizes: every part runs, so no code waits for a GPU
to reveal it; on the CPU the command itself refuses clearly. Also the host-sync guard of the hot loops."""
import json
import subprocess
import sys

import pytest
import torch

import gpu_check
import models
import pretrain
import utils
from tiny import REPO

CPU = torch.device("cpu")
TINY = {  # configs/cifar10.yaml shrunk to seconds on the CPU
    "overrides": {"data.resolution": 8, "network.width": 8, "pretrain.batch_size": 32,
                  "pretrain.projector_dims": [32, 32], "parameterization.image_basis_size": 4,
                  "parameterization.U": 8, "parameterization.V": 8, "storage.budget_N": 10, "storage.m": 16,
                  "distillation.outer_batch_size": 32, "model_pool.size_L": 2, "model_pool.widths": [8, 16],
                  "model_pool.inner_loop_steps_Z": 20, "probe.iterations": 30},
    "train_images": 256, "precision_train_images": 256, "inner_steps": 2, "repeats": 2, "ceiling_n": 64,
    "student_epochs": 1, "lever_repeats": 1, "teacher_compile_steps": 3}


def tiny_cfg(**more):
    return utils.load_config(REPO / "configs" / "cifar10.yaml", {**TINY["overrides"], **more})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_the_command_refuses_without_cuda(tmp_path):
    run = subprocess.run([sys.executable, str(REPO / "tests" / "gpu_check.py"), "--out", str(tmp_path / "gc")],
                         capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 1 and "no CUDA device" in run.stderr and "make test" in run.stderr
    assert not (tmp_path / "gc").exists()  # refused before any work


def test_every_part_runs_on_the_cpu_and_writes_the_report(tmp_path):
    report = gpu_check.run_checks(tmp_path / "gc", CPU, TINY, cifar_root=tmp_path / "no_cifar")
    assert report["ok"], json.dumps(report, indent=1, default=str)
    saved = json.loads((tmp_path / "gc" / "gpu_check.json").read_text())
    assert set(saved) >= {"versions", "pipeline", "precision", "syncs", "rates"}
    assert all(saved["pipeline"]["checks"].values()) and len(saved["pipeline"]["checks"]) == 6
    assert saved["syncs"]["syncs"] == {"outer_step": {}, "teacher_step": {}}
    rates = saved["rates"]["rates"]
    assert all(v > 0 for v in rates.values()) and set(rates) == set(gpu_check.TARGETS) | {"inner_steps_per_s"}
    assert "random uint8" in saved["rates"]["data"]
    steps = saved["rates"]["steps"]
    assert list(steps) == list(gpu_check.benchmark.STEPS)
    assert all(r["flops"] > 0 and 0 < r["fraction_bfloat16"] and 0 < r["fraction_tf32"] for r in steps.values())
    assert steps["outer_step"]["flops"] > steps["inner_step"]["flops"]  # the outer step contains an inner step
    md = (tmp_path / "gc" / "gpu_check.md").read_text()
    for text in ("views aligned with their targets", "| bfloat16 |", "outer_steps_per_s", "host syncs in outer_step",
                 "fraction of bf16", "| inner_step |", "| student_epoch |", "| real_features bfloat16 (krr_features"):
        assert text in md


def test_the_alignment_check_detects_misaligned_targets(tmp_path, monkeypatch):
    """The pipeline's alignment check fails when real_batch pairs views with another image's targets."""
    cfg = gpu_check.write_config(tmp_path)
    pretrain.main(["DIGITS", "--config", str(cfg), "--out", str(tmp_path / "t"), "--device", "cpu"])
    teacher = next((tmp_path / "t").glob("*.pth"))
    assert gpu_check.check_alignment(cfg, teacher, CPU) == {"views aligned with their targets": True,
                                                           "shifted targets detected": True}
    real_batch = gpu_check.main_distill.real_batch
    monkeypatch.setattr(gpu_check.main_distill, "real_batch",
                        lambda *a: (lambda x, y: (x, y.roll(1, 0)))(*real_batch(*a)))
    assert not gpu_check.check_alignment(cfg, teacher, CPU)["views aligned with their targets"]


def test_precision_check_measures_bf16_rounding_on_the_cpu():
    """float32 is within 1% of float64 on the KRR prediction and bf16 measurably further: the check sees
    rounding (bf16 is real on the CPU here), so its tolerances are not vacuous."""
    cfg = tiny_cfg()
    data, _ = gpu_check.cifar_like(cfg, CPU, 256)
    report = gpu_check.check_precision(cfg, data, gpu_check.random_targets(cfg, 256, CPU), CPU, inner_steps=2)
    p, levers = report["precisions"], report["levers"]
    assert p["float32"]["prediction_rel_diff"] < 1e-2 and p["float32"]["gradient_cosine"] > 0.999
    assert p["bfloat16"]["prediction_rel_diff"] > 3 * p["float32"]["prediction_rel_diff"]
    # the levers at the config's krr_features (tf32, float32 on the CPU): bf16 real views round measurably (they
    # carry no gradient, so only the prediction and, through it, the gradient move); a folded BatchNorm does not
    real, fold = levers["real_features bfloat16 (krr_features tf32)"], levers["fold_bn (krr_features tf32)"]
    assert real["prediction_rel_diff"] > 3 * p["float32"]["prediction_rel_diff"]
    assert fold["prediction_rel_diff"] < 1e-2 and fold["gradient_cosine"] > 0.999


def test_host_sync_counter_counts_reads():
    x = torch.ones(3)
    with gpu_check.count_host_syncs(CPU) as counts:
        x.sum().item()
        bool(x.sum() > 0)
        x.tolist()
    assert counts == {"item": 1, "__bool__": 1, "tolist": 1}
    x.sum().item()  # outside the block: the originals are back
    assert counts == {"item": 1, "__bool__": 1, "tolist": 1}


def test_the_sync_counter_names_the_line_a_cuda_sync_came_from():
    """On CUDA, torch.cuda.set_sync_debug_mode("warn") raises a warning at each sync; the counter records it with
    the line of this repository it came from (here a stand-in warning, as the CPU has no CUDA syncs)."""
    import warnings

    def step():
        warnings.warn("called a synchronizing CUDA operation")  # what torch says at a sync
        warnings.warn("an unrelated warning")

    with gpu_check.count_host_syncs(CPU) as counts:
        step()
    line = step.__code__.co_firstlineno + 1
    assert counts == {"cuda_sync": 1, "cuda_sync_at": [f"tests/test_gpu_check.py:{line} (step)"]}


def test_the_debug_modes_own_notice_is_not_a_sync():
    """The first torch.cuda.set_sync_debug_mode call of a process warns once that the mode "is a prototype feature
    and does not yet detect all synchronizing operations": a notice, not a sync. Counting it was the one "sync" in
    outer_step of the 2026-12-04 GPU runs (outer_step was checked first; the teacher step, second, had none)."""
    import warnings

    with gpu_check.count_host_syncs(CPU) as counts:
        warnings.warn("Synchronization debug mode is a prototype feature and does not yet detect all "
                      "synchronizing operations")  # torch's TORCH_WARN_ONCE text, verbatim
    assert counts == {}


def test_flop_counting_matches_the_arithmetic_of_a_tiny_inner_step():
    """benchmark.count_flops around ModelPool.inner_step counts what the arithmetic says: each conv and the linear
    head forward (2 x batch x outputs x inputs per output), their weight gradients (as much again) and the input
    gradients of every layer but the first (its input, the distilled views, is detached in the inner step)."""
    cfg = tiny_cfg()
    mp, res, d_y, n = cfg["model_pool"], 8, 16, 12
    pool = gpu_check.main_distill.ModelPool(mp, res, d_y, CPU)
    X, Y = torch.randn(n, 3, res, res), torch.randn(n, d_y)
    counted = gpu_check.benchmark.count_flops(lambda: pool.inner_step(0, X, Y))
    layers, c, side = [], 3, res
    for w in mp["widths"]:
        layers.append(2 * n * side * side * c * w * 9)  # 3x3 conv, padding 1: the output keeps the side
        c, side = w, side // 2
    layers.append(2 * n * c * side * side * d_y)  # the linear head on the flattened last block
    assert counted == sum(layers) * 3 - layers[0]


def test_a_lever_and_the_compiled_teacher_run_beside_the_default_on_the_cpu():
    """A lever section times the default and the lever from one state (bf16 real views: float32 on the CPU, so
    the same first loss); teacher:compile traces the teacher (the "eager" backend on
    the CPU) and reports both loss curves."""
    sections = gpu_check.sections(CPU, TINY, cifar_root="no_cifar")
    lever = sections["lever:real_bf16"]()
    assert lever["ok"] and lever["first_loss_rel_diff"] == 0 and lever["default"]["outer_steps_per_s"] > 0
    compiled = sections["teacher:compile"]()
    assert len(compiled["eager"]["losses"]) == len(compiled["compiled"]["losses"]) == TINY["teacher_compile_steps"]
    assert compiled["curves_match"] and compiled["speedup"] > 0


def test_one_outer_step_and_one_teacher_step_read_nothing_back():
    """No .item()/.cpu()/bool() in the hot steps (each is a host-device sync on CUDA)."""
    cfg = tiny_cfg()
    data, _ = gpu_check.cifar_like(cfg, CPU, 256)
    report = gpu_check.check_syncs(cfg, data, gpu_check.random_targets(cfg, 256, CPU), CPU)
    assert report == {"syncs": {"outer_step": {}, "teacher_step": {}}, "located": {}, "ok": True}


def test_a_teacher_epoch_reads_the_loss_back_once():
    """A 25-step epoch reads one value back (the epoch's mean loss), not one per progress-bar update."""
    cfg = tiny_cfg(**{"pretrain.batch_size": 8})
    pc = cfg["pretrain"]
    data, _ = gpu_check.cifar_like(cfg, CPU, 200)
    net, opt = pretrain.build(pc, 8, CPU)
    with gpu_check.count_host_syncs(CPU) as counts:
        loss, _ = pretrain.train_one_epoch(net, opt, data, pc, 0, models.make_generator(CPU, 0), CPU)
    assert counts == {"item": 1} and loss > 0


def test_the_report_survives_a_failing_section(tmp_path, monkeypatch):
    """A section that raises, or stops with sys.exit as the scripts do at a non-finite value, is recorded with its
    error verbatim; the report is rewritten after every section, so what passed before it is kept and the
    sections after it still run (the report used to be written only at the end)."""
    written = []
    real_write = gpu_check.Report.write
    monkeypatch.setattr(gpu_check.Report, "write", lambda self: (written.append(set(self.data)), real_write(self)))
    monkeypatch.setattr(gpu_check, "check_pipeline", lambda work, device: {"checks": {"fake": True}, "ok": True})
    monkeypatch.setattr(gpu_check, "check_precision", lambda *a: (_ for _ in ()).throw(RuntimeError("boom 17")))
    monkeypatch.setattr(gpu_check, "check_syncs", lambda *a: sys.exit("non-finite outer loss by step 3"))
    report = gpu_check.run_checks(tmp_path / "gc", CPU, TINY, cifar_root=tmp_path / "no_cifar")
    assert not report["ok"] and report["pipeline"]["ok"] and report["rates"]["ok"]
    assert "RuntimeError: boom 17" in report["precision"]["error"] and "Traceback" in report["precision"]["error"]
    assert report["syncs"]["error"] == "non-finite outer loss by step 3"
    assert written[0] == {"versions"} and written[1] == {"versions", "pipeline"}  # versions first, then each section
    md = (tmp_path / "gc" / "gpu_check.md").read_text()
    assert "precision: **FAILED**" in md and "boom 17" in md and "| fake | ok |" in md and "outer_steps_per_s" in md


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_check_passes_on_cuda(tmp_path):
    """What `make gpu-check` runs, as a test on a CUDA machine (rates are printed, not asserted)."""
    report = gpu_check.run_checks(tmp_path / "gc", torch.device("cuda"), cifar_root=REPO / "data")
    print(gpu_check.markdown(report))
    assert report["ok"], json.dumps({k: report[k] for k in ("pipeline", "precision", "syncs")}, default=str)


def test_a_sync_is_located_at_the_line_that_raised_under_error_mode():
    """locate_sync runs the step under set_sync_debug_mode("error") (simulated here: the step raises torch's
    message) and names the repository line that synced; a step that does not sync gives None and the mode is reset."""
    modes = []

    def syncing_step():
        raise RuntimeError("called a synchronizing CUDA operation")

    where = gpu_check.locate_sync(syncing_step, modes.append)
    assert where["at"].startswith("tests/test_gpu_check.py:") and "(syncing_step)" in where["at"]
    assert where["error"] == "called a synchronizing CUDA operation" and modes == ["error", "default"]
    assert gpu_check.locate_sync(lambda: None, modes.append) is None and modes[-1] == "default"
