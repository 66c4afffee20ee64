"""Backend choice: what is available, what ``auto`` picks, and that a backend asked for explicitly
that cannot run a tensor is a clear error, never a silent fallback (DESIGN.md, "Backends")."""
from __future__ import annotations

import pytest
import torch

import resnet_fused
from resnet_fused import backends
from resnet_fused.backends import BackendError

from conftest import TOL_OUT, assert_state_unchanged, block_factory, cpp_built, make_pair, rel_err, state_snapshot

needs_cpp = pytest.mark.skipif(not cpp_built(), reason="resnet_fused._C (C++ kernels) not built")
needs_no_cpp = pytest.mark.skipif(cpp_built(), reason="resnet_fused._C is built: the missing-extension path is not reachable")


@pytest.fixture
def no_triton_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


# ------------------------------------------------------------------------------------------------
# available_backends / backend_for under auto
# ------------------------------------------------------------------------------------------------
def test_available_backends_contents(no_triton_interpreter):
    names = resnet_fused.available_backends()
    assert isinstance(names, list) and len(names) == len(set(names))
    assert set(names) <= set(backends.BACKENDS)
    assert names[-1] == "reference"  # always there, always last (the fallback)
    assert ("cpu" in names) is cpp_built() is resnet_fused.build_info()["cpp"]
    if "cpu" in names:
        assert names.index("cpu") < names.index("reference")
    cpu_names = resnet_fused.available_backends("cpu")
    assert cpu_names[-1] == "reference"
    assert ("cpu" in cpu_names) is cpp_built()
    assert "cuda" not in cpu_names  # CUDA kernels never run CPU tensors
    assert "triton" not in cpu_names  # on CPU only under TRITON_INTERPRET=1
    assert resnet_fused.available_backends(torch.device("cpu")) == cpu_names
    if not torch.cuda.is_available():
        assert "cuda" not in names and "triton" not in names


def test_available_backends_for_a_device_without_kernels():
    assert resnet_fused.available_backends("meta") == ["reference"]


def test_backend_for_cpu_float32_under_auto():
    with resnet_fused.use_backend("auto"):
        expected = "cpu" if cpp_built() else "reference"
        assert resnet_fused.backend_for("cpu", torch.float32) == expected
        assert resnet_fused.backend_for("cpu") == expected  # float32 is the default dtype argument
        assert resnet_fused.backend_for(torch.device("cpu"), torch.float32) == expected


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_backend_for_other_cpu_kernel_dtypes_under_auto(dtype):
    with resnet_fused.use_backend("auto"):
        assert resnet_fused.backend_for("cpu", dtype) == ("cpu" if cpp_built() else "reference")


def test_float16_on_cpu_runs_reference_under_auto():
    with resnet_fused.use_backend("auto"):
        assert resnet_fused.backend_for("cpu", torch.float16) == "reference"


def test_extension_state_is_reported_consistently():
    info = resnet_fused.build_info()
    assert info["torch"] == torch.__version__
    if cpp_built():
        assert info["built_with_torch"].split("+")[0] == torch.__version__.split("+")[0]
        assert "extension_error" not in info
    else:
        assert info["extension_error"]  # one message naming the cause


# ------------------------------------------------------------------------------------------------
# set_backend / use_backend
# ------------------------------------------------------------------------------------------------
def test_default_choice_is_auto():
    assert resnet_fused.get_backend() == "auto"


def test_set_backend_unknown_name_is_a_value_error():
    before = resnet_fused.get_backend()
    with pytest.raises(ValueError, match="nope"):
        resnet_fused.set_backend("nope")
    assert resnet_fused.get_backend() == before


@pytest.mark.parametrize("name", ["auto", "reference", "cuda", "triton"])
def test_set_backend_is_process_wide(name):
    resnet_fused.set_backend(name)
    try:
        assert resnet_fused.get_backend() == name
    finally:
        resnet_fused.set_backend("auto")


def test_use_backend_restores_the_previous_choice():
    resnet_fused.set_backend("reference")
    try:
        with resnet_fused.use_backend("auto"):
            assert resnet_fused.get_backend() == "auto"
            with resnet_fused.use_backend("reference"):
                assert resnet_fused.get_backend() == "reference"
            assert resnet_fused.get_backend() == "auto"
        assert resnet_fused.get_backend() == "reference"
    finally:
        resnet_fused.set_backend("auto")


