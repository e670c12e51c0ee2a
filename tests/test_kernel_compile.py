"""Every Triton launch of fastibot's ops compiles for Hopper (sm_90) down to PTX, on a machine without a GPU
(``tests/compile_worker.py``). The interpreter, which runs the kernels in the other tests, accepts code that
the compiler refuses (a plain module global read inside a kernel is one); this catches it before a GPU does."""
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

WORKER = Path(__file__).resolve().parent / "compile_worker.py"


def test_every_launch_compiles_for_sm90():
    env = dict(os.environ, TRITON_INTERPRET="0")
    out = subprocess.run([sys.executable, str(WORKER)], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads(out.stdout.strip().splitlines()[-1])
    errors = [r for r in rows if "error" in r]
    assert not errors, errors
    # each op's launches: the two losses (forward, backward scale, teacher softmax), the EMA, the fused update
    # on its 128- and 32-bit paths, the block masks, tile attention at 37 tokens (one kernel each way) and at
    # 197 (forward, dK/dV, dQ)
    assert Counter(r["kernel"] for r in rows) == Counter({
        "_distill_ce_kernel": 2, "_scale_inplace_kernel": 2, "_softmax_rows_kernel": 1, "_ema_kernel": 1,
        "_fused_update_kernel": 2, "_block_mask_kernel": 1, "_tile_attn_fwd": 2, "_tile_attn_bwd_kv": 2,
        "_tile_attn_bwd_q": 1})
    assert all(r["ptx lines"] > 100 for r in rows)
