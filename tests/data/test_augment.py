import numpy as np
import pytest
import torch
from torch.nn import functional as F

from supcon.core.errors import UsageError
from supcon.data.augment import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    AugmentConfig,
    AugmentParams,
    BatchAugment,
    split_views,
    to_float_nchw,
)
from supcon.evaluation.plots import save_view_grid

# Everything off: a crop of the whole image, no flip, no jitter, no gray, no normalization.
IDENTITY = dict(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0, grayscale_p=0.0)


def images(b=6, h=12, w=12, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, h, w, c), dtype=torch.uint8, generator=g)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# torchvision's tensor colour ops (float images in [0, 1]), written out as the reference.
def ref_gray(x):
    r, g, b = x.unbind(-3)
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(-3)


def ref_blend(a, b, f):
    return (f * a + (1.0 - f) * b).clamp(0.0, 1.0)


def ref_hue(img, hue_factor):
    r, g, b = img.unbind(-3)
    maxc, minc = img.max(-3).values, img.min(-3).values
    eqc = maxc == minc
    cr = maxc - minc
    ones = torch.ones_like(maxc)
    s = cr / torch.where(eqc, ones, maxc)
    crd = torch.where(eqc, ones, cr)
    rc, gc, bc = (maxc - r) / crd, (maxc - g) / crd, (maxc - b) / crd
    hr = (maxc == r) * (bc - gc)
    hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
    hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
    h = torch.fmod((hr + hg + hb) / 6.0 + 1.0, 1.0)
    h = (h + hue_factor) % 1.0
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.to(torch.int32) % 6
    v = maxc
    p = (v * (1.0 - s)).clamp(0, 1)
    q = (v * (1.0 - s * f)).clamp(0, 1)
    t = (v * (1.0 - s * (1.0 - f))).clamp(0, 1)
    mask = (i.unsqueeze(-3) == torch.arange(6).view(-1, 1, 1)).to(img.dtype)
    a1 = torch.stack((v, q, p, p, t, v), -3)
    a2 = torch.stack((t, v, v, q, p, p), -3)
    a3 = torch.stack((p, p, t, v, v, q), -3)
    return torch.einsum("...ijk,...xijk->...xjk", mask, torch.stack((a1, a2, a3), -4))


def ref_jitter(img, factors, order):
    for op in order.tolist():
        f = float(factors[op])
        if op == 0:
            img = ref_blend(img, torch.zeros_like(img), f)
        elif op == 1:
            img = ref_blend(img, ref_gray(img).mean((-3, -2, -1), keepdim=True), f)
        elif op == 2:
            img = ref_blend(img, ref_gray(img), f)
        else:
            img = ref_hue(img, f)
    return img


def test_output_shape_dtype_layout():
    x = images(b=5, h=12, w=10)
    for views in (1, 2, 3):
        out = BatchAugment()(x, views=views, generator=gen())
        assert out.shape == (views * 5, 3, 12, 10)
        assert out.dtype == torch.float32
        assert out.is_contiguous(memory_format=torch.channels_last)
    out = BatchAugment(size=8)(x, views=2, generator=gen())
    assert out.shape == (10, 3, 8, 8)
    out = BatchAugment(size=(6, 9))(x, generator=gen())
    assert out.shape == (5, 3, 6, 9)


def test_float_nchw_input_gives_the_same_result_as_uint8():
    x = images()
    a = BatchAugment()(x, views=2, generator=gen(3))
    b = BatchAugment()(x.permute(0, 3, 1, 2).float() / 255, views=2, generator=gen(3))
    torch.testing.assert_close(a, b)


