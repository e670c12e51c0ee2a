"""Evaluation: weighted k-NN, linear probe, attention pictures, periodic k-NN during training."""
import csv
import json
import math
import shutil

import pytest
import torch
from PIL import Image

from fastibot.cli import main
from fastibot.data.synthetic import synthetic_image
from fastibot.eval.attention_maps import mass_mask, write_maps
from fastibot.eval.clusters import kmeans
from fastibot.eval.knn import knn_classify
from fastibot.eval.linear import train_linear
from fastibot.models.vit import VisionTransformer
from fastibot.train import train
from conftest import labelled_folder, tiny_config, tiny_overrides


def _unit(*angles_deg):
    return torch.tensor([[math.cos(math.radians(a)), math.sin(math.radians(a))] for a in angles_deg])


def test_knn_exact_accuracy_and_weighting():
    # class 0 near 0 degrees, class 1 near 40 degrees, class 2 near 180 degrees
    train_f = _unit(0, 2, 38, 40, 42, 180, 178)
    train_y = torch.tensor([0, 0, 1, 1, 1, 2, 2])
    # k = 3 neighbours of each query:
    #   1 deg   -> 0, 2, 38 deg: classes 0, 0, 1 -> predicts 0, truth 0
    #   177 deg -> 178, 180, 42 deg: classes 2, 2, 1 -> predicts 2, truth 2
    #   12 deg  -> 2, 0, 38 deg: classes 0, 0, 1 -> predicts 0, truth 1 (wrong)
    #   39 deg  -> 38, 40, 42 deg: class 1 -> predicts 1, truth 1
    test_f = _unit(1, 177, 12, 39)
    test_y = torch.tensor([0, 2, 1, 1])
    out = knn_classify(train_f, train_y, test_f, test_y, k=3, temperature=0.07)
    assert out["top1"] == pytest.approx(75.0)  # 3 of 4 correct
    assert out["top5"] == pytest.approx(100.0)  # 3 classes: the truth is always in the top 5


def test_knn_weighted_vote_beats_majority():
    # one very close neighbour of class 0 against two farther ones of class 1
    train_f = torch.nn.functional.normalize(torch.tensor([[1.0, 0.05], [0.6, 0.8], [0.6, -0.8]]), dim=1)
    train_y = torch.tensor([0, 1, 1])
    q = torch.tensor([[1.0, 0.0]])
    assert knn_classify(train_f, train_y, q, torch.tensor([0]), k=3, temperature=0.07)["top1"] == 100.0
    # a high temperature flattens the weights: the majority (class 1) wins
    assert knn_classify(train_f, train_y, q, torch.tensor([0]), k=3, temperature=100.0)["top1"] == 0.0


def test_linear_probe_separates_blobs():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 16, generator=g) * 4
    def blobs(n):
        y = torch.arange(n) % 3
        return centers[y] + torch.randn(n, 16, generator=g), y
    xtr, ytr = blobs(300)
    xva, yva = blobs(150)
    out = train_linear(xtr, ytr, xva, yva, num_classes=3, lrs=(1e-3, 1e-1), epochs=20, batch_size=64)
    assert out["top1"] >= 95.0 and out["best_lr"] in (1e-3, 1e-1)
    assert set(out["per_lr"]) == {1e-3, 1e-1}
    # chance level without signal
    out = train_linear(torch.randn(300, 16, generator=g), ytr, torch.randn(150, 16, generator=g), yva, 3,
                       lrs=(1e-2,), epochs=5)
    assert out["top1"] < 60.0


def test_mass_mask_and_kmeans():
    attn = torch.tensor([[0.5, 0.3, 0.1, 0.1]])
    assert mass_mask(attn, 0.6).tolist() == [[True, True, False, False]]
    x = torch.cat([torch.randn(20, 8) * 0.05 + torch.eye(8)[0], torch.randn(20, 8) * 0.05 + torch.eye(8)[1]])
    labels = kmeans(x, 2)
    assert len(set(labels[:20].tolist())) == 1 and len(set(labels[20:].tolist())) == 1
    assert labels[0] != labels[20]


