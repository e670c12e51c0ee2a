"""The DALI pipeline on DALI's CPU operators: shapes, ranges, masks, and augmentation statistics
against the torchvision reference (the GPU decoder and mask kernel run the same graph on a GPU)."""
import math

import numpy as np
import pytest
import torch
from torchvision import transforms as T

from fastibot.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from conftest import tiny_config

dali = pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed (pip install 'fastibot[dali]')")

from fastibot.data.dali import DaliData, build_pipeline  # noqa: E402
from fastibot.data.datasets import list_images  # noqa: E402


# out, extent, shape, flip, gray, jitter, blurred, solarized, colour (before solarize/flip), twisted (before blur)
PARAMS_PER_CROP = 10


def _cfg(tmp_path, images, **extra):
    return tiny_config(tmp_path, **{"data.source": "imagefolder", "data.path": str(images / "train"),
                                    "data.loader": "dali", "data.batch_size": 8, **extra})


def test_batches_shapes_ranges_and_masks(tmp_path, shared_images):
    cfg = _cfg(tmp_path, shared_images)
    data = DaliData(cfg, 0, 1, torch.device("cpu"))
    batches = iter(data)
    ratios = []
    for _ in range(3):
        b = next(batches)
        assert b.globals.shape == (16, 3, 32, 32) and b.globals.dtype == torch.float32
        assert b.locals.shape == (16, 3, 16, 16)
        for x in (b.globals, b.locals):
            assert torch.isfinite(x).all()
            lo = min((0 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD))
            hi = max((1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD))
            assert x.min() >= lo - 0.05 and x.max() <= hi + 0.05
            assert x.std() > 0.3  # real pictures, not constants
        assert b.masks.shape == (16, 16) and b.rows.shape == (data.capacity,)
        valid = int((b.row_weight > 0).sum())
        assert valid == int(b.masks.sum())
        assert torch.equal(b.masks.reshape(-1)[b.rows[:valid]], torch.ones(valid, dtype=torch.bool))
        assert b.row_weight[valid:].abs().sum() == 0
        ratios += b.masks.float().mean(1).tolist()
        assert b.labels.shape == (8,) and b.labels.max() < 10
    r = np.array(ratios)
    assert 0.2 < (r == 0).mean() < 0.8 and r.max() <= 0.5


def _reference_area_fractions(n, scale, size=128):
    """Crop area / image area drawn by torchvision's RandomResizedCrop on a size x size image."""
    torch.manual_seed(0)
    img = torch.zeros(3, size, size)
    fr = []
    for _ in range(n):
        i, j, h, w = T.RandomResizedCrop.get_params(img, scale=list(scale), ratio=[3 / 4, 4 / 3])
        fr.append(h * w / size ** 2)
    return np.array(fr)


