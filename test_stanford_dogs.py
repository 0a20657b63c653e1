"""Check a Stanford Dogs folder before pretrain.py / main_distill.py read it (SPEC 7).

    python test_stanford_dogs.py [--root data] [--resolution 64] [--sample 5]

Reads <root>/stanford-dogs/ with the same functions the loader uses (utils.stanford_dogs_split,
utils._decode_image) and prints the breed count, the split (the official train_list.mat /
test_list.mat, 12,000 train / 8,580 test, or the fallback of the first 100 files per breed),
images per breed, missing files and a few decoded samples. Writes nothing. Exits 0 when the
folder can be loaded, 1 with the path and the expected layout when it cannot.
"""
import argparse
import sys
from collections import Counter
from pathlib import Path

import torch
from PIL import Image

import utils

OFFICIAL = {"breeds": 120, "train": 12000, "test": 8580}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default="data", help="data root holding stanford-dogs/ (data.root in the config)")
    parser.add_argument("--resolution", type=int, default=64, help="decoded side in pixels (data.resolution)")
    parser.add_argument("--sample", type=int, default=5, help="number of images to decode as a check")
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

    missing = [f for f in train + test if not (images / f).is_file()]
    if missing:
        print(f"ERROR: {len(missing)} listed images missing under {images}, e.g. {missing[0]}")
        print(f"expected layout: {utils.DOGS_LAYOUT}")
        return 1
    print(f"all {len(train) + len(test):,} listed files exist")

    step = max(1, len(train) // max(1, args.sample))
    for f in train[::step][:args.sample]:
        try:
            with Image.open(images / f) as im:
                size = im.size
            x = utils._decode_image(images / f, args.resolution)
        except Exception as e:  # a truncated or non-image file
            print(f"ERROR: cannot decode {images / f} ({e!r}); expected layout: {utils.DOGS_LAYOUT}")
            return 1
        if tuple(x.shape) != (3, args.resolution, args.resolution) or x.dtype != torch.uint8:
            print(f"ERROR: {images / f} decoded to {tuple(x.shape)} {x.dtype}")
            return 1
        print(f"decoded {f}: {size[0]}x{size[1]} -> {tuple(x.shape)} uint8")
    print("OK: the folder can be loaded with data.root =", args.root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
