"""main_evaluate.py's parts: the random-init row's BatchNorm statistics and resuming by (row, seed) cells."""
import json

import pytest
import torch

import main_evaluate
import models
import utils
from tiny import write_config, write_teacher


@pytest.fixture(scope="module")
def digits():
    return utils.load_dataset("DIGITS", "data", 8)


def test_recalibrated_statistics_are_the_train_splits_own(digits):
    """After recalibrate_bn the first BatchNorm holds the exact mean and (unbiased) variance of its input over the
    whole train split, the weights are untouched and the momentum is restored."""
    torch.manual_seed(0)
    net = models.student("vgg11_bn", 16, 8)[0]
    before = {k: v.clone() for k, v in net.state_dict().items() if "running" not in k and "num_batches" not in k}
    main_evaluate.recalibrate_bn(net, digits, batch_size=1347)  # one batch: the running variance is the unbiased one
    conv, bn = net[0][0], net[0][1]
    with torch.no_grad():
        h = conv(utils.normalize(digits.train_x, digits.mean, digits.std))
    torch.testing.assert_close(bn.running_mean, h.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bn.running_var, h.transpose(0, 1).flatten(1).var(1), rtol=1e-4, atol=1e-5)
    assert bn.momentum == 0.1 and not net.training
    for k, v in net.state_dict().items():
        if k in before:
            assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("name", ["vgg11_bn", "alexnet"])
def test_recalibration_makes_a_random_students_features_readable(name, digits):
    """What evaluation.random_init_bn: recalibrate is for: in eval mode at the initial BatchNorm statistics a random
    VGG-11 gives features of scale ~1e-6 (AlexNet ~1e-3) that the SGD probe reads at chance; with statistics from
    the train split they are of order 0.5 and probe far above it. Measured (DIGITS, width 16, 1,000 probe
    iterations): vgg11_bn 10.2 -> 61.6, alexnet 10.2 -> 79.8. It is not the default because it does not help every
    student: mobilenetv2 10.2 -> 15.6, and resnet18 falls 79.1 -> 54.9 (README, Other students)."""
    torch.manual_seed(0)
    net = models.student(name, 16, 8)[0].eval()
    probe = {"iterations": 200, "batch_size": 512, "lr": 0.2, "momentum": 0.9, "weight_decay": 0.0,
             "labels_per_class": 0}
    init = utils.split_features(net, digits, 512)
    recal = utils.split_features(main_evaluate.recalibrate_bn(net, digits, 512), digits, 512)
    assert init[0].std(0).mean() < 1e-2 < 0.1 < recal[0].std(0).mean()
    acc_init = utils.probe_backbone(net, digits, probe, 0, 512, features=init)
    acc_recal = utils.probe_backbone(net, digits, probe, 0, 512, features=recal)
    assert acc_recal > acc_init + 30, (acc_init, acc_recal)


def test_the_no_pretraining_row_follows_random_init_bn(tmp_path):
    """The no_pretraining row of a VGG-11 student probes at chance with its initial BatchNorm statistics and far
    above it with recalibrated ones."""
    cfg = str(write_config(tmp_path, probe__iterations=200, evaluation__student="vgg11_bn", network__width=16))
    teacher = str(write_teacher(tmp_path / "teacher.pth", width=16))
    acc = {}
    for bn in ("init", "recalibrate"):
        r = main_evaluate.main(["--config", cfg, "--teacher", teacher, "--device", "cpu", "--rows", "no_pretraining",
                                f"--evaluation.random_init_bn={bn}", "--out", str(tmp_path / bn)])
        acc[bn] = r["no_pretraining"]["mean"]
    assert acc["init"] < 15 and acc["recalibrate"] > acc["init"] + 30, acc


def count_calls(monkeypatch, name, fail_on=None):
    """Count the calls of main_evaluate's <name> (its own, else utils'); raise on call number `fail_on`."""
    module = main_evaluate if hasattr(main_evaluate, name) else utils
    calls, real = [], getattr(module, name)

    def wrapped(*args, **kwargs):
        calls.append(args[3])  # the seed: probe_backbone(g, data, probe, seed, ...), finetune(g, data, ft, seed, ...)
        if len(calls) == fail_on:
            raise KeyboardInterrupt("killed mid-row")
        return real(*args, **kwargs)
    monkeypatch.setattr(module, name, wrapped)
    return calls


