"""A refused run leaves nothing behind; read-only datasets work; resumes and hints tell the truth (each test runs
the scripts as a user would, and fails on the code before these fixes)."""
import errno
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import main_distill
import main_evaluate
import pretrain
import utils
from conftest import make_cifar10, make_dogs, write_mat_list
from tiny import REPO, TINY, set_dotted, write_config, write_teacher

CPU = ["--device", "cpu"]


def cifar_config(tmp_path, root):
    """The tiny DIGITS config on a CIFAR-10 folder at `root` (8 px, batch 16)."""
    path = write_config(tmp_path, dataset="CIFAR10", data__root=str(root), pretrain__batch_size=16,
                        pretrain__epochs=1, distillation__outer_batch_size=8, storage__budget_N=10, storage__m=4,
                        parameterization__U=4, parameterization__V=4)
    return path


# ----------------------------------------------------------------------------- nothing written before the checks
def test_the_readme_walk_missing_data_then_the_same_command_runs(tmp_path):
    """README troubleshooting: no CIFAR-10 folder, refused; the data put in place; the same command runs (it used to
    answer 'holds run ...; pass --resume', and --resume then 'no checkpoint')."""
    root = tmp_path / "data"
    argv = ["CIFAR10", "--config", str(cifar_config(tmp_path, root)), "--out", str(tmp_path / "t"), *CPU]
    with pytest.raises(utils.DatasetError, match="CIFAR-10 not found at"):
        pretrain.main(argv)
    assert not (tmp_path / "t").exists()
    make_cifar10(root)
    assert pretrain.main(argv)["epochs"] == 1


def test_a_missing_teacher_leaves_no_folder_and_the_same_command_runs_once_it_is_there(tmp_path):
    argv = ["--config", str(write_config(tmp_path)), "--teacher", str(tmp_path / "teacher.pth"), "--out",
            str(tmp_path / "assets"), *CPU, "--distillation.steps=3"]
    with pytest.raises(utils.MissingInput, match="teacher not found"):
        main_distill.main(argv)
    assert not (tmp_path / "assets").exists()
    write_teacher(tmp_path / "teacher.pth")
    assert main_distill.main(argv)["steps"] == 3


def test_a_budget_too_large_and_bases_too_many_write_nothing(tmp_path):
    teacher = write_teacher(tmp_path / "teacher.pth")
    for override, expected in (("--storage.m=5000", "storage: m=5000 needs"),
                               ("--parameterization.U=100", "parameterization.U = 100: expected <= 48")):
        with pytest.raises(utils.ConfigError, match=expected):
            main_distill.main(["--config", str(write_config(tmp_path)), "--teacher", str(teacher), "--out",
                               str(tmp_path / "assets"), *CPU, override])
        assert not (tmp_path / "assets").exists()


def test_ownership_is_named_before_outputs_that_exist(tmp_path):
    """Distilling into pretrain.py's run folder used to answer 'outputs already exist ... pass --resume'."""
    pretrain.main(["DIGITS", "--config", str(write_config(tmp_path)), "--out", str(tmp_path / "t"), *CPU,
                   "--epochs", "1"])
    run = tmp_path / "t" / "resnet18_barlow_twins_digits_run"
    for extra in ([], ["--resume"]):
        with pytest.raises(utils.RunFolderError, match="belongs to pretrain.py"):
            main_distill.main(["--config", str(write_config(tmp_path)), "--teacher",
                               str(tmp_path / "t" / "resnet18_barlow_twins_digits.pth"), "--out", str(run), *CPU,
                               *extra])


def test_a_folder_with_only_a_dead_runs_owner_record_is_not_protected(tmp_path):
    out = tmp_path / "assets"
    out.mkdir()
    (out / utils.OWNER_FILE).write_text(json.dumps({"script": "main_distill.py", "run_id": "dead"}))
    metrics = main_distill.main(["--config", str(write_config(tmp_path)), "--teacher",
                                 str(write_teacher(tmp_path / "t.pth")), "--out", str(out), *CPU,
                                 "--distillation.steps=2"])
    assert metrics["run_id"] != "dead" and json.loads((out / utils.OWNER_FILE).read_text())["run_id"] != "dead"


