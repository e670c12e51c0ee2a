"""Config: YAML + dotted overrides, strict keys, typed values, errors that name the key."""
import pytest
import yaml

from fastibot.config import Config, ConfigError, describe, load_config, packaged_config
from fastibot.cli import main


def test_defaults_are_the_vit_small_recipe():
    c = Config()
    assert c.model.arch == "vit_small" and c.model.out_dim == 8192 and c.crops.n_local == 10
    assert c.masking.pred_ratio == [0.0, 0.3] and c.masking.pred_ratio_var == [0.0, 0.2]
    assert c.optim.clip_grad == 3.0 and c.teacher.temp == 0.07 and c.ibot.student_temp == 0.1


@pytest.mark.parametrize("name", ["quickstart", "vit_small_16", "vit_base_16", "vit_large_16", "swin_tiny_7"])
def test_packaged_configs_load(name):
    cfg = load_config(packaged_config(name), ["data.source=imagefolder", "data.path=/tmp/x"])
    assert cfg.model.patch_size == (4 if name.startswith("swin") else 16)


def test_overrides_and_types():
    cfg = load_config(packaged_config("quickstart"), ["optim.lr=1e-3", "crops.n_local=3", "model.packed=true",
                                                      "masking.pred_ratio=[0.2]", "masking.pred_ratio_var=[0.1]"])
    assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float)
    assert cfg.crops.n_local == 3 and cfg.model.packed == "true" and cfg.masking.pred_ratio == [0.2]


@pytest.mark.parametrize("override,key", [
    ("optim.lrr=1", "optim.lrr"),
    ("optimm.lr=1", "optimm"),
    ("optim.lr=fast", "optim.lr"),
    ("crops.n_local=2.5", "crops.n_local"),
    ("model.arch=vit_huge", "model.arch"),
    ("model.packed=maybe", "model.packed"),
    ("masking.pred_ratio_var=[0.1, 0.1, 0.1]", "masking.pred_ratio_var"),
    ("crops.global_size=100", "crops.global_size"),
    ("data.source=imagefolder", "data.path"),
    ("optim", "optim"),
])
def test_errors_name_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(packaged_config("quickstart"), [override])
    assert key in str(e.value)


def test_the_fused_update_needs_the_flat_buffers_of_the_triton_ema():
    for ema in ("foreach", "reference"):
        with pytest.raises(ConfigError, match=r"kernels\.update.*kernels\.ema=" + ema):
            load_config(packaged_config("quickstart"), ["kernels.update=triton", f"kernels.ema={ema}"])
    cfg = load_config(packaged_config("quickstart"), ["kernels.update=triton", "kernels.ema=auto"])
    assert cfg.kernels.update == "triton"


def test_suggests_close_key():
    with pytest.raises(ConfigError, match="did you mean 'batch_size'"):
        load_config(None, ["data.batch_sise=3"])


def test_yaml_unknown_key(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  arch: vit_tiny\n  dropath: 0.2\n")
    with pytest.raises(ConfigError, match="model.dropath"):
        load_config(p)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_save_roundtrip(tmp_path):
    cfg = load_config(packaged_config("quickstart"), ["optim.lr=2e-4"])
    cfg.save(tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert again == cfg
    assert yaml.safe_load((tmp_path / "c.yaml").read_text())["optim"]["lr"] == 2e-4


def test_describe_lists_every_key():
    lines = describe()
    assert any(line.startswith("optim.lr = ") and "#" in line for line in lines)
    assert len(lines) > 60


def test_cli_reports_config_error(capsys):
    assert main(["train", "optim.lrr=1"]) == 2
    assert "optim.lrr" in capsys.readouterr().err
