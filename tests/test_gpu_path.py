"""CPU twins of the GPU path (issue "ready for the first GPU run"): equal epochs on every data backend, the info-max
branch off under DDP, NVIDIA's loss scaling, the host synchronizations of a training step (counted in a CUDA-free
emulation), the fused optimizer's groups, the EMA's foreach update, TF32 switching, the DALI install and memory
hints."""
import collections
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

import main as cli
from dataloading.dali import dali_available
from image_classification.dllog import read_report
from tests.data_utils import make_dataset

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_24(tmp_path_factory):
    """24 training images (not a whole number of batches of 5) and 13 validation images."""
    root = tmp_path_factory.mktemp("data24")
    return make_dataset(root, {"a": 8, "b": 8, "c": 8}, {"a": 5, "b": 4, "c": 4}, size_range=(36, 48))


def small_run(data_root, workspace, backend, *extra):
    return [str(data_root), "--data-backend", backend, "--arch", "resnet18", "--dynamic", "--wmul", "0.125",
            "--image-size", "32", "-b", "5", "--lr", "0.02", "--device", "cpu", "-j", "1", "--seed", "5",
            "--workspace", str(workspace), "--raport-file", "raport.json", "-p", "1", "--no-checkpoints", *extra]


def steps_per_epoch(report: Path):
    """(training steps, validation steps, EMA validation steps) per epoch, from the report's iteration lines."""
    train, val, val_ema = collections.Counter(), collections.Counter(), collections.Counter()
    for entry in read_report(report):
        step = entry.get("step")
        if entry["type"] != "LOG" or not isinstance(step, list):
            continue
        if len(step) == 2:
            train[step[0]] += 1
        elif len(step) == 3:
            (val_ema if any(k.startswith("val_ema.") for k in entry["data"]) else val)[step[0]] += 1
    epochs = sorted(train)
    return [train[e] for e in epochs], [val[e] for e in epochs], [val_ema[e] for e in epochs]


BACKENDS = ["pytorch", pytest.param("dali-cpu", marks=pytest.mark.skipif(not dali_available(),
                                                                         reason="NVIDIA DALI not installed"))]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("prof", [None, 2])
