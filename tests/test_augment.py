"""Device augmentation (Kornia) and normalization."""

from __future__ import annotations

import torch

from brainseg_dist.augment import DeviceAugment
from brainseg_dist.config import AugmentConfig
from brainseg_dist.preprocess import normalize, volume_stats_by_patient


def _batch(n=8, size=64):
    g = torch.Generator().manual_seed(0)
    masks = torch.zeros(n, 1, size, size)
    for i in range(n):
        y, x = torch.randint(8, size - 24, (2,), generator=g).tolist()
        masks[i, 0, y:y + 16, x:x + 20] = 1
    images = torch.rand(n, 3, size, size, generator=g) * 0.2
    images[:, 1:2] += masks  # channel 1 carries the mask: a geometric twin
    return images, masks


def test_same_transform_on_image_and_mask_and_binary_masks():
    cfg = AugmentConfig(rotation_p=1.0, hflip_p=0.5, vflip_p=0.5, elastic_p=1.0)
    aug = DeviceAugment(cfg).train()
    images, masks = _batch()
    torch.manual_seed(1)
    out_images, out_masks = aug(images, masks)
    assert set(out_masks.unique().tolist()) <= {0.0, 1.0}
    assert not torch.equal(out_masks, masks)  # something moved
    # The bright square in channel 1 moved exactly like the mask did.
    twin = (out_images[:, 1:2] > 0.6).float()
    agreement = (twin == out_masks).float().mean()
    assert agreement > 0.99


def test_disabled_or_eval_is_identity():
    images, masks = _batch()
    aug = DeviceAugment(AugmentConfig(enabled=False)).train()
    a, b = aug(images, masks)
    assert torch.equal(a, images)
    assert torch.equal(b, masks)
    aug = DeviceAugment(AugmentConfig(rotation_p=1.0)).eval()
    a, b = aug(images, masks)
    assert torch.equal(a, images)
    assert torch.equal(b, masks)


def test_intensity_jitter_only_touches_images():
    images, masks = _batch()
    cfg = AugmentConfig(rotation_p=0, hflip_p=0, elastic_p=0, intensity_p=1.0)
    out_images, out_masks = DeviceAugment(cfg).train()(images, masks)
    assert torch.equal(out_masks, masks)
    assert not torch.allclose(out_images, images)


def test_slice_normalization_zero_mean_unit_std():
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    x = normalize(images, "slice")
    assert x.dtype == torch.float32
    torch.testing.assert_close(x.mean(dim=(2, 3)), torch.zeros(4, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(x.std(dim=(2, 3)), torch.ones(4, 3), atol=1e-4, rtol=0)


def test_flat_slice_is_not_blown_up():
    images = torch.zeros(1, 3, 16, 16, dtype=torch.uint8)
    images[..., 0, 0] = 1  # near-empty top-of-head slice
    assert normalize(images, "slice").abs().max() < 1.0


def test_volume_normalization_uses_patient_statistics():
    images = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8)
    codes = torch.tensor([0, 0, 0, 1, 1, 1])
    stats = volume_stats_by_patient(images, codes)
    assert stats.shape == (6, 3, 2)
    x = normalize(images, "volume", stats)
    first = x[:3].transpose(0, 1).reshape(3, -1)
    torch.testing.assert_close(first.mean(1), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(first.std(1), torch.ones(3), atol=1e-4, rtol=0)


def test_gamma_runs_before_normalization_only_in_training():
    from brainseg_dist.augment import DeviceAugment
    from brainseg_dist.config import AugmentConfig

    torch.manual_seed(0)
    images = torch.randint(1, 255, (16, 3, 8, 8), dtype=torch.uint8)
    off = DeviceAugment(AugmentConfig(gamma_p=0.0))
    assert off.intensity(images) is images
    aug = DeviceAugment(AugmentConfig(gamma_p=1.0, gamma_range=0.5))
    out = aug.intensity(images)
    assert out.dtype == torch.float32
    assert out.shape == images.shape
    x = images.float() / 255
    y = out / 255
    # One gamma per slice: log(y) / log(x) is constant within a slice, in [1/1.5, 1.5].
    ratio = (y.log() / x.log()).flatten(1)
    assert torch.allclose(ratio, ratio[:, :1].expand_as(ratio), rtol=1e-3, atol=1e-3)
    assert ratio.min() >= 1 / 1.5 - 1e-3
    assert ratio.max() <= 1.5 + 1e-3
    assert ratio[:, 0].std() > 0.05  # gammas differ between slices
    assert aug.eval().intensity(images) is images


def test_missing_sequences_are_filled_with_flair_at_the_asked_rate():
    from brainseg_dist.augment import fill_missing_sequences

    torch.manual_seed(0)
    images = torch.randint(0, 255, (4000, 3, 4, 4), dtype=torch.uint8)
    out = fill_missing_sequences(images, 0.25)
    assert out.dtype == torch.uint8
    torch.testing.assert_close(out[:, 1], images[:, 1])  # FLAIR is never touched
    for c in (0, 2):
        filled = (out[:, c] == images[:, 1]).flatten(1).all(1)
        kept = (out[:, c] == images[:, c]).flatten(1).all(1)
        assert bool((filled | kept).all())  # each channel is either its own or FLAIR
        assert 0.22 < filled.float().mean() < 0.28
    both = ((out[:, 0] == images[:, 1]) & (out[:, 2] == images[:, 1])).flatten(1).all(1)
    assert 0.045 < both.float().mean() < 0.08  # independent draws: about 0.25²

    aug = DeviceAugment(AugmentConfig(missing_sequence_p=1.0))
    assert (aug.intensity(images)[:, 0] == images[:, 1]).all()
    assert aug.eval().intensity(images) is images
