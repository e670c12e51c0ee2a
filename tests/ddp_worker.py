"""Run under torchrun by tests/test_ddp.py: train, then write this rank's parameter and center digests."""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import tiny_config  # noqa: E402
from fastibot.train import Trainer, init_runtime  # noqa: E402


def main(out_dir: str, *overrides: str) -> None:
    extra = dict(o.split("=", 1) for o in overrides)
    resume = extra.pop("resume", None)
    nan_rank = extra.pop("nan_on_rank", None)  # this rank's loss (not its gradients) is NaN at its first step
    cfg = tiny_config(out_dir, **extra)
    rt = init_runtime(cfg)
    if nan_rank is not None and int(nan_rank) == rt.rank:
        import fastibot.step as step_mod
        real, calls = step_mod.ibot_terms, [0]

        def terms(*args, **kw):
            out, stat = real(*args, **kw)
            calls[0] += 1
            if calls[0] == 1:  # a NaN constant: the loss is NaN, the gradients stay finite
                out = dict(out, cls=out["cls"] + torch.tensor(float("nan")))
            return out, stat

        step_mod.ibot_terms = terms
    trainer = Trainer(cfg, rt, resume)
    summary = trainer.fit()
    student = trainer.student
    digest = {
        "rank": rt.rank, "world": rt.world, "step": trainer.step, "loss": summary.get("loss"),
        "nonfinite_steps": summary.get("nonfinite_steps"),
        "student": [float(p.double().sum()) for p in student.parameters()],
        "teacher": [float(p.double().sum()) for p in trainer.teacher.parameters()],
        "centers": {k: float(v.double().sum()) for k, v in trainer.centers.state_dict().items()},
    }
    Path(out_dir, f"rank{rt.rank}.json").write_text(json.dumps(digest))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
