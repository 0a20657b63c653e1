"""Shared fixtures: tiny datasets written in the official layouts (SPEC 7) into tmp_path."""
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.io import savemat

REPO = Path(__file__).resolve().parents[1]
CIFAR10_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def write_pickle(path, d, bytes_keys):
    """Pickle a dict the way the official files read back: bytes keys (Python 2) or str keys."""
    if bytes_keys:
        d = {k.encode(): v for k, v in d.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(d, f, protocol=2)


def make_cifar10(root, per_batch=4, bytes_keys=True, seed=0):
    """root/cifar-10-python/{data_batch_1..5,test_batch,batches.meta}; returns {file: (data, labels)}."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-10-python"
    written = {}
    for name in CIFAR10_FILES:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, per_batch)]
        write_pickle(folder / name, {"batch_label": name, "labels": labels, "data": data}, bytes_keys)
        written[name] = (data, labels)
    write_pickle(folder / "batches.meta", {"label_names": [f"c{i}" for i in range(10)], "num_vis": 3072},
                 bytes_keys)
    return written


def make_dogs(root, per_breed, breeds=2, size=(12, 10), seed=0):
    """root/stanford-dogs/images/Images/n0000000{i}-Breed{i}/*.jpg; returns the stanford-dogs folder."""
    rng = np.random.default_rng(seed)
    images = Path(root) / "stanford-dogs" / "images" / "Images"
    for i in range(breeds):
        d = images / f"n0000000{i}-Breed{i}"
        d.mkdir(parents=True)
        for j in range(per_breed):
            w, h = size if isinstance(size, tuple) else size[j % len(size)]
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(d / f"n0000000{i}_{j:04d}.jpg")
    return images.parent.parent


def write_mat_list(path, files):
    """The official list format: file_list an (N, 1) cell of 1-element strings, labels (N, 1) 1-based."""
    cells = np.empty((len(files), 1), dtype=object)
    for i, f in enumerate(files):
        cells[i, 0] = np.array([f])
    labels = np.array([[int(f.split("-")[0][-1]) + 1] for f in files], dtype=np.uint8)
    savemat(str(path), {"file_list": cells, "annotation_list": cells, "labels": labels})


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No test downloads: torchvision's requests (urllib), in this process and in the scripts it starts, go to a
    closed local port and fail at once, as on a machine without a network."""
    for key in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(key, "http://127.0.0.1:9")
    for key in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(key, raising=False)


@pytest.fixture
def cifar10_root(tmp_path):
    """A tiny CIFAR-10 (4 images per batch, bytes keys) under tmp_path; yields (root, written arrays)."""
    return tmp_path, make_cifar10(tmp_path)


def make_tiny_imagenet(root, classes=3, per_class=4, val_per_class=2, seed=0):
    """root/tiny-imagenet-200/ in the official layout (64x64 JPEGs); returns (folder, val labels by file)."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "tiny-imagenet-200"
    wnids = [f"n0{i:07d}" for i in range(classes)]
    (folder / "val" / "images").mkdir(parents=True)
    (folder / "wnids.txt").write_text("\n".join(wnids) + "\n")
    save = lambda path: Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
    lines, labels = [], {}
    for i, w in enumerate(wnids):
        d = folder / "train" / w / "images"
        d.mkdir(parents=True)
        for j in range(per_class):
            save(d / f"{w}_{j}.JPEG")
        (folder / "train" / w / f"{w}_boxes.txt").write_text("")
        for j in range(val_per_class):
            name = f"val_{i * val_per_class + j}.JPEG"
            save(folder / "val" / "images" / name)
            lines.append(f"{name}\t{w}\t0\t0\t63\t63")
            labels[name] = i
    (folder / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return folder, labels


def make_imagenet64(root, per_batch=2, val=3, bytes_keys=False, seed=0):
    """root/imagenet64/{train_data_batch_1..10, val_data} in the Imagenet64x64 release's layout: 'data' uint8
    (n, 12288) in R, G, B planes, 'labels' 1-based (1..1000), 'mean' in the train batches; returns {file: (data,
    labels)}."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "imagenet64"
    written = {}
    for name, n in [(f"train_data_batch_{i}", per_batch) for i in range(1, 11)] + [("val_data", val)]:
        data = rng.integers(0, 256, (n, 12288), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(1, 1001, n)]
        d = {"data": data, "labels": labels, **({"mean": data.mean(0)} if name != "val_data" else {})}
        write_pickle(folder / name, d, bytes_keys)
        written[name] = (data, labels)
    return written
