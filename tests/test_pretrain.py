"""pretrain.py on DIGITS at 8 px: a loadable teacher, a falling loss, an exact resume."""
import json

import pytest
import torch

import pretrain
import utils
from tiny import write_config


def run(tmp_path, *extra):
    cfg = write_config(tmp_path)
    return pretrain.main(["DIGITS", "--config", str(cfg), "--out", str(tmp_path / "teachers"), "--device", "cpu",
                          *extra])


def test_two_epochs_write_a_loadable_teacher_and_the_loss_falls(tmp_path):
    metrics = run(tmp_path, "--epochs", "3")
    teacher, meta = utils.load_teacher(tmp_path / "teachers" / "resnet18_barlow_twins_digits.pth",
                                       utils.load_config(tmp_path / "digits.yaml"), torch.device("cpu"))  # the run's
    assert meta["epochs"] == 3 and teacher(torch.randn(2, 3, 8, 8)).shape == (2, 128)
    run_dir = tmp_path / "teachers" / "resnet18_barlow_twins_digits_run"
    rows = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.0, rows
    assert all(0 <= r["knn_top1"] <= 100 for r in rows)
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert saved["linear_probe_top1"] == metrics["linear_probe_top1"] and 0 <= saved["linear_probe_top1"] <= 100
    assert json.loads((run_dir / "config.json").read_text())["config"]["pretrain"]["epochs"] == 3


def test_existing_teacher_is_not_overwritten(tmp_path):
    run(tmp_path, "--epochs", "1")
    with pytest.raises(FileExistsError, match="--overwrite"):
        run(tmp_path, "--epochs", "1")
    run(tmp_path, "--epochs", "1", "--overwrite")


def test_resume_after_a_kill_matches_a_straight_run(tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    straight.mkdir()
    run(straight, "--epochs", "2")
    ref = torch.load(straight / "teachers" / "resnet18_barlow_twins_digits_run" / "checkpoint.pth", weights_only=False)

    killed = tmp_path / "killed"
    killed.mkdir()
    real_epoch = pretrain.train_one_epoch

    def die_in_second_epoch(*a, **k):
        if a[4] == 1:  # the epoch argument (net, opt, data, pc, epoch, ...)
            raise KeyboardInterrupt
        return real_epoch(*a, **k)

    monkeypatch.setattr(pretrain, "train_one_epoch", die_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        run(killed, "--epochs", "2")
    monkeypatch.setattr(pretrain, "train_one_epoch", real_epoch)
    run(killed, "--epochs", "2", "--resume")
    got = torch.load(killed / "teachers" / "resnet18_barlow_twins_digits_run" / "checkpoint.pth", weights_only=False)
    assert got["epoch"] == ref["epoch"] == 2
    assert [g["lr"] for g in got["optimizer"]["param_groups"]] == [g["lr"] for g in ref["optimizer"]["param_groups"]]
    for k, v in ref["backbone"].items():
        assert torch.allclose(got["backbone"][k].float(), v.float(), atol=1e-5), k


def test_resume_of_a_finished_loop_writes_the_teacher_with_the_same_probe(tmp_path):
    """The probe reuses the last kNN features; a resume that only has the teacher file left to write
    recomputes them from the checkpoint and must probe identically, and reports the checkpoint's kNN."""
    first = run(tmp_path, "--epochs", "1")
    (tmp_path / "teachers" / "resnet18_barlow_twins_digits.pth").unlink()  # killed before the teacher file
    again = run(tmp_path, "--epochs", "1", "--resume")
    assert (tmp_path / "teachers" / "resnet18_barlow_twins_digits.pth").is_file()
    assert again["linear_probe_top1"] == first["linear_probe_top1"]
    assert again["knn_top1"] == first["knn_top1"]  # kept in the checkpoint (it was null after such a resume)


def test_lr_schedule_warms_up_then_decays_to_zero():
    pc = {"lr": 0.3, "batch_size": 512, "warmup_epochs": 2, "epochs": 10}
    lrs = [pretrain.lr_at(s, 5, pc) for s in range(50)]
    assert lrs[0] == pytest.approx(0.6 / 10) and lrs[9] == pytest.approx(0.6)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] < 0.01


def test_a_teacher_of_another_width_is_a_clear_error(tmp_path):
    run(tmp_path, "--epochs", "1")
    cfg = utils.load_config(write_config(tmp_path, network__width=32))
    with pytest.raises(ValueError, match="width 16.*network.width 32"):
        utils.load_teacher(tmp_path / "teachers" / "resnet18_barlow_twins_digits.pth", cfg, torch.device("cpu"))


def test_dataset_mismatch_between_command_and_config(tmp_path):
    cfg = write_config(tmp_path)
    with pytest.raises(utils.ConfigError, match="dataset is DIGITS"):
        pretrain.main(["CIFAR10", "--config", str(cfg), "--device", "cpu", "--out", str(tmp_path)])


def test_checkpoint_frequency_is_a_config_key(tmp_path, monkeypatch):
    """pretrain.save_every=2 over 3 epochs: checkpoints after epochs 2 and 3 (the last), not after each one."""
    saved, real = [], utils.atomic_save

    def record(obj, path):
        if path.name == "checkpoint.pth":
            saved.append(obj["epoch"])
        return real(obj, path)

    monkeypatch.setattr(utils, "atomic_save", record)
    run(tmp_path, "--epochs", "3", "--pretrain.save_every=2")
    assert saved == [2, 3]
