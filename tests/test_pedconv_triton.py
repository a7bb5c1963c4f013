"""The fused Triton path (``method="triton"``) against the release's computation, ``pedconv2d_reference``.

Without a GPU the kernels run on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1, set per test), on
small shapes: output and every gradient (input, W0, the three gates) in float32 and float16. The tests marked
``cuda`` run the compiled kernels on every dynamic layer shape of ResNet-18/50 at batch 32.
"""
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

import pedconv
from pedconv.functional import pedconv2d, pedconv2d_reference

needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None,
    reason="Triton is not installed (it comes with PyTorch's CUDA wheels on Linux; else pip install triton)",
)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# (in, out, kernel, stride, padding, dilation, height, width, batch, channels_last)
SHAPES = {
    "3x3": (8, 16, 3, 1, 1, 1, 9, 9, 3, False),
    "3x3-stride2-odd": (16, 24, 3, 2, 1, 1, 9, 9, 2, True),
    "3x3-stride2-pad0-even": (8, 8, 3, 2, 0, 1, 8, 8, 2, False),
    "3x3-dilation2-rect": (20, 8, 3, 1, 2, 2, 9, 7, 3, True),
    "3x3-pad0": (32, 16, 3, 1, 0, 1, 7, 7, 2, False),
    "3x3-stride2-dilation2": (8, 16, 3, 2, 1, 2, 9, 9, 2, False),
    "3x3-stride2-width1": (8, 8, 3, 2, 1, 1, 5, 1, 2, False),  # a stride class without a column
    "1x1": (32, 16, 1, 1, 0, 1, 6, 6, 3, True),
    "1x1-stride2-odd": (16, 24, 1, 2, 0, 1, 9, 9, 2, False),
}
# Errors relative to the largest reference value: float32 sums differ in order only; float16 rounds the operands
# (and the gated operand once more) to 11 bits.
TOLERANCE = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


@pytest.fixture
def interpreter(monkeypatch):
    """Triton's interpreter for this test's CPU tensors (the compiled kernels are left as they are)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def make_operands(shape, dtype, device="cpu", rank=1, seed=0):
    """Input, weight and gates (float32, spread over (0, 1) so that a wrong gate shows), as leaves; the input
    and weight in ``dtype``, channels_last when the shape says so."""
    cin, cout, k, _, _, _, height, width, batch, channels_last = shape
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cin, height, width, generator=generator).to(device, dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = (torch.randn(cout, cin, k, k, generator=generator) / (cin * k * k) ** 0.5).to(device, dtype)
    gates = [torch.rand(batch, rank, n, generator=generator).to(device) for n in (cout, cin, k * k)]
    return [t.requires_grad_(True) for t in [x, weight, *gates]]


def triton_and_reference(shape, dtype, device="cpu", rank=1):
    """(output, gradients) of the Triton path and of the reference, the reference in float64 (float32 on CUDA)
    from the same rounded operands and the same output gradient."""
    _, _, _, stride, padding, dilation = shape[:6]
    conv = dict(stride=stride, padding=padding, dilation=dilation)
    operands = make_operands(shape, dtype, device, rank)
    reference_dtype = torch.float64 if device == "cpu" else torch.float32
    reference_operands = [t.detach().to(reference_dtype).requires_grad_(True) for t in operands]
    out = pedconv2d(*operands, method="triton", **conv)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    out.backward(grad)
    expected = pedconv2d_reference(*reference_operands, **conv)
    expected.backward(grad.to(reference_dtype))
    names = ["output", "input", "weight", "gate_out", "gate_in", "gate_tap"]
    actual = dict(zip(names, [out] + [t.grad for t in operands]))
    reference = dict(zip(names, [expected] + [t.grad for t in reference_operands]))
    return actual, reference, operands


def assert_all_close(actual, reference, tolerance):
    for name in reference:
        scale = reference[name].abs().max().item() + 1e-12
        error = (actual[name].to(reference[name].dtype) - reference[name]).abs().max().item()
        assert error <= tolerance * scale, f"{name}: max error {error:.3g} (scale {scale:.3g})"


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("name", list(SHAPES))
def test_output_and_every_gradient_equal_the_reference(interpreter, name, dtype):
    actual, reference, operands = triton_and_reference(SHAPES[name], dtype)
    assert actual["output"].dtype == dtype and actual["output"].shape == reference["output"].shape
    for t, leaf in zip(list(actual.values())[1:], operands):
        assert t.dtype == leaf.dtype and t.shape == leaf.shape
    assert_all_close(actual, reference, TOLERANCE[dtype])


@needs_triton
def test_bfloat16_runs_its_products_in_float32_under_the_interpreter(interpreter):
    """The interpreter's bfloat16 dot products are unreliable: its operands go in as float32 there."""
    actual, reference, _ = triton_and_reference(SHAPES["3x3-stride2-odd"], torch.bfloat16)
    assert actual["output"].dtype == torch.bfloat16
    assert_all_close(actual, reference, TOLERANCE[torch.bfloat16])