def test_attention_pngs(tmp_path):
    vit = VisionTransformer("vit_tiny", patch_size=8, img_size=32)
    for i in range(3):
        synthetic_image(i, 3, 48)[0].save(tmp_path / f"img{i}.png")
    written = write_maps(vit, [str(tmp_path)], tmp_path / "maps", n_images=2, image_size=32, clusters=3)
    assert len(written) == 4
    row = Image.open(tmp_path / "maps" / "img0_attention.png")
    assert row.size == ((vit.num_heads + 2) * 32, 32)
    assert Image.open(tmp_path / "maps" / "img0_clusters.png").size == (64, 32)


def test_attention_pictures_of_inputs_sharing_a_name_do_not_overwrite_each_other(tmp_path):
    vit = VisionTransformer("vit_tiny", patch_size=8, img_size=32)
    for i, (folder, name) in enumerate((("a", "x.png"), ("b", "x.png"), ("c", "x.jpg"), ("a", "x-2.png"))):
        (tmp_path / folder).mkdir(exist_ok=True)
        synthetic_image(i, 4, 48)[0].save(tmp_path / folder / name)
    inputs = [str(tmp_path / p) for p in ("a/x.png", "b/x.png", "c/x.jpg", "a/x-2.png")]
    written = write_maps(vit, inputs, tmp_path / "maps", n_images=0, image_size=32, clusters=2)
    assert [p.name for p in written[::2]] == ["x_attention.png", "x-3_attention.png", "x-4_attention.png",
                                              "x-2_attention.png"]
    assert len(set(written)) == 8 and all(p.is_file() for p in written)
    tiles = [Image.open(p).tobytes() for p in written[::2]]
    assert len(set(tiles)) == 4  # four different images, four different pictures


def _relabelled_copy(src, dst):
    """The same images with every class folder's files moved to the next class: a query whose nearest
    neighbour is its own copy is then always wrong."""
    classes = sorted(p.name for p in src.iterdir() if p.is_dir())
    for i, c in enumerate(classes):
        (dst / classes[(i + 1) % len(classes)]).mkdir(parents=True, exist_ok=True)
        for f in (src / c).iterdir():
            shutil.copy(f, dst / classes[(i + 1) % len(classes)] / f.name)
    return dst


