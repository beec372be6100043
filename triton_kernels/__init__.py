"""Triton kernels of mmrprune, installed as ``mmrprune.triton_kernels``.

The folder is named ``triton_kernels`` in the source tree, but ``setup.py``
maps it under the ``mmrprune`` namespace: Triton ships its own top-level
``triton_kernels`` package (used by vLLM) and we must not shadow it.
"""
