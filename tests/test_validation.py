"""Nothing read back unchecked: dataset files, run folders, kept results and recovery hints (each test fails on
the code before these checks existed)."""
import json
import re
import shlex

import numpy as np
import pytest
import torch

import main_distill
import main_evaluate
import pretrain
import utils
from conftest import make_cifar10, write_pickle
from tiny import write_config, write_teacher

CPU = ["--device", "cpu"]


# ----------------------------------------------------------------------------- dataset files
@pytest.mark.parametrize("fault, names", [
    ("width", r"data_batch_2: 'data' is uint8 of shape \(4, 3000\); expected uint8 \(n, 3072\)"),
    ("dtype", r"data_batch_2: 'data' is float64"),
    ("fewer_labels", r"data_batch_2: 'labels': 3 labels of type int64 for 4 images"),
    ("label_range", r"data_batch_2: 'labels': labels range over \[0, 10\]; expected \[0, 9\]"),
    ("negative_label", r"data_batch_2: 'labels': labels range over \[-1,"),
    ("float_labels", r"data_batch_2: 'labels'.*float64 for 4 images"),
])
def test_a_malformed_cifar10_batch_is_refused_naming_it(tmp_path, fault, names):
    """A batch of the wrong width used to be reshaped into scrambled images (labels misaligned from it on);
    labels too few or out of range passed the loader and crashed epochs later in the kNN monitor."""
    make_cifar10(tmp_path)
    path = tmp_path / "cifar-10-python" / "data_batch_2"
    data, labels = np.zeros((4, 3072), np.uint8), [0, 1, 2, 3]
    if fault == "width":
        data = np.zeros((4, 3000), np.uint8)
    elif fault == "dtype":
        data = np.zeros((4, 3072), np.float64)
    elif fault == "fewer_labels":
        labels = [0, 1, 2]
    elif fault == "label_range":
        labels = [0, 1, 2, 10]
    elif fault == "negative_label":
        labels = [0, 1, -1, 3]
    else:
        labels = [0.0, 1.5, 2.0, 3.0]
    write_pickle(path, {"batch_label": "x", "labels": labels, "data": data}, True)
    with pytest.raises(utils.DatasetError, match=names):
        utils.load_dataset("CIFAR10", tmp_path, 32)


def write_cifar100(root, n_train=6, fine=None):
    folder = root / "data" / "cifar-100-python"
    rng = np.random.default_rng(0)
    for name, n in (("train", n_train), ("test", 3)):
        labels = fine if (fine is not None and name == "train") else [int(v) for v in rng.integers(0, 100, n)]
        write_pickle(folder / name, {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "fine_labels": labels},
                     True)
    return folder


def test_cifar100_labels_are_checked_against_its_100_classes(tmp_path):
    write_cifar100(tmp_path, fine=[0, 5, 99, 100, 3, 2])
    with pytest.raises(utils.DatasetError, match=r"cifar-100-python/train: 'fine_labels': .*expected \[0, 99\]"):
        utils.load_dataset("CIFAR100", tmp_path, 32)


def test_a_decoded_cache_with_bad_labels_is_refused(tmp_path):
    """The decoded Stanford Dogs / Tiny ImageNet caches are read back through the same split check."""
    from conftest import make_dogs
    folder = make_dogs(tmp_path, per_breed=101)
    utils.load_dataset("STANFORD_DOGS", tmp_path, 8)
    cache = next(folder.glob("cache_*.pt"))
    d = torch.load(cache)
    d["test_y"] = d["test_y"] + 5  # two breeds: labels must be 0 or 1
    torch.save(d, cache)
    with pytest.raises(utils.DatasetError, match=r"STANFORD_DOGS test split .*labels range over \[5, 6\]; "
                                                 r"expected \[0, 1\]"):
        utils.load_dataset("STANFORD_DOGS", tmp_path, 8)


def test_a_cifar100_root_one_level_off_is_named_without_a_download(tmp_path, monkeypatch):
    """data.root pointing at the folder that holds cifar-100-python/ (not data/cifar-100-python/): one line that
    says where the files are and what data.root should be, and no download attempt."""
    import torchvision.datasets

    def no_download(*a, **k):
        raise AssertionError("tried to download")
    monkeypatch.setattr(torchvision.datasets, "CIFAR100", no_download)
    folder = write_cifar100(tmp_path)  # tmp/data/cifar-100-python
    with pytest.raises(utils.DatasetError, match=r"data.root must be the folder that holds data/cifar-100-python/"
                                                 r" \(here " + re.escape(str(tmp_path)) + r"\)") as e:
        utils.load_dataset("CIFAR100", folder.parent, 32)  # one level too deep
    assert e.value.__cause__ is None and e.value.__context__ is None


