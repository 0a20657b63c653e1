"""Batched augmentation (SPEC 1, 4, 6.1): shapes, per-sample randomness, exact identities."""
import colorsys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import main_distill
import main_evaluate
import models
import pretrain
import utils

CPU = torch.device("cpu")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def aug():
    return utils.load_config(REPO / "configs" / "cifar10.yaml")["pretrain"]


def images(B=8, H=16, seed=0, dtype=torch.float32):
    """Random images in [0, 1] (float) or uint8."""
    x = torch.rand(B, 3, H, H, generator=torch.Generator().manual_seed(seed))
    return (x * 255).round().to(torch.uint8) if dtype == torch.uint8 else x


def gen(seed=0):
    return models.make_generator(CPU, seed)


MEAN, STD = torch.tensor([0.49, 0.48, 0.45]), torch.tensor([0.25, 0.24, 0.26])


def test_barlow_views_shapes(aug):
    x = images(6, 16, dtype=torch.uint8)
    v1, v2 = pretrain.barlow_views(x, MEAN, STD, aug, gen())
    assert v1.shape == v2.shape == (6, 3, 16, 16) and v1.dtype == v2.dtype == torch.float32
    assert torch.isfinite(v1).all() and torch.isfinite(v2).all()
    assert (v1 - v2).abs().mean() > 0.05, "the two views must differ"
    assert v1.min() < -1 and v1.max() > 1, "the views must be normalised, not in [0, 1]"


def test_barlow_views_per_sample(aug):
    """Identical images in one batch get different augmentations."""
    x = images(1, 16, dtype=torch.uint8).expand(8, -1, -1, -1).contiguous()
    v1, _ = pretrain.barlow_views(x, MEAN, STD, aug, gen())
    diffs = [(v1[0] - v1[i]).abs().max().item() for i in range(1, 8)]
    assert min(diffs) > 1e-3, diffs


def test_barlow_views_seeded(aug):
    x = images(6, 16, dtype=torch.uint8)
    a = pretrain.barlow_views(x, MEAN, STD, aug, gen(1))
    b = pretrain.barlow_views(x, MEAN, STD, aug, gen(1))
    c = pretrain.barlow_views(x, MEAN, STD, aug, gen(2))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.allclose(a[0], c[0])


def test_random_resized_crop_identity():
    x = images()
    y = pretrain.random_resized_crop(x, 16, (1.0, 1.0), gen(), ratio=(1.0, 1.0))
    torch.testing.assert_close(y, x, atol=1e-5, rtol=0)


def test_random_resized_crop_zooms():
    """A small crop area is a real zoom: the output differs from the input, shape as asked."""
    x = images()
    y = pretrain.random_resized_crop(x, 12, (0.1, 0.1), gen())
    assert y.shape == (8, 3, 12, 12)
    assert (y - F.interpolate(x, size=12, mode="bilinear", antialias=True)).abs().mean() > 0.05


