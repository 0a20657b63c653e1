"""The CUDA precision path, exercised on the CPU: bf16 autocast and channels_last inputs everywhere
utils.autocast / utils.to_channels_last are used. CI has no GPU, so this is where a float32/bf16
mismatch between a network output and a loss, the KRR solve or the probe would show up first."""
import json
from contextlib import chdir

import torch

import main_distill
import main_evaluate
import pretrain
import utils
from tiny import write_config, write_teacher


def cpu_bf16(device, enabled=True):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled)


def test_all_three_scripts_under_bf16_autocast_and_channels_last(tmp_path, monkeypatch):
    monkeypatch.setattr(utils, "autocast", cpu_bf16)
    monkeypatch.setattr(utils, "to_channels_last", lambda x, device: x.contiguous(memory_format=torch.channels_last))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the patch is live: networks really return bf16
        assert utils.autocast(torch.device("cpu")).fast_dtype == torch.bfloat16
    cfg = str(write_config(tmp_path, pretrain__epochs=2, evaluation__epochs=2, probe__iterations=50))
    with chdir(tmp_path):
        teacher = pretrain.main(["DIGITS", "--config", cfg, "--device", "cpu"])
        # distill from a random-init teacher: two epochs leave BatchNorm's running statistics far from
        # converged, and that teacher's eval-mode features are ~1e4 in scale (a property of the short run)
        g = str(write_teacher(tmp_path / "random_teacher.pth"))
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
