"""tests/sizes.py (`make sizes`, `make gpu-sizes`) on the CPU at a tiny config, and the real-size failures it found,
each fixed and tested at a size the CPU runs."""
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import benchmark
import main_distill
import main_evaluate
import sizes
import utils
from tiny import REPO, write_config

CPU = torch.device("cpu")
COMPUTE = ("teacher_step", "teacher_targets", "outer_step", "inner_step", "outer_step_krr_st", "student_step")


# ---------------------------------------------------------------------------------- the full_dataset row's views
def test_real_views_are_all_views_and_their_targets_made_per_batch():
    """main_evaluate.real_views gives, at any index batch, the rows of main_distill.all_views of the images and of their
    teacher targets view-major, without making them: the full_dataset row's 4 x 1.28M views of IMAGENET64 and their
    targets were 63 + 10.5 GB beside the data (tests/sizes.py, the full_dataset_views stage)."""
    g = torch.Generator().manual_seed(0)
    data = SimpleNamespace(train_x=torch.randint(0, 256, (50, 3, 8, 8), dtype=torch.uint8, generator=g))
    T = torch.randn(50, 4, 16, generator=g)
    idx = torch.randperm(50, generator=g)[:30]
    views, targets = main_evaluate.real_views(data, T, idx, [90, 180, 270])
    made_views, made_targets = main_distill.all_views(data.train_x[idx], [90, 180, 270]), T[idx].transpose(0, 1).flatten(0, 1)
    assert len(views) == len(targets) == 120 and views.shape == made_views.shape and views.dtype == torch.uint8
    assert targets.shape == made_targets.shape and targets.device == T.device
    j = torch.randint(0, 120, (77,), generator=g)
    assert torch.equal(views[j], made_views[j]) and torch.equal(targets[j], made_targets[j])
    assert torch.equal(views[torch.arange(120)], made_views)


def test_a_student_pretrained_on_real_views_is_the_one_on_the_made_views():
    """pretrain_on_set reads the views and targets per batch: the same network to the last bit as on the tensors."""
    g = torch.Generator().manual_seed(1)
    data = SimpleNamespace(train_x=torch.randint(0, 256, (12, 3, 8, 8), dtype=torch.uint8, generator=g))
    T = torch.randn(12, 4, 6, generator=g)
    idx = torch.arange(12)
    ec = {"student": "resnet18", "batch_size": 16, "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3,
          "augment": True, "crop_pad": 1}
    recipe = main_evaluate.Recipe(ec, 4, torch.full((3,), 0.5), torch.full((3,), 0.25))
    made = (main_distill.all_views(data.train_x, [90, 180, 270]), T.transpose(0, 1).flatten(0, 1))
    nets = [main_evaluate.pretrain_on_set(*views, recipe, 3, 0, "views")[0].state_dict()
            for views in (main_evaluate.real_views(data, T, idx, [90, 180, 270]), made)]
    assert all(torch.equal(nets[0][k], nets[1][k]) for k in nets[0])


def test_real_views_of_every_image_take_no_memory_of_their_own():
    """The peak resident memory that real_views of 20,000 32 px images in 4 views adds (sizes.Peak): below a tenth
    of what making them as tensors adds in the same test (~400 MB: 246 MB of views, 164 MB of targets)."""
    g = torch.Generator().manual_seed(0)
    data = SimpleNamespace(train_x=torch.randint(0, 256, (20_000, 3, 32, 32), dtype=torch.uint8, generator=g))
    T = torch.randn(20_000, 4, 512, generator=g)
    idx, rotations = torch.arange(20_000), [90, 180, 270]
    peak = sizes.Peak(CPU)
    views = main_evaluate.real_views(data, T, idx, rotations)
    lazy = peak.bytes()
    del views
    peak = sizes.Peak(CPU)
    views = main_distill.all_views(data.train_x[idx], rotations), T[idx].transpose(0, 1).flatten(0, 1)
    made = peak.bytes()
    assert made > 300e6 and lazy < made / 10, (lazy, made)


# ---------------------------------------------------------------------------------- the sizing command
def sizing(tmp_path, *argv, config=None):
    """sizes.main at the tiny DIGITS config (tests/tiny.py) on the CPU, its report folder tmp_path/out."""
    config = config or write_config(tmp_path)
    return sizes.main(["--config", str(config), "--device", "cpu", "--out", str(tmp_path / "out"), "--plans",
                       str(tmp_path / "plans"), *argv])


def ended(tmp_path, *argv, config=None):
    """(exit code, the report's JSON file) of a sizing that ends with an exit code, as the command line does."""
    config = config or write_config(tmp_path)
    with pytest.raises(SystemExit) as e:
        utils.cli(lambda: sizing(tmp_path, *argv, config=config), "sizes.py")
    report = tmp_path / "out" / f"{config.stem}.json"
    return e.value.code, report


