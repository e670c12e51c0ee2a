"""Run under torchrun by tests/test_fsdp.py: train one or more runs in one process group, then write each
rank's view (step, AdamW step counts, non-finite steps) beside each run.

argv: a JSON list of runs, each {"out": folder, "overrides": {...}, "resume": path or null,
"nan_on_rank": rank or null (that rank's loss, not its gradients, is NaN at its first step)}."""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import tiny_config  # noqa: E402
from fastibot.train import Trainer, init_runtime  # noqa: E402


def nan_first_loss():
    import fastibot.step as step_mod
    real, calls = step_mod.ibot_terms, [0]

    def terms(*args, **kw):
        out, stat = real(*args, **kw)
        calls[0] += 1
        if calls[0] == 1:
            out = dict(out, cls=out["cls"] + torch.tensor(float("nan")))
        return out, stat

    step_mod.ibot_terms = terms
    return lambda: setattr(step_mod, "ibot_terms", real)


def run(spec: dict) -> None:
    cfg = tiny_config(spec["out"], **spec.get("overrides", {}))
    rt = init_runtime(cfg)
    undo = nan_first_loss() if spec.get("nan_on_rank") == rt.rank else None
    trainer = Trainer(cfg, rt, spec.get("resume"))
    summary = trainer.fit()
    if undo:
        undo()
    view = {"rank": rt.rank, "world": rt.world, "step": trainer.step, "nonfinite_steps": summary["nonfinite_steps"],
            "opt_steps": sorted({float(s["step"]) for s in trainer.opt.named_state().values()})}
    Path(spec["out"], f"rank{rt.rank}.json").write_text(json.dumps(view))


if __name__ == "__main__":
    for spec in json.loads(sys.argv[1]):
        run(spec)
    torch.distributed.destroy_process_group()