def test_same_seed_same_output_different_seed_different_output():
    x = images()
    aug = BatchAugment()
    a = aug(x, views=2, generator=gen(7))
    b = aug(x, views=2, generator=gen(7))
    c = aug(x, views=2, generator=gen(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # The generator advances: two consecutive batches differ, and replaying from a saved state repeats them.
    g = gen(7)
    state = g.get_state()
    first, second = aug(x, generator=g), aug(x, generator=g)
    assert not torch.equal(first, second)
    g.set_state(state)
    assert torch.equal(aug(x, generator=g), first)


def test_without_generator_the_global_seed_governs():
    x = images()
    torch.manual_seed(1)
    a = BatchAugment()(x, views=2)
    torch.manual_seed(1)
    b = BatchAugment()(x, views=2)
    assert torch.equal(a, b)


def test_rows_and_views_get_independent_draws():
    aug = BatchAugment()
    p = aug.sample_params(2000, 32, 32, generator=gen())
    # Crop boxes: many distinct ones, and the two views of an image (rows b and 1000 + b) mostly differ.
    assert len({tuple(b) for b in p.box.tolist()}) > 500
    assert (p.box[:1000] != p.box[1000:]).any(1).float().mean() > 0.9
    # Per-row Bernoulli draws match their probabilities and are not shared between views.
    assert abs(p.flip.float().mean().item() - 0.5) < 0.05
    assert abs(p.jitter.float().mean().item() - 0.8) < 0.05
    assert abs(p.gray.float().mean().item() - 0.2) < 0.05
    assert (p.flip[:1000] != p.flip[1000:]).float().mean() > 0.4
    # Factors in range and distinct per row.
    lo = torch.tensor([0.6, 0.6, 0.6, -0.1])
    hi = torch.tensor([1.4, 1.4, 1.4, 0.1])
    assert ((p.factors >= lo) & (p.factors <= hi)).all()
    assert p.factors[:, 0].unique().numel() > 1900
    # Random jitter order: each row is a permutation of 0..3, and all 24 orders occur.
    assert torch.equal(p.order.sort(1).values, torch.arange(4).expand(2000, 4))
    assert len({tuple(o) for o in p.order.tolist()}) == 24
    fixed = BatchAugment(jitter_order="fixed").sample_params(10, 32, 32, generator=gen())
    assert torch.equal(fixed.order, torch.arange(4).expand(10, 4))


def test_views_of_one_image_differ_in_pixels():
    x = images(b=4, h=16, w=16)
    out = BatchAugment(normalize=False)(x, views=2, generator=gen())
    v = split_views(out, 2)
    assert v.shape == (4, 2, 3, 16, 16)
    for b in range(4):
        assert not torch.allclose(v[b, 0], v[b, 1])


@pytest.mark.parametrize("size", [(40, 40), (64, 48)])
def test_crop_boxes_respect_scale_and_aspect_bounds(size):
    H, W = size
    aug = BatchAugment(crop_scale=(0.2, 1.0), crop_ratio=(3 / 4, 4 / 3))
    p = aug.sample_params(3000, H, W, generator=gen())
    top, left, h, w = p.box.T
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + h <= H).all() and (left + w <= W).all()
    assert (h >= 1).all() and (w >= 1).all()
    # Sides are rounded to whole pixels, so the bounds hold up to half a pixel on each side.
    area = (h * w).double() / (H * W)
    area_lo = ((torch.sqrt(torch.tensor(0.2 * H * W)) - 0.5) ** 2 / (H * W)).item()
    assert (area >= area_lo * 0.97).all() and (area <= 1.0).all()
    ratio = w.double() / h.double()
    assert (ratio >= (3 / 4) * (1 - 1 / h.double()) * (1 - 1 / w.double())).all()
    assert (ratio <= (4 / 3) / ((1 - 1 / h.double()) * (1 - 1 / w.double()))).all()
    # The scale range is used: small and whole-image crops both occur.
    assert area.min() < 0.3 and area.max() > 0.9


def test_crop_fallback_is_the_largest_centre_crop():
    # No try can succeed when the scale demands more than the image holds at the forced aspect.
    aug = BatchAugment(crop_scale=(1.0, 1.0), crop_ratio=(2.0, 2.0))
    p = aug.sample_params(5, 10, 10, generator=gen())
    assert p.box.tolist() == [[2, 0, 5, 10]] * 5


@pytest.mark.parametrize("size", [None, 7])
def test_crop_equals_slicing_then_torch_resize(size):
    # Exactly crop-then-resize with bilinear (antialiased when shrinking), as torchvision's tensor path.
    x = images(b=4, h=16, w=16)
    aug = BatchAugment(size=size, flip_p=0.0, jitter_p=0.0, grayscale_p=0.0, normalize=False)
    params = aug.sample_params(8, 16, 16, generator=gen(5))
    out = aug.apply(x, params, views=2)
    img = to_float_nchw(x)
    S = size or 16
    for n in range(8):
        t, l, h, w = params.box[n].tolist()
        ref = F.interpolate(
            img[n % 4 : n % 4 + 1, :, t : t + h, l : l + w],
            size=(S, S),
            mode="bilinear",
            align_corners=False,
            antialias=True,
        )
        torch.testing.assert_close(out[n], ref[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("size", [5, 16, 23])
def test_crop_edge_cases_equal_slicing_then_torch_resize(size):
    x = images(b=1, h=16, w=16)
    boxes = [[0, 0, 1, 1], [15, 15, 1, 1], [3, 5, 2, 7], [0, 0, 16, 16], [9, 0, 7, 16], [0, 13, 16, 3]]
    aug = BatchAugment(size=size, flip_p=0.0, jitter_p=0.0, grayscale_p=0.0, normalize=False)
    params = aug.sample_params(len(boxes), 16, 16, generator=gen())
    params.box = torch.tensor(boxes)
    out = aug.apply(x, params, views=len(boxes))
    img = to_float_nchw(x)
    for n, (t, l, h, w) in enumerate(boxes):
        ref = F.interpolate(
            img[:, :, t : t + h, l : l + w],
            size=(size, size),
            mode="bilinear",
            align_corners=False,
            antialias=True,
        )
        torch.testing.assert_close(out[n], ref[0], atol=1e-5, rtol=0)


def test_identity_settings_reproduce_the_input():
    x = images()
    out = BatchAugment(normalize=False, **IDENTITY)(x, views=2, generator=gen())
    torch.testing.assert_close(out, to_float_nchw(x).repeat(2, 1, 1, 1), atol=1e-6, rtol=0)


def test_flip_really_flips():
    x = images()
    out = BatchAugment(normalize=False, **dict(IDENTITY, flip_p=1.0))(x, generator=gen())
    torch.testing.assert_close(out, to_float_nchw(x).flip(-1), atol=1e-6, rtol=0)
    # With p = 0.5 some rows are flipped and the others are not, as the params say.
    aug = BatchAugment(normalize=False, **dict(IDENTITY, flip_p=0.5))
    p = aug.sample_params(12, 12, 12, generator=gen(1))
    assert 0 < p.flip.sum() < 12
    out = aug.apply(x, p, views=2)
    ref = to_float_nchw(x).repeat(2, 1, 1, 1)
    ref = torch.where(p.flip.view(-1, 1, 1, 1), ref.flip(-1), ref)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    # With real crops too: flipping mirrors the crop's output, it does not move the crop box.
    aug = BatchAugment(normalize=False, jitter_p=0.0, grayscale_p=0.0)
    p = aug.sample_params(12, 12, 12, generator=gen(2))
    p.flip[:] = False
    plain = aug.apply(x, p, views=2)
    p.flip[:] = True
    torch.testing.assert_close(aug.apply(x, p, views=2), plain.flip(-1), atol=1e-6, rtol=0)


def test_grayscale_gives_equal_channels():
    x = images()
    out = BatchAugment(normalize=False, **dict(IDENTITY, grayscale_p=1.0))(x, generator=gen())
    assert torch.allclose(out[:, 0], out[:, 1]) and torch.allclose(out[:, 1], out[:, 2])
    torch.testing.assert_close(out[:, :1], ref_gray(to_float_nchw(x)), atol=1e-5, rtol=0)
    # At p = 0.2, only the rows drawn gray have equal channels.
    aug = BatchAugment(normalize=False, grayscale_p=0.2)
    big = images(b=200, h=8, w=8)
    p = aug.sample_params(200, 8, 8, generator=gen())
    out = aug.apply(big, p)
    equal = (out[:, 0] == out[:, 1]).flatten(1).all(1) & (out[:, 1] == out[:, 2]).flatten(1).all(1)
    assert torch.equal(equal, p.gray)


@pytest.mark.parametrize("order", ["random", "fixed"])
def test_colour_jitter_matches_torchvision_semantics(order):
    x = images(b=16, h=8, w=8, seed=4)
    aug = BatchAugment(normalize=False, jitter_order=order, **dict(IDENTITY, jitter_p=1.0))
    p = aug.sample_params(16, 8, 8, generator=gen(9))
    out = aug.apply(x, p)
    img = to_float_nchw(x)
    for n in range(16):
        ref = ref_jitter(img[n], p.factors[n], p.order[n])
        torch.testing.assert_close(out[n], ref, atol=2e-5, rtol=0)
    assert not torch.allclose(out, img, atol=1e-3)


def test_hue_shift_matches_hsv_round_trip_including_edge_cases():
    g = gen(0)
    img = torch.rand(40, 3, 6, 6, generator=g)
    img[0] = 0.5  # gray: hue undefined, must stay gray
    img[1, 0], img[1, 1], img[1, 2] = 1.0, 1.0, 0.0  # ties between channel maxima
    img[2] = 0.0
    shifts = torch.rand(40, generator=g) - 0.5
    aug = BatchAugment(
        normalize=False, **dict(IDENTITY, jitter_p=1.0, brightness=0, contrast=0, saturation=0)
    )
    p = aug.sample_params(40, 6, 6, generator=gen())
    p.factors[:, 3] = shifts
    out = aug.apply(img, p)
    for n in range(40):
        torch.testing.assert_close(out[n], ref_hue(img[n], float(shifts[n])), atol=2e-5, rtol=0)


def test_rows_without_jitter_are_unchanged():
    x = images(b=8)
    aug = BatchAugment(normalize=False, **dict(IDENTITY, jitter_p=1.0))
    p = aug.sample_params(8, 12, 12, generator=gen())
    p.jitter[::2] = False
    out = aug.apply(x, p)
    img = to_float_nchw(x)
    torch.testing.assert_close(out[::2], img[::2], atol=1e-6, rtol=0)
    assert not torch.allclose(out[1::2], img[1::2], atol=1e-3)


def test_value_ranges_and_normalization():
    x = images(b=8)
    raw = BatchAugment(normalize=False)(x, views=2, generator=gen(1))
    assert raw.min() >= 0.0 and raw.max() <= 1.0
    normed = BatchAugment()(x, views=2, generator=gen(1))
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(normed, (raw - mean) / std, atol=1e-5, rtol=1e-5)
    custom = BatchAugment(mean=(0.5,), std=(0.25,))(x, generator=gen(1))
    assert custom.min() >= -2.0 - 1e-6 and custom.max() <= 2.0 + 1e-6


def test_plain_mode_scales_and_normalizes_only():
    x = images()
    for mode in ("plain", "none"):
        aug = BatchAugment(AugmentConfig(mode=mode))
        g = gen()
        state = g.get_state()
        out = aug(x, views=2, generator=g)
        assert torch.equal(g.get_state(), state)  # draws nothing
        mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
        ref = ((to_float_nchw(x) - mean) / std).repeat(2, 1, 1, 1)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        assert out.is_contiguous(memory_format=torch.channels_last)
    out = BatchAugment(mode="plain", normalize=False)(x)
    torch.testing.assert_close(out, to_float_nchw(x))


def test_single_channel_images():
    x = images(c=1)
    out = BatchAugment(mean=(0.5,), std=(0.5,))(x, views=2, generator=gen())
    assert out.shape == (12, 1, 12, 12)
    assert torch.isfinite(out).all()
    with pytest.raises(UsageError, match="channel"):
        BatchAugment()(x, generator=gen())


def test_split_views_pairs_rows_with_their_image():
    feats = torch.arange(12.0).view(6, 2)  # 3 images x 2 views
    v = split_views(feats, 2)
    assert v.shape == (3, 2, 2)
    assert torch.equal(v[1, 0], feats[1]) and torch.equal(v[1, 1], feats[4])
    with pytest.raises(ValueError):
        split_views(feats, 4)


def test_config_validation():
    with pytest.raises(UsageError, match="supcon, plain, none"):
        AugmentConfig(mode="strong")
    with pytest.raises(UsageError, match="crop_scale"):
        AugmentConfig(crop_scale=(0.5, 0.2))
    # values from YAML arrive as lists
    cfg = AugmentConfig(crop_scale=[0.08, 1.0], size=24, mean=[0.5], std=[0.5])
    assert cfg.crop_scale == (0.08, 1.0) and cfg.size == (24, 24) and cfg.mean == (0.5,)
    assert BatchAugment(cfg, normalize=False).config.normalize is False
    assert BatchAugment(mode="none").config.mode == "plain"
    assert isinstance(BatchAugment().sample_params(2, 8, 8), AugmentParams)


def test_bad_inputs():
    with pytest.raises(UsageError, match="4 dimensions"):
        BatchAugment()(torch.zeros(8, 8, 3, dtype=torch.uint8))
    with pytest.raises(ValueError):
        BatchAugment()(images(), views=0)


def test_save_view_grid_writes_png(tmp_path):
    from PIL import Image

    x = images(b=5, h=16, w=16)
    path = save_view_grid(x, tmp_path / "sub" / "views.png", views=3, n=4, zoom=2, pad=2)
    im = Image.open(path)
    # 4 rows and 1 + 3 columns of 16-pixel tiles with 2-pixel gaps (one extra after the original), x2 zoom.
    assert im.size == ((4 * 18 + 2 + 2) * 2, (4 * 18 + 2) * 2)
    assert im.mode == "RGB"
    arr = torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255
    # The first tile is the original image, undistorted.
    torch.testing.assert_close(arr[:, 4:36:2, 4:36:2], to_float_nchw(x)[0], atol=1 / 255, rtol=0)


@pytest.mark.parametrize(
    "overrides",
    [{}, {"jitter_p": 1.0}, {"jitter_order": "fixed"}, {"brightness": 0.0, "hue": 0.3}, {"size": 20}],
)
def test_branch_free_path_gives_identical_images(monkeypatch, overrides):
    # The path that reads nothing on the host (used off the CPU) against the CPU's row-selecting one.
    import supcon.data.imageops as imageops

    x = images(b=16, seed=3)
    outs = []
    for branch_free in (False, True):
        monkeypatch.setattr(imageops, "BRANCH_FREE_CPU", branch_free)
        outs.append(BatchAugment(**overrides)(x, views=2, generator=gen(4)))
    assert torch.equal(outs[0], outs[1])


def test_all_rows_without_jitter_or_gray_are_only_cropped():
    # Jitter and grayscale run unconditionally when the config enables them: rows that drew neither
    # must come out exactly as with both switched off.
    x = images(b=8, seed=5)
    p = BatchAugment().sample_params(16, 12, 12, generator=gen(6))
    p.jitter.zero_()
    p.gray.zero_()
    got = BatchAugment().apply(x, p, views=2)
    want = BatchAugment(jitter_p=0.0, grayscale_p=0.0).apply(x, p, views=2)
    assert torch.equal(got, want)


def test_an_empty_batch_gives_an_empty_stack():
    # A rank with an empty share of the global batch still augments (and calls the loss) each step.
    x = torch.zeros(0, 12, 12, 3, dtype=torch.uint8)
    out = BatchAugment()(x, views=2, generator=gen())
    assert out.shape == (0, 3, 12, 12) and out.dtype == torch.float32
    assert split_views(out.flatten(1), 2).shape == (0, 2, 3 * 12 * 12)
