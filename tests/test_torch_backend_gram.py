"""The ``torch`` backend reads each step's similarity row from the batch's Gram when it fits
(``GRAM_MAX_BYTES``) and computes it per step otherwise; both paths pick the same tokens."""
import pytest
import torch

import mmrprune
from certify import check_certificate
from mmrprune.backends import torch_backend

METHODS = ("mmr", "fps", "hybrid", "divprune")


def _problems():
    g = torch.Generator().manual_seed(3)
    yield torch.randn(3, 70, 24, generator=g), torch.rand(3, 70, generator=g), None
    # integer palette: duplicate tokens, zero vectors, tied importance, padding
    palette = torch.randint(-2, 3, (6, 8), generator=g).float()
    x = palette[torch.randint(0, 6, (4, 50), generator=g)]
    w = torch.randint(0, 3, (4, 50), generator=g).float()
    yield x, w, torch.tensor([50, 31, 7, 1])
    d = mmrprune.data.load_dinov2()
    yield torch.from_numpy(d["tokens"][:2, :256]), torch.from_numpy(d["cls_attention"][:2, :256]), None


@pytest.mark.parametrize("method", METHODS)
def test_both_paths_pass_the_step_certificate_and_agree_on_separated_tokens(method, monkeypatch):
    for i, (x, w, lengths) in enumerate(_problems()):
        k = min(20, x.shape[1])
        kw = dict(k=k, method=method, backend="torch", order="selection", lengths=lengths)
        picks = {}
        for path, limit in (("gram", torch_backend.GRAM_MAX_BYTES), ("per-step", 0)):
            monkeypatch.setattr(torch_backend, "GRAM_MAX_BYTES", limit)
            picks[path] = mmrprune.select(x, w, **kw)
            for b in range(x.shape[0]):
                n = x.shape[1] if lengths is None else int(lengths[b])
                row = picks[path][b]
                check_certificate(x[b, :n], w[b, :n], row[row >= 0].numpy(), method=method, k=min(k, n))
        if i == 0:  # gaussian tokens: no near-ties, so the two paths' roundings cannot matter
            assert torch.equal(picks["gram"], picks["per-step"])


def test_gram_is_used_only_when_it_fits(monkeypatch):
    x = torch.randn(2, 16, 4)
    gram = torch_backend._gram_if_fits(x, torch.float32)
    xn = x / x.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(gram, xn @ xn.transpose(1, 2))
    assert torch_backend._gram_if_fits(x.double(), torch.float64) is None     # float64: per-step path
    monkeypatch.setattr(torch_backend, "GRAM_MAX_BYTES", 2 * 16 * 16 * 4 - 1)
    assert torch_backend._gram_if_fits(x, torch.float32) is None


@pytest.mark.parametrize("n", [1, 5, 16, 17, 64, 100])
def test_blocked_gram_is_the_product_and_exactly_symmetric(n, monkeypatch):
    """Tiles above the diagonal, mirrored: every entry is x̂_i · x̂_j (to rounding) and
    sim(i, j) == sim(j, i) bit for bit, across tile edges (a 16-row tile here) and at a
    zero-padded last tile."""
    monkeypatch.setattr(torch_backend, "GRAM_TILE", 16)
    x = torch.randn(n, 40, generator=torch.Generator().manual_seed(n))
    xn = x / x.norm(dim=-1, keepdim=True)
    out = torch.full((n, n), float("nan"))
    torch_backend._symmetric_gram(xn, out)
    torch.testing.assert_close(out, xn @ xn.T, rtol=0, atol=1e-6)
    assert torch.equal(out, out.T)


@pytest.mark.parametrize("method", METHODS)
def test_small_tiles_keep_duplicates_tied_and_pass_the_certificate(method, monkeypatch):
    """With 16-row tiles the palette problem's duplicate tokens land in different tiles; their
    similarity rows must still be equal, so the certificate's tie rule (lowest twin first)
    holds, and the picks equal the per-step path's on the separated problem."""
    monkeypatch.setattr(torch_backend, "GRAM_TILE", 16)
    for i, (x, w, lengths) in enumerate(_problems()):
        k = min(20, x.shape[1])
        kw = dict(k=k, method=method, backend="torch", order="selection", lengths=lengths)
        picks = mmrprune.select(x, w, **kw)
        for b in range(x.shape[0]):
            n = x.shape[1] if lengths is None else int(lengths[b])
            row = picks[b]
            check_certificate(x[b, :n], w[b, :n], row[row >= 0].numpy(), method=method, k=min(k, n))
        if i == 0:
            monkeypatch.setattr(torch_backend, "GRAM_MAX_BYTES", 0)
            assert torch.equal(picks, mmrprune.select(x, w, **kw))
            monkeypatch.undo()
            monkeypatch.setattr(torch_backend, "GRAM_TILE", 16)


def test_divprune_leaves_no_trace_between_calls():
    """DivPrune marks the backend's own Gram in place (diagonal and padding to -inf): the
    Gram is per call, so a second identical call gives the same picks."""
    x = torch.randn(2, 90, 12, generator=torch.Generator().manual_seed(4))
    lengths = torch.tensor([90, 41])
    a = mmrprune.select(x, k=30, method="divprune", backend="torch", lengths=lengths)
    b = mmrprune.select(x, k=30, method="divprune", backend="torch", lengths=lengths)
    assert torch.equal(a, b)