def test_augmentation_statistics_match_torchvision(tmp_path, shared_images):
    cfg = _cfg(tmp_path, shared_images)
    samples, _ = list_images(cfg.data.path)
    samples = samples[:: max(1, len(samples) // 400)][:400]
    pipe = build_pipeline([p for p, _ in samples], [lab for _, lab in samples], cfg.crops, batch_size=50,
                          shard_id=0, num_shards=1, seed=3, device_id=None, num_threads=2, with_params=True)
    per_crop = PARAMS_PER_CROP
    n_crops = cfg.crops.n_global + cfg.crops.n_local
    stats = {k: [[] for _ in range(n_crops)] for k in ("area", "flip", "gray", "jitter", "blur", "solar", "chan")}
    mean = np.array(IMAGENET_MEAN)[:, None, None]
    std = np.array(IMAGENET_STD)[:, None, None]
    for _ in range(8):  # 400 images
        outs = pipe.run()
        for c in range(n_crops):
            o = [np.array(outs[c * per_crop + k].as_tensor()) for k in range(per_crop)]
            stats["area"][c] += list(o[1].prod(1) / (o[2][:, 0] * o[2][:, 1]))
            for key, k in (("flip", 3), ("gray", 4), ("jitter", 5), ("blur", 6), ("solar", 7)):
                stats[key][c] += list(o[k].reshape(-1).astype(float))
            pix = o[0] * std + mean  # back to [0, 1]
            stats["chan"][c] += list(np.abs(pix[:, 0] - pix[:, 1]).mean((1, 2)))
    n = len(stats["flip"][0])
    tol = 4 * math.sqrt(0.25 / n)  # four standard errors of a rate
    for c in range(n_crops):
        glob = c < cfg.crops.n_global
        scale = cfg.crops.global_scale if glob else cfg.crops.local_scale
        ref = _reference_area_fractions(2000, scale)
        assert abs(np.mean(stats["area"][c]) - ref.mean()) < 0.04, c
        assert abs(np.mean(stats["flip"][c]) - 0.5) < tol
        assert abs(np.mean(stats["gray"][c]) - 0.2) < tol
        assert abs(np.mean(stats["jitter"][c]) - 0.8) < tol
        blur_p = 1.0 if c == 0 else (0.1 if glob else 0.5)
        assert abs(np.mean(stats["blur"][c]) - blur_p) < tol
        solar_p = 0.2 if (glob and c > 0) else 0.0
        assert abs(np.mean(stats["solar"][c]) - solar_p) < tol
        # the grayscale draw shows in the pixels: equal channels exactly when it was drawn
        gray = np.array(stats["gray"][c]) > 0
        chan = np.array(stats["chan"][c])
        assert chan[gray].max() < 0.02 and np.median(chan[~gray]) > 0.02


def _fixed_images(n=16, size=64):
    """Colourful pictures with dark and bright regions: channel ramps in different directions plus a checker."""
    y, x = np.mgrid[0:size, 0:size] / (size - 1)
    imgs = []
    for i in range(n):
        check = ((np.mgrid[0:size, 0:size] // (4 + i % 5)).sum(0) % 2) * 60
        rgb = np.stack([x * 195 + check, y * 195 + (60 - check), (1 - x) * 255 * (i % 3 != 0)], -1)
        imgs.append(np.clip(rgb, 0, 255).astype(np.uint8))
    return imgs


def _fixed_pipeline(crops, images, seed):
    from nvidia.dali import fn, pipeline_def

    from fastibot.data.dali import multicrop_graph

    @pipeline_def(batch_size=len(images), num_threads=1, device_id=None, seed=seed, enable_conditionals=True)
    def pipe():
        x = fn.external_source(source=lambda: images, batch=True, layout="HWC")
        return tuple(multicrop_graph(x, x.shape(), crops, with_params=True))

    p = pipe()
    p.build()
    return p


def test_pixels_flip_solarize_grayscale_on_fixed_images(tmp_path):
    """What each drawn augmentation does to the pixels: a flipped crop is the unflipped one mirrored,
    solarization turns values >= 128 into 255 - value and leaves darker ones, grayscale makes R = G = B,
    and only the crops that drew the blur are blurred."""
    from fastibot.data.dali import MEAN_255, STD_255
    cfg = tiny_config(tmp_path)
    pipe = _fixed_pipeline(cfg.crops, _fixed_images(), seed=11)
    n_crops = cfg.crops.n_global + cfg.crops.n_local
    seen = {"flip": 0, "still": 0, "solar": 0, "gray": 0, "colour": 0, "blurred": 0, "changed": 0, "sharp": 0}
    for _ in range(2):
        outs = pipe.run()
        for c in range(n_crops):
            o = [np.array(outs[c * PARAMS_PER_CROP + k].as_tensor()) for k in range(PARAMS_PER_CROP)]
            out, flip, gray, solarized, colour = o[0], o[3].reshape(-1), o[4].reshape(-1), o[7].reshape(-1), o[8]
            blurred, twisted = o[6].reshape(-1), o[9]
            for b in range(out.shape[0]):
                if blurred[b]:
                    seen["blurred"] += 1
                    seen["changed"] += not np.array_equal(colour[b], twisted[b])  # sigma 0.1 may change nothing
                else:
                    np.testing.assert_array_equal(colour[b], twisted[b], err_msg=f"crop {c} image {b}: not drawn")
                    seen["sharp"] += 1
                px = colour[b].astype(np.float64)  # (S, S, 3) in 0..255
                if solarized[b]:
                    seen["solar"] += bool((px >= 128).any() and (px < 128).any())  # both sides of the threshold
                    px = np.where(px >= 128, 255 - px, px)
                if flip[b]:
                    px = px[:, ::-1]
                seen["flip" if flip[b] else "still"] += 1
                want = ((px - np.array(MEAN_255)) / np.array(STD_255)).transpose(2, 0, 1)
                np.testing.assert_allclose(out[b], want, rtol=0, atol=1e-4, err_msg=f"crop {c} image {b}")
                spread = np.abs(np.diff(colour[b].astype(np.int16), axis=-1)).max()
                if gray[b]:
                    assert spread <= 1, (c, b)  # rounding only
                    seen["gray"] += 1
                else:
                    seen["colour"] += spread > 20
    assert seen["flip"] >= 10 and seen["still"] >= 10 and seen["solar"] >= 2 and seen["gray"] >= 5
    assert seen["sharp"] >= 10 and seen["blurred"] >= 10 and seen["changed"] >= 0.7 * seen["blurred"]
    assert seen["colour"] >= 0.9 * (seen["flip"] + seen["still"] - seen["gray"])  # the pictures keep colour


def test_training_with_the_dali_loader(tmp_path, shared_images):
    from fastibot.train import train
    summary = train(_cfg(tmp_path, shared_images, **{"runtime.max_steps": 2}))
    assert summary["step"] == 2 and summary["loss"] > 0


def test_dali_threads_come_from_their_own_key_not_the_cpu_loaders_workers(tmp_path, shared_images):
    """data.num_workers sizes the torchvision loader (10 in the recipes); DALI runs data.dali_threads threads,
    few by default, because more of them ran slower beside the training process."""
    from fastibot.config import ConfigError
    data = DaliData(_cfg(tmp_path, shared_images, **{"data.num_workers": 10}), 0, 1, torch.device("cpu"))
    assert data.pipe.num_threads == 3
    data = DaliData(_cfg(tmp_path, shared_images, **{"data.num_workers": 10, "data.dali_threads": 2}), 0, 1,
                    torch.device("cpu"))
    assert data.pipe.num_threads == 2
    with pytest.raises(ConfigError, match="dali_threads"):
        _cfg(tmp_path, shared_images, **{"data.dali_threads": 0})


def test_dali_needs_an_image_folder(tmp_path):
    from fastibot.data.datasets import DataError
    cfg = tiny_config(tmp_path, **{"data.loader": "dali"})
    with pytest.raises(DataError, match="data.source=imagefolder"):
        DaliData(cfg, 0, 1, torch.device("cpu"))


def _odd_files(root):
    """RGB, grayscale, CMYK and PNG images that decode, and empty, non-image and truncated files."""
    from PIL import Image
    rng = np.random.default_rng(0)
    (root / "c0").mkdir(parents=True)
    good = []
    for i in range(6):
        img = Image.fromarray((rng.random((40 + i, 56, 3)) * 255).astype("uint8"))
        for mode, ext in (("RGB", "jpg"), ("L", "jpg"), ("CMYK", "jpg"), ("RGB", "png")):
            p = root / "c0" / f"{i}_{mode}.{ext}"
            img.convert(mode).save(p)
            good.append(str(p))
    jpeg = (root / "c0" / "0_RGB.jpg").read_bytes()
    bad = {"truncated.jpg": jpeg[: len(jpeg) // 2], "text.jpg": b"not an image" * 8, "empty.png": b""}
    for name, data in bad.items():
        (root / "c0" / name).write_bytes(data)
    return sorted(good), sorted(str(root / "c0" / n) for n in bad)


def test_screen_files_leaves_out_what_dali_cannot_decode(tmp_path):
    from fastibot.data.dali import screen_files
    good, bad = _odd_files(tmp_path)
    samples, _ = list_images(tmp_path)
    kept, left_out = screen_files(samples, threads=2)
    assert sorted(p for p, _ in kept) == good and sorted(left_out) == bad


def test_dali_reads_gray_cmyk_png_and_counts_unreadable_files(tmp_path):
    _, bad = _odd_files(tmp_path / "imgs")
    cfg = tiny_config(tmp_path, **{"data.source": "imagefolder", "data.path": str(tmp_path / "imgs"),
                                   "data.loader": "dali", "data.batch_size": 8})
    data = DaliData(cfg, 0, 1, torch.device("cpu"))
    data.set_position(0, 0)
    it = iter(data)
    first, second = next(it), next(it)
    assert first.globals.shape[1] == 3 and torch.isfinite(first.globals).all()
    assert first.n_bad.item() == len(bad) and second.n_bad.item() == 0


def test_dali_stops_when_most_files_are_unreadable(tmp_path):
    from fastibot.data.datasets import DataError
    (tmp_path / "imgs" / "c0").mkdir(parents=True)
    for i in range(5):
        (tmp_path / "imgs" / "c0" / f"{i}.jpg").write_bytes(b"\xff\xd8\xff" + b"\x00" * 50)  # no end marker
    cfg = tiny_config(tmp_path, **{"data.source": "imagefolder", "data.path": str(tmp_path / "imgs"),
                                   "data.loader": "dali", "data.batch_size": 2})
    with pytest.raises(DataError, match="unreadable"):
        DaliData(cfg, 0, 1, torch.device("cpu"))


def test_dali_decode_failure_is_a_data_error(tmp_path):
    from fastibot.data.datasets import DataError
    good, _ = _odd_files(tmp_path / "imgs")
    for p in (tmp_path / "imgs" / "c0").glob("*"):
        if str(p) not in good:
            p.unlink()
    # signature and end marker present, nothing decodable between them: passes the screen, fails in DALI
    (tmp_path / "imgs" / "c0" / "broken.jpg").write_bytes(b"\xff\xd8\xff" + b"\x17" * 300 + b"\xff\xd9")
    cfg = tiny_config(tmp_path, **{"data.source": "imagefolder", "data.path": str(tmp_path / "imgs"),
                                   "data.loader": "dali", "data.batch_size": len(good) + 1})
    data = DaliData(cfg, 0, 1, torch.device("cpu"))
    data.set_position(0, 0)
    with pytest.raises(DataError, match="torchvision skips"):
        next(iter(data))


def test_dali_writes_crops_straight_into_the_captured_steps_buffers(tmp_path, shared_images):
    """After ``deliver_into`` (the trainer calls it once the step is captured) micro-batch i of each step is
    written into buffer i in place, the same pixels a fresh pipeline gives with the same seed; the step's own
    copy of those fields is then skipped and the rest (masks, rows) still copied."""
    cfg = _cfg(tmp_path, shared_images, **{"optim.accum_steps": 2})
    plain = [next(it) for it in [iter(DaliData(cfg, 0, 1, torch.device("cpu")))] for _ in range(4)]
    data = DaliData(cfg, 0, 1, torch.device("cpu"))
    static = [plain[0].clone(), plain[0].clone()]
    data.deliver_into(static)
    batches = iter(data)
    for i in range(4):
        b = next(batches)
        dst = static[i % 2]
        assert b.globals is dst.globals and b.locals is dst.locals  # written in place
        torch.testing.assert_close(b.globals, plain[i].globals, rtol=0, atol=0)
        torch.testing.assert_close(b.locals, plain[i].locals, rtol=0, atol=0)
        copied = []
        real_copy = torch.Tensor.copy_
        torch.Tensor.copy_ = lambda self, src, non_blocking=False: (copied.append(self), real_copy(self, src))[1]
        try:
            dst.copy_(b)
        finally:
            torch.Tensor.copy_ = real_copy
        assert not any(t is dst.globals or t is dst.locals for t in copied)
        assert any(t is dst.masks for t in copied) and torch.equal(dst.masks, b.masks)
    with pytest.raises(ValueError, match="step buffer"):
        data.deliver_into([plain[0].clone()._map(lambda t: t[:1] if t.dim() == 4 else t)])
        next(iter(data))
