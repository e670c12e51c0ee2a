"""``fastibot train | eval | export | bench-data``."""
from __future__ import annotations

import argparse
import signal
import sys
from typing import List, Optional

from .config import ConfigError, describe, load_config, packaged_config


def one_line(e: BaseException) -> str:
    """The message of ``e``; for an error raised in a loader worker (which the loader re-raises with the
    worker's whole traceback as its message), the worker's own message."""
    text = str(e).strip()
    if "Original Traceback" in text:
        last = text.splitlines()[-1]
        name, _, msg = last.partition(": ")
        text = msg if msg and " " not in name else last
        return f"in a data loader worker: {text}"
    return text


def _train(args) -> int:
    from .checkpoint import CheckpointError
    from .data.datasets import DataError
    from .rundir import RunFolderError
    from .train import TrainingError, train

    path = args.config if args.config else packaged_config("quickstart")
    try:
        cfg = load_config(path, args.overrides)
    except ConfigError as e:
        print(f"fastibot: config error: {e}", file=sys.stderr)
        return 2
    try:
        summary = train(cfg, resume=args.resume, overwrite=args.overwrite)
    except (DataError, TrainingError, CheckpointError, RunFolderError, OSError) as e:
        print(f"fastibot: {one_line(e)}", file=sys.stderr)
        return 1
    if summary.get("complete"):
        if summary.get("rank", 0) == 0:
            print(f"the run in {cfg.runtime.output_dir} is already complete at step {summary['step']}: nothing to do "
                  "(raise optim.epochs or runtime.max_steps to train further)")
        return 0
    stopped = summary.get("stopped")
    if stopped in ("SIGINT", "SIGTERM", "SIGUSR1"):
        if summary.get("rank", 0) == 0:
            print(f"stopped by {stopped} at step {summary.get('step')}: checkpoint written; continue with "
                  f"fastibot train ... --resume", file=sys.stderr)
        return 128 + int(getattr(signal, stopped))
    if summary.get("step") is not None and summary.get("rank", 0) == 0:
        print(f"done: step {summary['step']}, loss {summary['loss']:.4f}, run folder {cfg.runtime.output_dir}")
    return 0


def _export(args) -> int:
    from .export import export_backbone, timm_snippet

    try:
        path, name, kwargs = export_backbone(args.checkpoint, args.out, args.which)
    except (FileNotFoundError, RuntimeError, ValueError) as e:
        print(f"fastibot: {e}", file=sys.stderr)
        return 1
    print(f"wrote {path}\nload it in timm:\n{timm_snippet(path, name, kwargs)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastibot", description="Fast iBOT pretraining for Vision Transformers.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="pretrain with iBOT",
                       description="Train with a YAML config (default: the packaged quickstart on synthetic "
                                   "images) and dotted overrides, e.g. optim.lr=1e-3 data.path=/images.")
    t.add_argument("-c", "--config", help="YAML config (e.g. configs/vit_small_16.yaml)")
    t.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="continue exactly from a checkpoint file, a run folder, or (no value) this run's folder")
    t.add_argument("--overwrite", action="store_true",
                   help="start afresh in a runtime.output_dir that holds a run, deleting that run's checkpoints, "
                        "metrics and TensorBoard events (nothing else in the folder)")
    t.add_argument("--help-config", action="store_true", help="list every config key with its default and doc")
    t.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=1e-3")
    t.set_defaults(func=_train)

    e = sub.add_parser("export", help="write a backbone that timm loads")
    e.add_argument("checkpoint", help="checkpoint file or run folder (latest checkpoint)")
    e.add_argument("--out", required=True, help="output file (.safetensors, .pt or .pth)")
    e.add_argument("--which", default="teacher", choices=("teacher", "student"))
    e.set_defaults(func=_export)

    from .eval.cli import add_eval_parser
    add_eval_parser(sub)
    from .finetune import add_finetune_parser
    add_finetune_parser(sub)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "help_config", False):
        print("\n".join(describe()))
        return 0
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
