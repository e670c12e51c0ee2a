"""Swin-T backbones: masked tokens, parity with timm, the padded-window order, a short run, export, evals."""
import json

import pytest
import torch
import torch.nn.functional as F

from fastibot.checkpoint import atomic_save, checkpoints
from fastibot.cli import main
from fastibot.config import ConfigError, load_config
from fastibot.models import swin
from fastibot.models.backbones import mask_grid, prediction_size
from fastibot.models.ibot import build_model
from fastibot.models.swin import SwinTransformer
from fastibot.train import train
from conftest import labelled_folder, tiny_config

timm = pytest.importorskip("timm")
from timm.models.swin_transformer import SwinTransformerBlock  # noqa: E402

SMALL = dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4))  # every stage has a shifted block


def _small(img_size=64, window_size=7, **kw):
    torch.manual_seed(0)
    return SwinTransformer("swin_tiny", 4, img_size, window_size, **SMALL, **kw).eval()


def test_masked_cells_get_the_mask_token_and_only_they():
    m = _small(img_size=96)
    with torch.no_grad():
        m.masked_embed.normal_()  # a distinctive token (it starts at zero)
    x = torch.randn(2, 3, 96, 96)
    mask = torch.zeros(2, 3, 3, dtype=torch.bool)  # 96 px -> 3x3 final-stage cells of 32 px
    mask[0, 0, 1] = mask[0, 2, 2] = True
    mask[1] = True  # every cell of image 1
    with torch.no_grad():
        plain, masked = m.embed(x), m.embed(x, mask.flatten(1))
    # patch-grid cell (r, c) (4 px) lies in mask cell (r // 8, c // 8) (32 px)
    expect = torch.zeros(2, 24, 24, dtype=torch.bool)
    for b in range(2):
        for r in range(24):
            for c in range(24):
                expect[b, r, c] = bool(mask[b, r // 8, c // 8])
    assert expect.sum() == 2 * 64 + 9 * 64
    torch.testing.assert_close(masked[expect], m.masked_embed.expand(int(expect.sum()), -1), rtol=0, atol=0)
    torch.testing.assert_close(masked[~expect], plain[~expect], rtol=0, atol=0)
    assert not torch.equal(masked[expect], plain[expect])
    with pytest.raises(ValueError, match="3x3 final-stage grid"):
        m.embed(x, torch.zeros(2, 24 * 24, dtype=torch.bool))  # a patch-grid mask is refused


@pytest.mark.parametrize("window", [7, 14])
def test_unmasked_output_equals_timm(window):
    ours = _small(img_size=224, window_size=window)  # Swin-T's layout at reduced widths (the export test: full size)
    ref = timm.models.swin_transformer.SwinTransformer(img_size=224, window_size=window, num_classes=0, **SMALL)
    ref.load_state_dict({k: v for k, v in ours.state_dict().items() if k != "masked_embed"}, strict=True)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        tokens, expect = ours.forward_features(x), ref.eval().forward_features(x)  # (2, 50, 128), (2, 7, 7, 128)
        torch.testing.assert_close(tokens[:, 1:], expect.flatten(1, 2), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(tokens[:, 0], ref(x), rtol=1e-5, atol=1e-5)  # [CLS] = timm's avg pool


def test_windows_that_do_not_tile_the_map_pad_before_the_shift():
    m = _small(img_size=224)
    blk = m.layers[0].blocks[1]  # built for a 56x56 map: window 7, shift 3
    assert blk.window_size == (7, 7) and blk.shift_size == (3, 3)
    x = torch.randn(2, 24, 24, 16)  # a 96 px crop's first stage: 24 is not a multiple of 7
    with torch.no_grad():
        ours = blk._attn(x)
        # the reference order: pad to 28, then timm's (shift, window, unshift) on a map the window tiles
        padded = SwinTransformerBlock._attn(blk, F.pad(x, (0, 0, 0, 4, 0, 4)))[:, :24, :24]
        shift_then_pad = SwinTransformerBlock._attn(blk, x)  # timm's own order on the unpadded map
    torch.testing.assert_close(ours, padded, rtol=1e-6, atol=1e-6)
    assert (ours - shift_then_pad).abs().max() > 1e-3  # the two orders differ, so the check above has teeth
    with torch.no_grad():  # and a whole local crop runs through the model
        assert m.forward_features(torch.randn(1, 3, 96, 96)).shape == (1, 1 + 9, 128)


def test_recomputed_blocks_give_the_same_gradients_and_keep_less():
    """set_recompute(n) checkpoints the first n blocks over all stages (drop-path draws replayed): the same
    output and gradients as keeping every activation, with fewer bytes saved for the backward."""
    x = torch.randn(2, 3, 64, 64)
    mask = torch.rand(2, 4) < 0.5
    runs = {}
    for n in (0, 5, 8):
        m = _small(drop_path_rate=0.3).train()
        m.set_recompute(n)
        assert [s.recompute for s in m.layers] == [min(2, max(0, n - 2 * i)) for i in range(4)]
        saved = []
        torch.manual_seed(3)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            out = m.forward_features(x, mask)
        (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        runs[n] = out.detach(), {k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None}, sum(saved)
    for n in (5, 8):
        torch.testing.assert_close(runs[n][0], runs[0][0])
        for k, g in runs[0][1].items():
            torch.testing.assert_close(runs[n][1][k], g, rtol=1e-5, atol=1e-6, msg=k)
    assert runs[0][2] > runs[5][2] > runs[8][2]


def test_intermediate_layers_and_attention_maps():
    m = _small(img_size=64)
    with torch.no_grad():
        outs = m.get_intermediate_layers(torch.randn(2, 3, 64, 64), 3)
        last = m.forward_features(torch.randn(2, 3, 64, 64))
    # last block of stage 3 (64 wide, 4x4 map) then the two of stage 4 (128 wide, 2x2), each with its mean first
    assert [tuple(o.shape) for o in outs] == [(2, 17, 64), (2, 5, 128), (2, 5, 128)]
    torch.testing.assert_close(outs[0][:, 0], outs[0][:, 1:].mean(1))
    assert last.shape == (2, 5, 128)
    with pytest.raises(ValueError, match="no \\[CLS\\] token"):
        m.last_self_attention(torch.randn(1, 3, 64, 64))


def test_config_checks_and_mask_grid(tmp_path):
    base = ["model.arch=swin_tiny", "model.patch_size=4"]
    cfg = load_config(None, base)
    assert prediction_size(cfg) == 32 and mask_grid(cfg, 224) == (7, 7)
    assert mask_grid(load_config(None, []), 224) == (14, 14)  # ViT-S/16: one cell per patch
    for extra, key in ((["model.packed=true"], "model.packed"), (["model.attention=xformers"], "model.attention"),
                       (["crops.global_size=208"], "crops.global_size"), (["model.window_size=1"], "model.window_size"),
                       (["model.depth=2"], "model.depth"),  # ViT-only keys must not be silently ignored
                       (["model.pos_embed_resize=exact"], "model.pos_embed_resize")):
        with pytest.raises(ConfigError, match=key.replace(".", "\\.")):
            load_config(None, base + extra)


@pytest.fixture(scope="module")
def swin_run(tmp_path_factory):
    """A short Swin run (reduced widths) on the torchvision loader, dense path, fused loss and EMA kernels."""
    out = tmp_path_factory.mktemp("swin") / "run"
    mp = pytest.MonkeyPatch()
    mp.setitem(swin.SWIN_ARCHS, "swin_tiny", SMALL)
    cfg = tiny_config(out, **{"model.arch": "swin_tiny", "model.patch_size": 4, "model.packed": False,
                              "crops.global_size": 64, "crops.local_size": 32, "data.loader": "torchvision",
                              "data.batch_size": 4, "runtime.max_steps": 2, "kernels.loss": "triton",
                              "kernels.ema": "triton", "masking.pred_ratio": [0.5], "masking.pred_ratio_var": [0.0]})
    try:
        torch.manual_seed(cfg.runtime.seed)
        initial = build_model(cfg, student=True).state_dict()
        summary = train(cfg)
    finally:
        mp.undo()  # the other tests build full-size Swin-Ts
    return out, cfg, initial, summary


def test_short_run_trains(swin_run):
    out, cfg, initial, summary = swin_run
    assert summary["step"] == 2 and [s for s, _ in checkpoints(out)] == [2]
    assert torch.isfinite(torch.tensor([summary["loss"], summary["cls"]])).all() and summary["patch"] > 0
    state = torch.load(out / "checkpoint_00000002.pt", map_location="cpu", weights_only=True)
    student, teacher = state["student"], state["teacher"]
    # the mask token is reached only through masked cells: it moved, so masks reached the backbone
    assert not torch.equal(student["backbone.masked_embed"], initial["backbone.masked_embed"])
    for k in ("backbone.layers.3.blocks.1.attn.qkv.weight", "backbone.patch_embed.proj.weight"):
        assert not torch.equal(teacher[k], initial[k]), k  # the EMA moved the teacher


def test_run_exports_to_timm_and_every_eval_runs(swin_run, tmp_path, capsys, monkeypatch):
    out, cfg, _, _ = swin_run
    monkeypatch.setitem(swin.SWIN_ARCHS, "swin_tiny", SMALL)
    dst = tmp_path / "swin.safetensors"
    assert main(["export", str(out), "--out", str(dst)]) == 0
    from safetensors.torch import load_file

    from fastibot.export import load_backbone
    ref = timm.models.swin_transformer.SwinTransformer(img_size=64, window_size=7, num_classes=0, strict_img_size=False,
                                                       **SMALL).eval()
    ref.load_state_dict(load_file(str(dst)), strict=True)
    ours, _ = load_backbone(out)
    # 224 px: the shifted stages' maps (56, 28) are tiled by the 7-token window, where timm's shift-then-pad
    # order and the reference pad-then-shift agree (a 64 px map of 16 is not: see the padding test)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)

    tr, va = labelled_folder(tmp_path / "train"), labelled_folder(tmp_path / "val", n_per_class=3, offset=999)
    common = ["--train", str(tr), "--val", str(va), "--image-size", "64", "--device", "cpu", "--workers", "0"]
    assert main(["eval", "knn", str(out), "--k", "3"] + common) == 0
    assert main(["eval", "linear", str(out), "--epochs", "2", "--n-last-blocks", "4"] + common) == 0
    assert '"feature_dim": 384' in capsys.readouterr().out  # 64 + 64 (stage 3) + 128 + 128 (stage 4)
    assert main(["eval", "unsupervised", str(out), "--val", str(va), "--image-size", "64", "--device", "cpu",
                 "--workers", "0", "--kmeans", "3", "--json", str(tmp_path / "u.json")]) == 0
    res = json.loads((tmp_path / "u.json").read_text())
    assert set(res) >= {"prototypes", "kmeans"} and 0 <= res["prototypes"]["nmi"] <= 1
    capsys.readouterr()
    assert main(["eval", "attention", str(out), "--images", str(va / "c0"), "--out", str(tmp_path / "maps"),
                 "--device", "cpu"]) == 1
    assert "no [CLS] token" in capsys.readouterr().err


def test_full_size_export_loads_into_timm_strictly(tmp_path, capsys):
    cfg = load_config(None, ["model.arch=swin_tiny", "model.patch_size=4", "model.out_dim=64",
                             "model.patch_out_dim=64"])
    torch.manual_seed(0)
    teacher = build_model(cfg, student=False)
    atomic_save({"config": cfg.to_dict(), "teacher": teacher.state_dict(), "step": 0}, tmp_path / "checkpoint_00000000.pt")
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "swin_t.safetensors")]) == 0
    assert "swin_tiny_patch4_window7_224" in capsys.readouterr().out
    from safetensors.torch import load_file
    model = timm.create_model("swin_tiny_patch4_window7_224", num_classes=0).eval()
    model.load_state_dict(load_file(str(tmp_path / "swin_t.safetensors")), strict=True)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model(x), teacher.backbone.eval()(x), rtol=1e-5, atol=1e-5)
    # fine-tuning starts from the same weights, with a new head on the mean final-stage token
    from fastibot.models.classifier import build_classifier, load_source
    name, kwargs, sd = load_source(str(tmp_path))
    clf = build_classifier(name, kwargs, 5, 224, 0.0, sd).eval()
    with torch.no_grad():
        torch.testing.assert_close(clf.forward_head(clf.forward_features(x), pre_logits=True), model(x))
        assert clf(x).shape == (1, 5)


def test_a_compiled_swin_does_not_recompile_on_its_second_call():
    """The shifted blocks cache their attention masks in a dict; filled inside a compiled graph, the dict
    changed what the graph's guards saw and every compiled Swin compiled twice (a full Swin-T step took
    minutes more to warm up on a GPU). Dynamo alone (eager backend) shows the guards."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    m = _small(img_size=64)
    torch._dynamo.reset()
    counters.clear()
    f = torch.compile(m.forward_features, backend="eager", fullgraph=True, dynamic=False)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        outs = [f(x) for _ in range(3)]  # the first call meets an empty cache
        ref = m.forward_features(x)
    for out in outs:
        torch.testing.assert_close(out, ref)
    assert counters["stats"]["unique_graphs"] == 1
