"""All three scripts on DIGITS (8 px, short schedules), with their default output folders."""
import json

import pytest

import main_distill
import main_evaluate
import pretrain
from tiny import write_config

E2E = {  # a teacher worth distilling from, and a pre-training long enough to show it
    "pretrain__epochs": 6, "pretrain__crop_scale": [0.5, 1.0], "pretrain__flip_p": 0.0,
    "storage__m": 0, "distillation__steps": 60, "evaluation__epochs": 15, "evaluation__full_epochs": 2,
    "probe__iterations": 300,
}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """pretrain -> distill (ours and KRR-ST) -> evaluate, run in a fresh working directory."""
    work = tmp_path_factory.mktemp("e2e")
    cfg = str(write_config(work, **E2E))
    import os
    cwd = os.getcwd()
    os.chdir(work)
    try:
        pretrain.main(["DIGITS", "--config", cfg, "--device", "cpu"])
        main_distill.main(["--config", cfg, "--device", "cpu"])
        main_distill.main(["--config", cfg, "--device", "cpu", "--distillation.method=krr_st"])
        results = main_evaluate.main(["--config", cfg, "--device", "cpu", "--seeds", "2"])
    finally:
        os.chdir(cwd)
    return work, results


def test_every_row_is_present_and_written(pipeline):
    work, results = pipeline
    assert list(results) == list(main_evaluate.ROWS)
    out = work / "evaluation_models" / "digits_N10"
    saved = json.loads((out / "results.json").read_text())["rows"]
    assert set(saved) == set(main_evaluate.ROWS)
    for f in ("results.md", "config.json", "resnet18_distilled_dataset.pth", "resnet18_full_dataset.pth"):
        assert (out / f).is_file(), f
    for name in ("distilled", "krr_st", "random_subset", "no_pretraining"):
        assert len(results[name]["accs"]) == 2  # --seeds 2
    assert results["random_subset"]["storage_images"] == 10
    assert results["distilled"]["storage_floats"] <= results["random_subset"]["storage_floats"]
    assert "| distilled |" in (out / "results.md").read_text()


def test_distilled_beats_no_pretraining(pipeline):
    """The margin is measured against the random-init row of the same run."""
    _, results = pipeline
    assert results["distilled"]["mean"] > results["no_pretraining"]["mean"] + 3.0, \
        {k: r["accs"] for k, r in results.items()}


def test_evaluate_without_assets_says_which_script_to_run(tmp_path, pipeline):
    work, _ = pipeline
    cfg = str(write_config(tmp_path, **E2E))
    import os
    cwd = os.getcwd()
    os.chdir(work)
    try:
        with pytest.raises(FileNotFoundError, match="main_distill.py"):
            main_evaluate.main(["--config", cfg, "--device", "cpu", "--rows", "distilled",
                                "--assets", str(tmp_path / "nowhere"), "--out", str(tmp_path / "ev")])
        with pytest.raises(FileNotFoundError, match="pretrain.py"):
            main_evaluate.main(["--config", cfg, "--device", "cpu", "--rows", "teacher",
                                "--teacher", str(tmp_path / "none.pth"), "--out", str(tmp_path / "ev2")])
        with pytest.raises(FileExistsError):  # results are not silently replaced
            main_evaluate.main(["--config", cfg, "--device", "cpu", "--rows", "teacher"])
    finally:
        os.chdir(cwd)
