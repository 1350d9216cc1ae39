"""Build modelopt_c: one extension, ``modelopt_c._conversion``.

The C files are plain C11 and ``csrc/aten_bridge.cpp`` (the only C++, the only file that
sees ATen) is C++ in the standard and libstdc++ ABI of the installed torch; both are built
with warnings as errors, each with its own flags (BuildExt below, public distutils calls).  torch is *not* a build requirement:
build with ``pip install --no-build-isolation -e .`` against the installed torch.

Switches (environment variables):
  MODELOPT_C_DEBUG=1     -O0 -g, asserts on
  MODELOPT_C_SANITIZE=1  ASan + UBSan (run python with LD_PRELOAD=$(gcc -print-file-name=libasan.so))
"""

import os
import re
import shlex
import subprocess
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.modified import newer_group


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


def _torch_settings() -> tuple[list[str], list[str], list[str]]:
    """Include dirs, library dirs and the C++ flags torch's own extensions build with:
    the language standard torch publishes for its consumers (TorchConfig.cmake's
    CXX_STANDARD: C++17 up to torch 2.5, C++20 since; ATen's headers need it) and the
    libstdc++ ABI torch was compiled with."""
    try:
        import torch
        import torch.utils
        from torch.utils.cpp_extension import include_paths, library_paths
    except ImportError:
        sys.exit(
            "modelopt_c builds against the installed torch: pip install torch, then "
            "pip install --no-build-isolation -e ."
        )
    config = os.path.join(torch.utils.cmake_prefix_path, "Torch", "TorchConfig.cmake")
    try:
        with open(config, encoding="utf-8") as f:
            found = re.search(r"\bCXX_STANDARD\s+(\d+)", f.read())
    except OSError as exc:
        sys.exit(f"modelopt_c: cannot read torch's build settings ({exc}); is torch installed completely?")
    if found is None:
        sys.exit(f"modelopt_c: {config} names no CXX_STANDARD; which C++ standard does this torch need?")
    flags = [f"-std=c++{found.group(1)}", f"-D_GLIBCXX_USE_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}"]
    return include_paths(), library_paths(), flags


DEBUG = _flag("MODELOPT_C_DEBUG")
SANITIZE = _flag("MODELOPT_C_SANITIZE")
OPT = ["-O0", "-g3", "-UNDEBUG"] if DEBUG or SANITIZE else ["-O2", "-g", "-DNDEBUG"]
SAN = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=undefined"] if SANITIZE else []
WARN = ["-Wall", "-Wextra", "-Werror", "-Wno-missing-field-initializers"]

torch_inc, torch_lib, torch_cxx = _torch_settings()
C_FLAGS = ["-std=c11", *WARN, "-fvisibility=hidden", *_pkgconfig("--cflags")] + OPT + SAN
# ATen's headers are -isystem: their own warnings are not ours to fix
CXX_FLAGS = [*torch_cxx, *WARN, "-fvisibility=hidden", *(f"-isystem{p}" for p in torch_inc)] + OPT + SAN
msgpack_ldirs = _pkgconfig("--libs-only-L")


class BuildExt(build_ext):
    """Compile the .c files as C11 and the .cpp bridge as C++ over ATen, each with its
    own flags (two public `compiler.compile` calls), then link them into one module."""

    def build_extension(self, ext):
        target = self.get_ext_fullpath(ext.name)
        if not (self.force or newer_group([*ext.sources, *ext.depends, __file__], target, "newer")):
            return  # up to date
        unknown = [s for s in ext.sources if not s.endswith((".c", ".cpp"))]
        if unknown:
            sys.exit(f"modelopt_c: no rule to compile {unknown}")
        objects = []
        for suffix, flags in ((".c", C_FLAGS), (".cpp", CXX_FLAGS)):
            sources = [s for s in ext.sources if s.endswith(suffix)]
            objects += self.compiler.compile(
                sources,
                output_dir=self.build_temp,
                macros=ext.define_macros,
                include_dirs=ext.include_dirs,
                debug=self.debug,
                extra_postargs=flags,
                depends=ext.depends,
            )
        self.compiler.link_shared_object(
            objects,
            target,
            libraries=self.get_libraries(ext),
            library_dirs=ext.library_dirs,
            runtime_library_dirs=ext.runtime_library_dirs,
            extra_postargs=ext.extra_link_args,
            export_symbols=self.get_export_symbols(ext),
            debug=self.debug,
            build_temp=self.build_temp,
            target_lang="c++",
        )


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
    # zlib's crc32 (stream_sink.c), from the runtime library every Linux has: no headers needed
    + ["-l:libz.so.1"]
    + SAN,
)

setup(ext_modules=[ext], cmdclass={"build_ext": BuildExt})
