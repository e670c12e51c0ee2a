"""Does iBOT pretraining help fine-tuning? Pretrain, then fine-tune it and a random init the same way.

    python benchmarks/finetune_quality.py --train <train> --val <val> --out runs/finetune_quality

1. ``fastibot train`` with the ViT-S/16 recipe for the README quality table's budget
   (``runtime.max_minutes=7.5`` of one GPU, fast path, the loader of ``--loader``);
2. ``fastibot finetune`` of that run's teacher and of ``random:vit_small`` with the same recipe
   (BEiT/iBOT defaults, ``--epochs`` epochs, warm-up a fifth of them);
3. a table of both runs' best and last top-1/top-5 on ``--val``.

Every stage skips when it has finished (a ``.done`` marker) and resumes from its checkpoint when
it was cut short, so the same command can be run again after a time limit cut it.
"""
from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

from fastibot.eval.cli import number

REPO = Path(__file__).resolve().parents[1]


def stage(name: str, out: Path, cmd: list, resumable: bool) -> None:
    done = out.parent / f"{out.name}.done"
    if done.exists():
        print(f"[{name}] already done ({out})", flush=True)
        return
    again = resumable and any(out.glob("checkpoint_*.pt"))
    cmd = cmd + (["--resume"] if again else [])
    print(f"[{name}] {'resuming' if again else 'running'}: {' '.join(cmd)}", flush=True)
    rc = subprocess.run(cmd).returncode
    if rc:  # its own message is above; a traceback of this script would only hide it
        sys.exit(f"[{name}] failed (exit status {rc}): see its message above; the same command resumes it")
    done.write_text("ok\n")


def summary(folder: Path) -> dict:
    with open(folder / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    best = max(rows, key=lambda r: float(r["val_top1"]))
    n = len(rows)  # the curve at the first epoch and each quarter: where pretraining shows first
    marks = sorted({0, *(max(0, round(n * q) - 1) for q in (0.25, 0.5, 0.75, 1.0))})
    curve = " / ".join(f"{float(rows[i]['val_top1']):.1f}@{rows[i]['epoch']}" for i in marks)
    return {"epochs": int(rows[-1]["epoch"]), "top-1 by epoch": curve,
            "best top-1": float(best["val_top1"]), "best epoch": int(best["epoch"]),
            "last top-1": float(rows[-1]["val_top1"]), "last top-5": float(rows[-1]["val_top5"])}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", help="labelled training images (needed by every stage but 'table')")
    ap.add_argument("--val", help="labelled validation images (needed by every stage but 'table')")
    ap.add_argument("--out", default=str(REPO / "runs" / "finetune_quality"))
    ap.add_argument("--minutes", type=number(float, 0, low_open=True), default=7.5, help="pretraining budget (the README quality table's)")
    ap.add_argument("--loader", default="auto", choices=("auto", "dali", "torchvision"))
    ap.add_argument("--workers", type=number(int, 0), default=15)
    ap.add_argument("--epochs", type=number(int, 1), default=30, help="fine-tuning epochs (both runs)")
    ap.add_argument("--batch", type=number(int, 2), default=128, help="even: mixup pairs the images")
    ap.add_argument("--json", help="write the table here")
    ap.add_argument("--stage", default="all", choices=("all", "pretrain", "pretrained", "random", "table"),
                    help="run one stage only (e.g. the random-init fine-tune on a second GPU while the "
                         "pretraining runs); 'table' prints the table of finished stages")
    args = ap.parse_args(argv)
    # checked before any stage: a bad value would otherwise surface only after the 7.5-minute pretraining
    if args.stage != "table" and not (args.train and args.val):
        ap.error(f"--stage {args.stage} needs --train and --val")
    if args.batch % 2:
        ap.error(f"--batch {args.batch}: must be even (mixup and cutmix mix the images in pairs)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fastibot = [sys.executable, "-m", "fastibot.cli"]
    if args.stage in ("all", "pretrain"):
        stage("pretrain", out / "pretrain", fastibot + [
            "train", "-c", str(REPO / "configs" / "vit_small_16.yaml"), f"data.path={args.train}",
            f"data.loader={args.loader}", f"data.num_workers={args.workers}", "model.packed=true", "kernels.loss=triton",
            "kernels.ema=triton", "optim.epochs=60", "optim.warmup_epochs=2", "teacher.warmup_temp_epochs=6",
            f"runtime.max_minutes={args.minutes}", f"runtime.output_dir={out / 'pretrain'}", "runtime.progress=false"],
            resumable=True)  # cut short: continues (its minute budget restarts)
    results = []
    for key, name, source in (("pretrained", "pretrained (iBOT teacher)", str(out / "pretrain")),
                              ("random", "random init", "random:vit_small")):
        folder = out / f"ft_{key}"
        if args.stage in ("all", key):
            if not (out / "pretrain.done").exists() and key == "pretrained":
                sys.exit(f"the pretraining stage has not finished in {out}; run --stage pretrain first")
            stage(name, folder, fastibot + [
                "finetune", source, "--train", args.train, "--val", args.val, "--out", str(folder),
                "--epochs", str(args.epochs), "--warmup-epochs", str(max(1, args.epochs // 5)),
                "--batch-size", str(args.batch), "--workers", str(args.workers), "--keep-last", "1"], resumable=True)
        if (out / f"ft_{key}.done").exists():
            results.append({"run": name, **summary(folder)})
    if args.stage in ("pretrain", "pretrained", "random"):
        return
    if not results:
        sys.exit(f"no finished fine-tuning in {out} (no ft_*.done): run the stages first")
    cols = ["run", "epochs", "top-1 by epoch", "best top-1", "best epoch", "last top-1", "last top-5"]
    print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in results:
        print("| " + " | ".join(f"{r[c]:.2f}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()