def test_a_full_disk_at_the_lock_leaves_nothing_and_says_where(tmp_path, monkeypatch):
    """It used to leave an empty run.lock, a raw 'No space left on device', and then 'in use by another run (pid
    None on None)' until the lock was deleted by hand."""
    real_link = utils.os.link

    def full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(utils.os, "link", full)
    argv = ["--config", str(write_config(tmp_path)), "--teacher", str(write_teacher(tmp_path / "t.pth")), "--out",
            str(tmp_path / "assets"), *CPU, "--distillation.steps=2"]
    with pytest.raises(utils.RunFolderError, match=f"could not claim the run folder {tmp_path / 'assets'}.*"
                                                   f"No space left on device"):
        main_distill.main(argv)
    assert not (tmp_path / "assets").exists()
    monkeypatch.setattr(utils.os, "link", real_link)
    assert main_distill.main(argv)["steps"] == 2


def test_an_out_that_is_a_file_and_an_unreadable_lock_are_named(tmp_path):
    teacher = write_teacher(tmp_path / "t.pth")
    argv = lambda out: ["--config", str(write_config(tmp_path)), "--teacher", str(teacher), "--out", str(out), *CPU]
    (tmp_path / "afile").write_text("x")
    with pytest.raises(utils.RunFolderError, match="afile is a file, not a folder"):
        main_distill.main(argv(tmp_path / "afile"))
    (tmp_path / "locked").mkdir()
    (tmp_path / "locked" / utils.LOCK_FILE).write_text("")
    with pytest.raises(utils.RunFolderError, match=r"run.lock cannot be read as a run lock .*delete "):
        main_distill.main(argv(tmp_path / "locked"))