@needs_triton
def test_rank_two_sums_two_fused_terms(interpreter):
    actual, reference, _ = triton_and_reference(SHAPES["3x3-stride2-pad0-even"], torch.float32, rank=2)
    assert_all_close(actual, reference, TOLERANCE[torch.float32])


@needs_triton
def test_layer_with_method_triton_equals_the_reference_layer(interpreter):
    """PEDConv2d(method="triton"): output and every parameter's gradient, the gate generator's included."""
    from tests.test_pedconv import CONFIGS, forward_backward, make_input, make_layer

    cfg = CONFIGS["stride2-odd"]
    out, grads = forward_backward(make_layer(cfg, "triton").train(), make_input(cfg))
    expected, expected_grads = forward_backward(make_layer(cfg, "reference").train(), make_input(cfg))
    actual = {"output": out, **grads}
    reference = {"output": expected, **expected_grads}
    assert actual.keys() == reference.keys()
    assert_all_close(actual, reference, 1e-4)


@needs_triton
def test_no_grad_forward_equals_the_training_forward(interpreter):
    """Without autograd the kernels skip the unscaled output; the output must not change."""
    operands = make_operands(SHAPES["3x3"], torch.float32)
    out = pedconv2d(*operands, padding=1, method="triton")
    with torch.no_grad():
        out_no_grad = pedconv2d(*operands, padding=1, method="triton")
    assert torch.equal(out.detach(), out_no_grad)


@needs_triton
def test_bias_and_memory_format_follow_the_other_paths(interpreter):
    operands = make_operands(SHAPES["1x1"], torch.float32)
    bias = torch.randn(operands[1].shape[0])
    out = pedconv2d(*operands, bias=bias, method="triton")
    expected = pedconv2d_reference(*operands, bias=bias)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert (out - expected).abs().max() <= 1e-5 * expected.abs().max()
    nchw = [operands[0].detach().contiguous()] + [t.detach() for t in operands[1:]]
    assert pedconv2d(*nchw, method="triton").is_contiguous()


