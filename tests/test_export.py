"""Export to timm: the snippet `fastibot export` prints is run as printed and loads the backbone."""
import pytest
import torch

from fastibot.cli import main
from fastibot.export import timm_snippet
from fastibot.config import packaged_config
from conftest import tiny_overrides


def _printed_code(out: str) -> str:
    lines = out.splitlines()
    return "\n".join(lines[lines.index("load it in timm:") + 1:])


@pytest.mark.parametrize("suffix,patch", [(".safetensors", 16), (".pt", 8)])
def test_export_prints_a_timm_snippet_that_loads_the_backbone(tmp_path, capsys, monkeypatch, suffix, patch):
    pytest.importorskip("timm")
    run = tmp_path / "run"
    args = ["train", "-c", str(packaged_config("quickstart"))] + tiny_overrides(
        run, **{"runtime.max_steps": 1, "model.patch_size": patch})
    assert main(args) == 0
    capsys.readouterr()
    out = tmp_path / f"vit{suffix}"
    assert main(["export", str(run), "--out", str(out)]) == 0
    code = _printed_code(capsys.readouterr().out)
    assert "checkpoint_path=" in code and "img_size=32" in code
    (tmp_path / "file").write_text("")
    for bad in (tmp_path, tmp_path / "vit.bin", tmp_path / "file" / f"vit{suffix}"):  # a folder, a suffix, no folder
        assert main(["export", str(run), "--out", str(bad)]) == 1
        err = capsys.readouterr().err
        assert f"fastibot: --out {str(bad)!r}" in err and len(err.splitlines()) == 1, err
    monkeypatch.chdir(tmp_path / "run")  # the printed path works from anywhere
    scope = {}
    exec(code, scope)  # exactly what was printed
    model = scope["model"].eval()
    from fastibot.export import load_backbone
    ours, _ = load_backbone(run)
    ours_sd = {k: v for k, v in ours.state_dict().items() if k != "masked_embed"}
    assert set(model.state_dict()) == set(ours_sd)  # every key, no extras
    for k, v in ours_sd.items():
        assert torch.equal(model.state_dict()[k], v), k
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(x), ours(x), rtol=1e-4, atol=1e-4)


def test_timm_snippet_text(tmp_path):
    code = timm_snippet(tmp_path / "b.pt", "vit_small_patch16_224", {"img_size": 96})
    assert code == ("import timm\nmodel = timm.create_model('vit_small_patch16_224', num_classes=0, "
                    f"checkpoint_path={str((tmp_path / 'b.pt').resolve())!r}, img_size=96)")
