import math

import numpy as np
import pytest
import torch

from cifar_ray.augment import augment, flip_crop, hflip, random_crop, warp
from cifar_ray.batches import DeviceImages
from cifar_ray.config import AUGMENT_PRESETS, AugmentConfig
from cifar_ray.data import Split

SETS = {name: AugmentConfig(**values) for name, values in AUGMENT_PRESETS.items() if values}


def _batch(n=16):
    torch.manual_seed(0)
    one = torch.rand(1, 3, 32, 32)
    return one.expand(n, 3, 32, 32).clone()  # the same image n times


@pytest.mark.parametrize("name", list(SETS))
def test_keeps_shape_dtype_range_and_differs_per_sample(name):
    x = _batch()
    out = augment(x, SETS[name], torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.min() >= 0 and out.max() <= 1
    distinct = {tuple(o.flatten()[:2000].tolist()) for o in out}
    assert len(distinct) > 4, "per-sample random parameters expected"


@pytest.mark.parametrize("name", list(SETS))
def test_seeded_generator_reproduces(name):
    x = _batch()
    a = augment(x, SETS[name], torch.Generator().manual_seed(7))
    b = augment(x, SETS[name], torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_hflip_matches_flip():
    x = torch.rand(4, 3, 32, 32)
    assert torch.equal(hflip(x, 1.0, torch.Generator()), x.flip(3))
    assert torch.equal(hflip(x, 0.0, torch.Generator()), x)


def test_crop_is_a_shifted_window_of_the_padded_image():
    x = torch.rand(8, 3, 32, 32)
    out = random_crop(x, 4, torch.Generator().manual_seed(1))
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(8):
        hits = [(dy, dx) for dy in range(9) for dx in range(9)
                if torch.equal(out[i], padded[i, :, dy:dy + 32, dx:dx + 32])]
        assert hits, f"sample {i} is not a window of its padded image"


def test_warp_identity_and_quarter_turn_match_torch():
    x = torch.rand(2, 3, 32, 32)
    eye = torch.eye(3).expand(2, 3, 3)
    assert torch.allclose(warp(x, eye), x, atol=1e-5)
    c, s = math.cos(math.pi / 2), math.sin(math.pi / 2)
    rot = torch.tensor([[c, -s, 0], [s, c, 0], [0, 0, 1]]).expand(2, 3, 3)
    out = warp(x, rot)
    ref = torch.rot90(x, k=1, dims=(2, 3))  # counter-clockwise in (row, col) display
    ref_other = torch.rot90(x, k=-1, dims=(2, 3))
    assert torch.allclose(out, ref, atol=1e-4) or torch.allclose(out, ref_other, atol=1e-4)


def test_cutout_zeroes_a_square():
    x = torch.ones(6, 3, 32, 32)
    out = augment(x, AugmentConfig(cutout=8), torch.Generator().manual_seed(0))
    zeros = (out[:, 0] == 0).sum(dim=(1, 2))
    assert ((zeros > 0) & (zeros <= 64)).all()
    assert (out[:, 0] == out[:, 1]).all()  # the same hole in every channel


def test_preset_names_resolve():
    from cifar_ray.config import DataConfig

    assert DataConfig(augment="flip_crop").augment == AugmentConfig(hflip=0.5, crop_padding=4)
    assert not DataConfig().augment.enabled()
    with pytest.raises(ValueError, match="unknown augmentation preset"):
        DataConfig(augment="flips")


def test_composed_colour_jitter_equals_the_steps_in_sequence():
    """The one-pass affine colour map gives what brightness, contrast and saturation give one after
    another (torchvision's definitions, without clamping between steps)."""
    from cifar_ray.augment import color_jitter

    torch.manual_seed(0)
    x = torch.rand(4, 3, 8, 8)
    out = color_jitter(x, AugmentConfig(brightness=0.3, contrast=0.3, saturation=0.3), torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    b, c, s = (torch.rand(4, generator=g)[:, None, None, None] * 0.6 + 0.7 for _ in range(3))

    def gray(y):
        return (0.299 * y[:, 0] + 0.587 * y[:, 1] + 0.114 * y[:, 2]).unsqueeze(1)

    y = x * b
    mean = gray(y).mean((1, 2, 3), keepdim=True)
    y = (y - mean) * c + mean
    y = (y - gray(y)) * s + gray(y)
    assert torch.allclose(out, y.clamp(0, 1), atol=1e-5)


@pytest.mark.parametrize("flip_p,padding", [(0.5, 4), (0.5, 0), (0.0, 4), (1.0, 2)])
def test_flip_crop_on_uint8_equals_hflip_then_crop_on_float(flip_p, padding):
    """The batch path runs flip_crop on uint8 before the float conversion: the same draws, the same pixels."""
    x8 = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    expected = x8.float() / 255
    g1 = torch.Generator().manual_seed(3)
    if flip_p:
        expected = hflip(expected, flip_p, g1)
    if padding:
        expected = random_crop(expected, padding, g1)
    got = flip_crop(x8, flip_p, padding, torch.Generator().manual_seed(3)).float() / 255
    assert torch.equal(got, expected)


@pytest.mark.parametrize("preset", ["none", "flip_crop", "seed"])
def test_batch_path_equals_augment_then_normalise(preset):
    """DeviceImages.batch runs flip/crop on uint8 and folds normalisation into a scale and shift: the
    batches must equal the plain definition, float in [0, 1] -> augment -> (x - mean) / std."""
    x8 = np.random.default_rng(0).integers(0, 256, (200, 3, 32, 32), dtype=np.uint8)
    y = np.arange(200, dtype=np.int64) % 10
    split = Split(np.arange(200), np.arange(0), (0.49, 0.48, 0.45), (0.25, 0.24, 0.26))
    images = DeviceImages.create(x8, y, split, torch.device("cpu"), channels_last=False)
    cfg = AugmentConfig(**AUGMENT_PRESETS[preset])
    idx = torch.arange(7, 71)
    got, labels = images.batch(idx, cfg if cfg.enabled() else None, torch.Generator().manual_seed(5))
    ref = torch.from_numpy(x8[7:71]).float() / 255
    if cfg.enabled():
        ref = augment(ref, cfg, torch.Generator().manual_seed(5))
    ref = (ref - images.mean) / images.std
    assert torch.allclose(got, ref, atol=1e-5) and torch.equal(labels, torch.from_numpy(y[7:71]))


@pytest.mark.parametrize("flip_p", [0.0, 0.5, 1.0])
def test_reflect_crop_is_a_window_of_the_reflect_padded_image_with_the_same_draws(flip_p):
    """crop_reflect: the same offsets (and flips) as the zero-padded crop, the border filled by torch's
    `reflect` padding, read by index on uint8."""
    import torch.nn.functional as F

    from cifar_ray.augment import reflect_index

    x8 = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8)
    got = flip_crop(x8, flip_p, 4, torch.Generator().manual_seed(3), reflect=True)
    g = torch.Generator().manual_seed(3)  # the draws flip_crop makes, in its order
    flip = torch.rand(32, generator=g) < flip_p if flip_p else torch.zeros(32, dtype=torch.bool)
    oy, ox = torch.randint(0, 9, (32,), generator=g), torch.randint(0, 9, (32,), generator=g)
    source = torch.where(flip[:, None, None, None], x8.flip(3), x8)
    padded = F.pad(source.float(), (4, 4, 4, 4), mode="reflect")
    expected = torch.stack([padded[i, :, oy[i]:oy[i] + 32, ox[i]:ox[i] + 32] for i in range(32)])
    assert torch.equal(got.float(), expected)
    zeros = flip_crop(x8, flip_p, 4, torch.Generator().manual_seed(3))
    inside = (oy == 4) & (ox == 4)  # a crop that needs no border is the same either way
    assert torch.equal(got[inside], zeros[inside])
    assert reflect_index(torch.tensor([-2, -1, 0, 31, 32, 33]), 32).tolist() == [2, 1, 0, 31, 30, 29]


def test_alternate_flip_mirrors_exactly_the_images_it_is_told_to():
    x8 = np.random.default_rng(1).integers(0, 256, (50, 3, 32, 32), dtype=np.uint8)
    split = Split(np.arange(50), np.arange(0), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    images = DeviceImages.create(x8, np.zeros(50, dtype=np.int64), split, torch.device("cpu"), channels_last=False)
    flips = torch.arange(50) % 3 == 0
    idx = torch.tensor([3, 4, 9, 10])
    cfg = AugmentConfig(alternate_flip=True)
    got, _ = images.batch(idx, cfg, torch.Generator().manual_seed(0), flips)
    plain, _ = images.batch(idx, None)
    assert torch.equal(got[[0, 2]], plain[[0, 2]].flip(3)) and torch.equal(got[[1, 3]], plain[[1, 3]])


def test_flip_and_crop_options_that_contradict_are_refused():
    with pytest.raises(ValueError, match="alternate_flip and hflip both set"):
        AugmentConfig(alternate_flip=True, hflip=0.5)
    with pytest.raises(ValueError, match="crop_reflect needs crop_padding"):
        AugmentConfig(crop_reflect=True)