def test_every_epoch_has_the_same_number_of_steps(data_24, tmp_path, backend, prof):
    """24 images, batch 5: 4 training steps (the partial batch dropped) and 3 validation steps (5, 5, 3) in every
    epoch, for the model and its EMA; with --prof 2, 2 of each. DALI used to alternate 4, 1, 4, 1."""
    extra = ["--epochs", "4", "--use-ema", "0.9"] + (["--prof", str(prof)] if prof else [])
    assert cli.main(small_run(data_24, tmp_path, backend, *extra)) == 0
    train, val, val_ema = steps_per_epoch(tmp_path / "raport.json")
    expected_train, expected_val = (4, 3) if prof is None else (2, 2)
    assert train == [expected_train] * 4
    assert val == [expected_val] * 4
    assert val_ema == [expected_val] * 4


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_infomax_weight_zero_trains_under_two_process_ddp(data_24, tmp_path):
    """--dynamic --infomax-weight 0 on 2 gloo processes: the decoders are out of the graph, so DDP (without
    find_unused_parameters) finishes every step; it used to fail at the second ("Expected to have finished
    reduction in the prior iteration")."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, str(ROOT / "multiproc.py"), "--nproc_per_node", "2", "--master_port",
               str(_free_port()), str(ROOT / "main.py"),
               *small_run(data_24, tmp_path, "pytorch", "--epochs", "2", "--infomax-weight", "0", "-j", "0")]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    train, val, _ = steps_per_epoch(tmp_path / "raport.json")
    assert train == [2, 2] and val == [2, 2]  # 24 images over 2 ranks: 12 each, 2 steps of 5; 13 val: 7 and 6
    entries = [e for e in read_report(tmp_path / "raport.json") if e["type"] == "LOG"]
    # the report keeps every key of its layout: the info-max loss is there, without a value
    assert not any(e["data"].get("train.infomax_loss") is not None for e in entries if isinstance(e["step"], list))
    assert any(e["step"] == [] and "val.top1" in e["data"] for e in entries)


def test_infomax_weight_zero_takes_the_decoders_out_of_the_graph():
    from image_classification.models import build_model, disable_info_max
    from image_classification.optim import build_optimizer

    torch.manual_seed(0)
    model = build_model("resnet18", dynamic=True, num_classes=3, wmul=0.125)
    optimizer = build_optimizer(model, "sgd", 0.1, 0.9, 1e-4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    disable_info_max(model)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    decoders = {n: p for n, p in model.named_parameters() if ".attn.decoder." in n}
    assert decoders and all(p.grad is None and not p.requires_grad for p in decoders.values())
    others = [p for n, p in model.named_parameters() if n not in decoders]
    assert all(p.grad is not None for p in others)  # everything else still trains
    optimizer.step()
    state = model.state_dict()
    assert set(state) == set(before)  # the checkpoint keys (the release's) are unchanged
    assert all(torch.equal(state[n], before[n]) for n in decoders)


# --- the DALI install: every library its backend loads resolves -------------------------------------------------

needs_dali = pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI not installed")


def _pinned_dali() -> str:
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    return next(line.split("==")[0] for line in lines if line.startswith("nvidia-dali"))


@needs_dali
def test_every_library_that_dalis_backend_loads_resolves():
    """The plain-venv GPU install is coherent: DALI's libraries, the CUDA libraries they dlopen (NPP, cuFFT, the
    runtime, nvJPEG through nvImageCodec) and their own dependencies are all in the environment. Runs on the CPU."""
    from dataloading import dali_libraries

    report = dali_libraries.check()
    pinned = _pinned_dali().replace("-", "_")
    hint = (f"\n(requirements.txt pins {pinned}; this environment has {report.distribution}: "
            "pip uninstall -y nvidia-dali-cuda120 && pip install -r requirements.txt)")
    assert report.ok, report.describe() + hint
    assert report.checked >= 10  # DALI's own libraries, nvImageCodec, NPP, cuFFT... were looked at


@needs_dali
def test_the_library_check_finds_a_missing_dlopened_library_and_its_runpath(tmp_path):
    """A DALI-like library whose code names libnppc for dlopen: missing until it lies where its RUNPATH points."""
    from dataloading import dali_libraries

    real = os.path.join(dali_libraries.dali_folder(), "libdali_core.so")
    fake_dali = tmp_path / "nvidia" / "dali"
    fake_dali.mkdir(parents=True)
    library = fake_dali / "libdali_fake.so"
    library.write_bytes(Path(real).read_bytes() + b"\0libnppc.so.777\0")
    report = dali_libraries.check(str(fake_dali))
    assert list(report.missing) == ["libnppc.so.777"] and not report.ok
    assert "libnppc.so.777 (needed by nvidia/dali/libdali_fake.so)" in report.describe()
    npp = tmp_path / "nvidia" / "npp" / "lib"  # the DALI wheels' RUNPATH has $ORIGIN/../npp/lib
    npp.mkdir(parents=True)
    (npp / "libnppc.so.777").write_bytes(Path(real).read_bytes())
    assert dali_libraries.check(str(fake_dali)).ok


@pytest.mark.skipif(not __import__("shutil").which("readelf"), reason="binutils' readelf not installed")
def test_the_elf_reader_agrees_with_readelf():
    from dataloading import dali_libraries

    path = os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")
    info = dali_libraries.read_elf(path, scan_dlopen=False)
    listing = subprocess.run(["readelf", "-d", path], capture_output=True, text=True, check=True).stdout
    needed = [line.split("[")[1].rstrip("]") for line in listing.splitlines() if "(NEEDED)" in line]
    assert info.needed == needed and len(needed) > 3


# --- loss scaling as NVIDIA's -----------------------------------------------------------------------------------


def _overflow_then_good_steps(scaler, good_steps: int) -> list:
    """Scales seen by a GradScaler over one overflowing step and then ``good_steps`` finite ones (on the CPU)."""
    weight = nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([weight], lr=0.0)
    scales = [scaler.get_scale()]
    for step in range(1 + good_steps):
        loss = (weight * (float("inf") if step == 0 else 1.0)).sum()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
        scales.append(scaler.get_scale())
    return scales


def test_static_loss_scale_backs_off_on_overflow_and_never_grows():
    from image_classification.training import loss_scaler

    scales = _overflow_then_good_steps(loss_scaler("cpu", True, 128.0, dynamic_loss_scale=False), 250)
    assert scales[0] == 128.0 and scales[1] == 64.0 and set(scales[1:]) == {64.0}


def test_dynamic_loss_scale_grows_every_100_good_steps():
    from image_classification.training import loss_scaler

    scales = _overflow_then_good_steps(loss_scaler("cpu", True, 128.0, dynamic_loss_scale=True), 250)
    assert scales[:2] == [128.0, 64.0]
    assert scales[100] == 64.0 and scales[101] == 128.0 and scales[201] == 256.0


def test_amp_without_either_starts_where_nvidias_does(monkeypatch):
    """NVIDIA's GradScaler: init_scale=--static-loss-scale (default 1), growth only with --dynamic-loss-scale."""
    from image_classification import training

    calls = []
    real = training.loss_scaler
    monkeypatch.setattr(training, "loss_scaler", lambda *args, **kw: calls.append((args, kw)) or real(*args, **kw))
    args = cli.parse_args(["/data", "--amp"])
    with warnings.catch_warnings():  # without CUDA the scaler disables itself, with a warning
        warnings.simplefilter("ignore")
        training.Precision.create(args.amp, torch.device("cuda"), args.static_loss_scale, args.dynamic_loss_scale)
    assert calls == [(("cuda", True, 1.0, False), {})]
    scales = _overflow_then_good_steps(real("cpu", True, 1.0, False), 150)
    assert scales[0] == 1.0 and set(scales[1:]) == {0.5}
    with pytest.raises(ValueError, match="--static-loss-scale must be positive"):
        real("cpu", True, 0.0)


