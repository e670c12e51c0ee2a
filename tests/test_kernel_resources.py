"""benchmarks/kernel_resources.py compiles the tile-attention kernels for Hopper on the CPU and reads ptxas'
register report: one row per kernel launch, as the op splits a sequence, with sane register counts."""
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "kernel_resources.py"


def test_reports_registers_and_spills_for_every_launch(tmp_path):
    out = tmp_path / "res.json"
    env = dict(os.environ, TRITON_INTERPRET="1")  # the script compiles for the GPU whatever the caller set
    subprocess.run([sys.executable, str(SCRIPT), "--configs", "37:64/64,197:64/32+64/64", "--warps", "8",
                    "--json", str(out)], check=True, env=env, capture_output=True, text=True, timeout=600)
    rows = json.loads(out.read_text())["rows"]
    launches = Counter((r["length"], r["kernel"], r["program rows"], r["loops"]) for r in rows)
    # 37 tokens: one block, no loop, dQ from the dK/dV program; 197: four programs of 64 rows (or keys) per
    # sequence looping over the other side's blocks, and dQ in a kernel of its own
    assert launches == Counter({(37, "forward", 64, False): 1, (37, "dK/dV + dQ", 64, False): 1,
                                (197, "forward", 64, True): 1, (197, "dK/dV", 64, True): 1, (197, "dQ", 64, True): 1})
    for r in rows:
        assert r["warps"] == 8 and 16 <= r["registers"] <= 255
        assert r["spill stores"] >= 0 and r["spill loads"] >= 0


def test_benchmark_tile_settings_reach_the_launch_plan_and_are_restored():
    """``--tile-configs`` entries (attention.py, step_time.py) set the tile kernels' block shapes and warps
    for what runs inside them, forward and backward apart, and leave the shipped settings behind, also
    when the timed run fails."""
    import pytest
    sys.path.insert(0, str(SCRIPT.parent))
    from common import tile_settings

    from fastibot.kernels import tile_attention as ta

    def shapes(length, backward):
        return sorted((c["BLOCK_M"], c["BLOCK_N"], w, programs) for _, programs, c, w in ta._plan(length, backward))

    shipped = {(n, b): shapes(n, b) for n in (37, 197) for b in (False, True)}
    with tile_settings("64/16/2+32/32/8"):
        assert shapes(197, False) == [(64, 16, 2, 4)]  # four blocks of 64 rows, looping over keys 16 at a time
        assert shapes(197, True) == [(32, 32, 8, 7), (32, 32, 8, 7)]  # dK/dV and dQ, seven blocks of 32 each
        assert shapes(37, True) == shipped[(37, True)]  # the locals' tile is not the entry's
    with pytest.raises(RuntimeError), tile_settings("64:32/32/8"):
        assert shapes(37, False) == [(32, 32, 8, 2)] and shapes(197, False) == shipped[(197, False)]
        raise RuntimeError("a failed run")
    assert {(n, b): shapes(n, b) for n in (37, 197) for b in (False, True)} == shipped


def test_a_malformed_tile_config_is_refused_with_its_syntax():
    """A ``--tile-configs`` entry that is not BM/BN/W (or F+B, after an optional S:) stops the benchmark with the
    syntax, before any device time is spent; well-formed entries parse to the key tiles and shapes they name."""
    import pytest
    sys.path.insert(0, str(SCRIPT.parent))
    from common import tile_config

    assert tile_config("64/32/4+64/64/4") == ((128, 256), ((64, 32, 4), (64, 64, 4)))
    assert tile_config("64:32/32/8") == ((64,), (32, 32, 8))
    for bad in ("64/64", "tails", "64/32/4+64/64/4+32/32/4", "a/b/c"):
        with pytest.raises(SystemExit, match="BM/BN/W"):
            tile_config(bad)
