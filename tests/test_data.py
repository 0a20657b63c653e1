"""Loaders on tiny datasets written in the official layouts (SPEC 7); DatasetError messages."""
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import utils
from conftest import REPO, make_cifar10, make_dogs, make_imagenet64, make_tiny_imagenet, write_mat_list, write_pickle


# ---------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100
# ---------------------------------------------------------------------------------------------
def check_cifar10(root, written):
    train = [written[f"data_batch_{i}"] for i in range(1, 6)]
    data = utils.load_dataset("CIFAR10", root, 32)
    assert data.train_x.shape == (20, 3, 32, 32) and data.test_x.shape == (4, 3, 32, 32)
    assert data.train_x.dtype == torch.uint8 and data.train_y.dtype == torch.int64
    assert data.test_y.dtype == torch.int64 and data.num_classes == 10
    rows = np.concatenate([d for d, _ in train])
    # a data row is R, G, B planes of 1024 bytes each, every plane row-major
    assert data.train_x[1, 0, 0, 1].item() == rows[1, 1]
    assert data.train_x[1, 1, 2, 0].item() == rows[1, 1024 + 2 * 32]
    assert data.train_x[2, 2, 31, 31].item() == rows[2, 3071]
    assert np.array_equal(data.train_x.numpy(), rows.reshape(-1, 3, 32, 32))
    assert data.train_y.tolist() == sum((lab for _, lab in train), [])
    assert np.array_equal(data.test_x.numpy(), written["test_batch"][0].reshape(-1, 3, 32, 32))
    assert data.test_y.tolist() == written["test_batch"][1]
    planes = rows.reshape(-1, 3, 1024).transpose(1, 0, 2).reshape(3, -1) / 255.0
    np.testing.assert_allclose(data.mean.numpy(), planes.mean(1), rtol=0, atol=1e-6)
    np.testing.assert_allclose(data.std.numpy(), planes.std(1), rtol=0, atol=1e-6)


def test_cifar10_bytes_keys(cifar10_root):
    """Python-2 style pickles (b'data', b'labels') load with the right layout and statistics."""
    check_cifar10(*cifar10_root)


def test_cifar10_str_keys(tmp_path):
    check_cifar10(tmp_path, make_cifar10(tmp_path, bytes_keys=False, seed=1))


def test_cifar10_load_cifar10(cifar10_root):
    root, written = cifar10_root
    train_x, train_y, test_x, test_y, classes = utils.load_cifar10(root)
    assert train_x.shape == (20, 3, 32, 32) and test_y.shape == (4,) and classes == 10
    assert train_x.is_contiguous()


def test_cifar10_wrong_resolution(cifar10_root):
    with pytest.raises(utils.ConfigError, match="resolution"):
        utils.load_dataset("CIFAR10", cifar10_root[0], 64)


def test_cifar10_downsampled_subset_is_fixed_and_normalised_on_itself(cifar10_root):
    """The CPU-scale keys: a lower resolution (antialiased) and a train subset that does not depend on the
    run's seed; mean/std are the subset's own; the test split stays whole."""
    root, written = cifar10_root
    full = utils.load_dataset("CIFAR10", root, 32)
    data = utils.load_dataset("CIFAR10", root, 16, train_subset=7)
    assert data.train_x.shape == (7, 3, 16, 16) and data.test_x.shape == (4, 3, 16, 16)
    assert data.train_x.dtype == torch.uint8
    again = utils.load_dataset("CIFAR10", root, 16, train_subset=7)
    assert torch.equal(again.train_x, data.train_x) and torch.equal(again.train_y, data.train_y)
    # the subset's labels are some of the full split's, and its statistics are its own
    small = utils.resize_uint8(full.train_x, 16)
    rows = [i for i in range(20) if any(torch.equal(small[i], x) for x in data.train_x)]
    assert len(rows) == 7 and sorted(full.train_y[rows].tolist()) == sorted(data.train_y.tolist())
    mean, std = utils.channel_stats(data.train_x)
    assert torch.equal(mean, data.mean) and torch.equal(std, data.std)
    with pytest.raises(utils.ConfigError, match="train_subset.*20"):
        utils.load_dataset("CIFAR10", root, 16, train_subset=21)