def test_help_says_what_each_loss_scale_option_does(capsys):
    with pytest.raises(SystemExit):
        cli.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "halves on a step whose gradients overflow" in text and "never grows" in text
    assert "x2 after every 100 steps without an overflow" in text
    assert "NVIDIA's default: 1" in text


# --- the training step's host synchronizations, counted in a CUDA-free emulation ------------------------------

SYNCING = {"item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__", "__format__"}


class HostReads(TorchFunctionMode):
    """Counts the tensor operations that make the host wait for a CUDA device: reading a value (``item``,
    ``tolist``, ``float()``, ``bool()``, formatting) or copying it to the host (``cpu``, ``numpy``). On the CPU
    nothing waits, but the same Python calls are made, so the count is the CUDA step's. (A ``.to("cpu")`` cannot be
    told from a no-op move on the CPU: the step has none, and the device code never names the CPU.)"""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in SYNCING:
            self.calls.append(func.__name__)
        return func(*args, **(kwargs or {}))


def _emulated_cuda_trainer(fused: bool, print_freq: int, accumulation: int = 1, infomax_weight: float = 1e-3):
    """A Trainer set up as on CUDA (loss scaling, the optimizer main.py builds for CUDA, mixup, info-max, EMA),
    on CPU tensors: a PEDConv ResNet-18 (wmul 0.125) on 16x16 images."""
    from image_classification.distributed import Context
    from image_classification.dllog import Report
    from image_classification.ema import EMA
    from image_classification.losses import Mixup, SoftTargetCrossEntropy
    from image_classification.models import build_model
    from image_classification.optim import build_optimizer
    from image_classification.training import Precision, Trainer, loss_scaler

    torch.manual_seed(0)
    model = build_model("resnet18", dynamic=True, num_classes=3, wmul=0.125)
    if fused:
        optimizer = build_optimizer(model, "sgd", 0.01, 0.9, 1e-4, device_type="cuda")  # fused SGD (runs on CPU)
    else:
        optimizer = build_optimizer(model, "sgd", 0.01, 0.9, 1e-4)
    precision = Precision(False, "cpu", torch.float32, loss_scaler("cpu", True, 128.0, True))
    context = Context(0, 1, 0, torch.device("cpu"))
    trainer = Trainer(model, SoftTargetCrossEntropy(0.1), optimizer, precision, context, Report(None, print_freq),
                      accumulation=accumulation, infomax_weight=infomax_weight, mixup=Mixup(0.2, 3, 0.1),
                      ema=EMA(model, 0.9))
    loader = [(torch.randn(4, 3, 16, 16), torch.randint(0, 3, (4,))) for _ in range(6)]
    return trainer, loader