@pytest.fixture
def setting(tmp_path):
    cfg = str(write_config(tmp_path, probe__iterations=30, finetune__iterations=5, network__width=16))
    teacher = str(write_teacher(tmp_path / "teacher.pth", width=16))
    return ["--config", cfg, "--teacher", teacher, "--device", "cpu", "--rows", "teacher,no_pretraining",
            "--out", str(tmp_path / "ev")], tmp_path / "ev" / "results.json"


def test_resume_runs_only_the_missing_seeds_and_protocols(setting, monkeypatch):
    """Cells are (row, seed) and hold each protocol's numbers: more seeds, then another protocol, each run only
    what is missing; the finished cells' numbers are kept as they were."""
    common, results = setting
    first = main_evaluate.main(common + ["--seeds", "1", "--resume"])  # nothing to resume yet: every cell runs
    probes, finetunes = count_calls(monkeypatch, "probe_backbone"), count_calls(monkeypatch, "finetune")
    more = main_evaluate.main(common + ["--seeds", "2", "--resume"])
    assert probes == [1] and finetunes == []  # only no_pretraining's seed 1; the teacher row has one seed
    assert more["no_pretraining"]["accs"][0] == first["no_pretraining"]["accs"][0]
    both = main_evaluate.main(common + ["--seeds", "2", "--protocol", "both", "--resume"])
    assert probes == [1] and sorted(finetunes) == [0, 0, 1]  # teacher seed 0, no_pretraining seeds 0 and 1
    assert both["no_pretraining"]["accs"] == more["no_pretraining"]["accs"]
    assert all(v is not None for v in both["no_pretraining"]["finetunes"])
    main_evaluate.main(common + ["--seeds", "2", "--protocol", "both", "--resume"])
    assert probes == [1] and sorted(finetunes) == [0, 0, 1]  # nothing left to run
    assert json.loads(results.read_text())["complete"]


def test_a_run_killed_mid_row_keeps_its_finished_cells(setting, monkeypatch):
    """Cells are saved as each ends: a run killed in a row's second seed resumes at that seed."""
    common, results = setting
    calls = count_calls(monkeypatch, "probe_backbone", fail_on=2)  # no_pretraining s0, then killed in its s1
    with pytest.raises(KeyboardInterrupt):
        main_evaluate.main(common + ["--seeds", "3"])
    saved = json.loads(results.read_text())
    assert not saved["complete"] and set(saved["cells"]["no_pretraining"]) == {"0"}
    monkeypatch.undo()
    calls = count_calls(monkeypatch, "probe_backbone")
    done = main_evaluate.main(common + ["--seeds", "3", "--resume"])
    assert sorted(calls) == [0, 1, 2] and len(done["no_pretraining"]["accs"]) == 3  # its s1 and s2, the teacher's s0


def test_resume_refuses_another_config_or_target(setting):
    common, _ = setting
    main_evaluate.main(common)
    with pytest.raises(ValueError, match="another config.*probe.iterations"):
        main_evaluate.main(common + ["--resume", "--probe.iterations=7"])


def table_row(mean, std=0.0):
    return {"mean": mean, "std": std, "fit_mean": 0.5, "fit_std": 0.0, "finetune_mean": None, "finetune_std": None,
            "seeds": 3, "steps": 10, "storage_floats": 100, "time_s": 1.0}


def test_gain_recovered_is_blank_when_the_full_dataset_is_within_noise_of_random_init():
    """DIGITS' full dataset beats random init by 0.2 points: a ratio over that printed -250% and 150% gains."""
    budget = {"floats_per_image": 10, "budget": 1000}
    close = main_evaluate.summarize({"distilled": table_row(95.3), "full_dataset": table_row(94.7),
                                     "no_pretraining": table_row(94.5, 0.4)}, budget)
    assert close["distilled"]["gain_recovered"] is None
    noisy = main_evaluate.summarize({"distilled": table_row(40.0), "full_dataset": table_row(33.0),
                                     "no_pretraining": table_row(30.0, 2.0)}, budget)  # margin 3 < 2 x std 2
    assert noisy["distilled"]["gain_recovered"] is None
    clear = main_evaluate.summarize({"distilled": table_row(39.0), "full_dataset": table_row(42.0),
                                     "no_pretraining": table_row(30.0, 0.5)}, budget)
    assert clear["distilled"]["gain_recovered"] == pytest.approx(0.75)


