"""Shared helpers: tiny configs, the shared real images, deterministic seeds."""
import os
from pathlib import Path

import pytest
import torch

from fastibot.config import load_config, packaged_config

REPO = Path(__file__).resolve().parents[1]
SHARED_IMAGES = Path(os.environ.get("FASTIBOT_TEST_IMAGES", REPO.parent / "shared" / "data" / "imagenette2-128"))

torch.set_num_threads(min(2, os.cpu_count() or 1))


def tiny_overrides(out_dir, **extra):
    """A ViT-Tiny on 32/16 px crops with patch 8: a step takes well under a second on 2 CPU cores."""
    o = {
        "model.patch_size": 8, "model.out_dim": 64, "model.patch_out_dim": 64, "model.head_hidden_dim": 64,
        "model.head_bottleneck_dim": 32, "crops.global_size": 32, "crops.local_size": 16, "crops.n_local": 2,
        "data.source": "synthetic", "data.synthetic_size": 48, "data.synthetic_resolution": 48,
        "data.batch_size": 8, "data.num_workers": 0, "optim.epochs": 2, "optim.warmup_epochs": 1,
        "teacher.warmup_temp_epochs": 1, "runtime.output_dir": str(out_dir), "runtime.log_every": 1,
        "runtime.progress": False, "runtime.tensorboard": False, "runtime.ckpt_every": 0,
    }
    o.update(extra)
    return [f"{k}={v}" for k, v in o.items()]


def labelled_folder(root, n_per_class=6, classes=3, offset=0, size=48):
    """An ImageFolder tree of synthetic images, ``root/c<k>/<idx>.png``, ``n_per_class`` per class."""
    from fastibot.data.synthetic import synthetic_image

    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True, exist_ok=True)
        for j in range(n_per_class):
            idx = offset + j * classes + c  # synthetic_image's label is idx % classes
            img, label = synthetic_image(idx, classes, size, seed=1)
            assert label == c
            img.save(root / f"c{c}" / f"{idx}.png")
    return root


def nan_loss_at(monkeypatch, calls):
    """Make the loss terms NaN at the given (0-based) calls of the step's loss, as a diverging run would."""
    import fastibot.step as step_mod
    real, count = step_mod.ibot_terms, [0]

    def terms(*args, **kw):
        out, stat = real(*args, **kw)
        if count[0] in calls:
            out = {k: v * float("nan") for k, v in out.items()}
        count[0] += 1
        return out, stat

    monkeypatch.setattr(step_mod, "ibot_terms", terms)


def tiny_config(out_dir, **extra):
    return load_config(packaged_config("quickstart"), tiny_overrides(out_dir, **extra))


NO_IMAGES = "shared images not found"  # starts the skip reason; the summary hooks below look for it
NO_IMAGES_CATEGORY = "skipped: no shared images"


@pytest.fixture
def shared_images():
    if not (SHARED_IMAGES / "train").is_dir():
        pytest.skip(f"{NO_IMAGES} at {SHARED_IMAGES} (set FASTIBOT_TEST_IMAGES); "
                    "the synthetic-data tests cover the same code paths")
    return SHARED_IMAGES


def pytest_report_teststatus(report, config):
    """Real-image tests skipped for want of the images get their own category, so the run's last
    line says so (e.g. ``140 passed, 7 skipped: no shared images``) without -rs."""
    if report.skipped and NO_IMAGES in str(report.longrepr):
        return NO_IMAGES_CATEGORY, "s", "SKIPPED (no shared images)"
    return None


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    n = len(terminalreporter.stats.get(NO_IMAGES_CATEGORY, []))
    if n:
        terminalreporter.write_line(f"{n} real-image test(s) skipped: {NO_IMAGES} at {SHARED_IMAGES} "
                                    "(set FASTIBOT_TEST_IMAGES to run them)", yellow=True, bold=True)


# Triton kernels run in the interpreter on machines without a GPU; this must be set
# before any kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def free_port() -> int:
    """A free TCP port on localhost (torchrun's rendezvous in the multi-process tests)."""
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def metrics_rows(folder):
    """A run folder's metrics.csv as a list of dicts (strings, as written)."""
    import csv
    with open(Path(folder) / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def eager_and_compiled(fn, *inputs):
    """``fn(*inputs)`` (a scalar loss) run eagerly and compiled whole (``aot_eager``, fullgraph), each on fresh
    leaf copies of ``inputs``: [(loss, gradient of each input)] for the two runs, eager first."""
    runs = []
    for f in (fn, torch.compile(fn, backend="aot_eager", fullgraph=True)):
        leaves = [x.clone().requires_grad_(True) for x in inputs]
        loss = f(*leaves)
        loss.backward()
        runs.append((loss.detach(), *(x.grad for x in leaves)))
    return runs