def test_an_offline_cifar100_failure_is_one_error_not_a_chain(tmp_path, monkeypatch):
    import torchvision.datasets

    def offline(*a, **k):
        raise OSError("no network\nsecond line of a long trace")
    monkeypatch.setattr(torchvision.datasets, "CIFAR100", offline)
    with pytest.raises(utils.DatasetError, match=r"download failed \(OSError: no network\); put the files") as e:
        utils.load_dataset("CIFAR100", tmp_path, 32)
    assert e.value.__suppress_context__ and e.value.__cause__ is None


# ----------------------------------------------------------------------------- non-finite values
@pytest.mark.parametrize("dotted, value", [("distillation.lr_image", ".inf"), ("data.target_rms", ".inf"),
                                           ("pretrain.lr", ".nan"), ("model_pool.lr", "-.inf")])
def test_non_finite_values_are_refused_by_name(tmp_path, dotted, value):
    cfg = write_config(tmp_path)
    with pytest.raises(utils.ConfigError, match=re.escape(f"{dotted}: expected a finite number")):
        utils.load_config(cfg, utils.parse_overrides([f"--{dotted}={value}"]))


def test_inf_target_rms_stops_before_the_teacher_targets(tmp_path):
    cfg = write_config(tmp_path)
    write_teacher(tmp_path / "teacher.pth")
    with pytest.raises(utils.ConfigError, match="data.target_rms: expected a finite number"):
        main_distill.main(["--config", str(cfg), "--teacher", str(tmp_path / "teacher.pth"), "--out",
                           str(tmp_path / "a"), *CPU, "--data.target_rms=.inf"])
    assert not (tmp_path / "a").exists()


# ----------------------------------------------------------------------------- one run folder, one script
def distill(tmp_path, out, *extra):
    cfg = write_config(tmp_path)
    if not (tmp_path / "teacher.pth").is_file():
        write_teacher(tmp_path / "teacher.pth")
    return main_distill.main(["--config", str(cfg), "--teacher", str(tmp_path / "teacher.pth"), "--out", str(out),
                              *CPU, "--distillation.steps=5", *extra])


def evaluate(tmp_path, out, assets, *extra):
    return main_evaluate.main(["--config", str(write_config(tmp_path)), "--assets", str(assets), "--teacher",
                               str(tmp_path / "teacher.pth"), "--out", str(out), *CPU, "--rows",
                               "distilled,no_pretraining", *extra])


def test_a_script_does_not_write_into_another_scripts_folder(tmp_path):
    """Evaluating into a distilled-set folder, or distilling into an evaluation folder, used to succeed and
    overwrite the other's config.json."""
    assets, evals = tmp_path / "assets", tmp_path / "eval"
    distill(tmp_path, assets)
    config = (assets / "config.json").read_text()
    with pytest.raises(utils.RunFolderError, match=r"assets belongs to main_distill.py \(run .*\); "
                                                   r"main_evaluate.py does not write"):
        evaluate(tmp_path, assets, assets)
    assert (assets / "config.json").read_text() == config and not (assets / "results.json").exists()
    evaluate(tmp_path, evals, assets)
    results = (evals / "results.json").read_text()
    with pytest.raises(utils.RunFolderError, match="belongs to main_evaluate.py"):
        distill(tmp_path, evals)
    with pytest.raises(utils.RunFolderError, match="belongs to main_evaluate.py"):
        distill(tmp_path, evals, "--resume")
    with pytest.raises(utils.RunFolderError, match="belongs to main_evaluate.py"):
        utils.RunFolder(evals, "pretrain.py").check(False, False)
    assert (evals / "results.json").read_text() == results and not (evals / "distilled_data.pth").exists()
    distill(tmp_path, evals, "--overwrite")  # the same --overwrite semantics: moved aside, then written
    assert (evals / "distilled_data.pth").is_file() and list(tmp_path.glob("eval.replaced-*/results.json"))


