"""Device augmentation (Kornia) and normalization."""

from __future__ import annotations

import kornia
import torch
import torch.nn.functional as F

from brainseg_dist.augment import DeviceAugment, FusedGeometry, elastic_kernel_size
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


# ----------------------------------------------------------------- one-grid geometry (fused)
def _fused(**kw) -> FusedGeometry:
    return FusedGeometry(AugmentConfig(**kw))


def _dot(n=1, size=64):
    x = torch.zeros(n, 2, size, size)
    x[:, 0, 12:16, 40:46] = 1.0  # off-centre and not symmetric: shows every transform
    x[:, 1, 30:34, 4:60] = 0.5
    return x


def _sample(x, grid):
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def test_fused_grid_equals_each_kornia_transform_with_the_same_parameters():
    x = _dot()
    h, w = x.shape[-2:]
    # rotation by +10°: draws = (hflip, vflip, rotate?, angle, elastic?)
    g = _fused(rotation_p=1.0, hflip_p=0.0).grid(
        torch.tensor([[0.9, 0.9, 0.0, (10 / 15 + 1) / 2, 0.9]]), None, h, w)
    ref = kornia.geometry.transform.rotate(x, torch.tensor([10.0]), align_corners=True)
    torch.testing.assert_close(_sample(x, g), ref, atol=1e-4, rtol=0)
    # both flips: exact index flips
    g = _fused(rotation_p=0.0, hflip_p=1.0, vflip_p=1.0).grid(torch.zeros(1, 5), None, h, w)
    torch.testing.assert_close(_sample(x, g), x.flip(-1).flip(-2), atol=1e-4, rtol=0)
    # elastic: Kornia's RandomElasticTransform (align_corners=False) with the same noise
    noise = torch.rand(1, 2, h, w, generator=torch.Generator().manual_seed(0)) * 2 - 1
    g = _fused(rotation_p=0.0, hflip_p=0.0, elastic_p=1.0).grid(torch.zeros(1, 5), noise, h, w)
    k = elastic_kernel_size(16.0)
    ref = kornia.geometry.transform.elastic_transform2d(x, noise, (k, k), (16.0, 16.0),
                                                        (3.0, 3.0), align_corners=False)
    torch.testing.assert_close(_sample(x, g), ref, atol=1e-4, rtol=0)
    # non-square and nothing drawn: the identity
    y = torch.rand(1, 1, 20, 30)
    torch.testing.assert_close(_sample(y, _fused().grid(torch.ones(1, 5), None, 20, 30)), y,
                               atol=1e-5, rtol=0)


def _dot_positions(aug: DeviceAugment, n: int, seed: int) -> torch.Tensor:
    """Per sample: the dot's centroid (x, y) and its spread, after ``aug``'s geometry."""
    torch.manual_seed(seed)
    x = _dot(n)
    out = aug.geometric(x)[:, 0].clamp(min=0)
    mass = out.sum((1, 2)).clamp(min=1e-6)
    ys, xs = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    cx, cy = (out * xs).sum((1, 2)) / mass, (out * ys).sum((1, 2)) / mass
    spread = (out * ((xs - cx[:, None, None]) ** 2 + (ys - cy[:, None, None]) ** 2)).sum(
        (1, 2)) / mass
    # Rounded to 0.01 px: an untransformed or flipped dot lands on one value that float
    # roundoff would otherwise split into two, and KS would count that as a difference.
    return (torch.stack([cx, cy, spread], dim=1) * 100).round() / 100


