"""Build of the ``resnet_fused._C`` extension (metadata lives in pyproject.toml).

Build with ``pip install --no-build-isolation -e .`` after torch, torchvision and ninja are installed:
an isolated build could fetch another torch and produce an extension that does not load against the
installed one.

* C++ CPU sources (``csrc/*.cpp``, ``csrc/cpu/*.cpp``) are always compiled.
* CUDA sources (``csrc/cuda/*.cu`` by nvcc, ``csrc/cuda/*.cpp`` by the C++ compiler) are compiled
  when torch is a CUDA build and a CUDA toolkit (nvcc) is found. ``RESNET_FUSED_SKIP_CUDA=1`` skips
  them; ``RESNET_FUSED_FORCE_CUDA=1`` requires them (the build fails if that is impossible). They are
  part of the one extension: a CUDA compile error fails the build, never a silent CPU-only fallback;
  and tests/test_cuda_ops.py fails a CPU-only build made where nvcc and a CUDA torch are present.
* The toolkit root is found from the *real* nvcc: ``$CUDA_HOME``/``$CUDA_PATH`` when set, else the
  ``nvcc`` on PATH with symlinks resolved and shell-script shims (``exec /path/to/nvcc "$@"``) followed,
  else ``/usr/local/cuda*``. It is exported as ``CUDA_HOME`` before ``torch.utils.cpp_extension`` is
  imported (torch would otherwise guess the root from the shim's directory).
* ``TORCH_CUDA_ARCH_LIST`` is honoured; when unset and no GPU is visible it defaults to one
  architecture plus PTX (``RESNET_FUSED_DEFAULT_ARCH``, "9.0+PTX"), which the driver JIT-compiles for
  newer GPUs. torch.utils.cpp_extension raises an IndexError with no GPU and no arch list.
* CPU kernels (``csrc/cpu/bn_kernels_impl.h``) are compiled once per CPU capability, as ATen compiles
  its ``native/cpu`` kernels: each wrapper ``csrc/cpu/capability/bn_kernels_<CAP>.cpp`` gets
  ``-DCPU_CAPABILITY=<CAP> -DCPU_CAPABILITY_<CAP>`` and that capability's ISA flags (DEFAULT: none;
  AVX2: ``-mavx2 -mfma -mf16c``; AVX512: ``-mavx512f -mavx512bw -mavx512vl -mavx512dq -mfma``), so
  ``at::vec::Vectorized`` has that width; the rest of the extension gets no ISA flag and never
  ``-march=native``. At run time the kernels of the capability torch runs
  (``torch.backends.cpu.get_cpu_capability()``, lowered by ``ATEN_CPU_CAPABILITY``) are used;
  ``resnet_fused._C.build_info()`` reports ``cpu_capability_used`` and ``cpu_capabilities_compiled``.
  AVX2/AVX512 are compiled on x86-64 only; ``RESNET_FUSED_CPU_CAPABILITIES=DEFAULT,AVX2`` (say)
  restricts the list. torch.utils.cpp_extension has no per-source flags, so ``build_ext`` below
  compiles each flag group with its own ninja file (the groups run concurrently) and links the
  objects in one library, plain objects first (their copies of shared inline functions win).
* C++ sources are compiled with ``-O3 -fopenmp``: at::parallel_for is an inline template that only
  runs in parallel when the including file is compiled with OpenMP (libgomp comes from torch/lib).
  ``RESNET_FUSED_DEBUG=1`` keeps debug info (``-g``) in the C++ objects.
"""
from __future__ import annotations

import copy
import functools
import glob
import os
import platform
import re
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor

from setuptools import setup

import torch

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH = "9.0+PTX"


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _log(msg: str) -> None:
    print(f"[resnet_fused setup] {msg}", file=sys.stderr)


def _is_toolkit_root(root: str | None) -> bool:
    return bool(root) and os.path.isfile(os.path.join(root, "bin", "nvcc")) and os.path.isfile(
        os.path.join(root, "include", "cuda_runtime.h")
    )


