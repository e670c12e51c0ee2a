"""Run outputs on the main process: a CSV of scalars, TensorBoard events, a progress bar."""
from __future__ import annotations

import csv
import logging
import sys
from pathlib import Path
from typing import Dict, Optional

log = logging.getLogger("fastibot")


def setup_logging(is_main: bool) -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO if is_main else logging.WARNING,
                            format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    log.setLevel(logging.INFO if is_main else logging.WARNING)


class MetricsWriter:
    """Appends rows to ``metrics.csv`` (new keys extend the header) and mirrors them to TensorBoard."""

    def __init__(self, folder, tensorboard: bool, enabled: bool = True):
        self.enabled = enabled
        self.path = Path(folder) / "metrics.csv"
        self.fields = None
        self.tb = None
        if not enabled:
            return
        if self.path.exists():
            with open(self.path, newline="") as f:
                header = next(csv.reader(f), None)
            self.fields = header
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise RuntimeError(f"runtime.tensorboard=true needs the tensorboard package ({e}); "
                                   "install it or set runtime.tensorboard=false") from None
            self.tb = SummaryWriter(str(Path(folder) / "tb"))

    def write(self, row: Dict[str, float]) -> None:
        if not self.enabled:
            return
        if self.fields is None or any(k not in self.fields for k in row):
            self._rewrite_header(list(self.fields or []) + [k for k in row if k not in (self.fields or [])])
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.fields).writerow(row)
        if self.tb is not None:
            step = int(row["step"])
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)

    def _rewrite_header(self, fields) -> None:
        rows = []
        if self.path.exists():
            with open(self.path, newline="") as f:
                rows = list(csv.DictReader(f))
        self.fields = fields
        with open(self.path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(rows)

    def truncate_after(self, step: int) -> None:
        """On resume: drop rows logged after the checkpoint's step (they will be logged again)."""
        if not self.enabled or not self.path.exists():
            return
        with open(self.path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if int(float(r["step"])) <= step]
        with open(self.path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.fields)
            w.writeheader()
            w.writerows(rows)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


class Progress:
    """tqdm bar over optimizer steps (main process only; silent otherwise)."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr)

    def update(self, n: int = 1, postfix: Optional[Dict[str, str]] = None) -> None:
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
