"""benchmarks/kernel_resources.py compiles the tile-attention kernels for Hopper on the CPU and reads ptxas'
register report: the launched kernel set per configuration and sane register counts."""
import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "kernel_resources.py"


def test_reports_registers_and_spills_for_every_launched_kernel(tmp_path):
    out = tmp_path / "res.json"
    env = dict(os.environ, TRITON_INTERPRET="1")  # the script compiles for the GPU whatever the caller set
    subprocess.run([sys.executable, str(SCRIPT), "--configs", "64:64/64,256:64/64", "--warps", "8",
                    "--json", str(out)], check=True, env=env, capture_output=True, text=True, timeout=400)
    rows = json.loads(out.read_text())["rows"]
    kernels = {(r["tile"], r["kernel"]) for r in rows}
    # a sequence that fits one block of keys gets dQ from the dK/dV program; a longer one launches the dQ kernel
    assert kernels == {(64, "forward"), (64, "dK/dV + dQ"), (256, "forward"), (256, "dK/dV"), (256, "dQ")}
    for r in rows:
        assert r["warps"] == 8 and 16 <= r["registers"] <= 255
        assert r["spill stores"] >= 0 and r["spill loads"] >= 0