def test_use_backend_restores_the_previous_choice_when_the_body_raises():
    resnet_fused.set_backend("reference")
    try:
        with pytest.raises(RuntimeError, match="boom"):
            with resnet_fused.use_backend("auto"):
                assert resnet_fused.get_backend() == "auto"
                raise RuntimeError("boom")
        assert resnet_fused.get_backend() == "reference"
        with pytest.raises(BackendError):
            with resnet_fused.use_backend("cuda"):
                resnet_fused.backend_for("cpu")
        assert resnet_fused.get_backend() == "reference"
    finally:
        resnet_fused.set_backend("auto")


def test_use_backend_with_an_unknown_name_changes_nothing():
    with pytest.raises(ValueError):
        with resnet_fused.use_backend("nope"):
            pass
    assert resnet_fused.get_backend() == "auto"


# ------------------------------------------------------------------------------------------------
# explicit backends that cannot run a tensor: clear errors
# ------------------------------------------------------------------------------------------------
def test_explicit_cuda_backend_on_a_cpu_tensor_names_the_device():
    with resnet_fused.use_backend("cuda"):
        with pytest.raises(BackendError, match=r"\bcpu\b") as info:
            resnet_fused.backend_for("cpu")
    assert "cuda" in str(info.value)


def test_explicit_triton_backend_on_cpu_needs_the_interpreter(no_triton_interpreter):
    with pytest.raises(BackendError, match="TRITON_INTERPRET"):
        with resnet_fused.use_backend("triton"):
            resnet_fused.backend_for("cpu")


@needs_cpp
@pytest.mark.parametrize("device", ["meta"])
def test_explicit_cpu_backend_on_another_device_names_the_device(device):
    with resnet_fused.use_backend("cpu"):
        with pytest.raises(BackendError, match=device):
            resnet_fused.backend_for(device)


@needs_cpp
def test_explicit_cpu_backend_with_float16_names_the_dtype():
    with resnet_fused.use_backend("cpu"):
        with pytest.raises(BackendError, match="float16"):
            resnet_fused.backend_for("cpu", torch.float16)
        assert resnet_fused.backend_for("cpu", torch.float32) == "cpu"


@needs_no_cpp
def test_explicit_cpu_backend_without_the_extension_is_an_error():
    with pytest.raises(BackendError, match="extension"):
        resnet_fused.set_backend("cpu")
    assert resnet_fused.get_backend() == "auto"


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_explicit_reference_backend_with_a_non_floating_dtype_names_the_dtype(dtype):
    with resnet_fused.use_backend("reference"):
        with pytest.raises(BackendError, match=str(dtype).replace("torch.", "")):
            resnet_fused.backend_for("cpu", dtype)


def test_explicit_reference_backend_runs_any_floating_dtype():
    with resnet_fused.use_backend("reference"):
        for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            assert resnet_fused.backend_for("cpu", dtype) == "reference"
        assert resnet_fused.backend_for("meta") == "reference"


IMPOSSIBLE = [
    pytest.param("cuda", r"\bcpu\b", None, id="cuda"),
    pytest.param("triton", "TRITON_INTERPRET", None, id="triton"),
    pytest.param("cpu", "float16", torch.float16,
                 marks=needs_cpp, id="cpu-float16"),
]


@pytest.mark.parametrize("kind", ["basic", "bottleneck"])
@pytest.mark.parametrize("name,pattern,dtype", IMPOSSIBLE)
def test_fused_block_under_an_impossible_backend_raises(name, pattern, dtype, kind, no_triton_interpreter):
    """The block raises the backend's error (no silent fallback) and changes no state."""
    make = block_factory(kind, 16, 16 if kind == "basic" else 4, downsample=False)
    ref, fused = make_pair(make)
    if dtype is not None:
        ref, fused = ref.to(dtype), fused.to(dtype)
    x = torch.randn(2, 16, 7, 9, dtype=dtype or torch.float32)
    for mode in ("train", "eval"):
        fused.train(mode == "train")
        before = state_snapshot(fused)
        with resnet_fused.use_backend(name):
            with pytest.raises(BackendError, match=pattern):
                fused(x)
        assert_state_unchanged(fused, before)
    # and under auto the same block runs and matches torchvision
    ref.eval()
    assert rel_err(fused(x), ref(x)) <= (TOL_OUT if dtype is None else 1e-2)


def test_fused_block_under_explicit_reference_matches_auto():
    make = block_factory("basic", 8, 16, stride=2, downsample=True)
    ref, fused = make_pair(make)
    ref.eval()
    fused.eval()
    x = torch.randn(2, 8, 9, 7)
    with resnet_fused.use_backend("reference"):
        out_ref_backend = fused(x)
    out_auto = fused(x)
    assert rel_err(out_ref_backend, ref(x)) <= TOL_OUT
    assert rel_err(out_auto, ref(x)) <= TOL_OUT
