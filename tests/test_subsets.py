"""Semi-supervised label subsets: class-balanced, deterministic, listed, and what the probe trained on."""
import json
from collections import Counter

import pytest

from fastibot.cli import main
from fastibot.eval import features
from fastibot.eval.subsets import label_subset, read_subset
from conftest import labelled_folder


def _samples(counts):
    return [(f"/d/c{c}/{i:03d}.jpg", c) for c, n in enumerate(counts) for i in range(n)]


def test_subset_is_class_balanced_and_deterministic():
    classes = ["c0", "c1", "c2"]
    samples = _samples([10, 30, 7])
    sub = label_subset(samples, classes, 0.1, seed=0)
    assert Counter(label for _, label in sub) == {0: 1, 1: 3, 2: 1}  # ceil(0.1 n), at least one
    assert Counter(label for _, label in label_subset(samples, classes, 0.5)) == {0: 5, 1: 15, 2: 4}
    assert sub == sorted(sub) and set(sub) <= set(samples)
    assert label_subset(samples, classes, 0.1, seed=0) == sub  # the same call, the same subset
    assert label_subset(list(reversed(samples)), classes, 0.1, seed=0) == sub  # order of listing does not matter
    others = {tuple(label_subset(samples, classes, 0.1, seed=s)) for s in range(1, 6)}
    assert any(o != tuple(sub) for o in others)  # the seed chooses
    # a class's choice depends on its own files only: more images of class 2 leave classes 0 and 1 alone
    grown = label_subset(_samples([10, 30, 12]), classes, 0.1, seed=0)
    assert [s for s in grown if s[1] < 2] == [s for s in sub if s[1] < 2]
    assert label_subset(samples, classes, 1.0) == samples
    with pytest.raises(ValueError, match="label-fraction"):
        label_subset(samples, classes, 0.0)


def test_linear_probe_trains_on_the_listed_subset(tmp_path, monkeypatch, capsys):
    tr = labelled_folder(tmp_path / "train", n_per_class=6)
    va = labelled_folder(tmp_path / "val", n_per_class=2, offset=999)
    loaded = []
    real = features.load_rgb
    monkeypatch.setattr(features, "load_rgb", lambda p: loaded.append(p) or real(p))
    args = ["eval", "linear", "random:vit_tiny", "--train", str(tr), "--val", str(va), "--image-size", "32",
            "--device", "cpu", "--workers", "0", "--epochs", "1", "--n-last-blocks", "1", "--label-fraction", "0.34",
            "--json", str(tmp_path / "lin.json")]
    assert main(args) == 0
    res = json.loads((tmp_path / "lin.json").read_text())
    listed = read_subset(tmp_path / "lin.subset.txt")
    assert res["subset_file"] == str(tmp_path / "lin.subset.txt") and res["n_train"] == 9 == len(listed)
    assert res["subset_per_class_min"] == res["subset_per_class_max"] == 3  # ceil(0.34 * 6)
    assert Counter(p.split("/")[0] for p in listed) == {"c0": 3, "c1": 3, "c2": 3}
    trained = sorted(str(p.relative_to(tr)) for p in map(type(tr), loaded) if p.is_relative_to(tr))
    assert trained == sorted(listed)  # the probe saw exactly the listed training images
    # the same run again agrees with its list; another seed may not overwrite it
    assert main(args) == 0
    assert json.loads((tmp_path / "lin.json").read_text())["subset_sha1"] == res["subset_sha1"]
    capsys.readouterr()
    assert main(args + ["--subset-seed", "3", "--subset-out", str(tmp_path / "lin.subset.txt")]) == 1
    assert "another label subset" in capsys.readouterr().err
