"""`make cifar10-quick` resumes after an interruption: the Makefile target itself, run on a tiny CIFAR-10 written in
the official layout, killed (SIGKILL, the whole process group) inside the teacher and again inside the
distillation, then run again until it completes."""
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import yaml

from conftest import make_cifar10
from tiny import REPO, set_dotted

QUICK = {  # configs/cifar10_quick.yaml shrunk to seconds on the CPU; long enough loops to be killed inside
    "data.resolution": 8, "data.eval_batch_size": 256, "network.width": 8,
    "pretrain.epochs": 40, "pretrain.batch_size": 32, "pretrain.projector_dims": [32, 32], "pretrain.save_every": 1,
    "pretrain.knn_every": 40, "pretrain.knn_k": 20,
    "parameterization.image_basis_size": 4, "parameterization.U": 8, "parameterization.V": 8,
    "storage.m": 16, "distillation.steps": 400, "distillation.outer_batch_size": 32,
    "distillation.save_every": 10, "distillation.log_every": 10, "model_pool.size_L": 2,
    "model_pool.inner_loop_steps_Z": 10, "model_pool.widths": [8, 16], "approximation.steps": 50,
    "evaluation.epochs": 2, "evaluation.full_epochs": 1, "evaluation.crop_pad": 1, "probe.iterations": 50,
}


def make(work, **kw):
    return subprocess.Popen(["make", "-f", str(REPO / "Makefile"), "cifar10-quick", f"PYTHON={sys.executable}"],
                            cwd=work, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, **kw)


def kill_when(proc, path, timeout=240):
    """SIGKILL make and its children as soon as `path` exists (a checkpoint: the step is under way)."""
    t0 = time.time()
    while not path.exists():
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() - t0 < timeout, f"{path} did not appear"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    return proc.communicate()[0]


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_cifar10_quick_resumes_each_step_after_a_kill(tmp_path):
    work = tmp_path
    make_cifar10(work / "data", per_batch=40)
    for script in ("pretrain.py", "main_distill.py", "main_evaluate.py", "utils.py", "models.py"):
        (work / script).symlink_to(REPO / script)
    cfg = yaml.safe_load((REPO / "configs" / "cifar10_quick.yaml").read_text())
    for dotted, value in QUICK.items():
        set_dotted(cfg, dotted, value)
    (work / "configs").mkdir()
    (work / "configs" / "cifar10_quick.yaml").write_text(yaml.safe_dump(cfg))
    teacher = work / "teacher_models" / "resnet18_barlow_twins_cifar10_quick.pth"
    run = work / "teacher_models" / "resnet18_barlow_twins_cifar10_quick_run"
    ours = work / "distilled_assets" / "cifar10_quick_N100"

    kill_when(make(work), run / "checkpoint.pth")  # 1: killed inside the teacher
    assert not teacher.exists()
    out = kill_when(make(work), ours / "checkpoint.pth")  # 2: the teacher resumes; killed inside distillation
    assert "resumed run" in out and teacher.is_file() and not (ours / "distilled_data.pth").exists()
    done = make(work)  # 3: distillation resumes, KRR-ST and the evaluation run from the start
    out = done.communicate(timeout=600)[0]
    assert done.returncode == 0, out
    assert f"done: {os.path.join('teacher_models', teacher.name)}" in out
    assert "resume: " in out and "resumed run" in out and out.count("start: ") == 2
    assert (work / "evaluation_models" / "cifar10_quick_N100" / "results.md").is_file()
    epochs = [yaml.safe_load(line)["epoch"] for line in (run / "log.jsonl").read_text().splitlines()]
    steps = [yaml.safe_load(line)["step"] for line in (ours / "log.jsonl").read_text().splitlines()]
    assert epochs == list(range(1, 41)) and steps == [1] + list(range(10, 401, 10))  # no gap, no repeat
    again = make(work)  # 4: everything is done
    out = again.communicate(timeout=300)[0]
    assert again.returncode == 0 and out.count("done: ") == 4, out
