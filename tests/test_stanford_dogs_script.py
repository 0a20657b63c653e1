"""The user-facing checker test_stanford_dogs.py on a tiny tree and on a missing folder."""
import test_stanford_dogs as checker
import utils
from conftest import make_dogs, write_mat_list


def test_checker_fallback_tree(tmp_path, capsys):
    n = utils.DOGS_TRAIN_PER_BREED
    make_dogs(tmp_path, per_breed=n + 1, breeds=2, size=[(40, 30), (30, 50)])
    assert checker.main(["--root", str(tmp_path), "--resolution", "16"]) == 0
    out = capsys.readouterr().out
    assert "breeds: 2" in out and "WARNING" in out and "120" in out
    assert f"train images: {2 * n}, test images: 2" in out and "fallback" in out
    assert f"train images per breed: min {n}, max {n}" in out and "test images per breed: min 1, max 1" in out
    assert f"decoded all {2 * n + 2} images to (3, 16, 16) uint8" in out and "OK" in out


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


def test_checker_lists_every_unreadable_file(tmp_path, capsys):
    """Every file is decoded, and each truncated, empty or non-image one is listed (it used to decode 5
    samples and say OK on such a tree)."""
    n = utils.DOGS_TRAIN_PER_BREED
    folder = make_dogs(tmp_path, per_breed=n + 2, breeds=2)
    breed = folder / "images" / "Images" / "n00000001-Breed1"
    truncated, empty, text = (breed / f"n00000001_{j:04d}.jpg" for j in (13, 57, n + 1))
    truncated.write_bytes(truncated.read_bytes()[:80])
    empty.write_bytes(b"")
    text.write_bytes(b"not a jpeg")
    assert checker.main(["--root", str(tmp_path), "--workers", "2"]) == 1
    out = capsys.readouterr().out
    assert f"ERROR: 3 of {2 * (n + 2)} images cannot be decoded" in out
    for f in (truncated, empty, text):
        assert str(f) in out
    assert "OK" not in out
