"""Triton kernels of mmrprune (``mmrprune.triton_kernels.greedy``).

They live inside the package, not in a top-level ``triton_kernels/`` folder: vLLM (and Triton's
own MoE kernels) use a top-level package of that name, and vLLM treats any folder so named on
``sys.path`` as that package, so a top-level folder in a checkout made vLLM log a traceback
whenever it ran from the repository root.
"""
