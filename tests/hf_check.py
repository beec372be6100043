"""The strong check of a pruned prefill, independent of the integration's own code.

Removing a token from a causal decoder is the same as hiding it as a key: a kept token sees
exactly the kept tokens before it either way.  So the hidden states (and logits) of a
pruned prefill at its kept columns must equal those of an *unpruned* forward of the same
language model, with the unpruned embeddings and position ids the model itself computed,
whose 4-D attention mask hides every dropped column (and the padding) as a key.

Everything on the reference side comes from the model: its own language-model call on the
unpruned batch (captured by a hook, so DeepStack features and the like come along) and a
4-D additive mask built here.  From the integration only the decision is taken -- which
visual tokens it kept (``p.last["kept_indices"]``) -- and the check then asserts that the
pruned call is exactly "the same prompt without the others": embeddings, position ids,
attention mask layout (re-padded on the left unless the batch was right-padded), hidden
states and logits.  Wrong positions, a wrong or shifted column, a mask that hides a kept
token, wrong padding or a wrong DeepStack row all make it fail (see
tests/test_integrations_hf_families.py, ``test_strong_check_fails_on``).
"""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from mmrprune.integrations import prune_visual_tokens

CACHE_KEYS = ("cache", "past_key_values")    # transformers 5.25 / 5.0-5.24


def language_model(model):
    return model.model.language_model


def cache_key(model) -> str:
    """The forward argument (and output field) of the KV cache in this transformers release."""
    return next(k for k in CACHE_KEYS if k in inspect.signature(model.forward).parameters)


@contextlib.contextmanager
def recording(module, pre=True, post=False, tamper: Optional[Callable] = None):
    """Record each forward call of ``module``: ``(args, kwargs)`` before it (``tamper`` may
    return changed kwargs) and its first output after it."""
    calls, outputs = [], []

    def before(mod, args, kwargs):
        if tamper is not None:
            kwargs = tamper(dict(kwargs))
        calls.append((args, dict(kwargs)))
        return args, kwargs

    def after(mod, args, kwargs, output):
        outputs.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

    handles = [module.register_forward_pre_hook(before, with_kwargs=True)] if pre else []
    if post:
        handles.append(module.register_forward_hook(after, with_kwargs=True))
    try:
        yield calls, outputs
    finally:
        for h in handles:
            h.remove()


def masked_forward(model, lm_call, keep: torch.Tensor, extra_allowed: Optional[torch.Tensor] = None):
    """Last hidden states of the language model's unpruned call ``lm_call`` with every column
    outside ``keep`` [B, L] hidden as a key (each query still sees itself, so the rows of
    hidden tokens stay finite; they are never compared)."""
    args, kw = lm_call
    kw = dict(kw)
    embeds = kw["inputs_embeds"]
    bsz, seqlen = keep.shape
    q = torch.arange(seqlen)
    allowed = (q[None, :] <= q[:, None])[None] & keep[:, None, :]
    if extra_allowed is not None:
        allowed |= extra_allowed & keep[:, None, :]
    allowed |= torch.eye(seqlen, dtype=torch.bool)[None]
    mask = torch.zeros(bsz, 1, seqlen, seqlen, dtype=embeds.dtype)
    kw["attention_mask"] = mask.masked_fill(~allowed[:, None], torch.finfo(embeds.dtype).min)
    for key in CACHE_KEYS:
        if key in kw:
            kw[key] = None
    kw["use_cache"] = False
    with torch.no_grad():
        out = language_model(model)(*args, **kw)
    return out[0] if isinstance(out, tuple) else out.last_hidden_state


def expected_keep(batch: dict, prunable: torch.Tensor, kept_indices: torch.Tensor) -> torch.Tensor:
    """[B, L]: the columns a pruning that keeps ``kept_indices`` (rows of the packed prunable
    slots, row-major) must keep: every non-padding column that is not prunable, plus those."""
    slots = prunable.nonzero()
    keep = ~prunable
    keep[slots[kept_indices, 0], slots[kept_indices, 1]] = True
    return keep & (batch["attention_mask"] != 0)


@dataclass
class PrunedPrefill:
    """What :func:`check_pruned_prefill` verified, for further checks."""
    pruner: object
    keep: torch.Tensor            # [B, L] kept columns of the original layout
    slots: list                   # per row, the pruned columns holding its kept columns, in order
    unpruned_call: tuple          # the language model's (args, kwargs) on the unpruned batch
    pruned_call: dict             # the model's forward kwargs after the pruning hook