def _resolve_nvcc(path: str, depth: int = 0) -> str | None:
    """Follow symlinks and shell-script shims until the real nvcc binary."""
    real = os.path.realpath(path)
    if depth > 8 or not os.path.isfile(real):
        return None
    with open(real, "rb") as f:
        head = f.read(4)
    if head == b"\x7fELF":
        return real
    if head[:2] != b"#!":
        return real  # not a script we can parse: take it as it is
    with open(real, "r", errors="replace") as f:
        text = f.read(65536)
    # `exec /usr/local/cuda-13.0/bin/nvcc "$@"` (optionally quoted path)
    for m in re.finditer(r"^\s*exec\s+(?:\"([^\"]+)\"|'([^']+)'|(\S+))", text, flags=re.M):
        target = next(g for g in m.groups() if g)
        target = os.path.expandvars(target)
        if os.path.basename(target).startswith("nvcc") and os.path.realpath(target) != real:
            found = _resolve_nvcc(target, depth + 1)
            if found:
                return found
    return None


def find_cuda_home() -> str | None:
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(var)
        if root:
            if _is_toolkit_root(root):
                return os.path.realpath(root)
            _log(f"ignoring ${var}={root}: no bin/nvcc and include/cuda_runtime.h there")
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = _resolve_nvcc(nvcc)
        if real:
            root = os.path.dirname(os.path.dirname(real))
            if _is_toolkit_root(root):
                return root
    candidates = ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for root in candidates:
        if _is_toolkit_root(root):
            return os.path.realpath(root)
    return None


def _want_cuda() -> tuple[bool, str | None]:
    skip, force = _env_flag("RESNET_FUSED_SKIP_CUDA"), _env_flag("RESNET_FUSED_FORCE_CUDA")
    if skip and force:
        raise RuntimeError("RESNET_FUSED_SKIP_CUDA and RESNET_FUSED_FORCE_CUDA are both set")
    if skip:
        _log("RESNET_FUSED_SKIP_CUDA=1: building the CPU kernels only")
        return False, None
    reason = None
    cuda_home = None
    if torch.version.cuda is None:
        reason = f"torch {torch.__version__} is not a CUDA build"
    else:
        cuda_home = find_cuda_home()
        if cuda_home is None:
            reason = "no CUDA toolkit (nvcc) found"
    if reason:
        if force:
            raise RuntimeError(f"RESNET_FUSED_FORCE_CUDA=1 but {reason}")
        _log(f"{reason}: building the CPU kernels only")
        return False, None
    return True, cuda_home


WITH_CUDA, CUDA_HOME = _want_cuda()
if WITH_CUDA:
    # Must happen before torch.utils.cpp_extension is imported: it reads CUDA_HOME at import time.
    os.environ["CUDA_HOME"] = CUDA_HOME
    _log(f"CUDA toolkit: {CUDA_HOME}")

import torch.utils.cpp_extension as cpp_ext  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

if WITH_CUDA:
    cpp_ext.CUDA_HOME = CUDA_HOME  # in case the module was imported earlier with a wrong guess
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = os.environ.get("RESNET_FUSED_DEFAULT_ARCH", DEFAULT_ARCH)
        _log(f"no GPU visible and TORCH_CUDA_ARCH_LIST unset: using {os.environ['TORCH_CUDA_ARCH_LIST']}")


def _rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


# CPU capabilities of the kernels, as ATen builds its own (cmake/Codegen.cmake): DEFAULT has no ISA
# flag; the others only run where torch itself reports that capability (AVX2: avx2 + fma, which
# every such CPU pairs with f16c; AVX512: avx512 f/bw/vl/dq + fma).
CPU_CAPABILITY_FLAGS = {
    "DEFAULT": [],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"],
}
# GCC's generic tuning splits unaligned 256-bit loads and stores in two; ATen turns that off too.
GCC_AVX2_TUNING = ["-mno-avx256-split-unaligned-load", "-mno-avx256-split-unaligned-store"]


