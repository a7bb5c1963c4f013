"""The CUDA paths (``python -m pytest -m cuda``, run by ``benchmarks/gpu_check.py``): the operator in float32,
float16 and bfloat16 and both memory formats against the release's computation, the training step (AMP, host
synchronizations, fused optimizer), the pytorch backend's prefetcher, the DALI loaders on the GPU and a checkpoint
from CUDA read on the CPU. Skipped, with that reason, where no CUDA device is present."""
import warnings

import pytest
import torch
import torch.nn as nn

import pedconv
from tests.data_utils import dominant_channel, make_dataset

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="needs a CUDA GPU (these run with: python -m pytest -m cuda, or benchmarks/gpu_check.py)"),
]

# Tolerances against the float32 reference computed on the same GPU (TF32 off for it): per compute dtype.
TOLERANCE = {torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 8e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FORMATS = [torch.contiguous_format, torch.channels_last]


@pytest.fixture(autouse=True)
def full_float32():
    """The references run in IEEE float32 (TF32 would make them the less exact side)."""
    from image_classification.cuda_settings import restore_tf32, set_tf32

    previous = set_tf32(False)
    yield
    restore_tf32(previous)


def _layer(kernel, method, seed=0):
    torch.manual_seed(seed)
    layer = pedconv.PEDConv2d(32, 48, kernel, stride=1, padding=kernel // 2, reduction=4, noise_std=0.0,
                              method=method)
    with torch.no_grad():  # gates spread over (0, 1), so that a wrong gate shows
        for linear in layer.attn.modules():
            if isinstance(linear, nn.Linear):
                linear.weight.normal_(0, 0.5)
                linear.bias.normal_(0, 0.5)
    return layer.cuda().train()


def _run(layer, x, dtype):
    x = x.detach().clone().requires_grad_(True)
    with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        out = layer(x)
        loss = (out.float() * torch.linspace(-1, 1, out.numel(), device="cuda").view_as(out)).sum()
        loss = loss + pedconv.info_max_loss(layer)
    layer.zero_grad(set_to_none=True)
    loss.backward()
    grads = {name: p.grad.detach().float().clone() for name, p in layer.named_parameters()}
    grads["x"] = x.grad.detach().float().clone()
    return out.detach().float(), grads, x.grad


def _relative_error(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("kernel", [3, 1])
@pytest.mark.parametrize("memory_format", FORMATS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
def test_operator_on_cuda_matches_the_reference(kernel, memory_format, dtype):
    """The auto path (unfold for channels_last k x k on CUDA) against the release's computation in float32:
    output and every gradient; the output and the input gradient keep the memory format."""
    fast, reference = _layer(kernel, "auto"), _layer(kernel, "reference")
    torch.manual_seed(1)
    x = torch.randn(6, 32, 28, 28, device="cuda").contiguous(memory_format=memory_format)
    out, grads, x_grad = _run(fast, x, dtype)
    expected_out, expected_grads, _ = _run(reference, x, torch.float32)
    assert _relative_error(out, expected_out) < TOLERANCE[dtype]
    for name, grad in expected_grads.items():
        assert _relative_error(grads[name], grad) < TOLERANCE[dtype], name
    assert out.is_contiguous(memory_format=memory_format)
    assert x_grad.is_contiguous(memory_format=memory_format)


def test_channels_last_layers_make_no_nchw_copy_on_cuda():
    from torch.overrides import TorchFunctionMode

    layer = _layer(3, "auto")
    x = torch.randn(8, 32, 56, 56, device="cuda").contiguous(memory_format=torch.channels_last).requires_grad_()
    copies = []

    class Count(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if getattr(func, "__name__", "") == "contiguous":
                fmt = kwargs.get("memory_format", args[1] if len(args) > 1 else torch.contiguous_format)
                activation = args[0].dim() == 4 and args[0].shape[0] == x.shape[0]  # not a weight
                if fmt == torch.contiguous_format and activation and not args[0].is_contiguous():
                    copies.append(tuple(args[0].shape))
            return func(*args, **kwargs)

    with Count(), torch.autocast("cuda", dtype=torch.float16):
        out = layer(x)
        out.float().sum().backward()
    assert not copies and out.is_contiguous(memory_format=torch.channels_last)


def _trainer(print_freq=4, fused=True, amp=True):
    from image_classification.distributed import Context
    from image_classification.dllog import Report
    from image_classification.ema import EMA
    from image_classification.losses import Mixup, SoftTargetCrossEntropy
    from image_classification.models import build_model
    from image_classification.optim import build_optimizer
    from image_classification.training import Precision, Trainer

    torch.manual_seed(0)
    device = torch.device("cuda")
    model = build_model("resnet18", dynamic=True, num_classes=10, wmul=0.25).to(device,
                                                                                memory_format=torch.channels_last)
    optimizer = build_optimizer(model, "sgd", 0.01, 0.9, 1e-4, device_type="cuda" if fused else "cpu")
    precision = Precision.create(amp, device, 128.0, True)
    trainer = Trainer(model, SoftTargetCrossEntropy(0.1), optimizer, precision, Context(0, 1, 0, device),
                      Report(None, print_freq), infomax_weight=1e-3, mixup=Mixup(0.2, 10, 0.1), ema=EMA(model, 0.9),
                      memory_format=torch.channels_last)
    loader = []
    for _ in range(8):  # learnable: each class has its own brightness
        labels = torch.randint(0, 10, (16,), device=device)
        images = 0.5 * torch.randn(16, 3, 64, 64, device=device) + 0.3 * labels.view(-1, 1, 1, 1)
        loader.append((images.contiguous(memory_format=torch.channels_last), labels))
    return trainer, loader


def test_amp_training_step_scales_and_learns():
    trainer, loader = _trainer()
    first = trainer.train_epoch(loader, 0, 0.05)
    later = [trainer.train_epoch(loader, epoch, 0.05) for epoch in range(1, 6)]
    assert first["train.grad_scale"] >= 64.0 and torch.isfinite(torch.tensor(first["train.loss"]))
    assert later[-1]["train.loss"] < first["train.loss"]
    assert trainer.precision.scaler.is_enabled()


def test_training_step_synchronizes_only_at_logging_steps():
    """CUDA's own sync detector: one synchronizing call per --print-freq interval (8 steps, print every 4)."""
    trainer, loader = _trainer(print_freq=4)
    trainer.train_epoch(loader[:4], 0, 0.01)  # warm-up: cuDNN autotuning, allocator growth
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.train_epoch(loader, 1, 0.01)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    assert len(syncs) <= 2, [str(w.message) for w in syncs]


def test_fused_sgd_steps_like_the_plain_one_on_cuda():
    from image_classification.optim import build_optimizer

    results = []
    for device_type in ("cuda", "cpu"):  # "cpu": the unfused optimizer, run on the GPU tensors
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.LazyLinear(4)).cuda()
        model(torch.randn(2, 3, 8, 8, device="cuda"))
        optimizer = build_optimizer(model, "sgd", 0.1, 0.9, 1e-2, nesterov=True, device_type=device_type)
        for _ in range(3):
            model(torch.randn(2, 3, 8, 8, device="cuda")).sum().backward()
            optimizer.step()
            optimizer.zero_grad()
        results.append([p.detach().clone() for p in model.parameters()])
    for fused, plain in zip(*results):
        torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)


def test_checkpoint_written_on_cuda_reads_on_the_cpu(tmp_path):
    from image_classification import checkpoints
    from image_classification.models import build_model

    trainer, loader = _trainer()
    trainer.train_epoch(loader, 0, 0.01)
    state = checkpoints.make_checkpoint(trainer.model, 1, trainer.optimizer, trainer.precision.scaler, 12.5,
                                        trainer.ema.module, checkpoints.capture_rng())
    checkpoints.save_checkpoint(state, str(tmp_path / "checkpoint.pth.tar"))
    loaded = checkpoints.load_checkpoint(str(tmp_path / "checkpoint.pth.tar"))
    assert all(t.device.type == "cpu" for t in loaded.state_dict.values())
    model = checkpoints.model_from_checkpoint(loaded).eval()
    reference = build_model("resnet18", dynamic=True, num_classes=10, wmul=0.25)
    reference.load_state_dict({k: v.cpu() for k, v in trainer.model.state_dict().items()})
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(model(x), reference.eval()(x))
    assert loaded.scaler and loaded.rng["cuda"]


def test_engine_amp_run_on_cuda_writes_a_report(tmp_path):
    import main as cli
    from image_classification.dllog import read_report

    argv = ["/unused", "--data-backend", "synthetic", "--arch", "resnet18", "--dynamic", "--wmul", "0.25",
            "--image-size", "64", "-b", "8", "--epochs", "1", "--prof", "6", "--amp", "--static-loss-scale", "128",
            "--memory-format", "nhwc", "--device", "cuda", "--num-classes", "10", "--workspace", str(tmp_path),
            "--raport-file", "raport.json", "-p", "3", "--no-checkpoints"]
    assert cli.main(argv) == 0
    steps = [e for e in read_report(tmp_path / "raport.json")
             if e["type"] == "LOG" and isinstance(e["step"], list) and len(e["step"]) == 2]
    assert len(steps) == 6 and all(e["data"]["train.grad_scale"] <= 128.0 for e in steps)


@pytest.fixture(scope="module")
def colour_data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("colours"), {"a": 7, "b": 6, "c": 5})


@pytest.mark.parametrize("memory_format", FORMATS, ids=["nchw", "nhwc"])
def test_pytorch_backend_prefetches_to_the_gpu(colour_data, memory_format):
    from dataloading import LoaderOptions, get_loaders

    options = dict(image_size=32, seed=3, memory_format=memory_format)
    cpu = get_loaders(LoaderOptions("pytorch", colour_data, 4, workers=0, device="cpu", train=False, **options)).val
    gpu = get_loaders(LoaderOptions("pytorch", colour_data, 4, workers=2, device="cuda", train=False, **options)).val
    for (cpu_images, cpu_labels), (gpu_images, gpu_labels) in zip(cpu, gpu, strict=True):
        assert gpu_images.is_cuda and gpu_images.is_contiguous(memory_format=memory_format)
        torch.testing.assert_close(gpu_images.cpu(), cpu_images)
        assert torch.equal(gpu_labels.cpu(), cpu_labels)


def _dali():
    from dataloading.dali import dali_available

    if not dali_available():
        pytest.skip("NVIDIA DALI not installed (pip install -r requirements.txt)")


@pytest.mark.parametrize("backend", ["dali-gpu", "dali-cpu"])
def test_dali_loaders_deliver_labelled_batches_on_the_gpu(colour_data, backend):
    _dali()
    from dataloading import LoaderOptions, get_loaders

    loaders = get_loaders(LoaderOptions(backend, colour_data, 4, workers=2, image_size=32, seed=3, device="cuda",
                                        memory_format=torch.channels_last, augmentation="autoaugment"))
    for _ in range(2):  # two epochs: the same number of batches each
        train = [(images, labels) for images, labels in loaders.train]
        assert len(train) == 4
    for images, labels in list(loaders.train) + list(loaders.val):
        assert images.is_cuda and labels.is_cuda and labels.dtype == torch.int64
        assert images.is_contiguous(memory_format=torch.channels_last)
    for images, labels in loaders.val:
        assert torch.equal(dominant_channel(images), labels)


def test_every_library_dali_loads_resolves_on_this_machine():
    _dali()
    from dataloading import dali_libraries

    report = dali_libraries.check()
    assert report.ok, report.describe()


def test_tf32_switch_changes_float32_matmuls():
    from image_classification.cuda_settings import restore_tf32, set_tf32

    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("TF32 needs an Ampere or newer GPU")
    a = torch.randn(1024, 1024, device="cuda")
    exact = (a.double() @ a.double()).float()
    previous = set_tf32(True)
    try:
        tf32 = a @ a
        set_tf32(False)
        ieee = a @ a
    finally:
        restore_tf32(previous)
    assert _relative_error(ieee, exact) < _relative_error(tf32, exact)


def test_two_dali_passes_on_cuda_do_not_leak_device_memory(colour_data):
    _dali()
    from dataloading import LoaderOptions, get_loaders

    loaders = get_loaders(LoaderOptions("dali-gpu", colour_data, 4, workers=2, image_size=32, seed=3, device="cuda"))
    list(loaders.train)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    for _ in range(3):
        list(loaders.train)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() <= before + (1 << 20)
