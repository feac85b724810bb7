#!/usr/bin/env python
"""
Install Detectron2 v0.6 from PyPI's ``pb1-detectron2==0.6`` source distribution,
as a pure-Python wheel named ``detectron2`` (no C++/CUDA extension).

That sdist carries the official v0.6 Python files but not the C++ sources, so a
plain ``pip install pb1-detectron2`` fails while building the extension, and
``pip download`` refuses it because of a direct-URL extra. This script lets pip
fetch and unpack it (``--no-clean`` keeps the unpacked tree), runs its own
``setup.py`` with the extension list emptied and the package renamed to
``detectron2``, caches the wheel, and installs it. Features that need the
extension (rotated boxes, deformable conv) report a clear error at use through
``eqlosses_d2.compat``.

Idempotent: a cached wheel is reused, and nothing is done when ``detectron2``
already imports. No Detectron2 source is stored in this repository.
"""
import argparse
import glob
import os
import shutil
import subprocess
import sys
import tempfile

BUILD_REVISION = 2  # bump when _BUILD_SHIM changes

_BUILD_SHIM = r"""
import glob, os, sys, runpy, setuptools
_setup = setuptools.setup
def _pure_python_setup(**kw):
    kw["name"] = "detectron2"
    kw["ext_modules"] = []
    kw.pop("cmdclass", None)
    # setup.py globs the model-zoo configs from a top-level configs/ that the sdist lacks;
    # they are already under detectron2/model_zoo/configs there
    zoo = os.path.join("detectron2", "model_zoo")
    kw.setdefault("package_data", {})["detectron2.model_zoo"] = [
        os.path.relpath(p, zoo)
        for p in glob.glob(os.path.join(zoo, "configs", "**", "*"), recursive=True)
        if p.endswith((".yaml", ".py"))
    ]
    extras = kw.get("extras_require", {})
    # the 'all' extra names a direct URL, which pip refuses on install
    extras.pop("all", None)
    return _setup(**kw)
setuptools.setup = _pure_python_setup
sys.argv = ["setup.py", "bdist_wheel", "--dist-dir", sys.argv[1]]
runpy.run_path("setup.py", run_name="__main__")
"""


def _pip(*args, **kw):
    return subprocess.run([sys.executable, "-m", "pip", *args], check=True, **kw)


def _download_source(workdir):
    env = dict(os.environ, TMPDIR=workdir)
    # pip unpacks the sdist, prepares metadata, then rejects the direct-URL extra;
    # with --no-clean the unpacked tree stays in TMPDIR.
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-clean", "--no-deps",
         "--no-build-isolation", "--no-binary", ":all:", "pb1-detectron2==0.6",
         "-d", os.path.join(workdir, "dl")],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    trees = glob.glob(os.path.join(workdir, "pip-*", "*", "setup.py"))
    if not trees:
        raise SystemExit("install_detectron2_v06: pip could not fetch pb1-detectron2==0.6")
    return os.path.dirname(trees[0])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--cache", required=True, help="directory that keeps the built wheel")
    parser.add_argument("--wheel-to", help="copy the wheel into this directory instead of installing it")
    args = parser.parse_args()
    # a new build recipe gets a new cache directory
    cache = os.path.join(args.cache, f"detectron2-0.6-pure-python-r{BUILD_REVISION}")
    os.makedirs(cache, exist_ok=True)
    wheels = glob.glob(os.path.join(cache, "detectron2-0.6-*.whl"))
    if not wheels:
        with tempfile.TemporaryDirectory(prefix="d2v06-") as workdir:
            src = _download_source(workdir)
            out = os.path.join(workdir, "wheel")
            subprocess.run([sys.executable, "-c", _BUILD_SHIM, out], cwd=src, check=True,
                           stdout=subprocess.DEVNULL)
            built = glob.glob(os.path.join(out, "detectron2-0.6-*.whl"))
            if len(built) != 1:
                raise SystemExit(f"install_detectron2_v06: expected one wheel in {out}, got {built}")
            # move into the cache only once complete
            tmp_target = os.path.join(cache, os.path.basename(built[0]) + ".part")
            shutil.copy(built[0], tmp_target)
            os.replace(tmp_target, tmp_target[: -len(".part")])
            wheels = [tmp_target[: -len(".part")]]
    if args.wheel_to:  # tools/gpu_wheels.sh: the wheel travels to a machine without network
        os.makedirs(args.wheel_to, exist_ok=True)
        shutil.copy(wheels[0], args.wheel_to)
        return
    _pip("install", wheels[0])


if __name__ == "__main__":
    main()
