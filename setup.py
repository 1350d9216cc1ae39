"""Build modelopt_c: one extension, ``modelopt_c._conversion``.

The C files are plain C11 built with warnings as errors; ``csrc/aten_bridge.cpp`` is
the only C++ and the only file that sees ATen.  torch is *not* a build requirement:
build with ``pip install --no-build-isolation -e .`` against the installed torch.

Switches (environment variables):
  MODELOPT_C_DEBUG=1     -O0 -g, asserts on
  MODELOPT_C_SANITIZE=1  ASan + UBSan (run python with LD_PRELOAD=$(gcc -print-file-name=libasan.so))
"""

import os
import shlex
import subprocess
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


def _flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


def _pkgconfig(*args: str) -> list[str]:
    try:
        out = subprocess.run(["pkg-config", *args, "msgpack"], check=True, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        sys.exit(
            "modelopt_c needs msgpack-c and pkg-config to build: "
            "apt-get install -y libmsgpack-dev pkg-config  (" + str(exc) + ")"
        )
    return shlex.split(out.stdout)


def _torch_paths() -> tuple[list[str], list[str], bool]:
    try:
        import torch
        from torch.utils.cpp_extension import include_paths, library_paths
    except ImportError:
        sys.exit(
            "modelopt_c builds against the installed torch: pip install torch, then "
            "pip install --no-build-isolation -e ."
        )
    return include_paths(), library_paths(), bool(torch._C._GLIBCXX_USE_CXX11_ABI)


DEBUG = _flag("MODELOPT_C_DEBUG")
SANITIZE = _flag("MODELOPT_C_SANITIZE")
OPT = ["-O0", "-g3", "-UNDEBUG"] if DEBUG or SANITIZE else ["-O2", "-g", "-DNDEBUG"]
SAN = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=undefined"] if SANITIZE else []
C_FLAGS = ["-std=c11", "-Wall", "-Wextra", "-Werror", "-Wno-missing-field-initializers", "-fvisibility=hidden"]

torch_inc, torch_lib, cxx11_abi = _torch_paths()
CXX_FLAGS = ["-std=c++17", "-Wall", "-Wextra", "-fvisibility=hidden", f"-D_GLIBCXX_USE_CXX11_ABI={int(cxx11_abi)}"]
CXX_FLAGS += [f"-isystem{p}" for p in torch_inc]

msgpack_cflags = _pkgconfig("--cflags")
msgpack_ldirs = [f for f in _pkgconfig("--libs-only-L")]


class BuildExt(build_ext):
    """Compile .c as C11 and .cpp as C++17 over ATen, each with its own flags."""

    def build_extensions(self):
        original = self.compiler._compile

        def compile_one(obj, src, ext, cc_args, extra_postargs, pp_opts):
            flags = (CXX_FLAGS if src.endswith(".cpp") else C_FLAGS + msgpack_cflags) + OPT + SAN
            original(obj, src, ext, cc_args, list(extra_postargs) + flags, pp_opts)

        self.compiler._compile = compile_one
        super().build_extensions()


SOURCES = sorted(os.path.join("csrc", f) for f in os.listdir("csrc") if f.endswith((".c", ".cpp")))

ext = Extension(
    "modelopt_c._conversion",
    sources=SOURCES,
    depends=sorted(os.path.join("csrc", f) for f in os.listdir("csrc") if f.endswith(".h")),
    include_dirs=["csrc"],
    library_dirs=torch_lib,
    runtime_library_dirs=torch_lib,
    libraries=["c10", "torch_cpu", "stdc++"],
    extra_link_args=msgpack_ldirs
    + ["-Wl,-Bstatic", "-lmsgpackc", "-Wl,-Bdynamic", "-Wl,--exclude-libs,ALL"]
    + SAN,
)

setup(ext_modules=[ext], cmdclass={"build_ext": BuildExt})