def _ks(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample Kolmogorov-Smirnov statistic."""
    both = torch.cat([a, b]).sort().values
    cdf_a = torch.searchsorted(a.sort().values, both, right=True) / len(a)
    cdf_b = torch.searchsorted(b.sort().values, both, right=True) / len(b)
    return float((cdf_a - cdf_b).abs().max())


STRONG = {"rotation_degrees": 30.0, "rotation_p": 0.7, "hflip_p": 0.5, "vflip_p": 0.3,
          "elastic_p": 0.5, "elastic_sigma": 8.0, "elastic_alpha": 3.0}


def test_fused_geometry_draws_the_kornia_ops_distribution():
    """Where the dot lands (centroid x, y) and how much it is smeared (spread), over 2,000
    draws each: the sequential Kornia ops and the one grid agree by a two-sample KS test
    (α = 0.001), while a changed setting is rejected by the same test."""
    n = 2000
    critical = 1.95 * (2 / n) ** 0.5  # KS at α = 0.001, equal sample sizes
    kornia_ops = _dot_positions(DeviceAugment(AugmentConfig(**STRONG)), n, seed=1)
    fused = _dot_positions(DeviceAugment(AugmentConfig(**STRONG, fused=True)), n, seed=2)
    for i, name in enumerate(("centroid x", "centroid y")):
        assert _ks(kornia_ops[:, i], fused[:, i]) < critical, name
    # One resampling instead of three smears the dot less, and no more than Kornia's does.
    assert fused[:, 2].median() <= kornia_ops[:, 2].median()
    # The test has power: 15° instead of 30°, or no vertical flips, are told apart.
    for change in ({"rotation_degrees": 15.0}, {"vflip_p": 0.0}):
        other = _dot_positions(DeviceAugment(AugmentConfig(**{**STRONG, **change}, fused=True)),
                               n, seed=3)
        assert max(_ks(kornia_ops[:, i], other[:, i]) for i in range(2)) > critical, change


def test_fused_elastic_displacement_has_kornias_distribution():
    """Elastic alone (p = 1): the dot's shift has the same distribution; alpha 2 instead
    of 3 is told apart."""
    n, critical = 2000, 1.95 * (2 / 2000) ** 0.5
    cfg = {"rotation_p": 0.0, "hflip_p": 0.0, "elastic_p": 1.0, "elastic_sigma": 8.0}
    kornia_ops = _dot_positions(DeviceAugment(AugmentConfig(**cfg)), n, seed=4)
    fused = _dot_positions(DeviceAugment(AugmentConfig(**cfg, fused=True)), n, seed=5)
    weaker = _dot_positions(DeviceAugment(AugmentConfig(**cfg, elastic_alpha=2.0, fused=True)),
                            n, seed=6)
    for i in range(2):
        assert _ks(kornia_ops[:, i], fused[:, i]) < critical, i
        assert _ks(kornia_ops[:, i], weaker[:, i]) > critical, i


def test_compiled_kornia_ops_draw_what_eager_ones_draw():
    """``train.compile`` compiles the augmentation on CUDA. Traced by dynamo (AOT autograd
    here; CUDA graphs in ``gpu_checks``), Kornia's ops must draw anew in each call as eager
    ones do, not replay what they drew while tracing: from the same seed, the compiled ops
    give the eager output exactly, call after call of the one graph."""
    x = torch.rand(64, 4, 64, 64, generator=torch.Generator().manual_seed(0))
    eager, compiled = DeviceAugment(AugmentConfig(**STRONG)), DeviceAugment(AugmentConfig(**STRONG))
    compiled.geometric.compile(backend="aot_eager")
    outputs = []
    for seed in (1, 2, 3):  # traced in the first call
        torch.manual_seed(seed)
        outputs.append(compiled.geometric(x))
        torch.manual_seed(seed)
        torch.testing.assert_close(outputs[-1], eager.geometric(x), rtol=0, atol=0)
    assert not torch.equal(outputs[1], outputs[2])


def test_fused_augment_keeps_image_and_mask_together():
    cfg = AugmentConfig(rotation_p=1.0, hflip_p=0.5, vflip_p=0.5, elastic_p=1.0, fused=True)
    images, masks = _batch()
    torch.manual_seed(1)
    out_images, out_masks = DeviceAugment(cfg).train()(images, masks)
    assert set(out_masks.unique().tolist()) <= {0.0, 1.0}
    assert not torch.equal(out_masks, masks)
    assert ((out_images[:, 1:2] > 0.6).float() == out_masks).float().mean() > 0.99


def test_kornia_draws_stay_on_the_augments_device():
    """Kornia hands a uniform generator's draws over on the device of its range tensors, or
    on the default device when the ranges are plain numbers: on CUDA that was a copy to the
    host and back (two host syncs) in every step. With the default device set elsewhere
    (meta), the draws must still come out on the module's device."""
    aug = DeviceAugment(AugmentConfig(gamma_p=0.5, gamma_range=0.3, vflip_p=0.5,
                                      elastic_p=0.5)).to("cpu")
    ops = [*aug.geometric, aug.gamma]
    assert {type(op).__name__ for op in ops} >= {"RandomRotation", "RandomGamma",
                                                  "RandomElasticTransform"}
    torch.manual_seed(0)
    with torch.device("meta"):
        for op in ops:
            params = op.forward_parameters(torch.Size((4, 4, 32, 32)))
            # forward_input_shape is host metadata, made on the default device by design.
            devices = {k: v.device.type for k, v in params.items()
                       if torch.is_tensor(v) and k != "forward_input_shape"}
            assert set(devices.values()) == {"cpu"}, (type(op).__name__, devices)
    x = torch.rand(4, 3, 32, 32) * 255
    images, masks = aug(aug.intensity(x), (x[:, :1] > 128).float())
    assert images.device.type == masks.device.type == "cpu"


def test_fused_blur_matrix_is_made_once_and_compiled_calls_keep_their_guards():
    """The blur matrix is made at construction, never inside a call: on an H200 a matrix
    cached at the first compiled call was a CUDA graph's output, overwritten at the next
    replay ("accessing tensor output of CUDAGraphs that has been overwritten"), and one
    cached by an eager call in between (the epoch's last, smaller batch) would change what
    the compiled code was guarded on: a second compile. Compiled, eager, compiled: one graph,
    and the eager result. At any size the matrix is the zero-border convolution's."""
    torch.manual_seed(0)
    geometry = _fused(hflip_p=0.5, rotation_p=1.0, elastic_p=1.0)
    graphs = []

    def backend(graph, _inputs):
        graphs.append(graph)
        return graph.forward

    compiled = torch.compile(geometry, backend=backend, fullgraph=True)
    x = torch.rand(2, 4, 16, 16)
    compiled(x)
    geometry(x[:1])  # eager, as training runs a last, smaller batch
    torch.manual_seed(1)
    out = compiled(x)
    assert len(graphs) == 1
    torch.manual_seed(1)
    assert torch.allclose(geometry(x), out, atol=1e-6)

    kernel = geometry.kernel.double()
    r = kernel.numel() // 2
    for size in (16, 128, 600):  # 600: past the matrix made at construction
        v = torch.rand(size, dtype=torch.float64)
        direct = F.conv1d(F.pad(v, (r, r))[None, None], kernel[None, None])[0, 0]
        blur = geometry.blur_matrix(size, v.device, torch.float64)
        assert blur.shape == (size, size)
        assert torch.allclose(blur @ v, direct, atol=1e-12), size
