"""Build and install mmrprune.

The Python package is ``mmrprune``; the Triton kernels live in the top-level
``triton_kernels/`` folder but install as ``mmrprune.triton_kernels`` so they
never shadow Triton's own ``triton_kernels`` package.
"""
from setuptools import find_packages, setup

setup(
    name="mmrprune",
    version="0.1.0",
    description="Exact, batched greedy visual-token selection (MMR, DivPrune, DPP, D2Pruner) for multimodal LLMs",
    python_requires=">=3.9",
    packages=find_packages(include=["mmrprune", "mmrprune.*"]) + ["mmrprune.triton_kernels"],
    package_dir={"mmrprune.triton_kernels": "triton_kernels"},
    package_data={"mmrprune.data": ["*.npz"]},
    install_requires=["numpy", "torch>=2.3"],
    extras_require={
        "triton": ["triton>=3.2"],
        "test": ["pytest", "pytest-benchmark"],
        "realdata": ["onnx", "onnxruntime", "pillow", "scikit-image"],
        "bench": ["matplotlib"],
        "hf": ["transformers>=5.0,<6"],
    },
    entry_points={"console_scripts": ["mmrprune-bench = mmrprune.bench.cli:main"]},
)