def test_every_stage_runs_end_to_end_and_the_steps_count_the_benchmarks_flops(tmp_path):
    """Each stage in its own child: ok, its FLOPs, seconds and peak memory; the outer, inner and teacher steps
    count exactly the FLOPs of tests/benchmark.py's steps at the same sizes; the report (JSON, Markdown) says the
    data are synthetic and the schedule's projected total is the sum of its parts."""
    config = write_config(tmp_path)
    rep = sizing(tmp_path, "--steps", "1", config=config)[str(config)]
    stages = rep["stages"]
    assert list(stages) == list(sizes.STAGES)
    assert all(r["status"] == "ok" and r["seconds"] > 0 and r["peak_bytes"] >= 0 for r in stages.values()), stages
    assert all(stages[name]["flops"] > 0 for name in COMPUTE)
    cfg = utils.load_config(config)
    data, T = benchmark.synthetic_data(cfg, rep["train_images"], CPU)
    assert stages["outer_step"]["flops"] == benchmark.count_flops(benchmark.outer_step_setup(cfg, data, T, CPU))
    assert stages["inner_step"]["flops"] == benchmark.count_flops(benchmark.inner_step_setup(cfg, data, T, CPU))
    assert stages["teacher_step"]["flops"] == benchmark.count_flops(benchmark.teacher_step_setup(cfg, data, CPU))
    assert rep["train_images"] == rep["real_train_images"] == 1_347 and rep["m"] == 16
    p = rep["projection"]
    assert len(p["parts"]) == len(sizes.schedule(cfg, 3)) and all(r["seconds"] > 0 for r in p["parts"])
    assert p["seconds"] == pytest.approx(sum(r["seconds"] for r in p["parts"]))
    assert p["ranks_seconds"] < p["seconds"]
    assert json.loads((tmp_path / "out" / "digits.json").read_text())["stages"] == stages
    md = (tmp_path / "out" / "digits.md").read_text()
    assert "**Synthetic data of the real shapes**" in md and "| outer_step |" in md and "| **total** |" in md


@pytest.mark.parametrize("argv, says", [
    (["--config", "configs/nope.yaml"], "config file not found: configs/nope.yaml"),
    (["--device", "tpu"], "--device tpu: expected cpu or cuda"),
    (["--stages", "teacher,outer_step"], "--stages unknown ['teacher']"),
    (["--steps", "-1"], "--steps must be >= 0, got -1"),
    (["--train-images", "10"], "storage.m = 16 exceeds the 10 images of the DIGITS train split"),
])
def test_a_users_mistake_is_one_line_and_exit_2_before_any_work(argv, says, tmp_path, capsys):
    flags = {"--config": str(write_config(tmp_path)), "--device": "cpu", "--out": str(tmp_path / "out"),
             **dict(zip(argv[::2], argv[1::2]))}
    with pytest.raises(SystemExit) as e:
        utils.cli(lambda: sizes.main([x for flag in flags.items() for x in flag]), "sizes.py")
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("sizes.py: error: ") and says in err[0], err
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present")
def test_cuda_without_cuda_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        utils.cli(lambda: sizing(tmp_path, "--device", "cuda"), "sizes.py")
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err == ["sizes.py: error: --device cuda: expected cpu (torch sees no CUDA device here)"]


def cuda(*args):  # the stages' faults, at module level: a spawned child unpickles them by name
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")


def cpu(*args):
    raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory")


def killed(*args):
    os.kill(os.getpid(), 9)


def bug(*args):
    raise ValueError("a bug")


def sleeps(*args):
    time.sleep(600)


def test_a_stage_out_of_memory_is_in_the_table_the_next_runs_and_each_ends_as_one_line(tmp_path, monkeypatch, capsys):
    """CUDA's OutOfMemoryError, the CPU allocator's error and a child killed by the kernel (signal 9): each stage
    reported as out of memory in the table, the next stage runs, and the command ends with one line per such stage
    naming the config, the stage and what lowers its memory (exit 2); a stage that fails otherwise (a bug) is
    reported as failed."""
    for name, setup in (("outer_step", cuda), ("inner_step", cpu), ("student_step", killed), ("probe_step", bug)):
        monkeypatch.setitem(sizes.STAGES, name, dataclasses.replace(sizes.STAGES[name], setup=setup))
    config = write_config(tmp_path)
    code, report = ended(tmp_path, "--stages", "outer_step,inner_step,teacher_step,student_step,probe_step",
                         config=config)
    stages = json.loads(report.read_text())["stages"]
    assert code == 2
    assert {n: r["status"] for n, r in stages.items()} == {
        "outer_step": "out of memory", "inner_step": "out of memory", "teacher_step": "ok",
        "student_step": "out of memory", "probe_step": "failed"}
    assert "signal 9" in stages["student_step"]["error"] and stages["probe_step"]["error"] == "a bug"
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("sizes.py")]
    assert err[:3] == [f"sizes.py: error: {config}: stage {n} ran out of memory ({stages[n]['error']}); lower "
                       f"{sizes.STAGES[n].lower}" for n in ("outer_step", "inner_step", "student_step")]
    assert "support_chunk" in err[0] and "evaluation.batch_size" in err[2]
    assert err[3] == f"sizes.py: {config}: stage probe_step FAILED: a bug"
    assert "**out of memory**" in report.with_suffix(".md").read_text()


