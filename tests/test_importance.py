"""mmrprune.importance: each source against a direct NumPy computation."""
import numpy as np
import pytest
import torch

import mmrprune
from mmrprune import importance as imp


def test_token_norm_numpy_and_torch():
    x = np.random.default_rng(0).standard_normal((2, 5, 7))
    got = imp.token_norm(x)
    assert isinstance(got, np.ndarray) and got.shape == (2, 5)
    np.testing.assert_allclose(got, np.linalg.norm(x, axis=-1), rtol=1e-6)
    t = imp.token_norm(torch.from_numpy(x).half())
    assert t.dtype == torch.float32
    np.testing.assert_allclose(t.numpy(), np.linalg.norm(x, axis=-1), rtol=2e-3)
    with pytest.raises(ValueError):
        imp.token_norm(np.ones(3))
    with pytest.raises(TypeError):
        imp.token_norm(torch.ones(3, 2, dtype=torch.int64))


def _softmax(a, axis=-1):
    e = np.exp(a - a.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def test_cls_attention():
    rng = np.random.default_rng(1)
    a = _softmax(rng.standard_normal((2, 3, 6, 6)))
    got = imp.cls_attention(a)
    np.testing.assert_allclose(got, a[:, :, 0, 1:].mean(axis=1), rtol=1e-6)
    np.testing.assert_allclose(imp.cls_attention(a, head_reduce="max"), a[:, :, 0, 1:].max(axis=1), rtol=1e-6)
    # CLS at the end (some towers append it) and unbatched input
    last = imp.cls_attention(a[0], cls_index=-1)
    np.testing.assert_allclose(last, a[0, :, 5, :5].mean(axis=0), rtol=1e-6)
    with pytest.raises(ValueError):
        imp.cls_attention(a[:, :, :, :5])
    with pytest.raises(ValueError):
        imp.cls_attention(a, head_reduce="sum")


def test_text_relevance_max_mean_and_mask():
    rng = np.random.default_rng(2)
    v = rng.standard_normal((2, 4, 8))
    t = rng.standard_normal((2, 3, 8))
    vn = v / np.linalg.norm(v, axis=-1, keepdims=True)
    tn = t / np.linalg.norm(t, axis=-1, keepdims=True)
    cos = np.einsum("bnd,bmd->bnm", vn, tn)
    np.testing.assert_allclose(imp.text_relevance(v, t), cos.max(-1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(imp.text_relevance(v, t, reduce="mean"), cos.mean(-1), rtol=1e-5, atol=1e-6)
    mask = np.array([[True, False, True], [False, True, False]])
    want = np.stack([cos[0][:, [0, 2]].mean(-1), cos[1][:, [1]].mean(-1)])
    np.testing.assert_allclose(imp.text_relevance(v, t, reduce="mean", text_mask=mask), want, rtol=1e-5, atol=1e-6)
    want = np.stack([cos[0][:, [0, 2]].max(-1), cos[1][:, [1]].max(-1)])
    np.testing.assert_allclose(imp.text_relevance(v, t, text_mask=mask), want, rtol=1e-5, atol=1e-6)
    # unbatched, shared text
    np.testing.assert_allclose(imp.text_relevance(v[0], t[0]), cos[0].max(-1), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError):
        imp.text_relevance(v, t, text_mask=np.zeros((2, 3), bool))
    with pytest.raises(ValueError):
        imp.text_relevance(v, t[..., :4])


def test_position_bias_estimate_and_debias():
    rng = np.random.default_rng(3)
    n = 12
    bias = np.linspace(0.2, 3.0, n)                # attention grows towards late positions
    # calibration: content varies per image, bias is shared -> the average recovers bias up to scale
    content = rng.uniform(0.5, 1.5, size=(4000, n))
    calib = content * bias
    prof = imp.estimate_position_bias(calib)
    assert prof.shape == (n,)
    np.testing.assert_allclose(prof.mean(), 1.0, rtol=1e-6)
    np.testing.assert_allclose(prof, bias / bias.mean(), rtol=0.03)
    # exact case: every calibration sample is a multiple of the bias
    exact = imp.estimate_position_bias(np.outer(rng.uniform(1, 5, 7), bias))
    np.testing.assert_allclose(exact, bias / bias.mean(), rtol=1e-6)
    # debiasing a biased score recovers the content ranking, which the raw score does not
    truth = rng.permutation(n).astype(np.float64) + 1.0
    biased = truth * bias
    deb = imp.debiased_attention(biased, exact)
    np.testing.assert_allclose(deb / deb.max(), truth / truth.max(), rtol=1e-5)
    k = 4
    picked = mmrprune.select(torch.zeros(n, 3).normal_(), torch.from_numpy(deb), k=k, method="topk")
    assert sorted(picked.tolist()) == sorted(np.argsort(-truth)[:k].tolist())
    raw = mmrprune.select(torch.zeros(n, 3).normal_(), torch.from_numpy(biased), k=k, method="topk")
    assert sorted(raw.tolist()) != sorted(picked.tolist())
    # 4-D maps go through cls_attention
    a = _softmax(rng.standard_normal((5, 2, n + 1, n + 1)))
    np.testing.assert_allclose(imp.estimate_position_bias(a),
                               imp.estimate_position_bias(imp.cls_attention(a)), rtol=1e-6)
    with pytest.raises(ValueError):
        imp.debiased_attention(biased, exact[:5])
    with pytest.raises(ValueError):
        imp.estimate_position_bias(-calib)


def test_passthrough():
    t = imp.passthrough(torch.arange(4.0), 4)
    assert torch.equal(t, torch.arange(4.0))
    with pytest.raises(ValueError):
        imp.passthrough(torch.arange(4.0), 5)
    with pytest.raises(ValueError):
        imp.passthrough(torch.tensor([1.0, float("nan")]), 2)
    with pytest.raises(TypeError):
        imp.passthrough(torch.arange(4), 4)
