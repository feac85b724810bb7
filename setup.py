#!/usr/bin/env python
"""eqlosses_d2: long-tailed detection (LVIS) on Detectron2.

Detectron2 and PyTorch are not listed as requirements: install them first, the way
that fits your machine (README: Installation), or let `bash tools/setup_env.sh` do it.
"""
import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def package_configs():
    """Ship configs/ inside the package (as eqlosses_d2/configs), as Detectron2 does for its
    model zoo, so config names resolve from an installed package too."""
    source = os.path.join(HERE, "configs")
    target = os.path.join(HERE, "eqlosses_d2", "configs")
    if os.path.isdir(source) and not os.path.exists(target):
        os.symlink(os.path.join("..", "configs"), target)
    return [
        os.path.relpath(os.path.join(root, name), os.path.join(HERE, "eqlosses_d2"))
        for root, _, files in os.walk(target)  # via the link: eqlosses_d2/configs/..., not ../configs/...
        for name in files
        if name.endswith(".yaml")
    ]


def package_model_zoo_manifest():
    """Ship model_zoo/manifest.yaml inside the package too (as eqlosses_d2/model_zoo/manifest.yaml)."""
    target = os.path.join(HERE, "eqlosses_d2", "model_zoo", "manifest.yaml")
    if os.path.isfile(os.path.join(HERE, "model_zoo", "manifest.yaml")) and not os.path.lexists(target):
        os.symlink(os.path.join("..", "..", "model_zoo", "manifest.yaml"), target)
    return ["manifest.yaml"]


setup(
    name="eqlosses_d2",
    version="0.1.0",
    description="Equalization losses and other long-tail methods for Detectron2, on LVIS",
    long_description=open(os.path.join(HERE, "README.md")).read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.8",
    packages=find_packages(exclude=("tests", "tests.*", "benchmarks", "tools")),
    package_data={"eqlosses_d2": package_configs(), "eqlosses_d2.model_zoo": package_model_zoo_manifest()},
    install_requires=[
        "numpy",
        "Pillow",
        "tqdm",
        "pycocotools>=2.0.2",
        # lvis-api: Detectron2's LVIS loader imports it. Its own requirement on
        # opencv-python (a GUI build) is replaced by the headless build; setup_env.sh
        # installs lvis itself with --no-deps.
        "opencv-python-headless",
        "hotcoco>=1.3.0",
        # the LVIS json files of `python -m eqlosses_d2.evaluation` (the stdlib json without it)
        "msgspec>=0.18",
    ],
    extras_require={
        "test": ["pytest>=7"],
    },
    entry_points={
        "console_scripts": [
            "eqlosses-synthetic-lvis=eqlosses_d2.data.synthetic:main",
        ],
    },
)
