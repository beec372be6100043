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