def _cpu_capabilities() -> list[str]:
    machine = platform.machine().lower()
    caps = ["DEFAULT"]
    if machine in ("x86_64", "amd64", "x64"):
        caps += ["AVX2", "AVX512"]
    wanted = os.environ.get("RESNET_FUSED_CPU_CAPABILITIES", "").strip()
    if wanted:
        names = {w.strip().upper() for w in wanted.split(",") if w.strip()}
        unknown = names - set(CPU_CAPABILITY_FLAGS)
        if unknown:
            raise RuntimeError(f"RESNET_FUSED_CPU_CAPABILITIES: unknown {sorted(unknown)}; "
                               f"known: {list(CPU_CAPABILITY_FLAGS)}")
        caps = [c for c in caps if c in names or c == "DEFAULT"]
    return caps


@functools.lru_cache(maxsize=None)
def _compiler_is_gcc() -> bool:
    try:
        return bool(cpp_ext.check_compiler_is_gcc(cpp_ext.get_cxx_compiler()))
    except Exception:  # noqa: BLE001 - a probe only: without it the tuning flags are left out
        return False


def make_extension():
    sources = _rel(glob.glob(os.path.join(ROOT, "csrc", "*.cpp")) + glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
    caps = _cpu_capabilities()
    _log(f"CPU kernels for capabilities {caps}")
    # Flags of single sources, on top of the common ones (BuildExtPerSourceFlags applies them).
    source_flags = {}
    for cap in caps:
        src = os.path.join("csrc", "cpu", "capability", f"bn_kernels_{cap}.cpp")
        flags = [f"-DCPU_CAPABILITY={cap}", f"-DCPU_CAPABILITY_{cap}"] + CPU_CAPABILITY_FLAGS[cap]
        if _compiler_is_gcc():
            # GCC 12 reports its own AVX-512 intrinsics (_mm512_undefined_*) as maybe-uninitialized.
            flags += ["-Wno-maybe-uninitialized"] + (GCC_AVX2_TUNING if cap == "AVX2" else [])
        sources.append(src)
        source_flags[src] = flags
    defines = [f'-DRESNET_FUSED_TORCH_VERSION="{torch.__version__}"']
    defines += [f"-DRESNET_FUSED_CPU_{cap}" for cap in caps if cap != "DEFAULT"]
    # No -march=native: the binary must run on any x86-64. No -std flag: torch.utils.cpp_extension
    # adds the standard torch needs (C++20 for torch 2.14). -g0 overrides the -g that Python's own
    # CFLAGS add: it cuts the C++ compile time by about a third and the .so from ~9 MB to ~1 MB
    # (RESNET_FUSED_DEBUG=1 keeps debug info). -fopenmp: at::parallel_for is serial without it.
    # -Wno-unknown-pragmas: the at::vec headers carry clang/`unroll` pragmas that GCC reports under -Wall.
    cxx = ["-O3", "-fopenmp", "-Wno-unknown-pragmas"] + ([] if _env_flag("RESNET_FUSED_DEBUG") else ["-g0"]) + defines
    extra_compile_args = {"cxx": cxx}
    torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    # rpath to torch's libraries so `import resnet_fused._C` works even before `import torch`
    # ($ORIGIN/../torch/lib for an installed wheel, the absolute build-time path for editable installs).
    # -fopenmp links libgomp.so.1, which resolves to the copy torch loads from torch/lib.
    extra_link_args = ["-fopenmp", "-Wl,-rpath,$ORIGIN/../torch/lib", f"-Wl,-rpath,{torch_lib}"]
    include_dirs = [os.path.join(ROOT, "csrc")]
    if WITH_CUDA:
        # Kernels (*.cu, nvcc) and the ops' host side (*.cpp, the C++ compiler: faster, and nvcc
        # never parses the ATen operator headers).
        sources += _rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")) +
                        glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp")))
        cxx.append("-DRESNET_FUSED_WITH_CUDA")
        extra_compile_args["nvcc"] = ["-O3", "-DRESNET_FUSED_WITH_CUDA"] + defines
        ext = CUDAExtension(
            "resnet_fused._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args=extra_compile_args,
            extra_link_args=extra_link_args,
        )
    else:
        ext = CppExtension(
            "resnet_fused._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args=extra_compile_args,
            extra_link_args=extra_link_args,
        )
    ext.source_flags = source_flags
    # Headers the ninja depfiles cannot know before a first build (setuptools' up-to-date check).
    ext.depends = _rel(glob.glob(os.path.join(ROOT, "csrc", "**", "*.h"), recursive=True))
    return ext


class BuildExtPerSourceFlags(BuildExtension.with_options(use_ninja=True)):
    """torch's BuildExtension plus per-source compiler flags (``ext.source_flags``).

    torch.utils.cpp_extension compiles all of an extension's sources with one set of flags. Here the
    compile step is split: sources with the same extra flags form a group, each group is compiled
    by torch's own (ninja) compile with its flags appended, into its own build folder (its own
    build.ninja), the groups concurrently; the objects are linked together as usual, those compiled
    without ISA flags first.
    """

    def build_extension(self, ext):
        source_flags = getattr(ext, "source_flags", None)
        if not source_flags:
            return super().build_extension(ext)
        compile_all = self.compiler.compile

        def compile_grouped(sources, output_dir=None, macros=None, include_dirs=None, debug=0,
                            extra_preargs=None, extra_postargs=None, depends=None):
            groups = {(): []}
            for src in sources:
                key = tuple(source_flags.get(os.path.relpath(os.path.abspath(src), ROOT), ()))
                groups.setdefault(key, []).append(src)

            def run(index, flags, srcs):
                post = copy.deepcopy(extra_postargs)
                out = output_dir
                if flags:
                    if isinstance(post, dict):
                        post["cxx"] = list(post.get("cxx", [])) + list(flags)
                    else:
                        post = list(post or []) + list(flags)
                    name = os.path.splitext(os.path.basename(srcs[0]))[0] if len(srcs) == 1 else f"group_{index}"
                    out = os.path.join(output_dir, "flags_" + name)
                return compile_all(srcs, output_dir=out, macros=macros, include_dirs=include_dirs,
                                   debug=debug, extra_preargs=extra_preargs, extra_postargs=post,
                                   depends=depends)

            # Objects without ISA flags first: where several objects define the same inline function
            # (a template instantiation the compiler kept out of line), the linker keeps the first
            # definition, which must run on any CPU.
            jobs = [(i, flags, srcs) for i, (flags, srcs) in enumerate(groups.items()) if srcs]
            jobs.sort(key=lambda job: any(f.startswith("-m") for f in job[1]))
            with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
                futures = [pool.submit(run, *job) for job in jobs]
                return [obj for fut in futures for obj in fut.result()]

        self.compiler.compile = compile_grouped
        try:
            return super().build_extension(ext)
        finally:
            self.compiler.compile = compile_all


setup(
    # `resnet_fused.triton_kernels` lives in the top-level folder triton_kernels/ (the import name
    # cannot collide with other `triton_kernels` packages). Editable installs: setuptools' default
    # PEP 660 mode ("lenient", setuptools >= 64; checked with 84.2) installs a meta-path finder
    # (site-packages/__editable___resnet_fused_*_finder.py) whose MAPPING holds every package_dir
    # entry, this nested one included, so `import resnet_fused.triton_kernels` works from any
    # directory (tests/test_cpp_ops.py::test_triton_kernels_package_mapping checks it). Do not use
    # `--config-settings editable_mode=compat`: it only puts the project root on sys.path, and the
    # nested mapping is lost. Regular (non-editable) installs copy triton_kernels/ into the wheel
    # as resnet_fused/triton_kernels/.
    packages=["resnet_fused", "resnet_fused.triton_kernels"],
    package_dir={"resnet_fused": "resnet_fused", "resnet_fused.triton_kernels": "triton_kernels"},
    ext_modules=[make_extension()],
    cmdclass={"build_ext": BuildExtPerSourceFlags},
    zip_safe=False,
)
