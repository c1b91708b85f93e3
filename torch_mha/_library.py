"""Loads the compiled operator library (torch_mha/_C*.so) into PyTorch's dispatcher."""

import importlib.machinery
import json
import os

import torch

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_REBUILD = "rebuild it with: pip install --no-build-isolation -e ."


def _base_version(version: str) -> str:
    return version.split("+")[0]


def _build_info() -> dict:
    path = os.path.join(_PACKAGE_DIR, "_build_info.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def load_library() -> str:
    """Loads _C and checks that it was built for the running torch; returns its path."""
    finder = importlib.machinery.FileFinder(
        _PACKAGE_DIR,
        (importlib.machinery.ExtensionFileLoader, importlib.machinery.EXTENSION_SUFFIXES),
    )
    spec = finder.find_spec("_C")
    if spec is None or spec.origin is None:
        raise ImportError(
            f"torch_mha: the compiled library (torch_mha/_C*.so) was not found in {_PACKAGE_DIR}; "
            f"install torch first, then build torch_mha: {_REBUILD}"
        )
    built_for = _build_info().get("torch_version", "unknown")
    try:
        torch.ops.load_library(spec.origin)
    except OSError as error:
        raise ImportError(
            f"torch_mha: failed to load {spec.origin}. It was built for torch {built_for}, and "
            f"torch {torch.__version__} is installed; {_REBUILD}\n({error})"
        ) from error
    compiled = dict(item.split("=", 1) for item in torch.ops.torch_mha._build_info().split(";"))
    if _base_version(compiled["torch"]) != _base_version(torch.__version__):
        raise ImportError(
            f"torch_mha was built for torch {compiled['torch']}, but torch {torch.__version__} "
            f"is installed; {_REBUILD}"
        )
    return spec.origin