@pytest.mark.parametrize("print_freq, accumulation", [(3, 1), (2, 2), (1, 1)])
def test_a_training_step_reads_the_device_only_at_logging_steps(print_freq, accumulation):
    """6 steps: one host read per --print-freq interval and none in between (loss, info-max loss, loss scale and
    stop flag stay on the device; mixup draws on the device; the fused SGD takes the scaler's overflow check)."""
    trainer, loader = _emulated_cuda_trainer(fused=True, print_freq=print_freq, accumulation=accumulation)
    with HostReads() as reads:
        means = trainer.train_epoch(loader, 0, 0.01)
    assert reads.calls == ["tolist"] * (6 // print_freq), reads.calls
    assert torch.isfinite(torch.tensor(means["train.loss"])) and means["train.grad_scale"] == 128.0
    assert "train.infomax_loss" in means


def test_the_emulation_sees_a_synchronization_inside_torch():
    """The counter is not blind: the GradScaler's overflow check with an unfused optimizer reads the device once
    per optimizer step (why CUDA runs take torch's fused SGD)."""
    trainer, loader = _emulated_cuda_trainer(fused=False, print_freq=3)
    with HostReads() as reads:
        trainer.train_epoch(loader, 0, 0.01)
    assert reads.calls.count("tolist") == 2 and reads.calls.count("item") == 6


def test_a_stop_request_waits_for_the_next_logging_step():
    trainer, loader = _emulated_cuda_trainer(fused=True, print_freq=3)
    trainer.stop.requested = True  # as if SIGTERM came before the first step
    trainer.train_epoch(loader, 0, 0.01)
    assert trainer.stop.requested
    trainer2, _ = _emulated_cuda_trainer(fused=True, print_freq=3)
    steps = []
    trainer2.report.log = lambda step, data, verbose=True: steps.append(step)
    trainer2.stop.requested = True
    trainer2.train_epoch(loader, 0, 0.01)
    assert steps == [(0, 1), (0, 2), (0, 3)]  # the whole first interval ran, then the loop stopped


def test_a_non_finite_loss_stops_at_the_logging_step_naming_its_iteration():
    trainer, loader = _emulated_cuda_trainer(fused=True, print_freq=3)
    loader[1] = (torch.full((4, 3, 16, 16), float("nan")), loader[1][1])
    with pytest.raises(FloatingPointError, match="iteration 2"):
        trainer.train_epoch(loader, 0, 0.01)


# --- the optimizer, the EMA, TF32, the PEDConv path on CUDA, DALI's decoder memory -----------------------------


def test_the_cuda_optimizer_is_fused_and_keeps_the_no_decay_groups():
    from image_classification.models import build_model
    from image_classification.optim import build_optimizer, parameter_groups

    model = build_model("resnet18", dynamic=True, num_classes=3, wmul=0.125)
    expected = parameter_groups(model, 1e-4)
    sgd = build_optimizer(model, "sgd", 0.1, 0.9, 1e-4, nesterov=True, device_type="cuda")
    assert all(group["fused"] for group in sgd.param_groups) and sgd._step_supports_amp_scaling
    for group, reference in zip(sgd.param_groups, expected):
        assert [id(p) for p in group["params"]] == [id(p) for p in reference["params"]]
        assert group["weight_decay"] == reference["weight_decay"]
    assert sgd.param_groups[1]["weight_decay"] == 0.0 and sgd.param_groups[0]["nesterov"]
    rmsprop = build_optimizer(model, "rmsprop", 0.1, 0.9, 1e-4, device_type="cuda")
    assert all(group["foreach"] for group in rmsprop.param_groups)
    cpu = build_optimizer(model, "sgd", 0.1, 0.9, 1e-4)
    assert not any(group["fused"] for group in cpu.param_groups)


def test_apex_is_used_only_when_asked_and_says_how_to_get_it():
    from image_classification.models import build_model
    from image_classification.optim import build_optimizer

    model = build_model("resnet18", dynamic=False, num_classes=3, wmul=0.125)
    with pytest.raises(ValueError, match="SGD on CUDA only"):
        build_optimizer(model, "rmsprop", 0.1, 0.9, 1e-4, device_type="cuda", implementation="apex")
    try:
        import apex.optimizers  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="needs NVIDIA apex"):
            build_optimizer(model, "sgd", 0.1, 0.9, 1e-4, device_type="cuda", implementation="apex")
    assert "apex" not in sys.modules or "apex.optimizers" in sys.modules  # nothing imports apex unasked


