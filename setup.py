"""hpc_bkd: parallel blockwise knowledge distillation of CNNs over MPI."""
from setuptools import find_packages, setup

setup(
    name="hpc_bkd",
    version="0.1.0",
    description="MPI/HPC toolkit for parallel blockwise knowledge distillation (PBKD) of deep CNNs",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["hpc_bkd", "hpc_bkd.*"]),
    package_data={"hpc_bkd": ["configs/*.yaml"]},
    python_requires=">=3.10",
    install_requires=[
        "torch",
        "torchvision",
        "numpy",
        "mpi4py>=4.0",
        "submitit>=1.5",
        "nvidia-ml-py",  # provides the `pynvml` module (the old `pynvml` package is deprecated)
        "pyyaml",
        "scikit-learn",  # only for its bundled, offline digits dataset
        "scipy",  # HiGHS MILP (scipy.optimize.milp) for the exact per-block selection (hpc_bkd.selection.solver)
        "matplotlib",
        "tqdm",
    ],
    extras_require={
        # Self-contained MPICH from PyPI: no system MPI needed. Omit on clusters with a site MPI.
        "mpi": ["mpich"],
        # the suite, and the guardrails `make lint` runs before it (ruff: lint + import order; mypy)
        "test": ["pytest>=7", "pytest-timeout", "ruff", "mypy", "types-PyYAML"],
        # `hpc-bkd export`: ONNX files (onnxscript: torch.onnx's exporter), checked and timed with ONNX Runtime.
        "export": ["onnx", "onnxruntime", "onnxscript"],
        # blocks.candidates shrink-w<f>: a unit's internal widths cut through Torch-Pruning's
        # dependency graph (any architecture, no per-class code).
        "prune": ["torch-pruning"],
        # model.arch timm:<name> (constructors only: no weights are downloaded).
        "timm": ["timm"],
        # run.tracking: TensorBoard event files (torch.utils.tensorboard writes them) and MLflow runs.
        "tracking": ["tensorboard", "mlflow"],
    },
    entry_points={"console_scripts": ["hpc-bkd=hpc_bkd.cli.main:main"]},
)
