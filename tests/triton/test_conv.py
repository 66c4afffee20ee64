"""The Triton implicit-GEMM convolution (triton_kernels/conv_kernels.py) against ``F.conv2d`` plus
the epilogue in plain PyTorch: every kernel size, stride, padding, dilation and groups of the
ResNet family (ResNet-18/50, ResNeXt-50) scaled down, odd spatial sizes, batch 1, channel counts off
the block sizes, each config class, NCHW and channels_last; reduced-precision storage; argument
validation; the op (opcheck, fake layout, autograd). GPU-only tests carry the ``cuda`` marker.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICE, INTERPRET, TOL_BF16_OUT, TOL_GRAD, TOL_OUT, rel_err

CL = torch.channels_last

# name -> (N, C_in, H, W, C_out, kernel, stride, padding, dilation, groups)
SHAPES = {
    "stem-7x7-s2-batch1": (1, 3, 19, 17, 40, 7, 2, 3, 1, 1),
    "basic-3x3-s1": (2, 24, 9, 11, 72, 3, 1, 1, 1, 1),
    "basic-3x3-s2": (2, 20, 9, 9, 36, 3, 2, 1, 1, 1),
    "bottleneck-1x1-wide": (2, 40, 7, 5, 136, 1, 1, 0, 1, 1),      # two column blocks
    "downsample-1x1-s2": (2, 24, 9, 7, 48, 1, 2, 0, 1, 1),
    "dilated-3x3": (1, 16, 11, 13, 40, 3, 1, 2, 2, 1),
    "resnext-3x3-g8": (2, 32, 7, 9, 32, 3, 1, 1, 1, 8),            # 4 channels per group
    "resnext-3x3-s2-g4": (1, 48, 9, 9, 48, 3, 2, 1, 1, 4),
    "grouped-wide-g2": (1, 64, 5, 5, 96, 3, 1, 1, 1, 2),           # 48 output channels per group
    "large-m": (4, 16, 17, 17, 40, 3, 1, 1, 1, 1),                 # N*OH*OW >= SMALL_M
    "spatial-1x1": (2, 64, 1, 1, 40, 3, 1, 1, 1, 1),
    "rect-3x1-s2x1": (1, 8, 10, 9, 36, (3, 1), (2, 1), (1, 0), 1, 1),
}
EPILOGUES = {
    "plain": dict(scale=False, shift=False, residual=False, relu=False),
    "bias-relu": dict(scale=False, shift=True, residual=False, relu=True),
    "bias-residual": dict(scale=False, shift=True, residual=True, relu=False),
    "affine-residual-relu": dict(scale=True, shift=True, residual=True, relu=True),
}


def _conv_args(shape, dtype=torch.float32, fmt=CL, scale=False, shift=True, residual=False,
               relu=True, res_fmt=CL):
    n, c_in, h, w, c_out, k, stride, padding, dilation, groups = shape
    k = k if isinstance(k, tuple) else (k, k)
    x = torch.randn(n, c_in, h, w, device=DEVICE).to(dtype).contiguous(memory_format=fmt)
    weight = (torch.randn(c_out, c_in // groups, *k, device=DEVICE) / (c_in // groups * k[0] * k[1]) ** 0.5)
    weight = weight.to(dtype)
    sc = torch.rand(c_out, device=DEVICE) + 0.5 if scale else None
    sh = torch.randn(c_out, device=DEVICE) if shift else None
    pair = lambda v: v if isinstance(v, tuple) else (v, v)  # noqa: E731
    stride, padding, dilation = pair(stride), pair(padding), pair(dilation)
    res = None
    if residual:
        out_shape = _out_hw(h, w, k, stride, padding, dilation)
        res = torch.randn(n, c_out, *out_shape, device=DEVICE).to(dtype).contiguous(memory_format=res_fmt)
    return (x, weight, sc, sh, list(stride), list(padding), list(dilation), groups, res, relu)


def _out_hw(h, w, k, stride, padding, dilation):
    return tuple((size + 2 * p - d * (kk - 1) - 1) // s + 1
                 for size, kk, s, p, d in zip((h, w), k, stride, padding, dilation))


def _reference(x, weight, scale, shift, stride, padding, dilation, groups, residual, relu):
    """F.conv2d and the epilogue in plain PyTorch, in float32."""
    out = F.conv2d(x.float(), weight.float(), None, stride, padding, dilation, groups)
    if scale is not None:
        out = out * scale.float().reshape(1, -1, 1, 1)
    if shift is not None:
        out = out + shift.float().reshape(1, -1, 1, 1)
    if residual is not None:
        out = out + residual.float()
    return torch.relu(out) if relu else out


@pytest.fixture(scope="module")
def CK(T):
    from resnet_fused.triton_kernels import conv_kernels

    assert conv_kernels.INTERPRETED == INTERPRET
    return conv_kernels


def _conv(*args):
    return torch.ops.resnet_fused_triton.conv2d_bias_act(*args)


# ------------------------------------------------------------------------------------------------
# parity
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("epilogue", list(EPILOGUES))
@pytest.mark.parametrize("name", list(SHAPES))
def test_conv_parity_float32(CK, ieee_fp32, name, epilogue):
    args = _conv_args(SHAPES[name], **EPILOGUES[epilogue])
    out = _conv(*args)
    ref = _reference(*args)
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert out.is_contiguous(memory_format=CL), f"output strides {out.stride()} are not channels_last"
    err = rel_err(out, ref)
    assert err <= TOL_OUT, f"rel_err {err:.3g}"


def test_shape_matrix_covers_every_config_class(CK):
    """Guards the parity matrix: each class of the config table is exercised."""
    classes = set()
    for n, c_in, h, w, c_out, k, stride, padding, dilation, groups in SHAPES.values():
        pair = lambda v: v if isinstance(v, tuple) else (v, v)  # noqa: E731
        oh, ow = _out_hw(h, w, pair(k), pair(stride), pair(padding), pair(dilation))
        classes.add(CK.shape_class(n * oh * ow, c_out // groups))
    assert classes == set(CK.CONFIGS)


@pytest.mark.parametrize("x_fmt,res_fmt", [(torch.contiguous_format, torch.contiguous_format),
                                           (torch.contiguous_format, CL),
                                           (CL, torch.contiguous_format)],
                         ids=["nchw-nchw", "nchw-cl", "cl-nchw"])
@pytest.mark.parametrize("name", ["basic-3x3-s2", "resnext-3x3-g8"])
def test_conv_parity_memory_formats(CK, ieee_fp32, name, x_fmt, res_fmt):
    """NCHW input is converted to channels_last; the residual is read through its strides."""
    args = _conv_args(SHAPES[name], fmt=x_fmt, scale=True, residual=True, res_fmt=res_fmt)
    out = _conv(*args)
    assert out.is_contiguous(memory_format=CL)
    assert rel_err(out, _reference(*args)) <= TOL_OUT


def test_conv_strided_weight(CK, ieee_fp32):
    """A channels_last weight (contiguous along C_in) and a non-contiguous view give the same result."""
    x, weight, *rest = _conv_args(SHAPES["basic-3x3-s1"], scale=True, residual=True)
    ref = _reference(x, weight, *rest)
    for w in (weight.contiguous(memory_format=CL), weight.transpose(2, 3).contiguous().transpose(2, 3)):
        assert rel_err(_conv(x, w, *rest), ref) <= TOL_OUT


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", ["basic-3x3-s1", "resnext-3x3-g8", "stem-7x7-s2-batch1"])
def test_conv_reduced_precision_storage(CK, name, dtype):
    """bfloat16/float16 storage, float32 accumulation. Under the interpreter bfloat16 operands are
    cast to float32 before tl.dot (its bfloat16 dot is wrong) and float16 runs the real dot; on a GPU
    both run the real dot. The result differs from the float32 reference by about the rounding of
    the output itself (a truncating cast measured 2x that)."""
    args = _conv_args(SHAPES[name], dtype=dtype, scale=True, residual=True)
    out = _conv(*args)
    assert out.dtype == dtype and out.is_contiguous(memory_format=CL)
    ref = _reference(*args)
    err = rel_err(out, ref)
    assert err <= TOL_BF16_OUT, f"rel_err {err:.3g}"
    rounding = rel_err(ref.to(dtype), ref)
    assert err <= 1.25 * rounding, f"rel_err {err:.3g}, output rounding alone {rounding:.3g}"


def test_conv_empty_output(CK):
    args = _conv_args((0, 8, 5, 5, 16, 3, 1, 1, 1, 1))
    out = _conv(*args)
    assert out.shape == (0, 16, 5, 5) and out.is_contiguous(memory_format=CL)


def test_conv_relu_passes_nan_like_torch(CK):
    x, weight, *rest = _conv_args(SHAPES["basic-3x3-s2"])
    x[0, 0, 0, 0] = float("nan")
    out = _conv(x, weight, *rest)
    ref = _reference(x, weight, *rest)
    assert torch.equal(torch.isnan(out), torch.isnan(ref)) and torch.isnan(out).any()


# ------------------------------------------------------------------------------------------------
# validation: clear errors before any launch
# ------------------------------------------------------------------------------------------------
def _bad(**changes):
    x, weight, sc, sh, stride, padding, dilation, groups, res, relu = _conv_args(
        SHAPES["resnext-3x3-s2-g4"], scale=True, residual=True)
    args = dict(input=x, weight=weight, scale=sc, shift=sh, stride=stride, padding=padding,
                dilation=dilation, groups=groups, residual=res, relu=relu)
    args.update({k: (v(args) if callable(v) else v) for k, v in changes.items()})
    return list(args.values())


BAD_CASES = {
    "float64": (dict(input=lambda a: a["input"].double(), weight=lambda a: a["weight"].double()),
                TypeError, "float32, float16 and bfloat16"),
    "weight-dtype": (dict(weight=lambda a: a["weight"].half()), TypeError, "weight dtype"),
    "input-rank": (dict(input=lambda a: a["input"][0]), ValueError, r"\[N, C, H, W\]"),
    "weight-rank": (dict(weight=lambda a: a["weight"][:, :, 0]), ValueError, "weight must be"),
    "groups-divisibility": (dict(groups=5, weight=lambda a: a["weight"][:45]), ValueError,
                            "divisible by groups"),
    "channels": (dict(weight=lambda a: a["weight"][:, :6]), ValueError, "input channels"),
    "groups-zero": (dict(groups=0), ValueError, "groups must be >= 1"),
    "stride-zero": (dict(stride=[0, 1]), ValueError, "stride"),
    "negative-padding": (dict(padding=[-1, 1]), ValueError, "padding"),
    "kernel-too-large": (dict(padding=[0, 0], dilation=[5, 5]), ValueError, "does not fit"),
    "scale-shape": (dict(scale=lambda a: a["scale"][:-1]), ValueError, "scale must have shape"),
    "shift-int": (dict(shift=lambda a: a["shift"].long()), TypeError, "shift must have a floating"),
    "residual-shape": (dict(residual=lambda a: a["residual"][:, :, 1:]), ValueError, "residual must have"),
    "residual-dtype": (dict(residual=lambda a: a["residual"].half()), TypeError, "residual dtype"),
    "weight-device": (dict(weight=lambda a: a["weight"].to("meta")), ValueError, "weight is on meta"),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_conv_validation(CK, case, monkeypatch):
    changes, exc, match = BAD_CASES[case]
    args = _bad(**changes)

    def no_launch(*a, **k):
        raise AssertionError("a kernel was launched before validation failed")

    monkeypatch.setattr(CK, "empty_output", no_launch)
    with pytest.raises(exc, match=match):
        CK.conv2d_bias_act(*args)


def test_conv_validation_through_ops(CK):
    """resnet_fused.ops.conv_bias_act under the triton backend reports the same errors."""
    import resnet_fused

    x, weight, *_ = _conv_args(SHAPES["resnext-3x3-s2-g4"])
    with resnet_fused.use_backend("triton"):
        with pytest.raises(ValueError, match="divisible by groups"):
            resnet_fused.ops.conv_bias_act(x, weight[:45], None, (1, 1), (1, 1), (1, 1), 5)
        with pytest.raises(resnet_fused.backends.BackendError, match="float64"):
            resnet_fused.ops.conv_bias_act(x.double(), weight.double(), None, (1, 1), (1, 1), (1, 1), 4)


# ------------------------------------------------------------------------------------------------
# the op: opcheck, fake layout, autograd
# ------------------------------------------------------------------------------------------------
OPCHECK_CASES = {
    "affine-residual-relu-cl": dict(name="resnext-3x3-s2-g4", scale=True, residual=True),
    "bias-nchw": dict(name="downsample-1x1-s2", fmt=torch.contiguous_format),
}


@pytest.mark.parametrize("case", list(OPCHECK_CASES))
def test_conv_opcheck(CK, case):
    kwargs = dict(OPCHECK_CASES[case])
    args = _conv_args(SHAPES[kwargs.pop("name")], **kwargs)
    args = tuple(a.requires_grad_() if isinstance(a, torch.Tensor) else a for a in args)
    torch.library.opcheck(torch.ops.resnet_fused_triton.conv2d_bias_act, args)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL], ids=["nchw", "cl"])
def test_conv_fake_matches_real_layout(CK, fmt):
    from torch._subclasses.fake_tensor import FakeTensorMode

    args = _conv_args(SHAPES["basic-3x3-s2"], fmt=fmt, residual=True)
    real = _conv(*args)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = _conv(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args))
    assert fake.shape == real.shape and fake.stride() == real.stride() and fake.dtype == real.dtype


@pytest.mark.parametrize("relu", [True, False], ids=["relu", "no-relu"])
@pytest.mark.parametrize("name", ["basic-3x3-s2", "resnext-3x3-g8"])
def test_conv_autograd(CK, ieee_fp32, name, relu):
    """Gradients w.r.t. input, weight, scale, shift and residual against autograd through F.conv2d."""
    args = _conv_args(SHAPES[name], scale=True, residual=True, relu=relu)
    leaves = [a.detach().clone().requires_grad_() if isinstance(a, torch.Tensor) else a for a in args]
    ref_leaves = [a.detach().clone().requires_grad_() if isinstance(a, torch.Tensor) else a for a in args]
    out, ref = _conv(*leaves), _reference(*ref_leaves)
    grad = torch.randn_like(ref)
    out.backward(grad)
    ref.backward(grad)
    for i, (a, r) in enumerate(zip(leaves, ref_leaves)):
        if isinstance(a, torch.Tensor):
            err = rel_err(a.grad, r.grad)
            assert err <= TOL_GRAD, f"argument {i}: grad rel_err {err:.3g}"


# ------------------------------------------------------------------------------------------------
# GPU only: the autotuned configs, the real bfloat16 dot, tf32, int64 offsets, torch.compile
# ------------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("name", list(SHAPES))
def test_conv_autotuned_parity_gpu(CK, ieee_fp32, name):
    """Several configs per class on a GPU: whichever autotuning picks is exact (ieee dots)."""
    args = _conv_args(SHAPES[name], scale=True, residual=True)
    assert rel_err(_conv(*args), _reference(*args)) <= TOL_OUT
    assert all(len(c) > 1 for c in CK.CONFIGS.values())


@pytest.mark.cuda
def test_conv_tf32_follows_cudnn_setting_gpu(CK):
    """Default torch settings (tf32 cuDNN convs): tf32 dots, within the tf32 tolerance."""
    if torch.backends.cudnn.conv.fp32_precision != "tf32":
        pytest.skip("cuDNN convs are not in tf32 here")
    assert CK.fp32_input_precision(torch.device("cuda")) == "tf32"
    args = _conv_args((8, 64, 28, 28, 128, 3, 1, 1, 1, 1), scale=True, residual=True)
    assert rel_err(_conv(*args), _reference(*args)) <= 1e-3


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_conv_reduced_precision_real_dot_gpu(CK, dtype):
    """ResNet-50-sized layers with the real bfloat16/float16 tl.dot (no upcast on a GPU)."""
    for shape in [(8, 64, 56, 56, 64, 3, 1, 1, 1, 1), (8, 256, 56, 56, 64, 1, 1, 0, 1, 1),
                  (8, 3, 224, 224, 64, 7, 2, 3, 1, 1), (8, 256, 28, 28, 256, 3, 1, 1, 1, 32)]:
        args = _conv_args(shape, dtype=dtype, scale=True, residual=True)
        ref = _reference(*args)
        assert rel_err(_conv(*args), ref) <= max(TOL_BF16_OUT, 2 * rel_err(ref.to(dtype), ref))


@pytest.mark.cuda
@pytest.mark.slow
def test_conv_int64_offsets_gpu(CK):
    """Input and output over 2^31 elements (bfloat16 keeps it near 9 GB)."""
    x = torch.randn(1, 64, 5800, 5800, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=CL)
    assert x.numel() > 2 ** 31
    w = (torch.randn(64, 64, 1, 1, device="cuda") / 8).to(torch.bfloat16)
    out = _conv(x, w, None, None, [1, 1], [0, 0], [1, 1], 1, None, False)
    ref = F.conv2d(x, w)
    tail = (slice(None), slice(None), slice(-3, None), slice(-3, None))  # the far end of the tensor
    assert rel_err(out[tail], ref[tail].float()) <= TOL_BF16_OUT
    assert rel_err(out, ref) <= TOL_BF16_OUT


@pytest.mark.cuda
def test_conv_torch_compile_through_triton_op_gpu(CK, ieee_fp32):
    from resnet_fused.triton_kernels import registration

    assert registration.OP_KIND == "triton_op"
    args = _conv_args(SHAPES["basic-3x3-s2"], scale=True, residual=True)

    def f(x, w, sc, sh, res):
        out = torch.ops.resnet_fused_triton.conv2d_bias_act(x, w, sc, sh, [2, 2], [1, 1], [1, 1], 1, res, True)
        return out * 2

    x, w, sc, sh, *_, res, _ = args
    eager = f(x, w, sc, sh, res)
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)(x, w, sc, sh, res)
    assert rel_err(compiled, eager) <= TOL_OUT and compiled.stride() == eager.stride()


@pytest.mark.parametrize("setting", ["ieee", "tf32"])
def test_fp32_dot_precision_follows_cudnn_conv_setting(CK, setting):
    """float32 dots are as precise as the cuDNN convs they replace (read from torch's flags; under
    the interpreter CPU tensors always get full float32)."""
    previous = torch.backends.cudnn.conv.fp32_precision
    torch.backends.cudnn.conv.fp32_precision = setting
    try:
        assert CK.fp32_input_precision(torch.device("cuda")) == setting
        assert CK.fp32_input_precision(torch.device("cpu")) == "ieee"
    finally:
        torch.backends.cudnn.conv.fp32_precision = previous


def test_config_table(CK):
    """tl.dot needs every block dimension >= 16; the interpreter gets exactly one config per class
    (multi-config autotuning benchmarks on a GPU)."""
    assert set(CK.GPU_CONFIGS) == set(CK.INTERPRETER_CONFIGS) == set(CK.TUNED_KERNELS)
    for table in (CK.GPU_CONFIGS, CK.INTERPRETER_CONFIGS):
        for configs in table.values():
            for cfg in configs:
                assert all(cfg.kwargs[b] >= 16 for b in ("BLOCK_M", "BLOCK_N", "BLOCK_K")), cfg
    assert all(len(c) == 1 for c in CK.INTERPRETER_CONFIGS.values())
    assert (CK.CONFIGS is CK.INTERPRETER_CONFIGS) == INTERPRET
