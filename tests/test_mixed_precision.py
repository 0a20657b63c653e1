"""The CUDA precision path, exercised on the CPU: bf16 autocast and channels_last inputs everywhere
models.autocast / models.to_channels_last are used. CI has no GPU, so this is where a float32/bf16
mismatch between a network output and a loss, the KRR solve or the probe would show up first."""
import json
import random
from contextlib import chdir

import pytest
import torch

import main_distill
import main_evaluate
import models
import pretrain
import utils
from tiny import write_config, write_teacher


def cpu_bf16(device, enabled=True):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled)


def test_all_three_scripts_under_bf16_autocast_and_channels_last(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "autocast", cpu_bf16)
    monkeypatch.setattr(models, "to_channels_last", lambda x, device: x.contiguous(memory_format=torch.channels_last))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the patch is live: networks really return bf16
        assert models.autocast(torch.device("cpu")).fast_dtype == torch.bfloat16
    # Small on purpose: CPUs without AVX-512 emulate bf16 arithmetic (a width-64 ResNet-18 on all 1,437 digits took
    # over 25 min here); width 8 and 320 train images exercise the same code paths and dtypes.
    cfg = str(write_config(tmp_path, network__width=8, data__train_subset=320, pretrain__epochs=2,
                           evaluation__epochs=2, probe__iterations=50))
    with chdir(tmp_path):
        teacher = pretrain.main(["DIGITS", "--config", cfg, "--device", "cpu"])
        # distill from a random-init teacher: two epochs leave BatchNorm's running statistics far from
        # converged, and that teacher's eval-mode features are ~1e4 in scale (a property of the short run)
        g = str(write_teacher(tmp_path / "random_teacher.pth", width=8,
                              train_hash=utils.load_data(utils.load_config(cfg)).fingerprint))
        distilled = main_distill.main(["--config", cfg, "--device", "cpu", "--distillation.steps=10", "--teacher", g])
        results = main_evaluate.main(["--config", cfg, "--device", "cpu", "--teacher", g, "--rows",
                                      "distilled,random_subset,full_dataset,no_pretraining"])
    run = json.loads((tmp_path / "teacher_models" / "resnet18_barlow_twins_digits_run" / "log.jsonl")
                     .read_text().splitlines()[-1])
    assert torch.isfinite(torch.tensor(run["loss"])) and 0 <= teacher["linear_probe_top1"] <= 100
    assert all(torch.isfinite(torch.tensor(loss)) for _, loss in distilled["loss_curve"])
    assert all(torch.isfinite(torch.tensor(e["relative_error"])) for e in distilled["approximation"].values())
    assert set(results) == {"distilled", "random_subset", "full_dataset", "no_pretraining"}
    assert all(r["mean"] > 20.0 for r in results.values()), {k: r["mean"] for k, r in results.items()}  # chance: 10%


def tf32_flags():
    return torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32


def test_teacher_targets_set_tf32_explicitly_and_key_their_cache_by_it(tmp_path):
    """data.target_precision decides TF32 for the teacher's pass (PyTorch's default leaves it on for cuDNN
    convs), the global flags come back afterwards, and targets of another precision are another cache file."""
    cfg = utils.load_config(write_config(tmp_path, network__width=16))
    data = utils.load_data(cfg)
    teacher = write_teacher(tmp_path / "t.pth", width=16)
    g, _ = utils.load_teacher(teacher, cfg, torch.device("cpu"), data)
    seen = []
    g.register_forward_hook(lambda m, i, o: seen.append(tf32_flags()))
    before = tf32_flags()
    for name, flags in (("float32", (False, False)), ("tf32", (True, True))):
        seen.clear()
        utils.teacher_targets(g, teacher, data, [90], {**cfg["data"], "target_precision": name}, tmp_path)
        assert seen and set(seen) == {flags} and tf32_flags() == before
    assert len(list(tmp_path.glob("targets_*_float32.pt"))) == len(list(tmp_path.glob("targets_*_tf32.pt"))) == 1


def test_outer_step_features_take_the_krr_precision_and_the_inner_step_does_not(tmp_path):
    """The KRR features (target and support passes) run with TF32 as distillation.krr_features says; the
    kernels and the solve never do; the inner step is outside both."""
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = True, False  # PyTorch's defaults
    for name, flags in (("float32", (False, False)), ("tf32", (True, True))):
        cfg = utils.load_config(write_config(tmp_path, distillation__krr_features=name, storage__m=4))
        data = utils.load_data(cfg)
        T = torch.randn(len(data.train_x), 4, 512)
        state = main_distill.build(cfg, data, T, 4, torch.device("cpu"), models.make_generator(torch.device("cpu"), 0),
                                   random.Random(0))
        seen, solves = [], []
        for f in state.pool.models:
            f.features.register_forward_hook(lambda m, i, o: seen.append(tf32_flags()))
        solve = torch.linalg.cholesky_ex
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(torch.linalg, "cholesky_ex", lambda *a: (solves.append(tf32_flags()), solve(*a))[1])
            main_distill.outer_step(state, data, T, cfg["distillation"])
        assert seen == [flags, flags, (True, False)] and solves == [(False, False)]
        assert tf32_flags() == (True, False)
