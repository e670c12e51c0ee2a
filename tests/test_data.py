"""Multi-crop data: shapes, determinism, bad images, folder errors, the resumable sampler."""
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from fastibot.data.datasets import (DataError, ImageFolderSource, MultiCropDataset, ResumableBatchSampler,
                                    SyntheticSource, build_loader, collate_multicrop, list_images)
from fastibot.data.masking import MaskGenerator
from fastibot.data.transforms import MultiCropAugmentation
from conftest import tiny_config


def _dataset(source, n_local=3, seed=0):
    aug = MultiCropAugmentation(64, 32, 2, n_local)
    return MultiCropDataset(source, aug, MaskGenerator([0.0, 0.3], [0.0, 0.2]), patch_size=16, n_global=2, seed=seed)


def test_synthetic_source_is_deterministic_and_labelled():
    src = SyntheticSource(20, 5, 64, seed=3)
    a, la = src[7]
    b, lb = src[7]
    assert la == lb == 7 % 5 and a.size == (64, 64) and a.mode == "RGB"
    assert np.array_equal(np.asarray(a), np.asarray(b))
    c, _ = SyntheticSource(20, 5, 64, seed=4)[7]
    assert not np.array_equal(np.asarray(a), np.asarray(c))


def test_multicrop_sample_shapes_and_determinism():
    ds = _dataset(SyntheticSource(10, 2, 64))
    s1, s2 = ds[(1, 4)], ds[(1, 4)]
    assert [tuple(c.shape) for c in s1["crops"]] == [(3, 64, 64)] * 2 + [(3, 32, 32)] * 3
    assert s1["masks"].shape == (2, 4, 4) and s1["masks"].dtype == torch.bool
    for a, b in zip(s1["crops"], s2["crops"]):
        assert torch.equal(a, b)
    other_epoch = ds[(2, 4)]
    assert not torch.equal(s1["crops"][0], other_epoch["crops"][0])
    # sampling a sample does not disturb the caller's RNG stream
    torch.manual_seed(0)
    x = torch.rand(3)
    torch.manual_seed(0)
    ds[(0, 1)]
    assert torch.equal(torch.rand(3), x)


def test_collate_layout():
    ds = _dataset(SyntheticSource(10, 2, 64), n_local=2)
    batch = collate_multicrop([ds[(0, i)] for i in range(3)], n_global=2, capacity=96)
    assert batch.globals.shape == (6, 3, 64, 64) and batch.locals.shape == (6, 3, 32, 32)
    assert batch.masks.shape == (6, 16) and batch.rows.shape == (96,) and batch.row_weight.shape == (96,)
    # crop-major: rows 0..2 are crop 0 of images 0..2, rows 3..5 crop 1
    assert torch.equal(batch.globals[4], ds[(0, 1)]["crops"][1])
    assert int((batch.row_weight > 0).sum()) == int(batch.masks.sum())
    assert batch.labels.tolist() == [0, 1, 0]


def test_sampler_shards_and_resumes():
    s0 = ResumableBatchSampler(50, 4, rank=0, world=2, seed=1)
    s1 = ResumableBatchSampler(50, 4, rank=1, world=2, seed=1)
    assert s0.steps_per_epoch == 6
    b0, b1 = list(s0), list(s1)
    idx0 = {i for b in b0 for _, i in b}
    idx1 = {i for b in b1 for _, i in b}
    assert not idx0 & idx1 and len(idx0) == len(idx1) == 24
    s0.set_position(0, 4)
    assert list(s0) == b0[4:]
    s0.set_position(1, 0)
    assert list(s0) != b0 and all(e == 1 for b in list(s0) for e, _ in b)
    with pytest.raises(DataError, match="batch"):
        ResumableBatchSampler(5, 4, world=2)


def test_folder_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        list_images(tmp_path / "nope")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    (tmp_path / "empty" / "cls" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="no images found"):
        list_images(tmp_path / "empty")


def test_real_jpegs_and_corrupt_files_are_skipped(tmp_path, shared_images, caplog):
    root = tmp_path / "imgs"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
    src_files = sorted((shared_images / "train" / "n01440764").glob("*.jpg"))[:3]
    for i, f in enumerate(src_files):
        shutil.copy(f, root / ("a" if i < 2 else "b") / f.name)
    gray = [p for p in sorted((shared_images / "train").rglob("*.jpg"))[:400] if Image.open(p).mode == "L"][:1]
    for p in gray:
        shutil.copy(p, root / "b" / "gray.jpg")
    (root / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    good = (root / "a" / src_files[0].name).read_bytes()
    (root / "b" / "truncated.jpg").write_bytes(good[: len(good) // 3])
    src = ImageFolderSource(root)
    assert src.classes == ["a", "b"]
    ds = _dataset(src)
    seen_bad = 0
    for i in range(len(src)):
        s = ds[(0, i)]
        seen_bad += s["n_bad"]
        assert s["crops"][0].shape == (3, 64, 64) and torch.isfinite(s["crops"][0]).all()
    assert seen_bad == 2  # broken.jpg and truncated.jpg, each served by its next neighbour
    assert "broken.jpg" in caplog.text and "truncated.jpg" in caplog.text


def test_loader_with_workers_matches_main_process(tmp_path):
    cfg = tiny_config(tmp_path, **{"data.num_workers": 2})
    _, sampler, loader = build_loader(cfg)
    a = next(iter(loader))
    cfg0 = tiny_config(tmp_path, **{"data.num_workers": 0})
    _, _, loader0 = build_loader(cfg0)
    b = next(iter(loader0))
    assert torch.equal(a.globals, b.globals) and torch.equal(a.masks, b.masks)


def test_torchvision_loader_masks_nothing_before_masking_start_epoch(tmp_path):
    cfg = tiny_config(tmp_path, **{"masking.start_epoch": 2, "masking.pred_ratio": [0.3],
                                   "masking.pred_ratio_var": [0.0]})
    _, sampler, loader = build_loader(cfg)
    for epoch in range(4):
        sampler.set_position(epoch, 0)
        masks = next(iter(loader)).masks  # (G*B, N)
        if epoch < 2:
            assert not masks.any(), epoch
        else:  # a fixed ratio of 0.3: every global crop has masked patches
            assert masks.any(1).all(), epoch