@needs_triton
def test_cpu_autocast_runs_in_bfloat16(interpreter):
    operands = make_operands(SHAPES["3x3"], torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = pedconv2d(*operands, padding=1, method="triton")
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert all(t.grad.dtype == torch.float32 and torch.isfinite(t.grad).all() for t in operands)
    expected = pedconv2d_reference(*[t.detach() for t in operands], padding=1)
    assert (out.float() - expected).abs().max() <= TOLERANCE[torch.bfloat16] * expected.abs().max()


@needs_triton
def test_custom_op_passes_torch_library_checks(interpreter):
    """Schema, fake (meta) implementation, autograd registration and tracing with dynamic shapes."""
    from pedconv.triton import triton_conv2d

    x, weight, gate_out, gate_in, gate_tap = make_operands(SHAPES["3x3-stride2-pad0-even"], torch.float32)
    args = (x, weight, gate_out[:, 0].detach().requires_grad_(True), gate_in[:, 0].detach().requires_grad_(True),
            gate_tap[:, 0].detach().requires_grad_(True), [2, 2], [0, 0], [1, 1], True)
    torch.library.opcheck(triton_conv2d, args)
    from pedconv.triton import triton_conv2d_backward

    out, raw = triton_conv2d(*[a.detach() if isinstance(a, torch.Tensor) else a for a in args])
    grad = torch.randn_like(out)
    backward_args = (grad, x.detach(), weight.detach(), *[a.detach() for a in args[2:5]], raw, [2, 2], [0, 0], [1, 1])
    for output_mask in ([True] * 5, [True, False, False, True, False]):
        torch.library.opcheck(triton_conv2d_backward, backward_args + (output_mask,))


@needs_triton
def test_torch_compile_keeps_the_op_whole(interpreter):
    """torch.compile traces the custom op through its fake implementation, in one graph."""
    operands = make_operands(SHAPES["3x3-stride2-odd"], torch.float32)

    def layer(x, weight, gate_out, gate_in, gate_tap):
        return pedconv2d(x, weight, gate_out, gate_in, gate_tap, stride=2, padding=1, method="triton")

    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    out = compiled(*operands)
    out.sum().backward()
    grads = [t.grad.clone() for t in operands]
    for t in operands:
        t.grad = None
    expected = layer(*operands)
    expected.sum().backward()
    assert torch.allclose(out, expected, rtol=0, atol=1e-6)
    assert all(torch.allclose(g, t.grad, rtol=0, atol=1e-5) for g, t in zip(grads, operands))


@needs_triton
def test_kernels_compile_for_a_gpu_without_one(tmp_path, monkeypatch):
    """The interpreter runs the kernels' Python, not Triton's compiler: compile them for a Hopper GPU (sm_90, to
    cubin with the ptxas that ships with Triton; no GPU needed), float16 as under AMP, every gradient asked for."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from pedconv.triton import kernels

    if "nvidia" not in triton.backends.backends:
        pytest.skip("this Triton has no NVIDIA backend")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    built = kernels.build(False)
    tiles = {"forward": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, WRITE_RAW=True),
             "input_grad": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32),
             "weight_grad": dict(BLOCK_O=64, BLOCK_C=64, BLOCK_M=64, SAMPLES=2, NEED_WEIGHT=True, NEED_OUT=True,
                                 NEED_IN=True, NEED_TAP=True)}
    for name, constants in tiles.items():
        function = getattr(built, name)
        while not isinstance(function, triton.runtime.JITFunction):  # under the autotuner
            function = function.fn
        constants = dict(constants, KH=3, KW=3, DOT_DTYPE=tl.float16, INPUT_PRECISION="ieee")
        # Pointers to float16 tensors, but the gates' and the summed gradients' (float32); integers 32-bit.
        float32 = ("gate_out_ptr", "gate_in_ptr", "gate_tap_ptr", "dw_ptr", "d_out_ptr", "d_in_ptr", "d_tap_ptr")
        signature = {arg: "constexpr" if arg in constants else
                     ("*fp32" if arg in float32 else "*fp16") if arg.endswith("_ptr") else "i32"
                     for arg in function.arg_names}
        compiled = triton.compile(ASTSource(function, signature, constants), target=GPUTarget("cuda", 90, 32))
        assert compiled.asm["cubin"], name


@needs_triton
def test_autotuner_prunes_tiles_wider_than_the_layer():
    from pedconv.triton import kernels

    configs = [kernels.triton.Config({"BLOCK_N": n, "BLOCK_K": k}) for n, k in [(128, 32), (64, 64), (32, 32)]]
    prune = kernels._prune_by_width({"BLOCK_N": "O", "BLOCK_K": "C"})
    kept = prune(configs, {"x_ptr": None}, O=64, C=48)  # the shape comes in the keywords
    assert [(c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]) for c in kept] == [(64, 64), (32, 32)]
    assert [c.kwargs["BLOCK_N"] for c in prune(configs, {"O": 16, "C": 16})] == [32]
    assert prune(configs[:1], {"O": 8, "C": 8}) == configs[:1]  # never none


def test_groups_other_than_one_are_refused():
    with pytest.raises(ValueError, match="'triton' supports groups=1 only, got groups=2"):
        pedconv.PEDConv2d(8, 8, 3, groups=2, method="triton")
    operands = [t.detach() for t in make_operands(SHAPES["3x3"], torch.float32)]
    weight = operands[1][:, :4]
    with pytest.raises(ValueError, match="groups=1 only"):
        pedconv2d(operands[0], weight, operands[2], operands[3][:, :, :4], operands[4], groups=2, method="triton")


def test_cpu_tensor_without_the_interpreter_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    layer = pedconv.PEDConv2d(8, 8, 3, padding=1, method="triton")
    with pytest.raises(RuntimeError, match="runs on CUDA tensors .*TRITON_INTERPRET=1"):
        layer(torch.randn(1, 8, 5, 5))


def test_missing_triton_is_named_with_how_to_install(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delattr(pedconv, "triton", raising=False)
    monkeypatch.setitem(sys.modules, "pedconv.triton", None)  # as if its import of triton failed
    layer = pedconv.PEDConv2d(8, 8, 3, padding=1, method="triton")
    with pytest.raises(RuntimeError, match="needs the triton package .*pip install triton"):
        layer(torch.randn(1, 8, 5, 5))


def test_import_and_the_cpu_default_path_never_import_triton():
    # Importing pedconv brings in neither Triton nor the compiler (compared with importing torch alone); running the
    # CPU default path never imports pedconv's Triton kernels. (Torch's custom-op dispatcher, which the fast paths
    # go through, loads torch._dynamo on its first call, and that probes for the triton package: torch's doing.)
    code = ("import sys, torch\n"
            "def tritons(): return {m for m in sys.modules if m in ('triton', 'torch._dynamo') or m.startswith('pedconv.t')}\n"
            "before = tritons()\n"
            "import pedconv\n"
            "print(sorted(tritons() - before))\n"
            "layer = pedconv.PEDConv2d(8, 8, 3, padding=1)\n"
            "layer(torch.randn(2, 8, 6, 6)).sum().backward()\n"
            "print(sorted(m for m in sys.modules if m.startswith('pedconv.t')))\n")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root,
                            check=True)
    assert result.stdout.strip().splitlines() == ["[]", "[]"], result.stdout


# ----------------------------------------------------------------------------------------------------------------
# On a GPU: the compiled (autotuned) kernels on the real layer shapes.


def resnet_layer_shapes():
    """Every distinct dynamic conv shape of ResNet-18 and ResNet-50 at 224x224, as SHAPES entries, batch 32."""
    from benchmarks.pedconv_layer import dynamic_conv_shapes

    shapes = {}
    for arch in ("resnet18", "resnet50"):
        for cin, cout, k, stride, padding, size in dynamic_conv_shapes(arch):
            shapes[f"{cin}-{cout}-{k}x{k}-s{stride}-{size}"] = (cin, cout, k, stride, padding, 1, size, size, 32, True)
    return shapes


@pytest.mark.cuda
@needs_cuda
@needs_triton
@pytest.mark.parametrize("shape", list(resnet_layer_shapes().items()), ids=lambda item: item[0])
def test_resnet_layers_in_float16_channels_last_on_cuda(shape, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    # The reference in float32 without TF32; the fused path's float16 products sum in float32.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    actual, reference, _ = triton_and_reference(shape[1], torch.float16, "cuda")
    assert_all_close(actual, reference, 1e-2)


@pytest.mark.cuda
@needs_cuda
@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32-tf32"])
@pytest.mark.parametrize("name", ["64-64-3x3-s1-56", "128-128-3x3-s2-56", "512-2048-1x1-s1-7"])
def test_resnet_layers_in_bfloat16_and_float32_on_cuda(name, dtype, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    # float32 runs its products in TF32 when cuDNN may (the default): a tolerance for TF32's 10-bit mantissa.
    actual, reference, _ = triton_and_reference(resnet_layer_shapes()[name], dtype, "cuda")
    assert_all_close(actual, reference, 3e-2 if dtype == torch.bfloat16 else 1e-2)


def test_layer_benchmark_refuses_triton_on_the_cpu(capsys):
    from benchmarks import pedconv_layer

    with pytest.raises(SystemExit) as exit_info:
        pedconv_layer.main(["--device", "cpu", "--methods", "triton"])
    assert exit_info.value.code == 2
    assert "--methods triton needs --device cuda" in capsys.readouterr().err


@pytest.mark.cuda
@needs_cuda
@needs_triton
def test_layer_benchmark_times_triton_against_static_and_per_sample_kernels(capsys, monkeypatch):
    from benchmarks import pedconv_layer

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    pedconv_layer.main(["--device", "cuda", "--arch", "resnet18", "-b", "2", "--iters", "1", "--no-memory", "--amp",
                        "--channels-last", "--methods", "triton", "grouped"])
    out = capsys.readouterr().out
    for ratio in ("triton/static", "grouped/static", "grouped/triton", "reference/triton"):
        assert f"RATIO resnet18 {ratio} = " in out