def check_pruned_prefill(model, batch: dict, spec, atol: float = 1e-5, tamper: Optional[Callable] = None,
                         **prune) -> PrunedPrefill:
    """Assert that the pruned prefill of ``batch`` equals the masked unpruned forward at every
    kept column (module docstring).  ``tamper`` edits the pruned call before the model runs
    it, to show the check fails on a broken integration."""
    lm = language_model(model)
    with torch.no_grad(), recording(lm) as (unpruned, _):
        model(**batch)
    with torch.no_grad(), prune_visual_tokens(model, **spec.enable(prune)) as p, \
            recording(model, tamper=tamper) as (calls, _), recording(lm, pre=False, post=True) as (_, hidden):
        out = model(**batch)
    call, pruned_hidden = calls[0][1], hidden[0]
    am = batch["attention_mask"]
    keep = expected_keep(batch, spec.prunable(batch), p.last["kept_indices"])
    n_keep = keep.sum(1)
    new_len = int(n_keep.max())
    right = bool((am[:, -1] == 0).any()) and not bool((am[:, 0] == 0).any())
    slots = [torch.arange(n) + (0 if right else new_len - n) for n in n_keep.tolist()]
    want_mask = torch.zeros(am.shape[0], new_len, dtype=torch.long)
    for b, s in enumerate(slots):
        want_mask[b, s] = 1
    assert torch.equal(call["attention_mask"].long(), want_mask), "pruned attention mask / padding layout"

    ref = masked_forward(model, unpruned[0], keep,
                         None if spec.extra_allowed is None else spec.extra_allowed(batch))
    ref_logits = model.get_output_embeddings()(ref)
    embeds, pos = unpruned[0][1]["inputs_embeds"], unpruned[0][1].get("position_ids")
    if pos is None:      # the language model numbers the columns itself
        pos = torch.arange(am.shape[1]).expand(am.shape[0], -1)
    pruned_pos = call["position_ids"]
    for b, s in enumerate(slots):
        cols = keep[b].nonzero()[:, 0]
        torch.testing.assert_close(call["inputs_embeds"][b, s], embeds[b, cols], rtol=0, atol=0)
        # M-RoPE: the (t, h, w) rows both calls have (generate adds a text row in front)
        r = min(pos.shape[0], pruned_pos.shape[0], 3) if pos.ndim == 3 else 0
        assert torch.equal(_row(pruned_pos, b, r)[..., s], _row(pos, b, r)[..., cols]), f"row {b}: position ids"
        for key, value in batch.items():     # per-token inputs the pruned call keeps move with the sequence
            if key != "attention_mask" and call.get(key) is not None and value.shape == am.shape:
                assert torch.equal(call[key][b, s], value[b, cols]), f"row {b}: {key}"
        torch.testing.assert_close(pruned_hidden[b, s], ref[b, cols], rtol=0, atol=atol)
        torch.testing.assert_close(out.logits[b, s], ref_logits[b, cols], rtol=0, atol=atol)
    return PrunedPrefill(pruner=p, keep=keep, slots=slots, unpruned_call=unpruned[0], pruned_call=call)


def _row(pos: torch.Tensor, b: int, rope_rows: int) -> torch.Tensor:
    """Row ``b`` of [B, L] (or [1, L]) position ids, or its last ``rope_rows`` of [R, B, L]."""
    return pos[-rope_rows:, b] if rope_rows else pos[min(b, pos.shape[0] - 1)]


def check_cached_generate(model, batch: dict, spec, steps: int = 4, **prune):
    """Pruned cached ``generate`` == an uncached greedy recompute of the whole pruned prompt at
    every step (tokens exactly, logits within float32 noise); returns the generated tokens.
    Neither emits the family's placeholder tokens (a random model may pick them, and an extra
    placeholder without features is an invalid prompt), nor the end-of-sequence token, which
    ``min_new_tokens`` keeps ``generate`` from emitting."""
    eos = model.generation_config.eos_token_id
    banned = list(spec.placeholders) + ([] if eos is None else [eos] if isinstance(eos, int) else list(eos))
    with torch.no_grad(), prune_visual_tokens(model, **spec.enable(prune)):
        g = model.generate(**batch, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                           suppress_tokens=banned, return_dict_in_generate=True, output_logits=True)
        b, ref, ref_logits = dict(batch), [], []
        for _ in range(steps):
            last = model(**b, use_cache=False).logits[:, -1]
            ref.append(last.index_fill(-1, torch.tensor(banned, dtype=torch.long), -float("inf"))
                       .argmax(-1, keepdim=True))
            ref_logits.append(last)
            b = spec.extend(b, ref[-1])
    seqlen = batch["input_ids"].shape[1]
    assert torch.equal(g.sequences[:, seqlen:], torch.cat(ref, 1))
    for a, r in zip(g.logits, ref_logits):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5)
    return g.sequences[:, seqlen:]