def test_ema_update_is_the_closed_form_in_a_few_kernels():
    """avg <- d avg + (1 - d) value with d = min(decay, (1 + step) / (10 + step)); integer buffers copied; the number
    of tensor operations does not grow with the number of tensors (foreach)."""
    from image_classification.ema import EMA

    counts = []
    for width in (1, 4):
        torch.manual_seed(0)
        model = nn.Sequential(*[nn.Sequential(nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2)) for _ in range(width)])
        ema = EMA(model, 0.99)
        start = {k: v.clone() for k, v in ema.module.state_dict().items()}
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.num_batches_tracked += 3
        calls = []

        class Count(TorchFunctionMode):  # operations that compute (not attribute reads, views, grad mode)
            def __torch_function__(self, func, types, args=(), kwargs=None):
                if getattr(func, "__name__", "") not in ("__get__", "detach", "_set_grad_enabled"):
                    calls.append(func)
                return func(*args, **(kwargs or {}))

        with Count():
            ema.update(model)
        counts.append(len(calls))
        decay = min(0.99, 1.0 / 10.0)
        current = model.state_dict()
        for name, value in ema.module.state_dict().items():
            if value.dtype.is_floating_point:
                assert torch.allclose(value, decay * start[name] + (1 - decay) * current[name]), name
            else:
                assert torch.equal(value, current[name]), name
    assert counts[0] == counts[1] <= 4, counts


def test_tf32_is_switched_on_and_off_without_touching_cuda():
    from image_classification.cuda_settings import restore_tf32, set_tf32

    previous = set_tf32(True)
    try:
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
        assert torch.backends.cudnn.conv.fp32_precision == "tf32"
        set_tf32(False)
        assert torch.backends.cuda.matmul.fp32_precision == "ieee"
        assert torch.backends.cudnn.conv.fp32_precision == "ieee"
    finally:
        restore_tf32(previous)
    assert cli.parse_args(["/data"]).tf32 and not cli.parse_args(["/data", "--no-tf32"]).tf32


def test_pedconv_keeps_channels_last_on_cuda_by_taking_the_nhwc_path():
    """On CUDA, channels_last k x k layers take the unfold path (NHWC throughout) where the CPU rule would fold the
    batch into the channels (NCHW); NCHW layers and the CPU keep the measured rule."""
    import pedconv

    big_map = (64, 64, (3, 3), 1, (56, 56))
    assert pedconv.choose_method(*big_map) == "grouped"
    assert pedconv.choose_method(*big_map, device_type="cuda", channels_last=False) == "grouped"
    assert pedconv.choose_method(*big_map, device_type="cuda", channels_last=True) == "unfold"
    assert pedconv.choose_method(*big_map, device_type="cpu", channels_last=True) == "grouped"
    assert pedconv.choose_method(64, 64, (3, 3), 2, (56, 56), device_type="cuda", channels_last=True) == "grouped"


def test_the_unfold_path_is_channels_last_in_and_out_without_an_nchw_copy():
    """What CUDA runs for channels_last (the unfold path), checked on the CPU: equal to the release's computation,
    channels_last output and input gradient, and no NCHW copy of the activations (no ``contiguous()`` call)."""
    import pedconv

    torch.manual_seed(0)
    layer = pedconv.PEDConv2d(8, 8, 3, padding=1, method="unfold", noise_std=0.0)
    reference = pedconv.PEDConv2d(8, 8, 3, padding=1, method="reference", noise_std=0.0)
    reference.load_state_dict(layer.state_dict())
    x = torch.randn(3, 8, 10, 10).contiguous(memory_format=torch.channels_last).requires_grad_()
    calls = []

    class Count(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") == "contiguous" and (kwargs or {}).get(
                    "memory_format", args[1] if len(args) > 1 else torch.contiguous_format) == torch.contiguous_format:
                calls.append(func)
            return func(*args, **(kwargs or {}))

    with Count():
        y = layer(x)
        y.sum().backward()
    assert not calls
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert x.grad.is_contiguous(memory_format=torch.channels_last)
    x_ref = x.detach().clone().requires_grad_()
    y_ref = reference(x_ref)
    y_ref.sum().backward()
    assert torch.allclose(y, y_ref, atol=1e-5) and torch.allclose(x.grad, x_ref.grad, atol=1e-5)


