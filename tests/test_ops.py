"""The primitives: the reference against torch's own BatchNorm autograd, and the custom ops
(opcheck, float64 gradcheck, the same signature on every backend)."""
import inspect

import pytest
import torch
import torch.nn.functional as F

import resnet_fused
from resnet_fused import ops, reference

HAS_CPP = "cpu" in resnet_fused.available_backends("cpu")
needs_cpp = pytest.mark.skipif(not HAS_CPP, reason="resnet_fused._C (C++ kernels) not built")


def rel_err(a, ref):
    a, ref = a.detach().double(), ref.detach().double()
    return ((a - ref).norm() / ref.norm()).item()


def _bn_case(shape=(3, 5, 7, 6), dtype=torch.float64, channels_last=False):
    y = torch.randn(shape, dtype=dtype) * 2 + 0.5
    if channels_last:
        y = y.to(memory_format=torch.channels_last)
    c = shape[1]
    weight = torch.rand(c, dtype=dtype) + 0.5
    bias = torch.rand(c, dtype=dtype) - 0.5
    return y, weight, bias


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("training", [True, False])
def test_reference_backward_matches_torch_autograd(relu, training):
    """reduce + apply reproduce autograd of F.batch_norm (+ReLU), float64."""
    y, weight, bias = _bn_case()
    running_mean, running_var = torch.randn(5, dtype=torch.float64), torch.rand(5, dtype=torch.float64) + 0.5
    eps = 1e-5
    yr, wr, br = (t.clone().requires_grad_() for t in (y, weight, bias))
    out = F.batch_norm(yr, running_mean.clone(), running_var.clone(), wr, br, training, 0.1, eps)
    if relu:
        out = torch.relu(out)
    grad = torch.randn_like(out)
    out.backward(grad)

    if training:
        mean, var = reference.bn_stats(y)
    else:
        mean, var = running_mean, running_var
    invstd = torch.rsqrt(var + eps)
    scale = weight * invstd
    ours = reference.bn_apply(y, scale, bias - mean * scale, relu=relu)
    assert rel_err(ours, out) < 1e-12
    sum_dy, sum_dy_xmu = reference.bn_backward_reduce(grad, y, ours, mean, relu)
    count = y.numel() // y.shape[1]
    means = (sum_dy / count, sum_dy_xmu / count) if training else (None, None)
    grad_y = reference.bn_backward_apply(grad, y, ours, mean, invstd, weight, *means, relu)
    assert rel_err(grad_y, yr.grad) < 1e-12
    assert rel_err(sum_dy_xmu * invstd, wr.grad) < 1e-12
    assert rel_err(sum_dy, br.grad) < 1e-12
    if relu:  # the same, with the ReLU mask recomputed from y and the forward's scale/shift
        affine = (scale, bias - mean * scale)
        sums = reference.bn_backward_reduce(grad, y, None, mean, relu, *affine)
        means = (sums[0] / count, sums[1] / count) if training else (None, None)
        grad_y = reference.bn_backward_apply(grad, y, None, mean, invstd, weight, *means, relu, *affine)
        assert rel_err(grad_y, yr.grad) < 1e-12
        assert rel_err(sums[1] * invstd, wr.grad) < 1e-12
        assert rel_err(sums[0], br.grad) < 1e-12


def test_reference_stats_robust_to_large_mean():
    y = torch.randn(4, 3, 16, 16) + 1e3  # mean 1e3 x std, float32
    _, var = reference.bn_stats(y)
    _, var64 = reference.bn_stats(y.double())
    assert rel_err(var, var64) < 1e-4


def test_reference_relu_passes_nan_like_torch():
    y = torch.randn(2, 3, 4, 4)
    y[0, 1, 2, 3] = float("nan")
    out = reference.bn_apply(y, torch.ones(3), torch.zeros(3), relu=True)
    assert torch.equal(out.isnan(), torch.relu(y).isnan())


def _schema_arg_names(op_name):
    schema = getattr(torch.ops.resnet_fused, op_name).default._schema
    return [a.name for a in schema.arguments]


@needs_cpp
@pytest.mark.parametrize("op_name", ops.OP_NAMES)
def test_every_backend_has_the_same_signature(op_name):
    """One signature per primitive: the C++ schema, the reference and the dispatching function."""
    cpp = _schema_arg_names(op_name)
    assert list(inspect.signature(getattr(reference, op_name)).parameters) == cpp
    assert list(inspect.signature(getattr(ops, op_name)).parameters) == cpp


def _op_samples(dtype, channels_last):
    y, weight, bias = _bn_case(dtype=dtype, channels_last=channels_last)
    c = y.shape[1]
    acc = reference.opmath_dtype(dtype)
    residual = torch.randn_like(y)
    scale, shift = weight.to(acc), bias.to(acc)
    res_scale, res_shift = torch.rand(c, dtype=acc) + 0.5, torch.randn(c, dtype=acc)
    out = reference.bn_apply(y, scale, shift, residual, res_scale, res_shift, True)
    grad = torch.randn_like(y)
    mean, var = reference.bn_stats(y)
    invstd = torch.rsqrt(var + 1e-5)
    return dict(y=y, scale=scale, shift=shift, residual=residual, res_scale=res_scale,
                res_shift=res_shift, out=out, grad=grad, mean=mean, invstd=invstd,
                weight=weight.to(acc), md=torch.randn(c, dtype=acc), mdx=torch.randn(c, dtype=acc))


