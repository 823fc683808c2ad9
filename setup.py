"""Build ssld_kernels._C with CMake + ninja.

Environment:
  SSLD_CUDA=0|1        force the CUDA kernels off / on (default: on when nvcc is found)
  SSLD_CUDA_ARCHS      CMAKE_CUDA_ARCHITECTURES value (default "80-real;90": sm_80, sm_90 + PTX)
  SSLD_BUILD_TYPE      CMake build type (default Release)
  SSLD_SKIP_EXT=1      skip the extension: pure-Python install (triton/torch backends only)
  CMAKE_ARGS           extra CMake arguments
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _find_nvcc():
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and (Path(cuda_home) / "bin" / "nvcc").exists():
        return str(Path(cuda_home) / "bin" / "nvcc")
    return shutil.which("nvcc") or (
        "/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").exists() else None
    )


def _want_cuda():
    flag = os.environ.get("SSLD_CUDA", "").strip().lower()
    nvcc = _find_nvcc()
    if flag in ("0", "off", "false", "no"):
        return False, None
    if flag in ("1", "on", "true", "yes"):
        if nvcc is None:
            raise RuntimeError(
                "SSLD_CUDA=1 but nvcc was not found: install the CUDA toolkit, put nvcc on PATH "
                "or set CUDA_HOME, or build without CUDA (SSLD_CUDA=0)."
            )
        return True, nvcc
    if flag not in ("", "auto"):
        raise RuntimeError(f"SSLD_CUDA must be 0, 1 or auto, got {flag!r}")
    return nvcc is not None, nvcc


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        import pybind11

        out = Path(self.get_ext_fullpath(ext.name)).resolve()
        out.parent.mkdir(parents=True, exist_ok=True)
        with_cuda, nvcc = _want_cuda()
        build_type = os.environ.get("SSLD_BUILD_TYPE", "Release")
        args = [
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_BUILD_TYPE={build_type}",
            f"-DSSLD_EXT_DIR={out.parent}",
            f"-DSSLD_WITH_CUDA={'ON' if with_cuda else 'OFF'}",
        ]
        if with_cuda:
            args.append(f"-DCMAKE_CUDA_COMPILER={nvcc}")
            archs = os.environ.get("SSLD_CUDA_ARCHS")
            if archs:
                args.append(f"-DSSLD_CUDA_ARCHS={archs}")
        if shutil.which("ninja") or _pip_ninja():
            args += ["-G", "Ninja"]
            if _pip_ninja():
                args.append(f"-DCMAKE_MAKE_PROGRAM={_pip_ninja()}")
        args += os.environ.get("CMAKE_ARGS", "").split()
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        cmake = _cmake()
        print(f"ssld: building _C (CUDA {'on' if with_cuda else 'off'}) in {build_dir}", flush=True)
        subprocess.run([cmake, str(ROOT), *args], cwd=build_dir, check=True)
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL") or str(os.cpu_count() or 2)
        subprocess.run([cmake, "--build", ".", "-j", jobs], cwd=build_dir, check=True)


def _pip_ninja():
    try:
        import ninja

        path = Path(ninja.BIN_DIR) / "ninja"
        return str(path) if path.exists() else None
    except ImportError:
        return None


def _cmake():
    try:
        import cmake

        path = Path(cmake.CMAKE_BIN_DIR) / "cmake"
        if path.exists():
            return str(path)
    except ImportError:
        pass
    found = shutil.which("cmake")
    if found is None:
        raise RuntimeError("cmake not found: pip install cmake")
    return found


ext_modules = [] if os.environ.get("SSLD_SKIP_EXT") == "1" else [CMakeExtension("ssld_kernels._C")]
setup(ext_modules=ext_modules, cmdclass={"build_ext": CMakeBuild})
