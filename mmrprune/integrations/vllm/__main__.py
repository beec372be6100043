"""``python -m mmrprune.integrations.vllm check``: can the plugin run on the installed vLLM?

Prints the vLLM version, the model runner the plugin would use (and why), the models it would
prune and whether every vLLM interface it relies on is present; exits 1 if one is missing or
changed, 2 on a usage error.  It starts no engine; ``--device cpu|gpu`` checks the runner of
that device instead of the detected platform's (a CPU machine can check the GPU lists).
"""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmrprune.integrations.vllm",
                                     description="mmrprune's vLLM plugin: check the installed vLLM")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="check the installed vLLM's interfaces, runner and models")
    check.add_argument("--device", choices=("cpu", "gpu"), help="the engine's device (default: vLLM's platform)")
    args = parser.parse_args(argv)

    try:
        import vllm
    except ImportError as exc:
        print(f"FAIL: vllm cannot be imported ({type(exc).__name__}: {exc})")
        return 1
    from . import MODELS, interfaces, runner
    on_cpu = None if args.device is None else args.device == "cpu"
    try:
        choice = runner.choose(pin=False, on_cpu=on_cpu)
    except ValueError as exc:
        print(f"FAIL: {exc}")
        return 1
    found = interfaces.available_models()
    print(f"vllm {vllm.__version__} ({'tested' if vllm.__version__ in interfaces.TESTED else 'not tested'} "
          f"end to end; tested: {', '.join(interfaces.TESTED)}; interfaces checked in CI: "
          f"{', '.join(interfaces.CHECKED)})")
    print(f"runner: {choice.name} on {choice.device} ({choice.why})")
    print("models: " + ", ".join(arch for arch, module in MODELS.items() if module in found))
    missing = [arch for arch, module in MODELS.items() if module not in found]
    if missing:
        print("not in this vLLM: " + ", ".join(missing))
    checked = interfaces.interfaces_for(choice)
    problems = interfaces.problems(checked)
    if problems:
        print(f"FAIL: {len(problems)} of {len(checked)} vLLM interfaces are missing or changed:")
        for line in problems:
            print(f"  - {line}")
        return 1
    print(f"OK: all {len(checked)} vLLM interfaces the plugin relies on are present")
    return 0


if __name__ == "__main__":
    sys.exit(main())
