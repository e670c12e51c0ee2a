"""Unsupervised classification: exact cluster scores, k-means on known clusters, prototype assignment, CLI."""
import json
import math

import numpy as np
import pytest
import torch

from fastibot.cli import main
from fastibot.eval.clusters import cluster_scores, contingency, kmeans
from fastibot.eval.unsupervised import prototype_assignments
from fastibot.models.head import IBOTHead
from conftest import labelled_folder

pytest.importorskip("scipy")


def test_perfect_clustering_with_other_names_scores_one():
    labels = [0, 0, 1, 1, 2, 2, 2]
    clusters = [7, 7, 3, 3, 5, 5, 5]  # prototype indices, any integers
    s = cluster_scores(labels, clusters)
    assert s == {"nmi": pytest.approx(1.0), "ari": pytest.approx(1.0), "acc": pytest.approx(100.0), "clusters": 3}


def test_known_tables_give_hand_computed_scores():
    # C = [[3, 1], [1, 3]] (rows: classes, columns: clusters), n = 8:
    #   MI = 3/4 ln(3/2) + 1/4 ln(1/2), H = ln 2 each  ->  NMI = 3/4 log2(3) - 1
    #   pairs: index 3 + 3 = 6, rows 6 + 6 = 12, columns 12, C(8, 2) = 28, expected 144/28
    #          ARI = (6 - 36/7) / (12 - 36/7) = 1/8;  matched: 3 + 3 of 8
    labels = [0, 0, 0, 0, 1, 1, 1, 1]
    clusters = [0, 0, 0, 1, 0, 1, 1, 1]
    assert contingency(labels, clusters).tolist() == [[3, 1], [1, 3]]
    s = cluster_scores(labels, clusters)
    assert s["nmi"] == pytest.approx(0.75 * math.log2(3) - 1, abs=1e-12)
    assert s["ari"] == pytest.approx(0.125, abs=1e-12) and s["acc"] == pytest.approx(75.0)
    # C = [[2, 1, 0], [0, 1, 2]], more clusters than classes, n = 6:
    #   MI = 2 * (1/3) ln 2, H(classes) = ln 2, H(clusters) = ln 3  ->  NMI = (4/3) ln 2 / ln 6
    #   pairs: index 2, rows 6, columns 3, C(6, 2) = 15, expected 18/15  ->  ARI = 0.8 / 3.3 = 8/33
    #   matched: class 0 -> cluster 0 (2), class 1 -> cluster 2 (2); cluster 1 is left over: 4 of 6
    s = cluster_scores([0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 2, 2])
    assert s["nmi"] == pytest.approx(4 * math.log(2) / (3 * math.log(6)), abs=1e-12)
    assert s["ari"] == pytest.approx(8 / 33, abs=1e-12) and s["acc"] == pytest.approx(200 / 3)
    # everything in one cluster: no information, chance-level adjusted index
    s = cluster_scores([0, 0, 1, 1], [4, 4, 4, 4])
    assert s["nmi"] == 0.0 and s["ari"] == pytest.approx(0.0) and s["acc"] == pytest.approx(50.0)


def test_kmeans_recovers_known_clusters():
    g = torch.Generator().manual_seed(0)
    centers = torch.eye(8)[:3] * 4
    labels = torch.tensor([2, 0, 1] * 30)  # interleaved, so cluster ids cannot follow the order
    x = centers[labels] + 0.3 * torch.randn(90, 8, generator=g)
    assigned = kmeans(x, 3, seed=1)
    s = cluster_scores(labels.numpy(), assigned.numpy())
    assert s["nmi"] == pytest.approx(1.0) and s["ari"] == pytest.approx(1.0) and s["acc"] == 100.0
    assert torch.equal(assigned, kmeans(x, 3, seed=1))  # seeded


def test_one_class_in_one_cluster_scores_one():
    """Both partitions a single block: nothing to explain, and nothing wrong (NMI and ARI are 1 by definition)."""
    s = cluster_scores([3, 3, 3, 3], [9, 9, 9, 9])
    assert s["nmi"] == 1.0 and s["ari"] == 1.0 and s["acc"] == 100.0


def test_kmeans_on_overlapping_clusters_ends_at_a_lloyd_fixed_point():
    """Blobs that overlap need several Lloyd iterations: the result is a fixed point of cosine k-means
    (every point at its nearest center, every center the normalised mean of its points), checked here
    in float64 by an independent step."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 6, generator=g)[torch.arange(240) % 4] + 1.2 * torch.randn(240, 6, generator=g)
    labels = kmeans(x, 4, iters=50, seed=3)
    xn = torch.nn.functional.normalize(x.double(), dim=-1)
    used = labels.unique()
    centers = torch.stack([torch.nn.functional.normalize(xn[labels == c].mean(0), dim=0) for c in used])
    again = used[(xn @ centers.T).argmax(1)]
    assert torch.equal(again, labels)
    assert len(used) == 4
    first = kmeans(x, 4, iters=1, seed=3)
    assert not torch.equal(first, labels)  # one iteration is not enough on this data


def test_prototype_assignment_is_the_argmax_prototype():
    head = IBOTHead(4, 6, 6, bottleneck_dim=4, nlayers=1, norm_last_layer=True)
    with torch.no_grad():
        head.mlp[0].weight.copy_(torch.eye(4))
        head.mlp[0].bias.zero_()
        protos = torch.tensor([[1., 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1], [1, 1, 0, 0], [0, 0, 1, 1]])
        head.last_layer.weight_v.copy_(protos)
    feats = torch.tensor([[0.1, 0.0, 3.0, 0.0], [2.0, 2.1, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 1.0, 1.1]])
    assert prototype_assignments(head, feats, "cpu", chunk=3).tolist() == [2, 4, 3, 5]


def test_cli_unsupervised(tmp_path, capsys):
    va = labelled_folder(tmp_path / "val", n_per_class=4)
    out = tmp_path / "u.json"
    assert main(["eval", "unsupervised", "random:vit_tiny", "--val", str(va), "--image-size", "32", "--device", "cpu",
                 "--workers", "0", "--kmeans", "3", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["n_val"] == 12 and res["n_classes"] == 3 and res["prototypes_total"] == 8192
    for key in ("prototypes", "kmeans"):
        assert 0 <= res[key]["nmi"] <= 1 and 0 <= res[key]["acc"] <= 100 and -1 <= res[key]["ari"] <= 1
    assert res["kmeans"]["clusters"] <= 3
    assert np.isfinite(res["prototypes"]["ari"])


def test_cli_unsupervised_checkpoint_errors_name_no_other_commands_flag(tmp_path, capsys):
    """A folder without checkpoints, or with only a broken one: one message about the folder, not about a
    --resume flag this command does not have."""
    va = labelled_folder(tmp_path / "val", n_per_class=1)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "checkpoint_00000001.pt").write_text("cut short")
    for src, msg in ((va, "no checkpoint_*.pt in"), (tmp_path / "broken", "no usable checkpoint in")):
        assert main(["eval", "unsupervised", str(src), "--val", str(va), "--device", "cpu", "--workers", "0"]) == 1
        err = capsys.readouterr().err
        assert msg in err and str(src) in err and "--resume" not in err, err
