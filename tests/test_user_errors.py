"""Every user error reaches the user as one line, `<script>: error: <message>` on stderr with exit code 2 (as
argparse does), never a traceback; the scripts run as a user runs them (a subprocess per case)."""
import json
import subprocess
import sys

import pytest
import yaml

import utils
from tiny import REPO, write_config, write_teacher


def run(script, *args, cwd):
    return subprocess.run([sys.executable, str(REPO / script), *map(str, args), "--device", "cpu"], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def one_line_error(p, script, *expected):
    """The run failed with exit 2 and one line on stderr naming the script and each of `expected`."""
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    assert "Traceback" not in p.stderr and len(lines) == 1, p.stderr[-2000:]
    assert lines[0].startswith(f"{script}: error: "), lines[0]
    for text in expected:
        assert text in lines[0], (text, lines[0])
    return lines[0]


def test_a_config_value_out_of_range(tmp_path):
    """The issue's example: a traceback through load_config and check_ranges used to end in this message."""
    p = run("main_distill.py", "--config", REPO / "configs" / "digits.yaml", "--storage.m=-3", cwd=tmp_path)
    one_line_error(p, "main_distill.py", "configs/digits.yaml: storage.m = -3: expected >= 0")


def test_an_unknown_override_and_a_key_written_twice(tmp_path):
    p = run("pretrain.py", "DIGITS", "--config", write_config(tmp_path), "--pretrain.epoch=3", cwd=tmp_path)
    one_line_error(p, "pretrain.py", "unknown key 'pretrain.epoch'")
    twice = tmp_path / "twice.yaml"
    twice.write_text(write_config(tmp_path).read_text() + "seed: 3\n")
    p = run("pretrain.py", "DIGITS", "--config", twice, cwd=tmp_path)
    one_line_error(p, "pretrain.py", str(twice), "key 'seed' is written twice")


def test_a_missing_dataset(tmp_path):
    cfg = yaml.safe_load((REPO / "configs" / "cifar10_cpu.yaml").read_text())
    cfg["data"]["root"] = str(tmp_path / "nowhere")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    p = run("pretrain.py", "CIFAR10", "--config", tmp_path / "c.yaml", "--out", tmp_path / "t", cwd=tmp_path)
    one_line_error(p, "pretrain.py", "CIFAR-10 folder not found", str(tmp_path / "nowhere"))
    assert not (tmp_path / "t").exists()  # refused before anything was written


def test_another_scripts_run_folder_and_a_resume_with_nothing_to_resume(tmp_path):
    cfg = write_config(tmp_path)
    folder = tmp_path / "assets"
    folder.mkdir()
    (folder / utils.OWNER_FILE).write_text(json.dumps({"script": "main_distill.py", "run_id": "r1"}))
    (folder / "distilled_data.pth").write_text("x")
    p = run("main_evaluate.py", "--config", cfg, "--out", folder, cwd=tmp_path)
    one_line_error(p, "main_evaluate.py", "belongs to main_distill.py")
    p = run("main_distill.py", "--config", cfg, "--teacher", write_teacher(tmp_path / "t.pth"), "--resume", "--out",
            tmp_path / "new", cwd=tmp_path)
    line = one_line_error(p, "main_distill.py", "no checkpoint", "run without --resume")
    assert not (tmp_path / "new").exists()


def test_a_file_that_is_not_a_teacher(tmp_path):
    bad = tmp_path / "teacher.pth"
    bad.write_bytes(b"not a checkpoint")
    p = run("main_distill.py", "--config", write_config(tmp_path), "--teacher", bad, "--out", tmp_path / "a",
            cwd=tmp_path)
    one_line_error(p, "main_distill.py", str(bad), "could not be read as a teacher file")


def test_a_bug_keeps_its_traceback(tmp_path):
    """Only the project's own errors are shortened: anything else is a bug and shows where it happened."""
    code = ("import sys, utils\n"
            "def main():\n    raise KeyError('a bug')\n"
            "utils.cli(main, 'x.py')\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert p.returncode == 1 and "Traceback" in p.stderr and "KeyError" in p.stderr


def test_no_cuda_is_one_line(tmp_path):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    p = subprocess.run([sys.executable, str(REPO / "pretrain.py"), "DIGITS", "--config", str(write_config(tmp_path)),
                        "--device", "cuda", "--out", str(tmp_path / "t")], cwd=tmp_path, capture_output=True, text=True)
    one_line_error(p, "pretrain.py", "--device cuda", "no CUDA device")