def test_cifar10_missing_folder_and_no_network(tmp_path):
    """Offline (conftest.offline), the failed download is one error naming the folder to fill and the layout."""
    with pytest.raises(utils.DatasetError, match="CIFAR-10 not found at .* download failed") as e:
        utils.load_dataset("CIFAR10", tmp_path / "nowhere", 32)
    assert str(tmp_path / "nowhere" / "cifar-10-python") in str(e.value)
    assert utils.CIFAR10_LAYOUT in str(e.value) and "\n" not in str(e.value)
    assert e.value.__cause__ is None and e.value.__suppress_context__


def test_cifar10_is_downloaded_when_absent(tmp_path, monkeypatch):
    """No cifar-10-python/ or cifar-10-batches-py/ under data.root: torchvision's CIFAR10 downloads the archive into
    data.root (here a stand-in writing the official files where the real one extracts them), and it is read from
    there; once present, nothing is downloaded again."""
    import torchvision.datasets
    calls, written = [], make_cifar10(tmp_path / "archive")

    def fetch(root, train, download):
        calls.append((root, download))
        shutil.move(tmp_path / "archive" / "cifar-10-python", Path(root) / "cifar-10-batches-py")
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", fetch)
    check_cifar10(tmp_path / "data", written)
    assert calls == [(str(tmp_path / "data"), True)]
    check_cifar10(tmp_path / "data", written)
    assert len(calls) == 1


def test_cifar10_missing_batch(cifar10_root):
    root, _ = cifar10_root
    (root / "cifar-10-python" / "data_batch_3").unlink()
    with pytest.raises(utils.DatasetError, match="data_batch_3") as e:
        utils.load_cifar10(root)
    assert utils.CIFAR10_LAYOUT in str(e.value)


@pytest.mark.parametrize("corrupt", ["truncated", "wrong_keys", "wrong_size"])
def test_cifar10_corrupt_pickle(cifar10_root, corrupt):
    """A corrupt batch raises a DatasetError naming the file."""
    root, _ = cifar10_root
    path = root / "cifar-10-python" / "test_batch"
    if corrupt == "truncated":
        path.write_bytes(path.read_bytes()[:100])
    elif corrupt == "wrong_keys":
        write_pickle(path, {"pixels": np.zeros((4, 3072), np.uint8), "labels": [0] * 4}, True)
    else:
        write_pickle(path, {"data": np.zeros((4, 1000), np.uint8), "labels": [0] * 4}, True)
    with pytest.raises(utils.DatasetError, match="test_batch"):
        utils.load_cifar10(root)


