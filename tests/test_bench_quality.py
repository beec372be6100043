"""``mmrprune-bench quality``: the Pareto / dominance helpers and a tiny run."""
import json

import numpy as np
import pytest

from mmrprune.bench import cli, quality
from mmrprune.bench.records import REQUIRED_FIELDS


def test_weak_dominance():
    assert quality.weakly_dominates((0.5, 0.9), (0.4, 0.95))
    assert quality.weakly_dominates((0.5, 0.9), (0.5, 0.9))
    assert not quality.weakly_dominates((0.5, 0.9), (0.6, 0.95))   # less retention
    assert not quality.weakly_dominates((0.5, 0.9), (0.4, 0.85))   # worse Hopkins


def test_pareto_front():
    pts = [(0.2, 0.80), (0.3, 0.85), (0.25, 0.90), (0.4, 0.95), (0.3, 0.85), (0.35, 0.99), (0.1, 0.80)]
    # (0.25, 0.90) loses to (0.3, 0.85); (0.35, 0.99) to (0.4, 0.95); (0.1, 0.80) to (0.2, 0.80)
    assert quality.pareto_front(pts) == [(0.2, 0.80), (0.3, 0.85), (0.4, 0.95)]
    assert quality.pareto_front([]) == []


def test_dominance_fraction_and_gap():
    mmr = [(0.2, 0.80), (0.3, 0.85), (0.4, 0.95)]
    hybrid = [(0.2, 0.80), (0.25, 0.84), (0.35, 0.88), (0.45, 0.97)]
    res = quality.dominance(mmr, hybrid)
    # (0.25, 0.84) by (0.3, 0.85)? no: Hopkins 0.85 > 0.84. (0.35, 0.88): by (0.4, 0.95)? no. -> only the tie
    assert res["dominated"] == [True, False, False, False]
    assert res["fraction"] == pytest.approx(0.25)
    # MMR front at retention 0.25 interpolates Hopkins 0.825: hybrid is 0.015 better there
    assert res["gap"][1] == pytest.approx(0.84 - 0.825)
    assert res["gap"][2] == pytest.approx(0.88 - 0.90)
    assert res["gap"][0] == pytest.approx(0.0)
    assert res["gap"][3] is None  # beyond MMR's retention range
    assert quality.hopkins_on_curve(mmr, 0.1) is None
    res = quality.dominance([(0.5, 0.5)], hybrid)
    assert res["fraction"] == 1.0


def _rec(method, lam, ret, hop, pool=None):
    return {"method": method, "lam": lam, "retention": ret, "hopkins": hop, "pool": pool, "k": 4, "tokens": 16}


def test_compare_mmr_hybrid_on_hand_made_records():
    recs = [_rec("mmr", 0.0, 0.25, 0.90), _rec("mmr", 0.1, 0.40, 0.92), _rec("mmr", 1.0, 0.45, 0.97),
            _rec("hybrid", 0.2, 0.25, 0.90, pool=16), _rec("hybrid", 0.5, 0.35, 0.93, pool=8),
            _rec("hybrid", 0.8, 0.44, 0.91, pool=5), _rec("hybrid", 1.0, 0.45, 0.97, pool=4),
            _rec("dpp", None, 0.30, 0.95), _rec("divprune", None, 0.26, 0.89)]
    c = quality.compare_mmr_hybrid(recs)
    assert (c["hybrid_points"], c["dominated"]) == (4, 3)
    assert (c["interior_points"], c["interior_dominated"]) == (2, 1)
    assert c["interior_fraction_dominated"] == pytest.approx(0.5)
    assert c["singles_dominated_by_mmr"] == {"dpp": True, "divprune": False}
    assert [p["dominated_by_mmr"] for p in c["per_point"]] == [True, True, False, True]
    text = quality.format_quality([dict(r, retention_seed_std=0.0, hopkins_seed_std=0.0, median_ms=1.0,
                                        backend="torch") for r in recs], c)
    assert "3/4 hybrid points" in text and "1/2" in text