def test_dali_decoder_memory_is_bounded_per_rank():
    """-j 8 on 8 ranks: NVIDIA's sizes pin 2 x 134 MiB x 8 threads x 2 pipelines x 8 ranks = 34 GiB of host memory;
    the scaled hints pin 512 MiB per rank (4 GiB per node), and NVIDIA's sizes are kept where they fit."""
    from dataloading import dali

    def pinned_per_rank(threads):
        hints = [dali.decoder_memory_hints(threads, 64, training) for training in (True, False)]
        return sum(2 * threads * h["host_memory_padding"] for h in hints)

    assert pinned_per_rank(8) == 512 << 20
    nvidia_per_node = 2 * dali.NVIDIA_HOST_MEMORY_PADDING * 8 * 2 * 8
    assert nvidia_per_node > 33 << 30 and 8 * pinned_per_rank(8) == 4 << 30
    hints = dali.decoder_memory_hints(8, 64)
    assert hints["device_memory_padding"] * 8 == 512 << 20
    assert hints["preallocate_width_hint"] == hints["preallocate_height_hint"] > 1500
    one = dali.decoder_memory_hints(1, 64)
    assert one["device_memory_padding"] == dali.NVIDIA_DEVICE_MEMORY_PADDING  # fits: NVIDIA's size
    many = dali.decoder_memory_hints(64, 64)
    assert many["host_memory_padding"] == dali.DALI_HOST_MEMORY_PADDING  # never below DALI's default


# --- benchmarks/gpu_check.py and the cuda marker -----------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what happens without CUDA")
def test_gpu_check_without_cuda_exits_2_with_one_line(tmp_path):
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--out", str(out)],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "no CUDA device" in lines[0] and not result.stdout
    assert not out.exists()


def test_gpu_check_reads_the_benchmarks_and_pytests_summaries():
    from benchmarks.gpu_check import parse_pytest_counts, parse_ratios

    layers = "cin cout ...\nRATIO resnet18 fast/static = 1.084\nRATIO resnet18 unfold/static = 1.210\n"
    models = ("           static:      12.0 ms/step\n"
              "RATIO time fast/static = 1.031   memory fast/static = 1.142\n"
              "RATIO time fast+amp+nhwc/static+amp+nhwc = 1.250   memory fast+amp+nhwc/static+amp+nhwc = 1.100\n")
    assert parse_ratios(layers) == {"resnet18 fast/static": 1.084, "resnet18 unfold/static": 1.21}
    assert parse_ratios(models) == {"time fast/static": 1.031, "memory fast/static": 1.142,
                                    "time fast+amp+nhwc/static+amp+nhwc": 1.25,
                                    "memory fast+amp+nhwc/static+amp+nhwc": 1.1}
    summary = "....F.s\nFAILED tests/test_cuda.py::x\n1 failed, 19 passed, 5 skipped, 443 deselected in 80.1s\n"
    assert parse_pytest_counts(summary) == {"failed": 1, "passed": 19, "skipped": 5, "deselected": 443}


def test_the_cuda_marker_selects_at_least_15_tests_skipped_here_with_the_reason(tmp_path):
    result = subprocess.run([sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-rs", "--strict-markers",
                             "-p", "no:cacheprovider", str(ROOT / "tests")], cwd=ROOT, capture_output=True,
                            text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    counts = __import__("benchmarks.gpu_check", fromlist=["x"]).parse_pytest_counts(result.stdout)
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the cuda tests ran instead")
    assert result.returncode == 0, result.stdout[-2000:]
    assert counts.get("skipped", 0) >= 15 and "passed" not in counts and "failed" not in counts
    assert "needs a CUDA GPU" in result.stdout
