"""PEDConv2d: the fast paths against the release's computation, names, modes, wrappers and bad input."""
import copy
import io
import math
import pickle

import pytest
import torch
import torch.nn as nn

import pedconv
from pedconv import PEDConv2d, info_max_loss
from pedconv.paths.common import conv_output_size, pair
from pedconv.paths.reference import modulation
from pedconv.paths import unfold as unfold_path
from pedconv.paths.unfold import onednn_matmul_available

# (in, out, kernel, stride, padding, dilation, groups, size, batch, rank, channels_last)
CONFIGS = {
    "3x3": (8, 12, 3, 1, 1, 1, 1, 9, 3, 1, False),
    "stride2": (8, 12, 3, 2, 1, 1, 1, 10, 3, 1, False),
    "stride2-odd": (8, 16, 3, 2, 1, 1, 1, 11, 2, 1, False),
    "groups": (8, 12, 3, 1, 1, 1, 2, 9, 3, 1, False),
    "depthwise": (8, 8, 3, 1, 1, 1, 8, 7, 2, 1, False),
    "dilation": (8, 12, 3, 1, 2, 2, 1, 9, 2, 1, False),
    "padding0": (8, 12, 3, 1, 0, 1, 1, 7, 2, 1, False),
    "odd-size": (8, 12, 3, 1, 1, 1, 1, 13, 2, 1, False),
    "batch1": (8, 12, 3, 2, 1, 1, 1, 9, 1, 1, False),
    "rank3": (8, 12, 3, 1, 1, 1, 1, 9, 3, 3, False),
    "channels-last": (8, 12, 3, 1, 1, 1, 1, 9, 3, 1, True),
    "channels-last-stride2": (8, 12, 3, 2, 1, 1, 1, 9, 3, 1, True),
    "5x3": (8, 12, (5, 3), (2, 1), (2, 1), 1, 1, 9, 2, 1, False),
    "1x1": (32, 16, 1, 1, 0, 1, 1, 6, 3, 1, False),
    "1x1-rank2-cl": (32, 16, 1, 1, 0, 1, 1, 6, 3, 2, True),
    "1x1-stride2": (16, 24, 1, 2, 0, 1, 1, 7, 2, 1, False),
    "1x1-groups": (16, 24, 1, 1, 0, 1, 2, 5, 2, 1, False),
}


def make_layer(cfg, method, seed=0):
    cin, cout, k, s, p, d, g, _, _, rank, _ = cfg
    torch.manual_seed(seed)
    layer = PEDConv2d(cin, cout, k, s, p, d, g, reduction=4, rank=rank, noise_std=0.0, method=method)
    # Spread the gates over (0, 1) so that a wrong gate shows, unlike the near-constant 0.5 of the release's init.
    with torch.no_grad():
        for linear in layer.attn.modules():
            if isinstance(linear, nn.Linear):
                linear.weight.normal_(0, 0.5)
                linear.bias.normal_(0, 0.5)
    return layer


def make_input(cfg, seed=1):
    cin, size, batch, channels_last = cfg[0], cfg[7], cfg[8], cfg[10]
    torch.manual_seed(seed)
    x = torch.randn(batch, cin, size, size)
    return x.to(memory_format=torch.channels_last) if channels_last else x


def forward_backward(layer, x):
    """Output, and the gradients of every parameter and of x, for a fixed random output gradient + info-max loss."""
    x = x.detach().clone().requires_grad_(True)
    out = layer(x)
    torch.manual_seed(2)
    loss = (out * torch.randn(out.shape)).sum() + info_max_loss(layer)
    loss.backward()
    grads = {name.removeprefix("_orig_mod."): p.grad.clone() for name, p in layer.named_parameters()}
    grads["input"] = x.grad.clone()
    layer.zero_grad(set_to_none=True)
    return out, grads


def assert_close(actual, expected, what):
    scale = expected.abs().max().item() + 1e-6
    err = (actual - expected).abs().max().item()
    assert err <= 2e-5 * scale, f"{what}: max error {err:.3g} (scale {scale:.3g})"


