"""Check a Stanford Dogs folder before pretrain.py / main_distill.py read it (SPEC 7).

    python test_stanford_dogs.py [--root data] [--resolution 64] [--workers 8]

Reads <root>/stanford-dogs/ with the same functions the loader uses (utils.stanford_dogs_split,
utils._decode_image) and prints the breed count, the split (the official train_list.mat /
test_list.mat, 12,000 train / 8,580 test, or the fallback of the first 100 files per breed),
images per breed and missing files, then decodes every image as the loader does and lists each one that
fails (truncated, empty, not an image). Writes nothing. Exits 0 when the folder can be loaded, 1 with the
paths and the expected layout when it cannot.
"""
import argparse
import os
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from tqdm import tqdm

import utils

OFFICIAL = {"breeds": 120, "train": 12000, "test": 8580}


def check_one(path, resolution):
    """'' if the file decodes exactly as the loader decodes it, else why not."""
    try:
        x = utils._decode_image(path, resolution)
    except Exception as e:  # a truncated, empty or non-image file
        return f"{type(e).__name__}: {e}"
    if tuple(x.shape) != (3, resolution, resolution) or x.dtype != torch.uint8:
        return f"decoded to {tuple(x.shape)} {x.dtype}"
    return ""


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default="data", help="data root holding stanford-dogs/ (data.root in the config)")
    parser.add_argument("--resolution", type=int, default=64, help="decoded side in pixels (data.resolution)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="decoding threads")
    args = parser.parse_args(argv)

    folder = Path(args.root) / "stanford-dogs"
    images = folder / "images" / "Images"
    try:
        breeds, train, test, split = utils.stanford_dogs_split(folder)
    except utils.DatasetError as e:
        print(f"ERROR: {e}")
        return 1
    print(f"Stanford Dogs at {folder}")
    warn = "" if len(breeds) == OFFICIAL["breeds"] else f"  WARNING: the official dataset has {OFFICIAL['breeds']}"
    print(f"breeds: {len(breeds)}{warn}")
    if split == "official":
        print("split: official (train_list.mat / test_list.mat)")
    else:
        print(f"split: fallback, first {utils.DOGS_TRAIN_PER_BREED} sorted files per breed to train "
              f"(no train_list.mat / test_list.mat in {folder})")
    official = "" if (len(train), len(test)) == (OFFICIAL["train"], OFFICIAL["test"]) else \
        f"  (the official split has {OFFICIAL['train']:,} / {OFFICIAL['test']:,})"
    print(f"train images: {len(train):,}, test images: {len(test):,}{official}")

    for name, files in (("train", train), ("test", test)):
        per_breed = Counter(f.split("/")[0] for f in files)
        counts = [per_breed[b] for b in breeds]
        print(f"{name} images per breed: min {min(counts)}, max {max(counts)}")
        empty = [b for b in breeds if per_breed[b] == 0]
        if empty:
            print(f"WARNING: {len(empty)} breed folders have no {name} images, e.g. {empty[0]}")

    if not train or not test:
        print(f"ERROR: the {'train' if not train else 'test'} split is empty")
        return 1
    missing = [f for f in train + test if not (images / f).is_file()]
    if missing:
        print(f"ERROR: {len(missing)} listed images missing under {images}:")
        for f in missing:
            print(f"  {f}")
        print(f"expected layout: {utils.DOGS_LAYOUT}")
        return 1
    print(f"all {len(train) + len(test):,} listed files exist")

    files = train + test
    with ThreadPoolExecutor(args.workers) as pool:  # PIL decodes without the GIL
        outcomes = list(tqdm(pool.map(lambda f: check_one(images / f, args.resolution), files), total=len(files),
                             desc="decode every image", leave=False))
    bad = [(f, why) for f, why in zip(files, outcomes) if why]
    if bad:
        print(f"ERROR: {len(bad)} of {len(files):,} images cannot be decoded (truncated, empty or not images):")
        for f, why in bad:
            print(f"  {images / f}: {why}")
        print("replace or remove them (and fix the .mat lists if they name them)")
        return 1
    print(f"decoded all {len(files):,} images to (3, {args.resolution}, {args.resolution}) uint8")
    print("OK: the folder can be loaded with data.root =", args.root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
