"""CPU twins of the GPU path (issue "ready for the first GPU run"): equal epochs on every data backend, the info-max
branch off under DDP, NVIDIA's loss scaling, the host synchronizations of a training step (counted in a CUDA-free
emulation), the fused optimizer's groups, the EMA's foreach update, TF32 switching, the DALI install and memory
hints."""
import collections
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

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
            "--workspace", str(workspace), "--raport-file", "raport.json", "-p", "2", "--no-checkpoints", *extra]


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
    assert not any("train.infomax_loss" in e["data"] for e in entries if isinstance(e["step"], list))
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