def test_random_resized_crop_per_sample_boxes():
    """Crop boxes, read off coordinate ramps, follow RandomResizedCrop's area and ratio ranges per sample."""
    B, S = 256, 32
    u = (2 * torch.arange(S) + 1) / S - 1  # pixel centres in grid_sample's [-1, 1] coordinates
    x = torch.zeros(B, 3, S, S)
    x[:, 0] = u.view(1, S)  # channel 0 holds the column's coordinate, channel 1 the row's
    x[:, 1] = u.view(S, 1)
    y = pretrain.random_resized_crop(x, S, (0.08, 1.0), gen())
    i1, i2 = S // 4, 3 * S // 4  # interior samples: a bilinear sample of a ramp is exact there
    w = (y[:, 0, S // 2, i2] - y[:, 0, S // 2, i1]) / (u[i2] - u[i1])
    h = (y[:, 1, i2, S // 2] - y[:, 1, i1, S // 2]) / (u[i2] - u[i1])
    area = w * h
    assert area.min() > 0.08 - 1e-3 and area.max() < 1 + 1e-3
    assert area.std() > 0.15 and 0.4 < area.mean() < 0.65, "areas are drawn per sample over the range"
    free = (w < 0.999) & (h < 0.999)  # boxes not clipped at the image border keep their ratio
    assert free.sum() > B // 2
    assert (w / h)[free].min() > 3 / 4 - 1e-3 and (w / h)[free].max() < 4 / 3 + 1e-3
    assert (w / h)[free].std() > 0.1


@pytest.mark.parametrize("name", ["grayscale", "flip", "solarize", "jitter"])
def test_coin_per_sample(name):
    """With p = 0.5 each sample is augmented or left exactly as it was, independently."""
    x = images(64, 8)
    f = {"grayscale": lambda x, g: pretrain.random_grayscale(x, 0.5, g),
         "flip": lambda x, g: utils.random_flip(x, 0.5, g),
         "solarize": lambda x, g: pretrain.random_solarize(x, 0.5, g),
         "jitter": lambda x, g: pretrain.color_jitter(x, 0.4, 0.4, 0.2, 0.1, 0.5, g)}[name]
    y = f(x, gen())
    same = (y == x).flatten(1).all(1)
    assert 12 < same.sum() < 52, same.sum()
    assert ((y - x).abs().flatten(1).amax(1)[~same] > 1e-3).all()


def test_random_grayscale():
    x = images()
    y = pretrain.random_grayscale(x, 1.0, gen())
    assert torch.equal(y[:, 0], y[:, 1]) and torch.equal(y[:, 1], y[:, 2])
    torch.testing.assert_close(y[:, 0], 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2])
    assert torch.equal(pretrain.random_grayscale(x, 0.0, gen()), x)


def test_random_flip():
    x = images()
    assert torch.equal(utils.random_flip(x, 1.0, gen()), x.flip(3))
    assert torch.equal(utils.random_flip(x, 0.0, gen()), x)


def test_random_solarize():
    x = images()
    y = pretrain.random_solarize(x, 1.0, gen())
    assert torch.equal(y, torch.where(x >= 0.5, 1 - x, x))
    assert not torch.equal(y, x)


def test_color_jitter_zero_is_identity():
    x = images()
    y = pretrain.color_jitter(x, 0.0, 0.0, 0.0, 0.0, 1.0, gen())
    torch.testing.assert_close(y, x, atol=1e-5, rtol=0)


def test_color_jitter_changes_and_stays_in_range():
    x = images()
    y = pretrain.color_jitter(x, 0.4, 0.4, 0.2, 0.1, 1.0, gen())
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1 + 1e-6
    assert (y - x).abs().amax((1, 2, 3)).min() > 1e-3, "every sample is jittered at p = 1"


def test_brightness_matches_torchvision():
    """Brightness alone scales by one per-sample factor, as torchvision's adjust_brightness."""
    from torchvision.transforms.functional import adjust_brightness
    x = images(4) * 0.5
    y = pretrain.color_jitter(x, 0.4, 0.0, 0.0, 0.0, 1.0, gen())
    for i in range(4):
        f = (y[i] / x[i]).median().item()
        assert 0.6 <= f <= 1.4
        torch.testing.assert_close(y[i], adjust_brightness(x[i], f), atol=1e-5, rtol=0)


def test_hsv_round_trip():
    x = images(4, 8)
    x[0] = 0.3  # grey: zero saturation, hue undefined
    h, s, v = pretrain.rgb_to_hsv(x)
    assert h.min() >= 0 and h.max() < 1 and s.min() >= 0 and s.max() <= 1
    torch.testing.assert_close(pretrain.hsv_to_rgb(h, s, v), x, atol=1e-5, rtol=0)


def test_hsv_matches_colorsys():
    """rgb_to_hsv agrees with the standard library's colorsys pixel by pixel."""
    pixels = torch.cat([torch.eye(3), images(1, 5).view(3, 25)], 1)  # (3, 28): red, green, blue, random
    h, s, v = pretrain.rgb_to_hsv(pixels.view(1, 3, 28, 1))
    ref = torch.tensor([colorsys.rgb_to_hsv(*pixels[:, i].tolist()) for i in range(28)])
    torch.testing.assert_close(torch.stack([h.flatten(), s.flatten(), v.flatten()], 1), ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(h.flatten()[:3], torch.tensor([0.0, 1 / 3, 2 / 3]))


def test_random_crop_flip_pad0():
    """Without padding every sample is itself or its mirror image, and both occur."""
    x = images(16)
    y = main_evaluate.random_crop_flip(x, 0, gen())
    same = [torch.equal(y[i], x[i]) for i in range(16)]
    flipped = [torch.equal(y[i], x[i].flip(2)) for i in range(16)]
    assert all(a or b for a, b in zip(same, flipped))
    assert any(same) and any(flipped)


def test_random_crop_flip_pad4():
    """With padding 4 each output is one crop (and maybe flip) of the reflect-padded input;
    all 9 x 9 offsets and both flips occur."""
    B = 128
    x = images(B, 16)  # at 8 px a shifted crop of a reflection can equal a flipped one
    y = main_evaluate.random_crop_flip(x, 4, gen())
    assert y.shape == (B, 3, 16, 16)
    xp = F.pad(x, (4, 4, 4, 4), mode="reflect")
    found = []
    for i in range(B):
        crops = {(dy, dx): xp[i, :, dy:dy + 16, dx:dx + 16] for dy in range(9) for dx in range(9)}
        hits = [(dy, dx, flip) for (dy, dx), c in crops.items() for flip in (False, True)
                if torch.equal(y[i], c.flip(2) if flip else c)]
        assert len(hits) == 1, f"sample {i} is not exactly one crop of the padded input: {hits}"
        found.append(hits[0])
    dys, dxs, flips = zip(*found)
    assert set(dys) == set(dxs) == set(range(9)) and set(flips) == {False, True}


def test_rotate():
    x = images(3, 8)
    y = x
    for _ in range(4):
        y = utils.rotate(y, 90)
    assert torch.equal(y, x)
    assert torch.equal(utils.rotate(x, 90), torch.rot90(x, 1, (2, 3)))
    assert torch.equal(utils.rotate(x, 180), x.flip(2).flip(3))
    assert torch.equal(utils.rotate(x, 0), x) and torch.equal(utils.rotate(x, 450), utils.rotate(x, 90))
    with pytest.raises(ValueError, match="45"):
        utils.rotate(x, 45)


def test_all_views():
    x = images(3, 8)
    v = main_distill.all_views(x, [90, 180, 270])
    assert v.shape == (12, 3, 8, 8)
    for k, angle in enumerate([0, 90, 180, 270]):
        assert torch.equal(v[3 * k:3 * (k + 1)], torch.rot90(x, angle // 90, (2, 3)))
    assert torch.equal(main_distill.all_views(x, []), x)


def test_hsv_to_rgb_builds_no_constant_tensor(monkeypatch):
    """Colour jitter runs in every teacher step: hsv_to_rgb must not build a tensor from Python data (on CUDA a
    host-to-device copy per call)."""
    h, s, v = pretrain.rgb_to_hsv(images(4, 8))
    calls = []
    real = torch.tensor
    monkeypatch.setattr(torch, "tensor", lambda *a, **k: calls.append(1) or real(*a, **k))
    pretrain.hsv_to_rgb(h, s, v)
    assert calls == []