def _op_calls(s):
    lib = torch.ops.resnet_fused
    return [
        (lib.bn_stats, (s["y"],)),
        (lib.bn_apply, (s["y"], s["scale"], s["shift"], None, None, None, False)),
        (lib.bn_apply, (s["y"], s["scale"], s["shift"], s["residual"], None, None, True)),
        (lib.bn_apply, (s["y"], s["scale"], s["shift"], s["residual"], s["res_scale"], s["res_shift"], True)),
        (lib.bn_backward_reduce, (s["grad"], s["y"], s["out"], s["mean"], True)),
        (lib.bn_backward_reduce, (s["grad"], s["y"], None, s["mean"], False)),
        (lib.bn_backward_reduce, (s["grad"], s["y"], None, s["mean"], True, s["scale"], s["shift"])),
        (lib.bn_backward_apply, (s["grad"], s["y"], s["out"], s["mean"], s["invstd"], s["weight"],
                                 s["md"], s["mdx"], True)),
        (lib.bn_backward_apply, (s["grad"], s["y"], None, s["mean"], s["invstd"], None, None, None, False)),
        (lib.bn_backward_apply, (s["grad"], s["y"], None, s["mean"], s["invstd"], s["weight"], s["md"], s["mdx"],
                                 True, s["scale"], s["shift"])),
    ]


@needs_cpp
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(dtype, channels_last):
    for op, args in _op_calls(_op_samples(dtype, channels_last)):
        torch.library.opcheck(op, args)


@needs_cpp
@pytest.mark.parametrize("channels_last", [False, True])
def test_opcheck_with_autograd(channels_last):
    s = _op_samples(torch.float64, channels_last)
    lib = torch.ops.resnet_fused
    y = s["y"].clone().requires_grad_()
    torch.library.opcheck(lib.bn_stats, (y,))
    args = (y, s["scale"].clone().requires_grad_(), s["shift"].clone().requires_grad_(),
            s["residual"].clone().requires_grad_(), s["res_scale"].clone().requires_grad_(),
            s["res_shift"].clone().requires_grad_(), True)
    torch.library.opcheck(lib.bn_apply, args)


@needs_cpp
@pytest.mark.parametrize("with_residual_affine", [False, True])
def test_gradcheck_bn_apply(with_residual_affine):
    s = _op_samples(torch.float64, False)
    y = s["y"][:2, :, :3, :4].clone().requires_grad_()
    residual = torch.randn_like(y, requires_grad=True)
    args = [y, s["scale"].clone().requires_grad_(), s["shift"].clone().requires_grad_(), residual]
    if with_residual_affine:
        args += [s["res_scale"].clone().requires_grad_(), s["res_shift"].clone().requires_grad_()]
    else:
        args += [None, None]
    with resnet_fused.use_backend("cpu"):
        assert torch.autograd.gradcheck(lambda *a: ops.bn_apply(*a, True), tuple(args))


@needs_cpp
def test_gradcheck_bn_stats():
    y = (torch.randn(2, 3, 3, 4, dtype=torch.float64) + 3).requires_grad_()
    with resnet_fused.use_backend("cpu"):
        assert torch.autograd.gradcheck(ops.bn_stats, (y,))


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_cpp)])
def test_dispatch_validates_arguments_before_running(backend):
    y = torch.randn(2, 4, 3, 3)
    with resnet_fused.use_backend(backend):
        with pytest.raises(ValueError, match=r"scale must have shape \[4\]"):
            ops.bn_apply(y, torch.ones(3), torch.zeros(4))
        with pytest.raises(ValueError, match="rank >= 2"):
            ops.bn_stats(torch.randn(4))
        with pytest.raises(TypeError, match="floating dtype"):
            ops.bn_stats(torch.ones(2, 4, dtype=torch.int64))
        with pytest.raises(ValueError, match="residual must have the input's shape"):
            ops.bn_apply(y, torch.ones(4), torch.zeros(4), torch.randn(2, 4, 3, 2))
        with pytest.raises(TypeError, match="residual must have the input's dtype"):
            ops.bn_apply(y, torch.ones(4), torch.zeros(4), y.double())
        with pytest.raises(ValueError, match="together"):
            ops.bn_apply(y, torch.ones(4), torch.zeros(4), y, torch.ones(4), None)
        with pytest.raises(ValueError, match="relu=True needs the forward output"):
            ops.bn_backward_reduce(y, y, None, torch.zeros(4), True)
        v = torch.ones(4)
        with pytest.raises(ValueError, match="mask_scale and mask_shift must be given together"):
            ops.bn_backward_apply(y, y, None, v, v, None, None, None, True, v, None)
        with pytest.raises(ValueError, match="need relu=True and output=None"):
            ops.bn_backward_reduce(y, y, y, v, True, v, v)
        with pytest.raises(ValueError, match=r"mask_shift must have shape \[4\]"):
            ops.bn_backward_reduce(y, y, None, v, True, v, torch.ones(3))


@needs_cpp
def test_fused_ops_compile_without_graph_breaks():
    s = _op_samples(torch.float32, False)

    def f(y, scale, shift, residual):
        mean, var = ops.bn_stats(y)
        return ops.bn_apply(y, scale * torch.rsqrt(var + 1e-5), shift - mean, residual, None, None, True)

    args = (s["y"], s["scale"], s["shift"], s["residual"])
    explanation = torch._dynamo.explain(f)(*args)
    assert explanation.graph_break_count == 0
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    assert rel_err(compiled(*args), f(*args)) < 1e-6
