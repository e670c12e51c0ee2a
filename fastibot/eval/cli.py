"""``fastibot eval knn | linear | unsupervised | attention``: evaluate a checkpoint's backbone."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda but no CUDA device is visible")
    return torch.device(name)


def number(kind=int, low=0, high=None, low_open: bool = False):
    """An argparse type: an int or float ``kind`` in [low, high] ((low, high] with ``low_open``)."""
    import argparse
    import math

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or (value <= low if low_open else value < low) or \
                (high is not None and value > high):
            lo = f"{'>' if low_open else '>='} {low}"
            need = f"{lo} and <= {high}" if high is not None else lo
            raise argparse.ArgumentTypeError(f"{text!r}: need {'an integer' if kind is int else 'a number'} {need}")
        return value
    return parse


def _common(p, folders: bool = True):
    p.add_argument("checkpoint", help="checkpoint file, run folder (its latest checkpoint), or random:ARCH for an "
                                      "untrained baseline (e.g. random:vit_small)")
    p.add_argument("--which", default="teacher", choices=("teacher", "student"))
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    p.add_argument("--image-size", type=number(int, 1), default=224, help="a multiple of the patch size")
    if folders:
        p.add_argument("--train", required=True, help="labelled image folder (class subfolders) to learn from")
        p.add_argument("--val", required=True, help="labelled image folder to evaluate on")
        _loading(p, "use at most this many images per split (0: all)")


def _loading(p, max_help: str) -> None:
    p.add_argument("--batch-size", type=number(int, 1), default=128)
    p.add_argument("--max-images", type=number(int, 0), default=0, help=max_help)
    p.add_argument("--workers", type=number(int, 0), default=4)
    p.add_argument("--json", help="also write the result here")


def report(result: dict, path) -> int:
    """Print ``result`` as JSON and, with ``path``, write it there too (its folders made)."""
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)
    return 0


def check_output(path, flag: str, folder: bool = False) -> None:
    """Refuse now, not after the work, an output that could not be written at the end: a folder where a file
    is asked for (or the reverse), or a path under a file. Missing folders are made when writing."""
    if path is None:
        return
    p = Path(path)
    if p.exists() and p.is_dir() != folder:
        raise ValueError(f"{flag} {path}: is a {'file' if folder else 'folder'}; give "
                         f"{'a folder' if folder else 'a file name'}")
    above = next(q for q in p.parents if q.exists())  # at worst the current folder or /
    if not above.is_dir():
        raise ValueError(f"{flag} {path}: {above} is a file, not a folder")


def _check_inputs(args, backbone) -> None:
    """After the checkpoint is open (a hostile one is refused first): the image folders, the outputs, and
    --image-size on the backbone's patch grid."""
    from ..eval.features import check_folders

    check_folders(getattr(args, "train", None), getattr(args, "val", None), "--train", "--val")
    check_output(getattr(args, "json", None), "--json")
    check_output(getattr(args, "out", None), "--out", folder=True)  # attention's folder of pictures
    if getattr(args, "label_fraction", 1) < 1:
        check_output(subset_out_path(args), "--subset-out")
    p, size = backbone.patch_size, args.image_size
    if size % p:
        raise ValueError(f"--image-size {size}: must be a multiple of the backbone's patch size ({p}), "
                         f"e.g. {max(p, size // p * p)}")


def _backbone(args):
    """(backbone, name, cache tag) of a checkpoint, run folder or ``random:ARCH``; then the image folders and
    the image size are checked, so that a wrong flag stops before any feature is computed."""
    from ..eval.features import checkpoint_fingerprint
    from ..export import open_backbone, random_backbone

    if args.checkpoint.startswith("random:"):
        backbone, _ = random_backbone(args.checkpoint)
        name, tag = args.checkpoint, args.checkpoint
    else:
        backbone, _, path = open_backbone(args.checkpoint, args.which)
        name, tag = str(path), f"{checkpoint_fingerprint(path)}:{args.which}"
    _check_inputs(args, backbone)
    return backbone, name, tag


def _knn(args) -> int:
    from .knn import run_knn

    backbone, name, tag = _backbone(args)
    res = run_knn(backbone, args.train, args.val, args.k, args.temperature, args.image_size, args.batch_size,
                  args.max_images, _device(args.device), args.workers, args.cache_dir, cache_tag=tag, progress=True)
    return report({"checkpoint": name, **res}, args.json)


def subset_out_path(args) -> str:
    """Where a label subset is listed: --subset-out, else beside --json, else in the current folder."""
    if args.subset_out:
        return args.subset_out
    if getattr(args, "json", None):
        return str(Path(args.json).with_suffix(".subset.txt"))
    return f"label_subset_{args.label_fraction:g}_seed{args.subset_seed}.txt"