def test_tiny_quality_run_writes_json(tmp_path, capsys):
    rc = cli.main(["quality", "--images", "1", "--tokens", "96", "--seeds", "0,1", "--mmr-lams", "0,0.3,1",
                   "--hybrid-lams", "0.5,1", "--methods", "topk,fps,divprune", "--out-dir", str(tmp_path),
                   "--no-figure", "--quiet", "--device", "cpu"])
    out = capsys.readouterr().out
    assert rc in (0, 1)  # 1 only when matplotlib is missing (plots skipped)
    records = json.loads((tmp_path / "quality_pareto.json").read_text())
    assert [(r["method"], r["lam"]) for r in records] == [
        ("mmr", 0.0), ("mmr", 0.3), ("mmr", 1.0), ("hybrid", 0.5), ("hybrid", 1.0),
        ("topk", 1.0), ("fps", 0.0), ("divprune", None)]
    k = 24  # 25% of 96
    for r in records:
        assert not [f for f in REQUIRED_FIELDS if f not in r]
        assert (r["batch"], r["tokens"], r["dim"], r["k"], r["seeds"]) == (1, 96, 384, k, "0,1")
        assert 0.0 < r["retention"] <= 1.0 and 0.0 < r["hopkins"] < 1.0
        assert r["median_ms"] > 0 and r["command"].startswith("mmrprune-bench quality")
    by = {(r["method"], r["lam"]): r for r in records}
    # top-k of the raw importance maximises retention; mmr lam=1 and hybrid lam=1 (pool = k) are top-k
    top = by[("topk", 1.0)]["retention"]
    assert all(r["retention"] <= top + 1e-12 for r in records)
    assert by[("mmr", 1.0)]["retention"] == pytest.approx(top)
    assert by[("hybrid", 1.0)]["retention"] == pytest.approx(top) and by[("hybrid", 1.0)]["pool"] == k
    assert by[("hybrid", 0.5)]["pool"] == 48
    # mmr lam=0 is fps
    assert by[("mmr", 0.0)]["hopkins"] == pytest.approx(by[("fps", 0.0)]["hopkins"])
    # uniform importance: top-k keeps about 1 - 0.75^2 of the mass; a diverse pick keeps far less
    assert by[("fps", 0.0)]["retention"] < top
    dom = json.loads((tmp_path / "quality_dominance.json").read_text())
    assert dom["hybrid_points"] == 2 and 0.0 <= dom["fraction_dominated"] <= 1.0
    assert "MMR vs hybrid" in out
    assert (tmp_path / "quality_pareto.csv").exists()


def test_token_masks_keep_the_budget():
    res = quality.token_masks(lam=0.5, keep_ratio=0.25, backend="auto", device="cpu",
                              images=("astronaut", "coffee"), methods=("topk", "divprune"))
    masks = res["masks"]
    assert masks.shape == (2, 2, 32, 32)
    assert (masks.reshape(2, 2, -1).sum(-1) == 256).all()
    assert res["thumbnails"].shape == (2, 224, 224, 3)
    from mmrprune.data import load_dinov2
    w = load_dinov2()["cls_attention"][0]
    top = np.sort(np.argsort(-w, kind="stable")[:256])
    assert np.array_equal(np.flatnonzero(masks[0, 0].reshape(-1)), top)
    assert res["stats"][("astronaut", "topk")]["retention"] >= res["stats"][("astronaut", "divprune")]["retention"]


QUICK = ["quality", "--images", "1", "--tokens", "32", "--seeds", "0", "--mmr-lams", "0,1", "--hybrid-lams", "1",
         "--methods", "topk", "--no-figure", "--quiet", "--device", "cpu"]


def test_default_output_is_a_fresh_folder_never_the_committed_results(tmp_path, monkeypatch, capsys):
    committed = tmp_path / "bench" / "results"
    committed.mkdir(parents=True)
    (tmp_path / "bench" / "figures").mkdir()
    (committed / "quality_pareto.json").write_text("committed\n")
    monkeypatch.chdir(tmp_path)
    assert cli.main(QUICK) in (0, 1) and cli.main(QUICK) in (0, 1)
    runs = sorted((tmp_path / cli.FRESH_OUT).iterdir())
    assert len(runs) == 2 and all((r / "quality_pareto.json").is_file() for r in runs)
    assert (committed / "quality_pareto.json").read_text() == "committed\n"
    # regenerating the committed results takes the explicit flag
    assert cli.main(QUICK + ["--update-committed"]) in (0, 1)
    assert json.loads((committed / "quality_pareto.json").read_text())[0]["method"] == "mmr"
    capsys.readouterr()


def test_update_committed_needs_the_repository_root(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        cli.main(QUICK + ["--update-committed"])
    assert exc.value.code == 2 and "repository root" in capsys.readouterr().err


@pytest.mark.parametrize("images,photos", [(1, ["astronaut"]), (2, ["astronaut", "chelsea"]),
                                           (8, ["astronaut", "chelsea", "coffee"])])
def test_token_mask_figure_shows_only_the_runs_photos(tmp_path, monkeypatch, capsys, images, photos):
    pytest.importorskip("matplotlib")   # the mask figure is drawn after the Pareto plot
    from mmrprune.bench import plotting
    drawn = []
    monkeypatch.setattr(plotting, "plot_token_masks", lambda masks, path: drawn.append(masks))
    argv = ["quality", "--images", str(images), "--tokens", "1024", "--seeds", "0", "--mmr-lams", "0.5",
            "--hybrid-lams", "1", "--methods", "topk", "--out-dir", str(tmp_path), "--quiet", "--device", "cpu"]
    assert cli.main(argv) in (0, 1)
    capsys.readouterr()
    (masks,) = drawn
    assert masks["images"] == photos and masks["masks"].shape[0] == len(photos)