@pytest.mark.parametrize("method", ["auto", "grouped", "unfold", "taps", "grouped:chunks",
                                    "grouped:per-sample-input-grad", "unfold:matmul", "unfold:onednn-matmul"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_fast_paths_equal_reference_forward_and_gradients(name, method):
    cfg = CONFIGS[name]
    reference = make_layer(cfg, "reference").train()
    fast = make_layer(cfg, method).train()
    x = make_input(cfg)
    out_ref, grads_ref = forward_backward(reference, x)
    out_fast, grads_fast = forward_backward(fast, x)
    assert out_fast.shape == out_ref.shape
    assert out_fast.dtype == torch.float32
    assert_close(out_fast, out_ref, "output")
    assert set(grads_fast) == set(grads_ref)
    for key in grads_ref:
        assert_close(grads_fast[key], grads_ref[key], f"gradient of {key}")


@pytest.mark.parametrize("name", ["3x3", "stride2", "dilation", "padding0", "rank3", "channels-last", "5x3"])
def test_unfold_path_in_chunks_of_samples_equals_reference(name, monkeypatch):
    """On the CPU the unfold path takes the batch in chunks of samples (pedconv.paths.unfold.COLUMN_CHUNK_BYTES of
    unfolded columns): one sample per chunk and two (a short last chunk) give the reference's output and gradients."""
    cfg = CONFIGS[name]
    x = make_input(cfg)
    out_ref, grads_ref = forward_backward(make_layer(cfg, "reference").train(), x)
    cin, _, k, s, p, d, _, size = cfg[:8]
    kernel = pair(k)
    out_h, out_w = conv_output_size((size, size), kernel, pair(s), pair(p), pair(d))
    bytes_per_sample = out_h * out_w * kernel[0] * kernel[1] * cin * 4
    for samples in (1, 2):
        monkeypatch.setattr(unfold_path, "COLUMN_CHUNK_BYTES", samples * bytes_per_sample)
        out_fast, grads_fast = forward_backward(make_layer(cfg, "unfold").train(), x)
        assert_close(out_fast, out_ref, f"output, {samples} sample(s) per chunk")
        for key in grads_ref:
            assert_close(grads_fast[key], grads_ref[key], f"gradient of {key}, {samples} sample(s) per chunk")


def test_reference_matches_a_per_sample_convolution():
    """The reference itself: sample by sample, conv2d with W0 * (a_out x a_in x a_k), written out longhand."""
    cfg = CONFIGS["rank3"]
    layer = make_layer(cfg, "reference").eval()
    x = make_input(cfg)
    with torch.no_grad():
        logits = layer.attn(x.mean((2, 3)))
        gate_out, gate_in, gate_tap = layer.attn.gates(logits)
        expected = []
        for b in range(x.shape[0]):
            kernel = torch.zeros_like(layer.weight)
            for r in range(layer.rank):
                outer = gate_out[b, r][:, None, None] * gate_in[b, r][None, :, None] * gate_tap[b, r][None, None, :]
                kernel += layer.weight * outer.view_as(layer.weight)
            expected.append(torch.nn.functional.conv2d(x[b : b + 1], kernel, None, 1, 1))
        assert_close(layer(x), torch.cat(expected), "reference output")
        assert modulation(gate_out, gate_in, gate_tap).shape == (x.shape[0], 12, 8, 9)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_global_avg_pool_matches_mean_in_value_and_gradient(memory_format):
    """The gate generator's pooling hands back a broadcast gradient; it must equal autograd's mean's."""
    torch.manual_seed(0)
    x = torch.randn(3, 5, 7, 6).to(memory_format=memory_format)
    weights = torch.randn(3, 5)
    grads = []
    for pool in (pedconv.functional.global_avg_pool, lambda t: t.mean((2, 3))):
        leaf = x.detach().clone().requires_grad_(True)
        pooled = pool(leaf)
        (pooled * weights).sum().backward()
        grads.append((pooled.detach(), leaf.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=0, atol=0)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-6, atol=0)


@pytest.mark.parametrize("method", ["auto", "grouped", "unfold", "reference"])
def test_sample_output_does_not_depend_on_the_rest_of_the_batch(method):
    cfg = CONFIGS["stride2"]
    layer = make_layer(cfg, method).eval()
    x = make_input(cfg)
    other = torch.randn_like(x) * 3
    with torch.no_grad():
        alone = layer(x[:1])
        mixed = layer(torch.cat([x[:1], other[1:]]))
    assert torch.allclose(alone, mixed[:1], rtol=1e-5, atol=1e-6)


def test_eval_is_deterministic_and_training_noise_follows_noise_std():
    cfg = CONFIGS["3x3"]
    layer = make_layer(cfg, "auto")
    x = make_input(cfg)
    with torch.no_grad():
        layer.eval()
        assert torch.equal(layer(x), layer(x))
        layer.train()
        layer.noise_std = 0.1
        assert not torch.allclose(layer(x), layer(x))
        layer.noise_std = 0.0
        assert torch.equal(layer(x), layer(x))
        layer.eval()
        layer.noise_std = 0.1
        assert torch.equal(layer(x), layer(x))


@pytest.mark.parametrize("method", ["auto", "grouped", "unfold", "reference"])
@pytest.mark.parametrize("name", ["3x3", "channels-last-stride2", "1x1"])
def test_output_keeps_the_input_memory_format(name, method):
    cfg = CONFIGS[name]
    layer = make_layer(cfg, method)
    for memory_format in (torch.channels_last, torch.contiguous_format):
        x = make_input(cfg).contiguous(memory_format=memory_format).requires_grad_(True)
        out = layer(x)
        assert out.is_contiguous(memory_format=memory_format)
        out.sum().backward()
        assert x.grad.shape == x.shape


def test_parameter_names_and_shapes_are_the_releases():
    layer = PEDConv2d(64, 64, 3, 1, 1)
    shapes = {name: tuple(p.shape) for name, p in layer.state_dict().items()}
    assert shapes == {
        "weight": (64, 64, 3, 3),
        "attn.fc_share.weight": (4, 64),
        "attn.fc_share.bias": (4,),
        "attn.fc_inp.weight": (64, 4),
        "attn.fc_inp.bias": (64,),
        "attn.fc_oup.weight": (64, 4),
        "attn.fc_oup.bias": (64,),
        "attn.fc_k.weight": (9, 4),
        "attn.fc_k.bias": (9,),
        "attn.decoder.0.weight": (4, 137),
        "attn.decoder.0.bias": (4,),
        "attn.decoder.2.weight": (64, 4),
        "attn.decoder.2.bias": (64,),
    }
    pointwise = PEDConv2d(256, 64, 1, bias=True)
    assert pointwise.state_dict()["attn.fc_k.weight"].shape == (1, 16)
    assert pointwise.state_dict()["bias"].shape == (64,)


def test_initialization_is_the_releases():
    torch.manual_seed(0)
    layer = PEDConv2d(256, 256, 3, padding=1)
    fan_out = 256 * 9
    assert abs(layer.weight.std().item() - math.sqrt(2.0 / fan_out)) < 0.05 * math.sqrt(2.0 / fan_out)
    for name, param in layer.attn.named_parameters():
        if name.endswith("bias"):
            assert torch.count_nonzero(param) == 0, name
        else:
            assert abs(param.std().item() - 0.01) < 0.003, name
    with torch.no_grad():
        logits = layer.attn(torch.rand(4, 256))
        for gate in layer.attn.gates(logits):
            assert torch.allclose(gate, torch.full_like(gate, 0.5), atol=0.02)


def test_int_and_tuple_arguments_match_conv2d_output_shape():
    x = torch.randn(2, 8, 15, 12)
    for args in [(3, 1, 1), ((3, 1), (2, 1), (1, 0)), (3, 2, 0, 2), (1, 2)]:
        static = nn.Conv2d(8, 12, *args)
        dynamic = PEDConv2d(8, 12, *args)
        assert dynamic(x).shape == static(x).shape, args
    assert PEDConv2d(8, 12, 3, padding="same")(x).shape == (2, 12, 15, 12)


@pytest.mark.parametrize(
    "shape, match",
    [((8, 9, 9), r"expected input of shape \(N, 8, H, W\), got \(8, 9, 9\)"),
     ((2, 7, 9, 9), r"expected input of shape \(N, 8, H, W\), got \(2, 7, 9, 9\)")],
)
def test_bad_input_raises_a_value_error_naming_the_expected_shape(shape, match):
    layer = PEDConv2d(8, 12, 3)
    with pytest.raises(ValueError, match=match):
        layer(torch.randn(*shape))


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="divide by groups"):
        PEDConv2d(8, 12, 3, groups=3)
    with pytest.raises(ValueError, match="unknown PEDConv method"):
        PEDConv2d(8, 12, 3, method="fastest")
    with pytest.raises(ValueError, match="padding_mode"):
        PEDConv2d(8, 12, 3, padding_mode="reflect")


def test_onednn_matmul_path_names_what_it_cannot_run():
    layer = PEDConv2d(8, 12, 3, padding=1, method="unfold:onednn-matmul").double()
    with pytest.raises(ValueError, match="'unfold:onednn-matmul' needs CPU tensors of float32 .* got cpu torch.float64"):
        layer(torch.randn(2, 8, 5, 5, dtype=torch.float64))


@pytest.mark.parametrize("method", ["auto", "unfold", "grouped", "unfold:onednn-matmul"])
def test_bfloat16_autocast_on_cpu(method):
    if method == "unfold:onednn-matmul" and not onednn_matmul_available("cpu", torch.bfloat16):
        pytest.skip("oneDNN has no bfloat16 matrix product on this processor")
    cfg = CONFIGS["stride2"]
    layer = make_layer(cfg, method).train()
    x = make_input(cfg).requires_grad_(True)
    with torch.no_grad():
        expected = make_layer(cfg, "reference").train()(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
        loss = out.float().sum() + info_max_loss(layer)
    assert out.dtype == torch.bfloat16
    assert (out.float() - expected).abs().max() < 0.05 * expected.abs().max()
    loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in layer.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="float16 autocast needs an NVIDIA GPU (CUDA), which this machine lacks")
def test_float16_autocast_on_cuda():
    cfg = CONFIGS["stride2"]
    layer = make_layer(cfg, "auto").cuda().train()
    x = make_input(cfg).cuda().requires_grad_(True)
    with torch.autocast("cuda", dtype=torch.float16):
        out = layer(x)
    assert out.dtype == torch.float16
    out.float().sum().backward()
    assert torch.isfinite(x.grad).all()


def test_torch_compile_forward_and_backward_match_eager():
    cfg = CONFIGS["stride2"]
    eager = make_layer(cfg, "auto").train()
    compiled_layer = make_layer(cfg, "auto").train()
    compiled = torch.compile(compiled_layer, backend="inductor", fullgraph=False)
    x = make_input(cfg)
    out_eager, grads_eager = forward_backward(eager, x)
    out_compiled, grads_compiled = forward_backward(compiled, x)
    assert_close(out_compiled, out_eager, "compiled output")
    for key in grads_eager:
        assert_close(grads_compiled[key], grads_eager[key], f"compiled gradient of {key}")
    assert info_max_loss(compiled).item() > 0


def test_functional_call_and_grad_with_torch_func():
    cfg = CONFIGS["3x3"]
    layer = make_layer(cfg, "auto").eval()
    x = make_input(cfg)
    params = {name: p.detach() for name, p in layer.named_parameters()}
    out = torch.func.functional_call(layer, params, (x,))
    assert torch.allclose(out, layer(x))

    def loss_fn(p):
        return torch.func.functional_call(layer, p, (x,)).square().mean()

    grads = torch.func.grad(loss_fn)(params)
    loss_fn_eager = layer(x).square().mean()
    loss_fn_eager.backward()
    assert torch.allclose(grads["weight"], layer.weight.grad, rtol=1e-4, atol=1e-7)


def test_deepcopy_and_pickle_after_a_training_forward():
    cfg = CONFIGS["3x3"]
    layer = make_layer(cfg, "auto").train()
    x = make_input(cfg)
    layer(x)  # leaves an info-max loss (part of an autograd graph) on the layer
    twin = copy.deepcopy(layer)
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    restored = pickle.loads(pickle.dumps(layer))
    for other in (twin, restored):
        other.eval()
        assert torch.equal(other(x), layer.eval()(x))
        assert other.noise_std == layer.noise_std and other.method == layer.method
    assert buffer.tell() > 0


def test_info_max_loss_sums_the_layers_and_is_zero_in_eval():
    model = nn.Sequential(PEDConv2d(16, 16, 3, padding=1), nn.ReLU(), PEDConv2d(16, 32, 1), nn.Flatten())
    x = torch.randn(4, 16, 6, 6)
    model.train()
    model(x)
    total = info_max_loss(model)
    assert total.dim() == 0 and total.item() > 0
    assert torch.allclose(total, info_max_loss(model[0]) + info_max_loss(model[2]))
    info_max_loss(model[0]).backward()
    assert model[0].attn.decoder[0].weight.grad is not None
    assert model[0].weight.grad is None  # the gates come from the input, not from W0; the target is detached
    model.eval()
    model(x)
    assert info_max_loss(model).item() == 0.0
    assert info_max_loss(nn.Linear(3, 3)).item() == 0.0
    assert info_max_loss(nn.ReLU()).item() == 0.0
    model.train()
    for layer in (model[0], model[2]):
        layer.info_max = False
    model(x)
    assert info_max_loss(model).item() == 0.0


def test_info_max_loss_through_ddp(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = nn.Sequential(PEDConv2d(16, 16, 3, padding=1), nn.ReLU(), PEDConv2d(16, 16, 3, padding=1))
        wrapped = nn.parallel.DistributedDataParallel(model)
        out = wrapped(torch.randn(2, 16, 5, 5))
        loss = info_max_loss(wrapped)
        assert torch.allclose(loss, info_max_loss(model)) and loss.item() > 0
        (out.mean() + loss).backward()
        assert model[2].attn.decoder[2].weight.grad is not None
    finally:
        dist.destroy_process_group()


def test_convert_a_torchvision_resnet():
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    static_state = {k: v.clone() for k, v in model.state_dict().items()}
    pedconv.convert(model)
    dynamic = [name for name, m in model.named_modules() if isinstance(m, PEDConv2d)]
    assert len(dynamic) == 16
    assert "conv1" not in dynamic and not any("downsample" in name for name in dynamic)
    assert all(isinstance(m, nn.Conv2d) for name, m in model.named_modules() if name.endswith("downsample.0"))
    assert torch.equal(model.layer2[0].conv1.weight, static_state["layer2.0.conv1.weight"])
    assert model.layer2[0].conv1.stride == (2, 2)
    out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 10)
    assert info_max_loss(model).item() > 0

    only_3x3_stride1 = pedconv.convert(
        torchvision.models.resnet18(weights=None), predicate=lambda name, conv: conv.stride == (1, 1) and name != "conv1"
    )
    strided = [m for m in only_3x3_stride1.modules() if isinstance(m, PEDConv2d) and m.stride != (1, 1)]
    assert not strided


def test_trace_keeps_a_dynamic_batch():
    """Tracing (as ONNX export does) takes batch-independent ops: a graph traced at batch 2 runs at batch 5."""
    cfg = CONFIGS["stride2"]
    layer = make_layer(cfg, "auto").eval()
    with torch.no_grad():
        traced = torch.jit.trace(layer, make_input(cfg)[:2], check_trace=False)
        x = torch.randn(5, 8, 10, 10)
        assert_close(traced(x), layer(x), "traced output at another batch size")


def test_extra_repr_names_the_settings():
    text = repr(PEDConv2d(8, 12, 3, 2, 1, rank=2))
    assert "8, 12, kernel_size=(3, 3), stride=(2, 2), padding=(1, 1), bias=False, reduction=16" in text
    assert "rank=2" in text and "noise_std=0.1" in text and "method=auto" in text


def test_layer_benchmark_runs_and_prints_the_ratios(capsys):
    from benchmarks import pedconv_layer

    pedconv_layer.main(["--arch", "resnet18", "-b", "1", "--iters", "1", "--no-memory"])
    out = capsys.readouterr().out
    assert "RATIO resnet18 fast/static = " in out and "RATIO resnet18 reference/fast = " in out
    assert len([line for line in out.splitlines() if line[:3].strip().isdigit()]) == 7  # the 7 dynamic shapes


@pytest.mark.parametrize("method, shape", [("unfold", (64, 64, 3, 14)), ("grouped", (16, 16, 3, 28)),
                                           ("unfold", (64, 128, 1, 14)), ("auto", (64, 64, 3, 14))])
def test_the_fast_paths_keep_little_for_the_backward(method, shape):
    """Memory: besides the input (which the previous layer keeps anyway), a fast path keeps about one output's
    worth for the backward, not the unfolded columns (kh*kw inputs) nor per-sample kernels/modulations."""
    cin, cout, k, size = shape
    layer = PEDConv2d(cin, cout, k, padding=k // 2, method=method).train()
    x = torch.randn(8, cin, size, size, requires_grad=True)
    saved = {}

    def pack(tensor):
        if tensor.data_ptr() != x.data_ptr():
            saved[tensor.data_ptr()] = tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = layer(x)
    parameters = sum(p.numel() * p.element_size() for p in layer.parameters())
    activation_bytes = sum(saved.values()) - parameters
    assert activation_bytes <= 1.5 * out.numel() * out.element_size(), activation_bytes