def test_cli_knn_linear_attention_and_periodic_knn(tmp_path, capsys):
    tr = labelled_folder(tmp_path / "train")
    va = labelled_folder(tmp_path / "val", n_per_class=3, offset=999)
    wrong = _relabelled_copy(tr, tmp_path / "relabelled")
    run = tmp_path / "run"
    # the k-NN queries are the memory bank itself: with k = 1 each image finds itself, 100% exactly
    cfg = tiny_config(run, **{"runtime.max_steps": 4, "eval.every_n_steps": 2, "eval.train_path": str(tr),
                              "eval.val_path": str(tr), "eval.k": 1, "eval.image_size": 32, "eval.batch_size": 8})
    train(cfg)
    with open(run / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    knn_rows = [r for r in rows if r.get("knn_top1")]
    assert [int(r["step"]) for r in knn_rows] == [2, 4]
    assert [float(r["knn_top1"]) for r in knn_rows] == [100.0, 100.0]

    common = ["--image-size", "32", "--device", "cpu", "--workers", "0"]

    def knn(val, k, name):
        assert main(["eval", "knn", str(run), "--train", str(tr), "--val", str(val), "--k", str(k),
                     "--cache-dir", str(tmp_path / "cache"), "--json", str(tmp_path / name)] + common) == 0
        return json.loads((tmp_path / name).read_text())

    res = knn(va, 5, "knn.json")
    assert res["n_train"] == 18 and res["n_val"] == 9
    # the same features and k as the CLI, classified directly: the CLI reports exactly this
    from fastibot.eval.knn import run_knn
    from fastibot.export import load_backbone
    from fastibot.checkpoint import resolve_resume
    backbone, _ = load_backbone(resolve_resume(str(run), str(run)), "teacher")
    direct = run_knn(backbone, tr, va, k=5, image_size=32, num_workers=0)
    assert res["top1"] == direct["top1"] and res["top5"] == direct["top5"]
    assert knn(tr, 1, "self.json")["top1"] == 100.0  # each query is its own nearest neighbour
    assert knn(wrong, 1, "wrong.json")["top1"] == 0.0  # ... and carries the wrong label
    assert list((tmp_path / "cache").glob("*.pt"))  # features cached
    assert main(["eval", "linear", str(run), "--train", str(tr), "--val", str(va), "--epochs", "3",
                 "--n-last-blocks", "2", "--avgpool"] + common) == 0
    assert '"feature_dim": 576' in capsys.readouterr().out  # 2 x 192 [CLS] + 192 pooled
    assert main(["eval", "attention", str(run), "--images", str(va / "c0"), "--out", str(tmp_path / "maps"),
                 "-n", "1"] + common[:2] + ["--device", "cpu"]) == 0
    assert len(list((tmp_path / "maps").glob("*.png"))) == 2
    assert main(["eval", "knn", str(tmp_path / "nope"), "--train", str(tr), "--val", str(va)]) == 1


def test_cli_random_init_baseline(tmp_path, capsys):
    tr = labelled_folder(tmp_path / "train")
    va = labelled_folder(tmp_path / "val", n_per_class=3, offset=999)
    common = ["--train", str(tr), "--val", str(va), "--image-size", "32", "--device", "cpu", "--workers", "0"]
    assert main(["eval", "knn", "random:vit_tiny", "--k", "5", "--json", str(tmp_path / "r.json")] + common) == 0
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["checkpoint"] == "random:vit_tiny" and res["n_val"] == 9
    # known answers: the memory bank as queries (k = 1) is 100% right, relabelled copies 0%
    wrong = _relabelled_copy(tr, tmp_path / "relabelled")
    for val, want in ((tr, 100.0), (wrong, 0.0)):
        args = ["eval", "knn", "random:vit_tiny", "--k", "1", "--json", str(tmp_path / "k1.json")] + common
        args[args.index("--val") + 1] = str(val)
        assert main(args) == 0
        assert json.loads((tmp_path / "k1.json").read_text())["top1"] == want
    # the same seed gives the same untrained backbone, so the baseline is repeatable
    assert main(["eval", "knn", "random:vit_tiny", "--k", "5", "--json", str(tmp_path / "r2.json")] + common) == 0
    assert json.loads((tmp_path / "r2.json").read_text())["top1"] == res["top1"]
    capsys.readouterr()
    assert main(["eval", "knn", "random:vit_huge"] + common) == 1
    assert "model.arch" in capsys.readouterr().err


@pytest.mark.parametrize("kind, bad", [
    ("knn", ["--k", "0"]), ("knn", ["--temperature", "0"]), ("knn", ["--image-size", "0"]),
    ("knn", ["--batch-size", "0"]), ("linear", ["--epochs", "0"]), ("linear", ["--lrs", "0.1", "-1"]),
    ("linear", ["--n-last-blocks", "0"]), ("unsupervised", ["--kmeans", "-1"]), ("attention", ["--clusters", "0"]),
    ("attention", ["--threshold", "2"])])
def test_cli_flags_out_of_range_are_refused_by_name(tmp_path, capsys, kind, bad):
    """A value that would give a silently wrong result (--k 0 votes for nobody, --temperature 0 divides by
    zero, --epochs 0 reports untrained heads) or a traceback is refused while parsing, naming the flag."""
    where = {"knn": ["--train", str(tmp_path), "--val", str(tmp_path)], "unsupervised": ["--val", str(tmp_path)],
             "attention": ["--images", str(tmp_path), "--out", str(tmp_path / "maps")]}
    args = ["eval", kind, "random:vit_tiny", *where.get(kind, where["knn"]), *bad]
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2 and f"argument {bad[0]}" in capsys.readouterr().err


def test_cli_folders_and_image_size_are_checked_before_any_feature(tmp_path, capsys):
    tr = labelled_folder(tmp_path / "train", n_per_class=2, classes=2)
    other = labelled_folder(tmp_path / "other", n_per_class=2, classes=3)
    (tmp_path / "empty" / "c0").mkdir(parents=True)
    common = ["--device", "cpu", "--workers", "0"]
    for args, msg in (
            (["knn", "--train", str(tmp_path / "nope"), "--val", str(tr)], "--train: folder"),
            (["linear", "--train", str(tr), "--val", str(tmp_path / "empty")], "--val: no images"),
            (["knn", "--train", str(tr), "--val", str(other)], "--train and --val have different classes"),
            (["unsupervised", "--val", str(tmp_path / "empty")], "--val: no images"),
            (["knn", "--train", str(tr), "--val", str(tr), "--image-size", "33"], "--image-size 33: must be a "
                                                                                  "multiple of the backbone's patch size (16)"),
            (["attention", "--images", str(tr), "--out", str(tmp_path / "m"), "--image-size", "40"], "--image-size 40"),
            (["linear", "--train", str(tr), "--val", str(tr), "--image-size", "32", "--n-last-blocks", "13"],
             "this backbone has 12 blocks")):
        extra = common[:2] if args[0] == "attention" else common
        assert main(["eval", args[0], "random:vit_tiny", *args[1:], *extra]) == 1, args
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err, (args, err)


def test_cli_outputs_that_cannot_be_written_are_refused_before_any_feature(tmp_path, capsys):
    """--json a folder or under a file, --subset-out a folder, attention's --out a file: refused by name before
    the features (the result is written at the end); a --json in a folder not made yet is written there."""
    tr, afile = labelled_folder(tmp_path / "train", n_per_class=1, classes=2), tmp_path / "afile"
    afile.write_text("x")
    common = ["--train", str(tr), "--val", str(tr), "--image-size", "32", "--device", "cpu", "--workers", "0"]
    for args, msg in ((["knn", *common, "--json", str(tr)], f"--json {tr}: is a folder; give a file name"),
                      (["linear", *common, "--json", str(afile / "r.json")], f"--json {afile / 'r.json'}: {afile} is a file"),
                      (["linear", *common, "--label-fraction", "0.5", "--subset-out", str(tr)],
                       f"--subset-out {tr}: is a folder"),
                      (["attention", "--images", str(tr), "--out", str(afile), "--device", "cpu"],
                       f"--out {afile}: is a file; give a folder")):
        assert main(["eval", args[0], "random:vit_tiny", *args[1:]]) == 1, args
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err, (args, err)
    assert main(["eval", "knn", "random:vit_tiny", *common, "--k", "1", "--json", str(tmp_path / "new" / "k.json")]) == 0
    assert json.loads((tmp_path / "new" / "k.json").read_text())["top1"] == 100.0


def test_periodic_knn_folders_are_checked_before_the_first_step(tmp_path, capsys):
    va = labelled_folder(tmp_path / "val", n_per_class=2, classes=2)
    run = tmp_path / "run"
    periodic = {"eval.every_n_steps": 1, "eval.val_path": str(va), "eval.image_size": 32, "runtime.max_steps": 1}
    assert main(["train", *tiny_overrides(run, **periodic, **{"eval.train_path": str(tmp_path / "nope")})]) == 1
    assert "eval.train_path: folder" in capsys.readouterr().err
    assert not (run / "metrics.csv").exists()  # no step was trained (then lost) before the error
    other = labelled_folder(tmp_path / "other", n_per_class=2, classes=3)
    assert main(["train", *tiny_overrides(run, **periodic, **{"eval.train_path": str(other)})]) == 1
    assert "eval.train_path and eval.val_path have different classes" in capsys.readouterr().err
    assert main(["train", *tiny_overrides(run, **{**periodic, "eval.train_path": str(va), "eval.image_size": 36})]) == 2
    assert "eval.image_size: must be a multiple of model.patch_size (8)" in capsys.readouterr().err


def test_knn_on_real_images(tmp_path, shared_images):
    """Real JPEGs through the whole k-NN path, with known answers: 3 images of each of the 10 classes as
    memory bank; the same images as queries are found (100%), relabelled copies are all wrong (0%)."""
    from fastibot.eval.knn import run_knn
    bank = tmp_path / "bank"
    for d in sorted(p for p in (shared_images / "train").iterdir() if p.is_dir()):
        (bank / d.name).mkdir(parents=True)
        for f in sorted(d.iterdir())[:3]:
            shutil.copy(f, bank / d.name / f.name)
    wrong = _relabelled_copy(bank, tmp_path / "relabelled")
    torch.manual_seed(0)
    vit = VisionTransformer("vit_tiny", patch_size=16, img_size=64)
    kw = dict(k=1, image_size=64, batch_size=32, num_workers=0)
    res = run_knn(vit, bank, bank, **kw)
    assert res["n_train"] == res["n_val"] == 30 and res["top1"] == 100.0
    assert run_knn(vit, bank, wrong, **kw)["top1"] == 0.0
