"""``fastibot eval knn | linear | attention``: evaluate a checkpoint's backbone."""
from __future__ import annotations

import json
import sys

import torch


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda but no CUDA device is visible")
    return torch.device(name)


def _common(p, folders: bool = True):
    p.add_argument("checkpoint", help="checkpoint file, run folder (its latest checkpoint), or random:ARCH for an "
                                      "untrained baseline (e.g. random:vit_small)")
    p.add_argument("--which", default="teacher", choices=("teacher", "student"))
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    p.add_argument("--image-size", type=int, default=224)
    if folders:
        p.add_argument("--train", required=True, help="labelled image folder (class subfolders) to learn from")
        p.add_argument("--val", required=True, help="labelled image folder to evaluate on")
        p.add_argument("--batch-size", type=int, default=128)
        p.add_argument("--max-images", type=int, default=0, help="use at most this many images per split")
        p.add_argument("--workers", type=int, default=4)
        p.add_argument("--json", help="also write the result here")


def _finish(result: dict, path) -> int:
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if path:
        with open(path, "w") as f:
            f.write(text)
    return 0


def _backbone(args):
    """(backbone, name, cache tag) of a checkpoint, run folder or ``random:ARCH``."""
    from ..eval.features import checkpoint_fingerprint
    from ..export import open_backbone, random_backbone

    if args.checkpoint.startswith("random:"):
        backbone, _ = random_backbone(args.checkpoint)
        return backbone, args.checkpoint, args.checkpoint
    backbone, _, path = open_backbone(args.checkpoint, args.which)
    return backbone, str(path), f"{checkpoint_fingerprint(path)}:{args.which}"


def _knn(args) -> int:
    from .knn import run_knn

    backbone, name, tag = _backbone(args)
    res = run_knn(backbone, args.train, args.val, args.k, args.temperature, args.image_size, args.batch_size,
                  args.max_images, _device(args.device), args.workers, args.cache_dir, cache_tag=tag, progress=True)
    return _finish({"checkpoint": name, **res}, args.json)


def _linear(args) -> int:
    from .linear import run_linear

    backbone, name, _ = _backbone(args)
    res = run_linear(backbone, args.train, args.val, args.n_last_blocks, args.avgpool, args.lrs, args.epochs,
                     args.image_size, args.batch_size, args.max_images, _device(args.device), args.workers,
                     progress=True)
    return _finish({"checkpoint": name, **res}, args.json)


def _attention(args) -> int:
    from .attention_maps import write_maps

    backbone, _, _ = _backbone(args)
    written = write_maps(backbone, args.images, args.out, args.n, args.image_size, args.threshold, args.clusters,
                         _device(args.device))
    print("\n".join(map(str, written)))
    return 0


def _guarded(fn):
    def run(args):
        try:
            return fn(args)
        except (OSError, ValueError, RuntimeError) as e:
            print(f"fastibot eval: {e}", file=sys.stderr)
            return 1
    return run


def add_eval_parser(sub) -> None:
    ev = sub.add_parser("eval", help="k-NN, linear probe or attention maps of a checkpoint")
    kinds = ev.add_subparsers(dest="eval_kind", required=True)

    k = kinds.add_parser("knn", help="weighted k-NN on l2-normalised teacher [CLS] features")
    _common(k)
    k.add_argument("--k", type=int, default=20)
    k.add_argument("--temperature", type=float, default=0.07)
    k.add_argument("--cache-dir", default=None, help="cache features here (keyed by checkpoint and settings)")
    k.set_defaults(func=_guarded(_knn))

    lin = kinds.add_parser("linear", help="linear probe on frozen features, best of a learning-rate sweep")
    _common(lin)
    lin.add_argument("--n-last-blocks", type=int, default=4, help="concatenate [CLS] of the last n blocks")
    lin.add_argument("--avgpool", action="store_true", help="also append the mean patch token of the last block")
    lin.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2, 3e-2, 1e-1])
    lin.add_argument("--epochs", type=int, default=100)
    lin.set_defaults(func=_guarded(_linear))

    a = kinds.add_parser("attention", help="PNG attention maps and patch clusters")
    _common(a, folders=False)
    a.add_argument("--images", nargs="+", required=True, help="image files or folders")
    a.add_argument("--out", required=True, help="output folder")
    a.add_argument("-n", type=int, default=4, help="at most this many images")
    a.add_argument("--threshold", type=float, default=0.6, help="attention mass kept in the outlined region")
    a.add_argument("--clusters", type=int, default=5)
    a.set_defaults(func=_guarded(_attention))