def _linear(args) -> int:
    from .linear import run_linear

    backbone, name, _ = _backbone(args)
    res = run_linear(backbone, args.train, args.val, args.n_last_blocks, args.avgpool, args.lrs, args.epochs,
                     args.image_size, args.batch_size, args.max_images, _device(args.device), args.workers,
                     progress=True, label_fraction=args.label_fraction, subset_seed=args.subset_seed,
                     subset_out=subset_out_path(args) if args.label_fraction < 1 else None)
    return report({"checkpoint": name, **res}, args.json)


def _unsupervised(args) -> int:
    from ..export import open_model, random_model
    from .unsupervised import run_unsupervised

    if args.checkpoint.startswith("random:"):
        (model, _), name = random_model(args.checkpoint), args.checkpoint
    else:
        model, _, path = open_model(args.checkpoint, args.which)
        name = str(path)
    _check_inputs(args, model.backbone)
    res = run_unsupervised(model, args.val, args.image_size, args.batch_size, args.max_images, _device(args.device),
                           args.workers, args.kmeans, progress=True)
    return report({"checkpoint": name, **res}, args.json)


def _attention(args) -> int:
    from .attention_maps import write_maps

    backbone, _, _ = _backbone(args)
    written = write_maps(backbone, args.images, args.out, args.n, args.image_size, args.threshold, args.clusters,
                         _device(args.device))
    print("\n".join(map(str, written)))
    return 0


def _fraction(text: str) -> float:
    import argparse
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r}: need a number with 0 < fraction <= 1 (0.01 for 1%)")
    return value


def add_subset_args(p) -> None:
    """--label-fraction / --subset-seed / --subset-out (eval linear, finetune)."""
    p.add_argument("--label-fraction", type=_fraction, default=1.0,
                   help="train on this class-balanced fraction of the labels (e.g. 0.01, 0.1)")
    p.add_argument("--subset-seed", type=int, default=0, help="seed of the label subset")
    p.add_argument("--subset-out", help="file listing the chosen training images (default: beside --json, "
                                        "or in the output folder)")


def _guarded(fn):
    def run(args):
        try:
            return fn(args)
        except (OSError, ValueError, RuntimeError) as e:
            print(f"fastibot eval: {e}", file=sys.stderr)
            return 1
    return run


def add_eval_parser(sub) -> None:
    ev = sub.add_parser("eval", help="k-NN, linear probe, unsupervised classification or attention maps")
    kinds = ev.add_subparsers(dest="eval_kind", required=True)

    k = kinds.add_parser("knn", help="weighted k-NN on l2-normalised teacher [CLS] features")
    _common(k)
    k.add_argument("--k", type=number(int, 1), default=20, help="neighbours that vote")
    k.add_argument("--temperature", type=number(float, 0, low_open=True), default=0.07,
                   help="votes weigh exp(similarity / temperature)")
    k.add_argument("--cache-dir", default=None, help="cache features here (keyed by checkpoint and settings)")
    k.set_defaults(func=_guarded(_knn))

    lin = kinds.add_parser("linear", help="linear probe on frozen features, best of a learning-rate sweep")
    _common(lin)
    lin.add_argument("--n-last-blocks", type=number(int, 1), default=4, help="concatenate [CLS] of the last n blocks")
    lin.add_argument("--avgpool", action="store_true", help="also append the mean patch token of the last block")
    lin.add_argument("--lrs", type=number(float, 0, low_open=True), nargs="+", default=[1e-3, 3e-3, 1e-2, 3e-2, 1e-1])
    lin.add_argument("--epochs", type=number(int, 1), default=100)
    add_subset_args(lin)
    lin.set_defaults(func=_guarded(_linear))

    u = kinds.add_parser("unsupervised", help="NMI, ARI and matched accuracy of the teacher's prototype "
                                              "assignments (and of k-means clusters)")
    _common(u, folders=False)
    u.add_argument("--val", required=True, help="labelled image folder to cluster")
    u.add_argument("--kmeans", type=number(int, 0), default=0, metavar="K",
                   help="also score K cosine k-means clusters of the [CLS] features (0: off)")
    _loading(u, "use at most this many images (0: all)")
    u.set_defaults(func=_guarded(_unsupervised))

    a = kinds.add_parser("attention", help="PNG attention maps and patch clusters")
    _common(a, folders=False)
    a.add_argument("--images", nargs="+", required=True, help="image files or folders")
    a.add_argument("--out", required=True, help="output folder")
    a.add_argument("-n", type=number(int, 0), default=4, help="at most this many images (0: all)")
    a.add_argument("--threshold", type=number(float, 0, 1, low_open=True), default=0.6,
                   help="attention mass kept in the outlined region")
    a.add_argument("--clusters", type=number(int, 1), default=5, help="k-means clusters of the patch tokens")
    a.set_defaults(func=_guarded(_attention))