def test_the_reference_sizing_and_the_budget_skip_what_would_not_fit_or_finish(tmp_path, monkeypatch):
    """A stage the reference sizing says needs more than the machine's memory is skipped with that reason (and ends
    as out of memory, exit 2); one whose FLOPs would not finish in the budget is skipped with its estimate; one
    still running at the deadline is stopped and reported; the others run."""
    monkeypatch.setattr(sizes, "CHILD_START_S", 0.0)
    monkeypatch.setitem(sizes.STAGES, "teacher_targets",
                        dataclasses.replace(sizes.STAGES["teacher_targets"], setup=sleeps))
    config = write_config(tmp_path)
    plan = {"device": "cpu", "stages": {
        "inner_step": {"status": "ok", "flops": 1e9, "peak_bytes": 1e15, "train_images": 1347},
        "outer_step": {"status": "ok", "flops": 1e17, "peak_bytes": 1e6, "train_images": 1347}}}
    (tmp_path / "plans").mkdir()
    (tmp_path / "plans" / "digits.json").write_text(json.dumps(plan))
    t0 = time.time()
    code, report = ended(tmp_path, "--stages", "teacher_step,inner_step,outer_step,teacher_targets", "--budget-s",
                         "45", config=config)  # (a spawned child's start-up is seconds on a busy 2-core box)
    stages = json.loads(report.read_text())["stages"]
    assert code == 2 and time.time() - t0 < 100
    assert stages["teacher_step"]["status"] == "ok"
    assert stages["inner_step"]["status"] == "out of memory" and stages["inner_step"]["skipped"]
    assert "the device has" in stages["inner_step"]["error"] and "support_chunk" in stages["inner_step"]["error"]
    assert stages["outer_step"]["status"] == "skipped" and "left of --budget-s" in stages["outer_step"]["error"]
    assert stages["teacher_targets"]["status"] == "skipped" and "did not finish" in stages["teacher_targets"]["error"]


# ---------------------------------------------------------------------------------- the train split's hash
def test_the_train_splits_hash_reads_its_bytes_in_place():
    """utils.tensor_hash (every loaded split's fingerprint) allocates no copy of the images (it held a bytes copy
    of all of them: 15.7 GB more at IMAGENET64's 1.28M images), and its digest is that of the bytes, as before."""
    import hashlib
    import tracemalloc
    x = torch.randint(0, 256, (20_000, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    tracemalloc.start()
    digest = utils.tensor_hash(x)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    before = hashlib.sha256(str((tuple(x.shape), x.dtype)).encode() + x.numpy().tobytes()).hexdigest()[:16]
    assert digest == before and peak < x.numel() / 100, (peak, x.numel())


PEAK_UNDER = """
import contextlib, sys
import torch
from torch.utils.flop_counter import FlopCounterMode
import benchmark, main_distill, sizes, utils
cfg = utils.load_config("configs/cifar10_cpu.yaml", {"storage.m": 400, "distillation.support_chunk": 200,
                                                     "distillation.outer_batch_size": 128})
cpu = torch.device("cpu")
data, T = benchmark.synthetic_data(cfg, 1000, cpu)
state = sizes.distill_state(cfg, data, T, cpu)
counter = {"none": contextlib.nullcontext(), "ours": sizes.flop_counter(), "tracker": FlopCounterMode(display=False)}
peak = sizes.Peak(cpu)
with counter[sys.argv[1]]:
    main_distill.outer_step(state, data, T, cfg["distillation"])
flops = 0 if sys.argv[1] == "none" else counter[sys.argv[1]].get_total_flops()
print(peak.bytes(), flops)
"""


def peak_under(counter):
    """(peak resident growth in bytes, FLOPs counted) of one 32 px outer step under `counter` in a fresh process: in
    the suite's own process, memory earlier tests freed is reused without the resident set growing (CI saw 0.6 MB)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]))
    out = subprocess.run([sys.executable, "-c", PEAK_UNDER, counter], cwd=REPO, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return tuple(int(v) for v in out.stdout.split()[-2:])


def test_the_flop_count_holds_no_memory_of_its_own():
    """FlopCounterMode's module tracker kept the outer step's activations (Stanford Dogs' step was killed at 23 GB
    under it, 9.9 GB without): the sizing's counter counts the same FLOPs and the step's peak stays its own, where the
    tracker's grows by more than the step itself takes (one 32 px outer step per fresh process: here ~80 MB plain,
    ~95 MB ours, ~195 MB under the tracker)."""
    plain, _ = peak_under("none")
    ours, counted = peak_under("ours")
    tracked, full = peak_under("tracker")
    assert counted == full > 0
    assert tracked - plain > 3 * max(ours - plain, 2**24), (plain, ours, tracked)  # bytes of peak growth