def test_cifar100_local(tmp_path):
    """root/data/cifar-100-python/{train,test,meta} with fine_labels loads without a download."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "data" / "cifar-100-python"
    arrays = {}
    for name, n in (("train", 6), ("test", 3)):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        fine = [int(v) for v in rng.integers(0, 100, n)]
        write_pickle(folder / name, {"data": data, "fine_labels": fine, "coarse_labels": [0] * n}, True)
        arrays[name] = (data, fine)
    write_pickle(folder / "meta", {"fine_label_names": [str(i) for i in range(100)]}, True)
    data = utils.load_dataset("CIFAR100", tmp_path, 32)
    assert data.num_classes == 100 and data.train_x.shape == (6, 3, 32, 32) and data.test_x.shape == (3, 3, 32, 32)
    assert np.array_equal(data.train_x.numpy(), arrays["train"][0].reshape(-1, 3, 32, 32))
    assert data.train_y.tolist() == arrays["train"][1] and data.test_y.tolist() == arrays["test"][1]
    assert data.train_y.dtype == torch.int64


def test_unknown_dataset(tmp_path):
    with pytest.raises(utils.ConfigError, match="MNIST"):
        utils.load_dataset("MNIST", tmp_path, 32)


# ---------------------------------------------------------------------------------------------
# Stanford Dogs
# ---------------------------------------------------------------------------------------------
def test_decode_image_resize_and_centre_crop(tmp_path):
    """Shorter side -> size, then the centre size x size crop, uint8 CHW."""
    wide = np.zeros((30, 40, 3), np.uint8)  # 40 x 30: a 5 px red border left and right
    wide[:, :5, 0] = wide[:, 35:, 0] = 255
    wide[:, 5:35] = 128
    Image.fromarray(wide).save(tmp_path / "wide.png")
    x = utils._decode_image(tmp_path / "wide.png", 30)
    assert x.shape == (3, 30, 30) and x.dtype == torch.uint8
    assert (x == 128).all(), "the centre crop must drop the side borders"
    tall = np.zeros((50, 30, 3), np.uint8)  # 30 x 50: the top half red, the bottom half blue
    tall[:25, :, 0] = 255
    tall[25:, :, 2] = 255
    Image.fromarray(tall).save(tmp_path / "tall.png")
    y = utils._decode_image(tmp_path / "tall.png", 16)
    assert y.shape == (3, 16, 16)
    assert y[0, :6].float().mean() > 250 and y[2, -6:].float().mean() > 250  # top red, bottom blue
    z = utils._decode_image(tmp_path / "tall.png", 64)  # upsampling works too
    assert z.shape == (3, 64, 64) and z.dtype == torch.uint8


def png_16bit_rgb(path, rgb16, side=12):
    """A 16-bit-per-channel RGB PNG (PIL writes none): IHDR bit depth 16, colour type 2, one colour everywhere."""
    import struct
    import zlib
    row = b"\x00" + np.tile(np.array(rgb16, ">u2"), side).tobytes()
    chunk = lambda kind, data: struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(row * side)) + chunk(b"IEND", b""))


RGB = (200, 120, 60)
MODES = {  # file name -> (PIL image, format; None: written by hand, expected 8-bit RGB); every file is named .jpg
    "grey16.jpg": (Image.fromarray(np.full((12, 12), 25700, np.uint16)), "PNG", (100,) * 3),  # I;16: 25700 / 257
    "grey16b.jpg": (Image.frombytes("I;16B", (12, 12), np.full(144, 51400, ">u2").tobytes()), "TIFF", (200,) * 3),
    "bilevel.jpg": (Image.new("1", (12, 12), 1), "PNG", (255,) * 3),
    "grey.jpg": (Image.new("L", (12, 12), 100), "PNG", (100,) * 3),
    "grey_alpha.jpg": (Image.new("LA", (12, 12), (100, 7)), "PNG", (100,) * 3),
    "palette.jpg": (Image.new("RGB", (12, 12), RGB).convert("P", palette=Image.ADAPTIVE), "PNG", RGB),
    "rgba.jpg": (Image.new("RGBA", (12, 12), RGB + (9,)), "PNG", RGB),
    "cmyk.jpg": (Image.new("RGB", (12, 12), RGB).convert("CMYK"), "TIFF", RGB),
    "ycbcr.jpg": (Image.new("RGB", (12, 12), RGB).convert("YCbCr"), "TIFF", RGB),
    "lab.jpg": (Image.new("RGB", (12, 12), RGB).convert("LAB"), "TIFF", RGB),
    "rgb16.jpg": (None, None, (10, 200, 100)),  # 2570, 51400, 25700 per channel
}
REFUSED = {"float.jpg": Image.fromarray(np.full((12, 12), 0.5, np.float32)),  # F: no fixed range
           "int32.jpg": Image.fromarray(np.full((12, 12), 70000, np.int32))}  # I: 32-bit integers


def test_every_image_mode_decodes_at_its_real_contrast_or_is_refused_and_the_checker_agrees(tmp_path, capsys):
    """A 16-bit greyscale PNG named .jpg used to decode as white (convert("RGB") clips 16-bit values) and the checker
    said OK. Every pixel mode a Stanford Dogs or Tiny ImageNet file can hold is read at its real colour (within the
    YCbCr / LAB conversions' rounding), or refused naming the file, by the loader and by test_stanford_dogs.py."""
    import test_stanford_dogs as checker
    folder = make_dogs(tmp_path, per_breed=2, breeds=1)
    breed = folder / "images" / "Images" / "n00000000-Breed0"
    for name, (im, fmt, _) in MODES.items():
        im.save(breed / name, fmt) if im is not None else png_16bit_rgb(breed / name, (2570, 51400, 25700))
    files = [f"n00000000-Breed0/{f}" for f in MODES]
    write_mat_list(folder / "train_list.mat", files)
    write_mat_list(folder / "test_list.mat", ["n00000000-Breed0/n00000000_0000.jpg"])
    data = utils.load_dataset("STANFORD_DOGS", tmp_path, 8)
    for i, (name, (_, _, rgb)) in enumerate(MODES.items()):
        got = data.train_x[i].flatten(1)
        assert (got.min(1).values == got.max(1).values).all(), name  # one colour, as written
        assert (got[:, 0].int() - torch.tensor(rgb)).abs().max() <= 2, (name, got[:, 0].tolist(), rgb)
    assert checker.main(["--root", str(tmp_path), "--resolution", "8"]) == 0 and "OK" in capsys.readouterr().out
    for name, im in REFUSED.items():
        im.save(breed / name, "TIFF")
    write_mat_list(folder / "train_list.mat", files + [f"n00000000-Breed0/{f}" for f in REFUSED])
    with pytest.raises(utils.DatasetError, match=f"cannot decode {breed / 'float.jpg'} .*pixel mode F has no 8-bit"):
        utils.load_dataset("STANFORD_DOGS", tmp_path, 8, cache_dir=str(tmp_path / "other_cache"))
    assert checker.main(["--root", str(tmp_path), "--resolution", "8"]) == 1
    out = capsys.readouterr().out
    assert f"ERROR: 2 of {len(MODES) + 3} images cannot be decoded" in out
    assert f"{breed / 'float.jpg'}: ValueError: pixel mode F" in out and f"{breed / 'int32.jpg'}: ValueError: pixel mode I " in out


def test_dogs_fallback_split(tmp_path):
    """Without .mat lists: the first DOGS_TRAIN_PER_BREED sorted files per breed train, the rest test."""
    n = utils.DOGS_TRAIN_PER_BREED
    folder = make_dogs(tmp_path, per_breed=n + 2, breeds=2)
    breeds, train, test, split = utils.stanford_dogs_split(folder)
    assert breeds == ["n00000000-Breed0", "n00000001-Breed1"] and split == f"first{n}"
    assert len(train) == 2 * n and len(test) == 4
    assert train[0] == "n00000000-Breed0/n00000000_0000.jpg"
    assert test == [f"n0000000{b}-Breed{b}/n0000000{b}_{j:04d}.jpg" for b in (0, 1) for j in (n, n + 1)]
    data = utils.load_dataset("STANFORD_DOGS", tmp_path, 8)
    assert data.train_x.shape == (2 * n, 3, 8, 8) and data.test_x.shape == (4, 3, 8, 8)
    assert data.train_x.dtype == torch.uint8 and data.num_classes == 2
    assert data.train_y.tolist() == [0] * n + [1] * n and data.test_y.tolist() == [0, 0, 1, 1]


def test_dogs_official_split_and_cache(tmp_path):
    """The .mat lists decide the split; the decoded arrays are cached and read back."""
    folder = make_dogs(tmp_path, per_breed=3, breeds=3, size=[(40, 30), (30, 50)])
    train = ["n00000002-Breed2/n00000002_0001.jpg", "n00000000-Breed0/n00000000_0002.jpg",
             "n00000001-Breed1/n00000001_0000.jpg"]
    test = ["n00000001-Breed1/n00000001_0002.jpg", "n00000000-Breed0/n00000000_0000.jpg"]
    write_mat_list(folder / "train_list.mat", train)
    write_mat_list(folder / "test_list.mat", test)
    breeds, tr, te, split = utils.stanford_dogs_split(folder)
    assert (tr, te, split) == (train, test, "official") and len(breeds) == 3
    data = utils.load_dataset("STANFORD_DOGS", tmp_path, 16)
    assert data.train_x.shape == (3, 3, 16, 16) and data.test_x.shape == (2, 3, 16, 16)
    assert data.train_y.tolist() == [2, 0, 1] and data.test_y.tolist() == [1, 0]
    images = folder / "images" / "Images"
    assert torch.equal(data.train_x[2], utils._decode_image(images / train[2], 16))
    caches = list(folder.glob("cache_official_16px_*.pt"))
    assert len(caches) == 1 and data.split == "official"
    real_decode = utils._decode_image
    utils._decode_image = lambda *a: pytest.fail("an unchanged tree must load from the cache")
    try:
        again = utils.load_dataset("STANFORD_DOGS", tmp_path, 16)
    finally:
        utils._decode_image = real_decode
    assert torch.equal(again.train_x, data.train_x) and torch.equal(again.test_y, data.test_y)
    assert again.fingerprint == data.fingerprint


def test_dogs_cache_is_rebuilt_when_the_tree_changes(tmp_path):
    """The decoded cache is keyed by the split, the breeds and every file's name, size and mtime: a new breed
    or a replaced image decodes afresh (a stale cache once returned 3 breeds from a 4-breed folder)."""
    n = utils.DOGS_TRAIN_PER_BREED
    folder = make_dogs(tmp_path, per_breed=n + 1, breeds=2)
    first = utils.load_dataset("STANFORD_DOGS", tmp_path, 8)
    assert first.num_classes == 2 and len(first.train_x) == 2 * n
    make_dogs(tmp_path / "more", per_breed=n + 1, breeds=3)  # a third breed joins the folder
    src = tmp_path / "more" / "stanford-dogs" / "images" / "Images" / "n00000002-Breed2"
    src.rename(folder / "images" / "Images" / "n00000002-Breed2")
    grown = utils.load_dataset("STANFORD_DOGS", tmp_path, 8)
    assert grown.num_classes == 3 and len(grown.train_x) == 3 * n and len(grown.test_x) == 3
    assert grown.fingerprint != first.fingerprint
    img = folder / "images" / "Images" / "n00000000-Breed0" / "n00000000_0000.jpg"
    Image.fromarray(np.zeros((10, 12, 3), dtype=np.uint8)).save(img)  # one image replaced in place
    replaced = utils.load_dataset("STANFORD_DOGS", tmp_path, 8)
    assert replaced.train_x[0].max() == 0 and not torch.equal(replaced.train_x, grown.train_x)
    assert len(list(folder.glob("cache_*.pt"))) == 3


def test_dogs_too_few_images_and_empty_split_are_clear_errors(tmp_path):
    n = utils.DOGS_TRAIN_PER_BREED
    make_dogs(tmp_path, per_breed=n, breeds=1)  # fallback split: nothing left for test
    with pytest.raises(utils.DatasetError, match=f"has {n} .jpg images.*more than {n}"):
        utils.load_dataset("STANFORD_DOGS", tmp_path, 8)
    folder = tmp_path / "stanford-dogs"
    write_mat_list(folder / "train_list.mat", ["n00000000-Breed0/n00000000_0000.jpg"])
    write_mat_list(folder / "test_list.mat", [])
    with pytest.raises(utils.DatasetError, match="test split .* is empty"):
        utils.load_dataset("STANFORD_DOGS", tmp_path, 8)


def test_dogs_loader_names_the_file_it_cannot_decode(tmp_path):
    n = utils.DOGS_TRAIN_PER_BREED
    folder = make_dogs(tmp_path, per_breed=n + 1, breeds=1)
    bad = folder / "images" / "Images" / "n00000000-Breed0" / "n00000000_0007.jpg"
    bad.write_bytes(bad.read_bytes()[:60])  # truncated
    with pytest.raises(utils.DatasetError, match="cannot decode .*n00000000_0007.jpg.*test_stanford_dogs.py"):
        utils.load_dataset("STANFORD_DOGS", tmp_path, 8)


def test_dogs_listed_image_missing(tmp_path):
    folder = make_dogs(tmp_path, per_breed=1, breeds=1)
    write_mat_list(folder / "train_list.mat", ["n00000000-Breed0/n00000000_0000.jpg"])
    write_mat_list(folder / "test_list.mat", ["n00000000-Breed0/gone.jpg"])
    with pytest.raises(utils.DatasetError, match="gone.jpg"):
        utils.load_dataset("STANFORD_DOGS", tmp_path, 8)


def test_dogs_missing_folder(tmp_path):
    with pytest.raises(utils.DatasetError) as e:
        utils.load_dataset("STANFORD_DOGS", tmp_path, 64)
    assert str(tmp_path / "stanford-dogs" / "images" / "Images") in str(e.value)
    assert utils.DOGS_LAYOUT in str(e.value)


def test_dogs_no_breed_folders(tmp_path):
    (tmp_path / "stanford-dogs" / "images" / "Images").mkdir(parents=True)
    with pytest.raises(utils.DatasetError, match="no breed folders"):
        utils.stanford_dogs_split(tmp_path / "stanford-dogs")


# ---------------------------------------------------------------------------------------------
# DIGITS
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("res", [16, 32])
def test_digits(res):
    """Bundled digits: uint8 grey-as-RGB, a fixed stratified 1347 / 450 split."""
    data = utils.load_dataset("DIGITS", "unused", res)
    assert data.train_x.shape == (1347, 3, res, res) and data.test_x.shape == (450, 3, res, res)
    assert data.train_x.dtype == torch.uint8 and data.train_y.dtype == torch.int64
    assert torch.equal(data.train_x[:, 0], data.train_x[:, 1]) and torch.equal(data.train_x[:, 0], data.train_x[:, 2])
    assert data.train_x.max() > 200 and data.train_x.min() == 0
    assert set(data.train_y.tolist()) == set(data.test_y.tolist()) == set(range(10))
    assert data.num_classes == 10
    again = utils.load_digits(res)
    assert torch.equal(again[0], data.train_x) and torch.equal(again[3], data.test_y)


# ---------------------------------------------------------------------------------------------
# Real CIFAR-10 (acceptance): 50,000 / 10,000 images and the textbook channel means
# ---------------------------------------------------------------------------------------------
PACKS = [REPO.parent / "shared" / "data" / f"cifar10-part{i}.npz" for i in (1, 2)]


@pytest.fixture(scope="module")
def real_cifar10_root(tmp_path_factory):
    if (REPO / "data" / "cifar-10-python" / "data_batch_1").is_file():
        return REPO / "data"
    if all(p.is_file() for p in PACKS):
        root = tmp_path_factory.mktemp("cifar")
        subprocess.run([sys.executable, str(PACKS[0].parent / "unpack_cifar10.py"), str(root / "cifar-10-python"),
                        *map(str, PACKS)], check=True, capture_output=True)
        return root
    pytest.skip("no real CIFAR-10 (data/cifar-10-python or ../shared/data packs)")


def test_real_cifar10(real_cifar10_root):
    data = utils.load_dataset("CIFAR10", real_cifar10_root, 32)
    assert data.train_x.shape == (50000, 3, 32, 32) and data.test_x.shape == (10000, 3, 32, 32)
    assert torch.bincount(data.train_y).tolist() == [5000] * 10
    mean = [round(v, 4) for v in data.mean.tolist()]
    assert all(abs(a - b) < 5e-5 for a, b in zip(mean, (0.4914, 0.4822, 0.4465))), mean
    assert all(abs(a - b) < 5e-4 for a, b in zip(data.std.tolist(), (0.2470, 0.2435, 0.2616))), data.std


def test_cifar100_offline_failure_says_where(tmp_path, monkeypatch):
    """An offline CIFAR-100 failure names the folder and the layout to put by hand."""
    import torchvision.datasets

    def offline(*args, **kwargs):
        raise OSError("no network")
    monkeypatch.setattr(torchvision.datasets, "CIFAR100", offline)
    with pytest.raises(utils.DatasetError) as e:
        utils.load_dataset("CIFAR100", tmp_path, 32)
    assert str(tmp_path / "data" / "cifar-100-python") in str(e.value) and utils.CIFAR100_LAYOUT in str(e.value)


def test_tiny_imagenet_reads_the_official_layout(tmp_path):
    folder, labels = make_tiny_imagenet(tmp_path)
    d = utils.load_dataset("TINY_IMAGENET", tmp_path, 16)
    assert d.train_x.shape == (12, 3, 16, 16) and d.test_x.shape == (6, 3, 16, 16) and d.num_classes == 3
    assert d.train_y.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert d.test_y.tolist() == [labels[f"val_{i}.JPEG"] for i in range(6)]
    assert list(folder.glob("cache_16px_*.pt"))  # decoded once, keyed by the files
    again = utils.load_dataset("TINY_IMAGENET", tmp_path, 16)
    assert torch.equal(again.train_x, d.train_x) and again.fingerprint == d.fingerprint


@pytest.mark.parametrize("break_it, names", [
    (lambda f: (f / "wnids.txt").unlink(), "wnids.txt"),
    (lambda f: (f / "val" / "val_annotations.txt").unlink(), "val_annotations.txt"),
    (lambda f: shutil.rmtree(f / "train" / "n00000001" / "images"), "n00000001/images"),
    (lambda f: (f / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn09999999\t0\t0\t1\t1\n"), "line 1"),
    (lambda f: (f / "val" / "images" / "val_3.JPEG").unlink(), "val/images/val_3.JPEG"),
])
def test_a_malformed_tiny_imagenet_names_the_path(tmp_path, break_it, names):
    folder, _ = make_tiny_imagenet(tmp_path)
    break_it(folder)
    with pytest.raises(utils.DatasetError, match=re.escape(names)):
        utils.load_dataset("TINY_IMAGENET", tmp_path, 16)


# ---------------------------------------------------------------------------------------------
# Downsampled ImageNet 64x64 (the Imagenet64x64 release's pickles)
# ---------------------------------------------------------------------------------------------
def test_imagenet64_reads_the_release_layout(tmp_path):
    written = make_imagenet64(tmp_path)
    d = utils.load_dataset("IMAGENET64", tmp_path, 64)
    rows = np.concatenate([written[f"train_data_batch_{i}"][0] for i in range(1, 11)])
    assert d.train_x.shape == (20, 3, 64, 64) and d.test_x.shape == (3, 3, 64, 64) and d.num_classes == 1000
    assert np.array_equal(d.train_x.numpy(), rows.reshape(-1, 3, 64, 64))  # R, G, B planes, each row-major
    assert d.train_x[1, 1, 2, 0].item() == rows[1, 4096 + 2 * 64]
    labels = sum((written[f"train_data_batch_{i}"][1] for i in range(1, 11)), [])
    assert d.train_y.tolist() == [v - 1 for v in labels]  # 1-based in the files
    assert d.test_y.tolist() == [v - 1 for v in written["val_data"][1]]
    make_imagenet64(tmp_path / "b", bytes_keys=True)
    small = utils.load_dataset("IMAGENET64", tmp_path / "b", 32)
    assert small.train_x.shape == (20, 3, 32, 32)  # Python 2 pickles (bytes keys), resized once at load


@pytest.mark.parametrize("break_it, names", [
    (lambda f: (f / "train_data_batch_7").unlink(), "lacks train_data_batch_7"),
    (lambda f: (f / "val_data").unlink(), "lacks val_data"),
    (lambda f: (f / "train_data_batch_2").write_bytes(b"not a pickle"), "train_data_batch_2 as an Imagenet64x64"),
    (lambda f: write_pickle(f / "val_data", {"data": np.zeros((2, 3072), np.uint8), "labels": [1, 2]}, False),
     "val_data: 'data' is uint8 of shape (2, 3072)"),
    (lambda f: write_pickle(f / "val_data", {"data": np.zeros((2, 12288), np.uint8), "labels": [0, 2]}, False),
     "val_data: 'labels' range over [0, 2]; the release's labels are 1-based"),
    (lambda f: write_pickle(f / "val_data", {"data": np.zeros((2, 12288), np.uint8), "labels": [1, 1001]}, False),
     "val_data: 'labels' range over [1, 1001]"),
    (lambda f: shutil.rmtree(f), "ImageNet 64x64 folder not found"),
])
def test_a_malformed_imagenet64_names_the_file(tmp_path, break_it, names):
    make_imagenet64(tmp_path)
    break_it(tmp_path / "imagenet64")
    with pytest.raises(utils.DatasetError, match=re.escape(names)):
        utils.load_dataset("IMAGENET64", tmp_path, 64)