def test_a_start_killed_before_its_first_checkpoint_has_nothing_to_resume_and_frees_its_folder(tmp_path, monkeypatch):
    """A run killed before its first checkpoint: --resume is refused (nothing to continue; run without it), and the
    folder is free again for a plain rerun (issue 36; it used to be refused too)."""
    out = tmp_path / "assets"
    with monkeypatch.context() as m:
        m.setattr(main_distill, "outer_step", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
        with pytest.raises(KeyboardInterrupt):
            distill(tmp_path, out)
    assert json.loads((out / utils.OWNER_FILE).read_text())["script"] == "main_distill.py"
    with pytest.raises(utils.MissingInput, match="no checkpoint .* nothing to continue; run without --resume"):
        distill(tmp_path, out, "--resume")
    distill(tmp_path, out)
    assert (out / "distilled_data.pth").is_file()


def test_a_corrupt_owner_record_is_refused(tmp_path):
    out = tmp_path / "assets"
    out.mkdir()
    (out / utils.OWNER_FILE).write_text("{not json")
    with pytest.raises(utils.RunFolderError, match=r"owner.json is not a run folder's owner record"):
        distill(tmp_path, out)


def test_a_refused_evaluate_resume_writes_nothing(tmp_path):
    """The refused --resume used to rewrite config.json with the refused settings before the check."""
    assets, out = tmp_path / "assets", tmp_path / "eval"
    distill(tmp_path, assets)
    evaluate(tmp_path, out, assets)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(ValueError, match=r"another config or target \(changed: probe.iterations\)"):
        evaluate(tmp_path, out, assets, "--resume", "--probe.iterations=7")
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert after == before
    # a distilled set of another teacher is refused before the new evaluation folder exists
    other = write_teacher(tmp_path / "other_teacher.pth", seed=1)
    with pytest.raises(ValueError, match="distilled from other inputs than this evaluation uses: teacher"):
        main_evaluate.main(["--config", str(write_config(tmp_path)), "--assets", str(assets), "--teacher", str(other),
                            "--out", str(tmp_path / "eval2"), *CPU, "--rows", "distilled,no_pretraining"])
    assert not (tmp_path / "eval2").exists()


# ----------------------------------------------------------------------------- kept results read back
@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """A distilled set and its evaluation folder, made once; each test works on a copy."""
    work = tmp_path_factory.mktemp("evaluated")
    distill(work, work / "assets")
    evaluate(work, work / "eval", work / "assets")
    return work


@pytest.mark.parametrize("corrupt, names", [
    (lambda s: "{ not json", r"JSONDecodeError"),
    (lambda s: json.dumps([1, 2]), r"expected a mapping with 'config', 'derived' and 'cells'"),
    (lambda s: json.dumps({**s, "cells": {"distilled": {"0": {**s["cells"]["distilled"]["0"], "probe": "high"}}}}),
     r"cells.distilled.0.probe = 'high': expected a finite number >= 0.0 <= 100.0"),
    (lambda s: json.dumps({**s, "cells": {"distilled": {"0": {**s["cells"]["distilled"]["0"], "probe": 140.0}}}}),
     r"cells.distilled.0.probe = 140.0"),
    (lambda s: json.dumps({**s, "cells": {"distilled": {"0": {**s["cells"]["distilled"]["0"], "steps": None}}}}),
     r"cells.distilled.0.steps = None: expected a count"),
    (lambda s: json.dumps({**s, "cells": {"bogus_row": {}}}), r"cells.bogus_row: expected one of the rows"),
    (lambda s: json.dumps({**s, "derived": {"target": 3}}), r"derived.target"),
])
def test_a_broken_results_json_is_refused_naming_it(evaluated, tmp_path, corrupt, names):
    """It used to raise a raw JSONDecodeError / TypeError / AttributeError without the file's name."""
    import shutil
    shutil.copytree(evaluated, tmp_path, dirs_exist_ok=True)
    assets, out = tmp_path / "assets", tmp_path / "eval"
    for folder in (assets, out):
        (folder / utils.LOCK_FILE).unlink(missing_ok=True)
    path = out / "results.json"
    path.write_text(corrupt(json.loads(path.read_text())))
    with pytest.raises(ValueError, match=re.escape(str(path)) + " is not a results.json written by "
                                         "main_evaluate.py: .*" + names):
        evaluate(tmp_path, out, assets, "--resume")


def test_a_corrupt_log_line_is_named_on_resume(tmp_path, monkeypatch):
    out = tmp_path / "assets"
    distill(tmp_path, out)
    with open(out / "log.jsonl", "a") as f:
        f.write("{truncated\n")
    with pytest.raises(ValueError, match=r"log.jsonl, line \d+: not a log row of this run"):
        distill(tmp_path, out, "--resume", "--distillation.steps=10", "--allow-changed", "distillation.steps")


def test_a_checkpoint_of_another_device_kind_is_refused_by_name(tmp_path):
    """A CPU checkpoint resumed with a CUDA generator (or the reverse) used to fail in set_state with an
    opaque size error; here a CUDA-kind record meets a CPU generator."""
    gen = torch.Generator().manual_seed(0)
    state = utils.rng_state(gen)
    assert state["device"] == "cpu"
    utils.set_rng_state(state, gen)
    with pytest.raises(ValueError, match=r"ckpt.pth was written by a run on cuda, this run is on cpu: resume it on "
                                         r"the same kind of device \(--device cuda\)"):
        utils.set_rng_state({**state, "device": "cuda"}, gen, "ckpt.pth")


# ----------------------------------------------------------------------------- recovery hints that work
def hint_command(message):
    """The command between backticks in a NaN stop's message, as an argv list (it runs as printed)."""
    command = re.search(r"`([^`]+)`", message).group(1)
    argv = shlex.split(command)
    assert argv[0] == "python"
    return argv[1], argv[2:]


def test_the_distillation_nan_hint_reproduces_the_command_and_resumes(tmp_path, monkeypatch):
    """The printed hint used to drop --out, --device and --teacher, and fail with 'no checkpoint'."""
    real_step, calls = main_distill.outer_step, []

    def nan_at_step_8(*a, **k):
        calls.append(1)
        loss = real_step(*a, **k)
        return loss * float("nan") if len(calls) == 8 else loss

    monkeypatch.setattr(main_distill, "outer_step", nan_at_step_8)
    cfg = write_config(tmp_path)
    write_teacher(tmp_path / "teacher.pth")
    argv = ["--config", str(cfg), "--teacher", str(tmp_path / "teacher.pth"), "--out", str(tmp_path / "my run"),
            *CPU, "--distillation.steps=12", "--distillation.save_every=5", "--distillation.log_every=4",
            "--distillation.lr_image=0.05"]
    with pytest.raises(utils.RunStopped) as e:
        main_distill.main(argv)
    script, hinted = hint_command(str(e.value))
    assert script == "main_distill.py"
    for flag in ("--out", "--teacher", "--device", "--distillation.steps=12", "--resume"):
        assert any(a == flag or a.startswith(flag) for a in hinted), (flag, hinted)
    lowered = [a for a in hinted if a.startswith("--distillation.lr_") and a.split("=")[0] in str(e.value)]
    assert len(lowered) == 1 and "--distillation.lr_image=0.05" not in hinted  # one group's rate, a tenth of it
    monkeypatch.setattr(main_distill, "outer_step", real_step)
    metrics = main_distill.main(hinted)  # the hint as printed
    assert metrics["steps"] == 12
    ckpt = torch.load(tmp_path / "my run" / "checkpoint.pth", weights_only=False)
    key, value = lowered[0][2:].split("=")
    assert ckpt["config"]["distillation"][key.split(".")[1]] == float(value)


def test_the_teacher_nan_hint_without_a_checkpoint_starts_afresh(tmp_path, monkeypatch):
    """NaN before the first checkpoint: the hint restarts the run (--overwrite), with every flag kept."""
    import models
    real_loss = models.barlow_twins_loss
    monkeypatch.setattr(models, "barlow_twins_loss", lambda *a, **k: real_loss(*a, **k) * float("nan"))
    argv = ["DIGITS", "--config", str(write_config(tmp_path)), "--out", str(tmp_path / "t"), *CPU, "--epochs", "1"]
    with pytest.raises(utils.RunStopped) as e:
        pretrain.main(argv)
    script, hinted = hint_command(str(e.value))
    assert script == "pretrain.py" and "--overwrite" in hinted and "--resume" not in hinted
    assert hinted[:hinted.index("--overwrite")] == argv
    monkeypatch.setattr(models, "barlow_twins_loss", real_loss)
    assert pretrain.main(hinted)["epochs"] == 1
