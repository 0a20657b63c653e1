"""The user-facing checker test_stanford_dogs.py on a tiny tree and on a missing folder."""
import test_stanford_dogs as checker
import utils
from conftest import make_dogs, write_mat_list


def test_checker_fallback_tree(tmp_path, capsys):
    n = utils.DOGS_TRAIN_PER_BREED
    make_dogs(tmp_path, per_breed=n + 1, breeds=2, size=[(40, 30), (30, 50)])
    assert checker.main(["--root", str(tmp_path), "--resolution", "16", "--sample", "3"]) == 0
    out = capsys.readouterr().out
    assert "breeds: 2" in out and "WARNING" in out and "120" in out
    assert f"train images: {2 * n}, test images: 2" in out and "fallback" in out
    assert f"train images per breed: min {n}, max {n}" in out and "test images per breed: min 1, max 1" in out
    assert out.count("decoded ") == 3 and "40x30 -> (3, 16, 16)" in out and "OK" in out


def test_checker_missing_image(tmp_path, capsys):
    folder = make_dogs(tmp_path, per_breed=2, breeds=1)
    write_mat_list(folder / "train_list.mat", ["n00000000-Breed0/n00000000_0000.jpg"])
    write_mat_list(folder / "test_list.mat", ["n00000000-Breed0/lost.jpg"])
    assert checker.main(["--root", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "official" in out and "lost.jpg" in out and utils.DOGS_LAYOUT in out


def test_checker_missing_folder(tmp_path, capsys):
    assert checker.main(["--root", str(tmp_path / "nowhere")]) == 1
    out = capsys.readouterr().out
    assert str(tmp_path / "nowhere" / "stanford-dogs" / "images" / "Images") in out
    assert utils.DOGS_LAYOUT in out


def test_checker_corrupt_image(tmp_path, capsys):
    folder = make_dogs(tmp_path, per_breed=2, breeds=1)
    bad = folder / "images" / "Images" / "n00000000-Breed0" / "n00000000_0000.jpg"
    bad.write_bytes(b"not a jpeg")
    assert checker.main(["--root", str(tmp_path), "--sample", "1"]) == 1
    out = capsys.readouterr().out
    assert "cannot decode" in out and str(bad) in out