def test_the_table_leaves_out_the_columns_of_protocols_that_did_not_run():
    results = main_evaluate.summarize({"distilled": table_row(39.0)}, {"floats_per_image": 10, "budget": 1000})
    probe = main_evaluate.markdown(results, "h", ["probe"])
    assert "| top-1 (%) | teacher fit R² |" in probe and "fine-tune" not in probe.split("\n")[2]
    results["distilled"].update(finetune_mean=50.0, finetune_std=0.1)
    finetune = main_evaluate.markdown(results, "h", ["finetune"])
    header = finetune.split("\n")[2]
    assert "fine-tune top-1 (%)" in header and "teacher fit" not in header and "| 50.00 ± 0.10 |" in finetune


def test_the_cpu_batch_layout_keeps_a_students_gradients_repeatable():
    """random_crop_flip returns a channels_last-strided batch. On torch 2.14.1's CPU the backward of a 1x1 stride-2
    convolution (each ResNet-18 downsample) on that layout gave other weight gradients from run to run (101 of 200
    runs on 2 threads) and corrupted the heap on 1 thread; models.to_channels_last hands the CPU contiguous batches."""
    n = torch.get_num_threads()
    torch.set_num_threads(2)  # where the kernel split its work between threads and differed
    try:
        x = main_evaluate.random_crop_flip(torch.randn(8, 4, 8, 8, generator=torch.Generator().manual_seed(0)), 1,
                                   torch.Generator().manual_seed(0))
        x = models.to_channels_last(x, torch.device("cpu"))
        conv = torch.nn.Conv2d(4, 8, 1, stride=2, bias=False)
        grads = []
        for _ in range(20):
            conv.zero_grad()
            conv(x).pow(2).mean().backward()
            grads.append(conv.weight.grad.clone())
    finally:
        torch.set_num_threads(n)
    assert all(torch.equal(g, grads[0]) for g in grads)


def test_the_low_label_probe_trains_on_k_labels_of_each_class(digits, monkeypatch):
    """probe.labels_per_class = k: the probe's train split is k images of every class (stratified), the same
    draw whatever the run's seed or the global random state, nested (the 3 labelled images of a class are among its
    5: a curve over k adds labels); 0 is every label. The probe itself sees exactly those features and labels."""
    y, C = digits.train_y, digits.num_classes
    torch.manual_seed(1)
    idx = utils.labelled_subset(y, C, 5)
    torch.manual_seed(2)
    assert torch.equal(utils.labelled_subset(y, C, 5), idx)  # a fixed draw
    assert len(idx.unique()) == len(idx) == 5 * C and torch.equal(torch.bincount(y[idx], minlength=C), torch.full((C,), 5))
    three = utils.labelled_subset(y, C, 3)
    assert torch.equal(torch.bincount(y[three], minlength=C), torch.full((C,), 3))
    assert set(three.tolist()) < set(idx.tolist())
    assert torch.equal(utils.labelled_subset(y, C, 0), torch.arange(len(y)))
    with pytest.raises(utils.ConfigError, match="probe.labels_per_class = 1000: class"):
        utils.labelled_subset(y, C, 1000)
    seen = []
    monkeypatch.setattr(utils, "linear_probe", lambda f, fy, *a: seen.append((f, fy)) or 0.0)
    feats = (torch.arange(len(y), dtype=torch.float32)[:, None], torch.zeros(len(digits.test_y), 1))
    probe = {"labels_per_class": 5}
    for seed in (0, 3):
        utils.probe_backbone(None, digits, probe, seed, 512, features=feats)
    for f, fy in seen:  # the rows of exactly the drawn images, with their own labels, for every seed
        assert torch.equal(f[:, 0].long(), idx) and torch.equal(fy, y[idx])
