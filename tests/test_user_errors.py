"""Every user error reaches the user as one line, `<script>: error: <message>` on stderr with exit code 2 (as
argparse does), never a traceback; the scripts run as a user runs them (a subprocess per case)."""
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

import models
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
    one_line_error(p, "pretrain.py", "CIFAR-10 not found at", str(tmp_path / "nowhere"), "download failed")
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


def test_a_device_torch_cannot_run_here_is_one_line_naming_the_flag(tmp_path):
    """--device mps / meta / xla used to end in torch's traceback (only cuda* was checked); cpu:1 is the CPU."""
    import torch
    for name in ("mps", "meta", "xla", "gpu", "cuda:x", "cuda:99"):
        with pytest.raises(utils.UserError, match=rf"^--device {name}: expected cpu"):
            utils.get_device(name)
    assert utils.get_device("cpu:1").type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(utils.UserError, match="--device cuda: expected cpu .torch sees no CUDA device here"):
            utils.get_device("cuda")
    p = subprocess.run([sys.executable, str(REPO / "main_distill.py"), "--config", str(write_config(tmp_path)),
                        "--device", "mps"], cwd=tmp_path, capture_output=True, text=True)
    one_line_error(p, "main_distill.py", "--device mps: expected cpu")


def test_a_config_not_in_utf8_is_one_line_naming_the_file_and_the_encoding(tmp_path):
    """A config saved as UTF-16 or with a Latin-1 comment ended in UnicodeDecodeError, the file not named; UTF-8 with
    a byte-order mark is read as it is."""
    text = write_config(tmp_path).read_text() + "# café\n"
    (tmp_path / "bom.yaml").write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert utils.load_config(tmp_path / "bom.yaml") == utils.load_config(write_config(tmp_path))
    for name, raw, why in (("utf16.yaml", text.encode("utf-16"), "it holds NUL bytes, as UTF-16 text does"),
                           ("latin1.yaml", text.encode("latin-1"), f"byte 0xe9 on line {text.count(chr(10))} is not")):
        (tmp_path / name).write_bytes(raw)
        p = run("pretrain.py", "DIGITS", "--config", tmp_path / name, cwd=tmp_path)
        one_line_error(p, "pretrain.py", f"{tmp_path / name} is not UTF-8 text: {why}", "save it as UTF-8")