def test_a_start_killed_before_its_first_checkpoint_and_a_late_refusal_leave_folders_a_plain_rerun_takes(tmp_path):
    """kill -9 before the first checkpoint left owner.json, config.json and run.lock (its process dead), and the plain
    rerun was refused ('holds run ...: it has nothing to resume from'); probe.labels_per_class above the smallest
    class was refused only after main_evaluate had claimed its folder and trained a student (pretrain.py: after every
    epoch), and the folder then refused the corrected command."""
    argv = ["--config", str(write_config(tmp_path)), "--teacher", str(write_teacher(tmp_path / "t.pth")), "--out",
            str(tmp_path / "a"), *CPU, "--distillation.steps=30", "--distillation.save_every=30"]
    first = subprocess.Popen([sys.executable, str(REPO / "main_distill.py"), *argv], cwd=tmp_path,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    while not (tmp_path / "a" / "config.json").exists():
        assert first.poll() is None
        time.sleep(0.01)
    first.kill()
    first.wait()
    left = {p.name for p in (tmp_path / "a").iterdir()}
    assert {utils.OWNER_FILE, "config.json", utils.LOCK_FILE} <= left and "checkpoint.pth" not in left, left
    assert main_distill.main(argv)["steps"] == 30  # the same command
    late = ["--probe.labels_per_class=1000"]  # DIGITS' smallest class has 134 train images
    for main, args in ((pretrain.main, ["DIGITS", "--config", str(write_config(tmp_path)), "--out", str(tmp_path / "t"),
                                        *CPU, "--epochs", "1"]),
                       (main_evaluate.main, ["--config", str(write_config(tmp_path)), "--teacher", str(tmp_path / "t.pth"),
                                             "--out", str(tmp_path / "e"), *CPU, "--rows", "no_pretraining"])):
        with pytest.raises(utils.ConfigError, match="probe.labels_per_class = 1000: class .* has only 13"):
            main(args + late)
        assert not Path(args[args.index("--out") + 1]).exists()
        assert main(args)  # the corrected command


# ----------------------------------------------------------------------------- caches are optional
def test_a_read_only_stanford_dogs_root_runs_end_to_end(tmp_path, monkeypatch, capsys):
    """Every image used to be decoded, then the run died on the cache write (and on a read-only disk the clean-up
    of the partial file raised its own error, hiding the first)."""
    root = tmp_path / "data"
    folder = make_dogs(root, per_breed=10, breeds=2, size=(20, 16))
    files = sorted(str(p.relative_to(folder / "images" / "Images")) for p in folder.rglob("*.jpg"))
    write_mat_list(folder / "train_list.mat", [f for f in files if not f.endswith(("4.jpg", "5.jpg"))])
    write_mat_list(folder / "test_list.mat", [f for f in files if f.endswith(("4.jpg", "5.jpg"))])
    real_save, real_unlink = torch.save, Path.unlink

    def read_only(obj, f, *a, **k):  # nothing can be written under the data root: writes and clean-ups fail
        if str(f).startswith(str(root)):
            raise OSError(errno.EROFS, "Read-only file system", str(f))
        return real_save(obj, f, *a, **k)

    def unlink(self, missing_ok=False):
        if str(self).startswith(str(root)):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(utils.torch, "save", read_only)
    monkeypatch.setattr(Path, "unlink", unlink)
    cfg = write_config(tmp_path, dataset="STANFORD_DOGS", data__root=str(root), pretrain__batch_size=8,
                       pretrain__epochs=1, distillation__outer_batch_size=8, storage__budget_N=10, storage__m=4,
                       parameterization__U=4, parameterization__V=4, distillation__steps=2, evaluation__epochs=1,
                       probe__iterations=5)
    pretrain.main(["STANFORD_DOGS", "--config", str(cfg), "--out", str(tmp_path / "t"), *CPU])
    teacher = tmp_path / "t" / "resnet18_barlow_twins_digits.pth"
    main_distill.main(["--config", str(cfg), "--teacher", str(teacher), "--out", str(tmp_path / "a"), *CPU])
    table = main_evaluate.main(["--config", str(cfg), "--teacher", str(teacher), "--assets", str(tmp_path / "a"),
                                "--out", str(tmp_path / "e"), *CPU, "--rows", "distilled,no_pretraining"])
    assert set(table) == {"distilled", "no_pretraining"} and not list(folder.glob("cache_*"))
    err = capsys.readouterr().err
    assert "warning: the decoded Stanford Dogs images not cached" in err and "Read-only file system" in err
    cache_dir = tmp_path / "cache"
    utils.load_dataset("STANFORD_DOGS", root, 8, cache_dir=str(cache_dir))  # data.cache_dir: a writable place
    assert len(list(cache_dir.glob("cache_official_8px_*.pt"))) == 1


def test_a_failed_write_keeps_its_first_error_when_the_clean_up_fails_too(tmp_path, monkeypatch):
    def fail(obj, f, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    def no_unlink(self, missing_ok=False):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(utils.torch, "save", fail)
    monkeypatch.setattr(Path, "unlink", no_unlink)
    with pytest.raises(OSError, match=r"could not write .*x.pth \(OSError: \[Errno 28\] No space left on device\)"):
        utils.atomic_save({}, tmp_path / "x.pth")


# ----------------------------------------------------------------------------- resumes tell the truth
def test_extending_the_steps_recomputes_the_decay_from_the_resumed_step_and_records_it(tmp_path, capsys):
    """--resume --allow-changed distillation.steps used to restart the decay silently, and the set said steps: 40
    with no mark of it."""
    argv = ["--config", str(write_config(tmp_path)), "--teacher", str(write_teacher(tmp_path / "t.pth")), "--out",
            str(tmp_path / "a"), *CPU, "--distillation.log_every=10", "--distillation.save_every=10"]
    main_distill.main(argv + ["--distillation.steps=20"])
    main_distill.main(argv + ["--distillation.steps=40", "--resume", "--allow-changed", "distillation.steps"])
    assert "the schedule changed at step 20" in capsys.readouterr().out
    d = torch.load(tmp_path / "a" / "distilled_data.pth", weights_only=False)
    assert d["steps"] == 40 and [(s["from_step"], s["steps"]) for s in d["schedule"]] == [(0, 20), (20, 40)]
    lr = {json.loads(line)["step"]: json.loads(line)["lr_image"] for line in (tmp_path / "a" / "log.jsonl").open()}
    base = TINY["distillation.lr_image"]
    assert lr[20] == pytest.approx(0.0) and lr[30] == pytest.approx(base * (1 - 30 / 40))  # documented: README


def test_a_changed_rate_on_resume_is_the_rate_that_runs(tmp_path, monkeypatch):
    """The optimizer's saved rates used to override the config's on --resume: a lower rate after a divergence was
    silently ignored."""
    real_step, calls = main_distill.outer_step, []

    def killed_at_15(*a, **k):
        calls.append(1)
        if len(calls) == 15:
            raise KeyboardInterrupt
        return real_step(*a, **k)

    monkeypatch.setattr(main_distill, "outer_step", killed_at_15)
    argv = ["--config", str(write_config(tmp_path)), "--teacher", str(write_teacher(tmp_path / "t.pth")), "--out",
            str(tmp_path / "a"), *CPU, "--distillation.steps=20", "--distillation.save_every=10",
            "--distillation.log_every=5"]
    with pytest.raises(KeyboardInterrupt):
        main_distill.main(argv)
    main_distill.main(argv + ["--resume", "--allow-changed", "distillation.lr_image", "--distillation.lr_image=0.004"])
    lr = {json.loads(line)["step"]: json.loads(line)["lr_image"] for line in (tmp_path / "a" / "log.jsonl").open()}
    assert lr[5] == pytest.approx(TINY["distillation.lr_image"] * (1 - 5 / 20))
    assert lr[15] == pytest.approx(0.004 * (1 - 15 / 20))  # the new rate, on the same decay


@pytest.mark.parametrize("key", ["storage.m", "parameterization.U", "augmentations.rotate"])
def test_allow_changed_refuses_keys_that_change_the_tensors(tmp_path, key):
    argv = ["--config", str(write_config(tmp_path)), "--teacher", str(write_teacher(tmp_path / "t.pth")), "--out",
            str(tmp_path / "a"), *CPU, "--distillation.steps=2"]
    main_distill.main(argv)
    value = {"storage.m": 8, "parameterization.U": 6, "augmentations.rotate": "[90]"}[key]
    with pytest.raises(utils.InputError, match=f"--allow-changed {key}: this key changes the tensors of"):
        main_distill.main(argv + ["--resume", "--allow-changed", key, f"--{key}={value}"])


def test_main_evaluate_does_not_offer_allow_changed(capsys):
    """It was documented in --help and ignored: a table resumes only under its own config."""
    with pytest.raises(SystemExit):
        main_evaluate.parse_args(["--help"])
    assert "--allow-changed" not in capsys.readouterr().out
    with pytest.raises(utils.ConfigError, match="unrecognised argument '--allow-changed'"):
        main_evaluate.parse_args(["--config", "c.yaml", "--resume", "--allow-changed", "probe.lr"])


# ----------------------------------------------------------------------------- hints that work
def hint_command(message):
    """The command a RunStopped message prints between backquotes, as argv."""
    argv = shlex.split(message.split("`")[1])
    assert argv[0] == "python"
    return argv[1], argv[2:]


def test_the_nan_hint_under_torchrun_starts_as_many_processes(monkeypatch):
    """A run started by torchrun is continued by torchrun with the same process counts, not by plain python."""
    stop = lambda: str(utils.non_finite_stop("loss", "main_distill.py", ["--config", "c.yaml"], "distillation.lr_image",
                                             0.01))
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert "`torchrun --standalone --nproc_per_node=4 main_distill.py --config c.yaml --overwrite" in stop()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert "`torchrun --nnodes=2 --nproc_per_node=2 <your rendezvous flags> main_distill.py" in stop()
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert "`python main_distill.py --config c.yaml --overwrite --distillation.lr_image=0.001`" in stop()


@pytest.mark.parametrize("group", ["lr_repr", "lr_image"])
def test_the_nan_hint_names_the_group_that_diverged_and_its_command_runs_as_printed(tmp_path, monkeypatch, group):
    """The hint always lowered lr_image; when lr_repr diverged, its command diverged again (the resumed optimizer also
    kept the old rates), and the growth it named was counted from the resumed step, not the run's start. Simulated
    divergence: while the group's rate is above 0.02, each step scales its tensors by 1.25, and at step 7 they
    overflow (a real rate too high grows them too, but Adam's bounded steps take longer to reach an overflow); the run
    is interrupted at step 5 and resumed from its step-4 checkpoint before it diverges."""
    real_step, calls = main_distill.outer_step, []

    def step(state, *a, **k):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        loss = real_step(state, *a, **k)
        g = next(g for g in state.opt.param_groups if g["key"] == group)
        if g["initial_lr"] > 0.02:
            with torch.no_grad():
                for p in g["params"]:
                    p.mul_(1.25) if len(calls) < 8 else p.fill_(float("inf"))
        return loss

    monkeypatch.setattr(main_distill, "outer_step", step)
    argv = ["--config", str(write_config(tmp_path)), "--teacher", str(write_teacher(tmp_path / "t.pth")), "--out",
            str(tmp_path / "my run"), *CPU, "--distillation.steps=12", "--distillation.save_every=2",
            "--distillation.log_every=2", f"--distillation.{group}=0.05"]
    with pytest.raises(KeyboardInterrupt):
        main_distill.main(argv)
    with pytest.raises(utils.RunStopped, match=rf"distillation.{group} grew the most") as e:
        main_distill.main(argv + ["--resume"])
    grown = float(re.search(r"grew the most, ([\d.]+)x", str(e.value)).group(1))
    assert 1.25 ** 5 < grown < 5, grown  # 1.25^6 and Adam's steps since the start (since the resumed step 4: ~1.25^2)
    script, hinted = hint_command(str(e.value))
    assert script == "main_distill.py" and f"--distillation.{group}=0.005" in hinted and "--resume" in hinted
    assert "(step 6)" in str(e.value) and main_distill.main(hinted)["steps"] == 12  # as printed


def test_nan_hints_followed_as_printed_lower_the_rates_until_the_run_finishes(tmp_path):
    """Both rates 1e6 x the tiny default: a real divergence by step 6, whose step-5 checkpoint had grown 1.4e4x. The
    hint used to resume from it (which diverged again at any lower rate) and, the growth counted from the resumed
    step, lowered the same rate again and again. Now a checkpoint with a group grown past SOUND_GROWTH is not
    resumed: each hint starts afresh with the group that grew the most at a tenth, and the hints, followed as
    printed, lower the rates in turn until a run finishes, never printing the same command twice."""
    argv = ["--config", str(write_config(tmp_path)), "--teacher", str(write_teacher(tmp_path / "t.pth")), "--out",
            str(tmp_path / "a"), *CPU, "--distillation.steps=30", "--distillation.save_every=5",
            "--distillation.log_every=1", "--distillation.lr_image=1e4", "--distillation.lr_repr=1e4"]
    hints = []
    for _ in range(6):
        try:
            assert main_distill.main(argv)["steps"] == 30
            break
        except utils.RunStopped as e:
            assert "past 10x: that checkpoint is not resumed" in str(e) and "--overwrite" in str(e), str(e)
            script, argv = hint_command(str(e))
            hints.append(" ".join(argv))
    else:
        pytest.fail(f"no run finished after {len(hints)} hints: {hints}")
    assert 1 <= len(hints) == len(set(hints)) and "--distillation.lr_image=1e+03" in hints[0], hints


def test_a_teacher_file_with_another_layout_is_refused_naming_it(tmp_path):
    path = write_teacher(tmp_path / "t.pth")
    d = torch.load(path, weights_only=False)
    d["backbone"] = {f"module.{k}": v for k, v in d["backbone"].items()}  # saved from a DDP wrapper, say
    torch.save(d, path)
    with pytest.raises(utils.InputError, match=f"{path} does not hold the weights of a ResNet-18 .* of width 16"):
        utils.load_teacher(path, utils.load_config(write_config(tmp_path)), torch.device("cpu"))


def test_a_key_or_section_written_twice_is_refused_naming_it(tmp_path):
    text = write_config(tmp_path).read_text()
    for extra, key in (("seed: 4\n", "seed"), ("probe:\n  iterations: 3\n", "probe")):
        (tmp_path / "twice.yaml").write_text(text + extra)
        with pytest.raises(utils.ConfigError, match=f"twice.yaml, line .*: key '{key}' is written twice"):
            utils.load_config(tmp_path / "twice.yaml")


def test_a_teacher_fit_below_minus_one_in_a_kept_results_file_is_refused(tmp_path):
    cell = {"probe": 50.0, "fit": -7.0, "steps": 0, "time_s": 1.0}
    (tmp_path / "results.json").write_text(json.dumps({"config": {}, "derived": {"target": "DIGITS", "inputs": {}},
                                                       "cells": {"teacher": {"0": cell}}}))
    with pytest.raises(utils.InputError, match=r"cells.teacher.0.fit = -7.0: expected a finite number >= -1"):
        main_evaluate.read_results(tmp_path / "results.json")
