"""torchrun on the CPU (gloo, 2 processes), as on several GPUs (nccl): pretrain.py's DDP step is the
single-process step on the same global batch; a 2-process teacher finishes, loads and resumes after a kill;
main_evaluate's full-dataset row trains under DDP and its seeded rows are spread over the ranks;
main_distill.py's outer step spread over the ranks is the single-process step, and its runs resume after a kill."""
import json
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import main_distill
import main_evaluate
import models
import utils
from tiny import REPO, write_config, write_teacher

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
CPU = ["--device", "cpu"]


def kill_tree(pid):
    """SIGKILL a process and all its descendants (torchrun's workers live in their own process groups)."""
    children = Path(f"/proc/{pid}/task/{pid}/children")
    kids = children.read_text().split() if children.exists() else []
    os.kill(pid, signal.SIGSTOP)  # no new children while the tree is walked
    for kid in kids:
        kill_tree(int(kid))
    os.kill(pid, signal.SIGKILL)


def kill_at_first_checkpoint(args, checkpoint):
    """torchrun `args` until `checkpoint` appears, then SIGKILL torchrun and both workers (kill_tree)."""
    first = subprocess.Popen(TORCHRUN + [str(a) for a in args], cwd=REPO, env=ENV,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    t0 = time.time()
    while not checkpoint.exists():
        assert first.poll() is None, first.stdout.read()
        assert time.time() - t0 < 300
        time.sleep(0.02)
    kill_tree(first.pid)
    first.communicate()


def torchrun(args, cwd, **kw):
    run = subprocess.run(TORCHRUN + [str(a) for a in args], cwd=cwd, capture_output=True, text=True, env=ENV,
                         timeout=600, **kw)
    return run.returncode, run.stdout + run.stderr


def test_ddp_step_is_the_single_process_step_on_the_global_batch(tmp_path):
    cfg = write_config(tmp_path, pretrain__batch_size=64, pretrain__projector_dims=[64, 64])
    rc, out = torchrun([REPO / "tests" / "ddp_first_step.py", cfg, tmp_path / "step.json"], cwd=tmp_path)
    assert rc == 0, out
    r = json.loads((tmp_path / "step.json").read_text())
    assert r["world"] == 2 and r["global_batch"] == 64
    assert r["loss"] == pytest.approx(r["single_loss"], rel=1e-5), r
    # float32 sums in another order (two ranks' halves, then the all-reduce) move single weights by up to 0.22% of
    # the step on torch 2.14.1 here (LARS' per-layer trust ratio scales such differences): 0.5% bounds them
    assert r["max_weight_diff"] < 5e-3 * r["step_size"] and r["max_buffer_diff"] < 1e-4, r
    # BatchNorm per rank would not be the same step: the comparison can tell
    assert abs(r["unsynced_loss"] - r["single_loss"]) > 100 * abs(r["loss"] - r["single_loss"]), r


def test_teacher_under_torchrun_finishes_loads_and_resumes_after_a_kill(tmp_path):
    cfg = write_config(tmp_path, network__width=16, pretrain__epochs=12, pretrain__batch_size=256,
                       pretrain__save_every=1, pretrain__knn_every=6)  # the kill lands with 11 epochs to go
    args = ["pretrain.py", "DIGITS", "--config", str(cfg), "--out", str(tmp_path / "t"), *CPU]
    run = tmp_path / "t" / "resnet18_barlow_twins_digits_run"
    kill_at_first_checkpoint(args, run / "checkpoint.pth")
    teacher = tmp_path / "t" / "resnet18_barlow_twins_digits.pth"
    assert not teacher.exists()
    plain = subprocess.run([sys.executable] + args + ["--resume"], cwd=REPO, env=ENV, capture_output=True, text=True)
    assert plain.returncode == 2 and "written by 2 process(es)" in plain.stderr  # 2 ranks' generators to continue
    rc, out = torchrun(args + ["--resume"], cwd=REPO)
    assert rc == 0 and "resumed run" in out, out
    assert out.count("teacher written to") == 1  # rank 0 alone writes and prints
    epochs = [json.loads(line)["epoch"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert epochs == list(range(1, 13))
    conf = utils.load_config(cfg)
    g, meta = utils.load_teacher(teacher, conf, torch.device("cpu"), utils.load_data(conf))
    assert meta["epochs"] == 12 and json.loads((run / "config.json").read_text())["derived"]["processes"] == 2


def test_evaluation_under_torchrun(tmp_path):
    """The full-dataset row trained with DDP probes within the spread of single-process trainings (seeds 0-2);
    the seeded rows, spread over the two ranks, give the single-process numbers (one thread per process in
    both, so the float reductions run in the same order)."""
    cfg = write_config(tmp_path, evaluation__full_epochs=1, evaluation__epochs=3, probe__iterations=200)
    teacher = write_teacher(tmp_path / "teacher.pth")
    rows = ["--rows", "full_dataset,random_subset,no_pretraining", "--seeds", "2"]
    common = ["--config", str(cfg), "--teacher", str(teacher), *CPU]
    one = subprocess.run([sys.executable, "main_evaluate.py", *common, *rows, "--out", str(tmp_path / "one")],
                         cwd=REPO, env=ENV, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr
    single = json.loads((tmp_path / "one" / "results.json").read_text())["rows"]
    full = [single["full_dataset"]["mean"]] + [
        main_evaluate.main(common + ["--rows", "full_dataset", f"--seed={s}", "--out", str(tmp_path / f"one_s{s}")])
        ["full_dataset"]["mean"] for s in (1, 2)]
    rc, out = torchrun(["main_evaluate.py", *common, *rows, "--out", tmp_path / "two"], cwd=REPO)
    assert rc == 0, out
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert two["complete"] and two["derived"]["processes"] == 2
    ddp = two["rows"]["full_dataset"]["mean"]
    mean, std = statistics.fmean(full), statistics.pstdev(full)
    assert abs(ddp - mean) <= 3 * std + 0.5, (ddp, full)
    for row in ("random_subset", "no_pretraining"):
        assert two["rows"][row]["accs"] == single[row]["accs"], row
    assert "seed 1: linear probe" in out and "(rank 1)" in out  # seed 1 ran on rank 1


def test_distillation_under_torchrun(tmp_path):
    """One outer step on 2 ranks is the single-process step on the same batch (loss, distilled gradient, updated
    pool), for ours and krr_st; after 20 steps the ranks hold identical tensors and the divergence guard sees one
    changed bit; a 2-rank run (data.shard) killed with -9 and resumed ends on the tensors of an uninterrupted one,
    and one process refuses its checkpoint by name."""
    cfg, teacher = write_config(tmp_path), write_teacher(tmp_path / "teacher.pth")
    run = ["main_distill.py", "--config", cfg, "--teacher", teacher, *CPU, "--data.shard=true",
           "--distillation.steps=40", "--distillation.save_every=10", "--distillation.log_every=10"]
    folder = tmp_path / "killed"
    kill_at_first_checkpoint(run + ["--out", folder], folder / "checkpoint.pth")  # at step 10, 30 steps to go
    assert not (folder / "distilled_data.pth").exists()
    with pytest.raises(utils.InputError, match="written by 2 process.*with per-rank batch generators.*"
                                               "torchrun --nproc_per_node=2"):
        main_distill.main([str(a) for a in run[1:] + ["--out", folder, "--resume"]])  # one process
    # one torchrun start: the step checks, then main_distill.main --resume, then the uninterrupted run
    rc, out = torchrun([REPO / "tests" / "distill_ranks.py", cfg, teacher, tmp_path / "r.json",
                        "--", *run[1:], "--out", folder, "--resume", "--", *run[1:], "--out", tmp_path / "whole"],
                       cwd=REPO)
    assert rc == 0 and "resumed run" in out and out.count("distilled set written to") == 2, out
    r = json.loads((tmp_path / "r.json").read_text())
    for method in ("ours", "krr_st"):
        m = r[method]
        assert m["loss"] == pytest.approx(m["single_loss"], rel=1e-5), m
        # float32 sums in another order, through the KRR solve: the same process summing the loss over the two
        # halves of the real batch moves the gradient by 3.4e-4 (ours) and 2.5e-5 (krr_st) of its largest entry;
        # measured here 3.9e-4 and 2.5e-5. A missing rank's share would be of the order of 1.
        assert m["grad_max"] > 0 and m["grad_rel_diff"] < 2e-3, m
        assert m["pool_rel_diff"] < 1e-5 and m["ages"][0] == m["ages"][1], m  # the inner step, BatchNorm over both
        # the stagger's ~13 inner steps carry the split sums' rounding on (with momentum): 4.1e-5 measured at width 16
        assert m["stagger_pool_rel_diff"] < 2e-4, m
        assert m["ranks_identical_after_20"] and m["tensors_compared"] > 20, m
        assert m["guard"] and "diverged by step 20" in m["guard"] and "rank(s) [1]" in m["guard"], m
    whole, resumed = (torch.load(f / "checkpoint.pth", weights_only=False) for f in (tmp_path / "whole", folder))
    assert whole["step"] == resumed["step"] == 40 and len(resumed["real_rng"]) == 2
    for key in ("distilled", "optimizer", "pool"):
        a, b = (torch.utils._pytree.tree_leaves(c[key]) for c in (whole, resumed))
        assert len(a) == len(b) and all(torch.equal(x, y) if torch.is_tensor(x) else x == y for x, y in zip(a, b)), key
    steps = [json.loads(line)["step"] for line in (folder / "log.jsonl").read_text().splitlines()]
    assert steps == [1] + list(range(10, 41, 10))


def test_a_distillation_checkpoint_continues_under_another_process_count_only_when_sound():
    """Without data.shard every rank holds the whole state and draws alike: any count continues it; with it, each
    rank's draws from its own shard continue only under as many ranks."""
    cfg = utils.load_config(REPO / "configs" / "digits.yaml")
    shard = {**cfg, "data": {**cfg["data"], "shard": True}}
    main_distill.check_processes({"processes": 2, "real_rng": None}, cfg, models.Ranks(0, 1), "c.pth")
    main_distill.check_processes({"processes": 1, "real_rng": None}, cfg, models.Ranks(1, 4), "c.pth")
    main_distill.check_processes({"processes": 2, "real_rng": [{}, {}]}, shard, models.Ranks(1, 2), "c.pth")
    for ckpt, conf, ranks in (({"processes": 2, "real_rng": [{}, {}]}, shard, models.Ranks(0, 4)),
                              ({"processes": 2, "real_rng": [{}, {}]}, shard, models.Ranks(0, 1)),
                              ({"processes": 1, "real_rng": None}, shard, models.Ranks(0, 2))):
        with pytest.raises(utils.InputError, match="c.pth was written by .* process.*resume with"):
            main_distill.check_processes(ckpt, conf, ranks, "c.pth")


def test_several_students_under_torchrun(tmp_path):
    """--student a,b under torchrun: one process group for both tables; rank 0 writes them and the summary."""
    cfg = write_config(tmp_path, probe__iterations=50)
    teacher = write_teacher(tmp_path / "teacher.pth")
    rc, out = torchrun(["main_evaluate.py", "--config", cfg, "--teacher", teacher, *CPU, "--rows", "no_pretraining",
                        "--seeds", "2", "--student", "resnet10,alexnet", "--out", tmp_path / "e"], cwd=REPO)
    assert rc == 0, out
    summary = json.loads((tmp_path / "e" / "students.json").read_text())
    assert set(summary) == {"resnet10", "alexnet"} and all(len(t["no_pretraining"]["accs"]) == 2
                                                           for t in summary.values())


def worker(launcher_pid, rank):
    """The pid of torchrun's worker of `rank` (read from each child's environment)."""
    for kid in Path(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read_text().split():
        env = dict(v.split("=", 1) for v in Path(f"/proc/{kid}/environ").read_bytes().decode().split("\0") if "=" in v)
        if env.get("RANK") == str(rank):
            return int(kid)
    raise AssertionError(f"no worker of rank {rank} under {launcher_pid}")


def test_under_torchrun_a_user_error_and_a_stalled_rank_are_one_line_each(tmp_path):
    """A user error: every rank used to print it (rank 0 alone can see a run folder's state) and the worker's exit
    code was 1; now rank 0's one line, its worker exits 2 (torchrun's own report, which it prints after any failed
    worker, shows the code; torchrun itself exits 1). A rank stopped with SIGSTOP used to leave the others waiting
    in gloo for 30 minutes: with distributed_timeout_s = 3 rank 0 names it, the step and the --resume command within
    two timeouts, and that command, run as printed, finishes the run."""
    cfg, teacher = write_config(tmp_path), write_teacher(tmp_path / "teacher.pth")
    (tmp_path / "owned").mkdir()
    (tmp_path / "owned" / utils.OWNER_FILE).write_text(json.dumps({"script": "pretrain.py", "run_id": "r"}))
    rc, out = torchrun(["main_distill.py", "--config", cfg, "--teacher", teacher, "--out", tmp_path / "owned", *CPU],
                       cwd=REPO)
    ours = [line for line in out.splitlines() if "main_distill.py: error:" in line or 'main_distill.py", line' in line]
    assert rc == 1 and len(ours) == 1 and ours[0].startswith("main_distill.py: error: ") and "belongs to pretrain.py" \
        in ours[0] and "exitcode  : 2" in out, out[-3000:]
    run = ["main_distill.py", "--config", cfg, "--teacher", teacher, "--out", tmp_path / "a", *CPU,
           "--distillation.steps=60", "--distillation.save_every=10", "--distributed_timeout_s=3"]
    job = subprocess.Popen(TORCHRUN + [str(a) for a in run], cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
    try:
        while not (tmp_path / "a" / "checkpoint.pth").exists():
            assert job.poll() is None, job.stderr.read()
            time.sleep(0.02)
        os.kill(worker(job.pid, 1), signal.SIGSTOP)
        t0 = time.time()
        line = job.stderr.readline()
        while line and "main_distill.py: error:" not in line:
            line = job.stderr.readline()
        waited = time.time() - t0
    finally:
        kill_tree(job.pid)  # torchrun itself stops a stopped worker only 30 s (its --shutdown-timeout) after SIGTERM
        job.communicate()
    line = line[line.index("main_distill.py: error:"):].strip()
    assert waited < 3 * 3 + 5 and re.fullmatch(r"main_distill.py: error: rank 1 did not answer within "
                                                r"distributed_timeout_s = 3 s at outer step \d+ .*`", line), (waited, line)
    hinted = shlex.split(line.split("`")[1])
    assert hinted[:3] == ["torchrun", "--standalone", "--nproc_per_node=2"] and hinted[-1] == "--resume", hinted
    rc, out = torchrun(hinted[3:], cwd=REPO)  # as printed (torchrun: python -m torch.distributed.run)
    assert rc == 0 and "resumed run" in out and torch.load(tmp_path / "a" / "checkpoint.pth", weights_only=False)[
        "step"] == 60, out[-3000:]