def stop(script, args, signum, ready, cwd):
    """Start `script`, send `signum` once the file `ready` exists; (exit code, the last line on stderr, stderr)."""
    p = subprocess.Popen([sys.executable, str(REPO / script), *map(str, args), "--device", "cpu"], cwd=cwd,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"},  # SIGINT as in a terminal: a suite started
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # in the background ignores it
    while not ready.exists():
        assert p.poll() is None, p.stderr.read()
        time.sleep(0.02)
    p.send_signal(signum)
    err = p.communicate(timeout=120)[1]
    assert "Traceback" not in err, err[-3000:]
    return p.returncode, [line for line in err.splitlines() if line.strip()][-1], err  # (splitlines: tqdm's \r too)


def resumed(line, script):
    """The command between backquotes of a stop's line, as argv for main() (it runs in REPO as `python <script>`)."""
    argv = shlex.split(line.split("`")[1])
    assert argv[:2] == ["python", script] and argv[-1] == "--resume", argv
    return argv[2:]


def test_sigint_and_sigterm_stop_with_one_line_and_the_printed_resume_continues(tmp_path):
    """Ctrl-C used to end in an 18-25 line KeyboardInterrupt traceback, SIGTERM in none at all; now each is one line
    naming where the run was, what is kept and the exact --resume command, exit 128 + the signal number."""
    import main_distill
    import main_evaluate
    import pretrain
    cfg, teacher = write_config(tmp_path, pretrain__save_every=1), write_teacher(tmp_path / "t.pth")
    code, line, _ = stop("main_distill.py", ["--config", cfg, "--teacher", teacher, "--out", tmp_path / "a",
                                             "--distillation.steps=600", "--distillation.save_every=10"],
                         signal.SIGINT, tmp_path / "a" / "checkpoint.pth", tmp_path)
    assert code == 130 and re.fullmatch(r"main_distill.py: error: stopped by SIGINT at outer step \d+; "
                                        rf"{tmp_path / 'a' / 'checkpoint.pth'} is kept .*`", line), line
    assert main_distill.main(resumed(line, "main_distill.py"))["steps"] == 600  # as printed
    code, line, _ = stop("pretrain.py", ["DIGITS", "--config", cfg, "--out", tmp_path / "t", "--epochs", "300"],
                         signal.SIGTERM, tmp_path / "t" / "resnet18_barlow_twins_digits_run" / "checkpoint.pth", tmp_path)
    assert code == 143 and re.fullmatch(r"pretrain.py: error: stopped by SIGTERM at epoch \d+; .*checkpoint.pth is "
                                        r"kept \(nothing after it was saved\): continue with `python pretrain.py .*`",
                                        line), line
    code, line, _ = stop("main_evaluate.py", ["--config", cfg, "--teacher", teacher, "--out", tmp_path / "e", "--rows",
                                              "no_pretraining", "--seeds", "4"],
                         signal.SIGINT, tmp_path / "e" / "results.json", tmp_path)
    assert code == 130 and f"at the cell no_pretraining seed" in line and "results.json is kept" in line, line
    assert len(main_evaluate.main(resumed(line, "main_evaluate.py"))["no_pretraining"]["accs"]) == 4


def test_a_second_signal_while_stopping_does_not_break_the_line(monkeypatch, capsys):
    """`pkill` of a make recipe sent SIGTERM twice: the second, arriving while the first stop's line was written,
    ended in a Terminated traceback. Once stopping, further SIGINT / SIGTERM are ignored."""
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def again(script):
        os.kill(os.getpid(), signal.SIGTERM)  # the second signal, while the line is made
        return "no checkpoint was written"
    monkeypatch.setattr(utils, "_kept", again)
    monkeypatch.setattr(utils, "RUN", {})  # (an earlier test's loop position)
    try:
        with pytest.raises(SystemExit) as e:
            utils.cli(lambda: (_ for _ in ()).throw(KeyboardInterrupt()), "main_distill.py")
    finally:
        for sig, h in handlers.items():
            signal.signal(sig, h)
    err = capsys.readouterr().err.splitlines()
    assert e.value.code == 130 and err == ["main_distill.py: error: stopped by SIGINT; no checkpoint was written"]


def test_a_value_no_step_of_the_run_would_read_is_refused(tmp_path):
    """Each of these was accepted and silently ignored: --allow-changed without --resume, or naming no config key;
    --krr-assets / --retrain-full / --assets when no row to run reads them; a snapshot step past the last step;
    finetune.crop_pad (unchecked, unlike evaluation.crop_pad: a traceback mid-table)."""
    import main_distill
    import main_evaluate
    distill = ["--config", str(write_config(tmp_path)), "--teacher", str(write_teacher(tmp_path / "t.pth")),
               "--out", str(tmp_path / "a"), "--device", "cpu"]
    for extra, expected in ((["--allow-changed", "distillation.steps"], "--allow-changed acts only with --resume"),
                            (["--resume", "--allow-changed", "distillation.stepz"],
                             r"--allow-changed: unknown config keys \['distillation.stepz'\]"),
                            (["--distillation.snapshot_steps=[10,60]"], r"snapshot_steps \[60\]: after the last of "
                                                                        "distillation.steps = 50, never written"),
                            (["--finetune.crop_pad=8"], "finetune.crop_pad = 8: expected < data.resolution")):
        with pytest.raises(utils.ConfigError, match=expected):
            main_distill.main(distill + extra)
    evaluate = ["--config", str(write_config(tmp_path)), "--teacher", str(tmp_path / "t.pth"), "--device", "cpu",
                "--out", str(tmp_path / "e")]
    for extra, flag in ((["--krr-assets", "k", "--rows", "distilled"], "--krr-assets"),
                        (["--retrain-full", "--rows", "teacher"], "--retrain-full"),
                        (["--assets", "a", "--rows", "teacher,no_pretraining"], "--assets")):
        with pytest.raises(utils.ConfigError, match=f"{flag}: read by the rows .* none of them runs"):
            main_evaluate.main(evaluate + extra)
    cfg = utils.load_config(write_config(tmp_path))
    for extra, kept in (([], False), (["--krr-assets", "k"], True)):  # a missing set given by flag: read, not skipped
        args = main_evaluate.parse_args(evaluate + extra)[0]
        ev = main_evaluate.Inputs(args, cfg, models.Ranks(), torch.device("cpu"), tmp_path / "e", args.rows, [0],
                                  tmp_path / "a", tmp_path / "k")
        rows = main_evaluate.available_rows(ev)
        assert ("krr_st" in rows) == kept, rows
    assert not (tmp_path / "a").exists() and not (tmp_path / "e").exists()
