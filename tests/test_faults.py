"""Faults and hostile input (issue 19): kills and full disks during writes, broken report lines, stale temporary
files, decompression bombs and damaged JPEGs, symlink loops, unreadable folders, bad arguments, NaN weights.

Each test is numbered by the case it covers; every one failed before its fix. A full disk is a real tmpfs where an
unprivileged mount namespace can be made (``unshare -rm``), else a write that raises ENOSPC; a short write is made
by RLIMIT_FSIZE in a subprocess.
"""
import errno
import io
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import checkpoint2model
import classify
import export_onnx
import main as cli
from dataloading import DataError, LoaderOptions, get_loaders, integrity, list_image_folder
from dataloading.dali import dali_available
from image_classification import atomic_files, checkpoints
from image_classification.dllog import Report, read_report
from image_classification.models import build_model
from image_classification.report import load_run
from tests.data_utils import make_dataset, make_image_folder, write_garbage_jpeg, write_jpeg

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
needs_dali = pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI not installed")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"), {"a": 6, "b": 6}, {"a": 2, "b": 2}, size_range=(36, 40))


def tiny(data_root, workspace, *extra):
    return [str(data_root), "--arch", "resnet18", "--wmul", "0.125", "--image-size", "32", "-b", "4", "-j", "0",
            "--device", "cpu", "--seed", "1", "--workspace", str(workspace), "--raport-file", "raport.json",
            "--epochs", "1", "-p", "100", *extra]


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def temporaries(folder: Path):
    return [p.name for p in folder.iterdir() if atomic_files.TEMPORARY_NAME.match(p.name)]


# --------------------------------------------------------------------------------------------------------------
# 1, 3: kill -9 while model_best is written; the stale temporary file it leaves


KILLING_RUN = textwrap.dedent("""
    import os, signal, sys
    from image_classification import atomic_files, checkpoints, training

    def validate(self, loader, epoch, model=None, prefix="val"):  # every epoch a new best: 10, 20, 30 %
        return {f"{prefix}.top1": 10.0 * (epoch + 1), f"{prefix}.top5": 100.0, f"{prefix}.loss": 1.0}

    training.Trainer.validate = validate
    kill_at, saves, save = int(os.environ.get("KILL_AT_BEST", "0")), [], checkpoints.save_checkpoint

    def save_or_die(obj, path):
        if os.path.basename(path) == "model_best.pth.tar":
            saves.append(path)
            if len(saves) == kill_at:  # killed halfway through writing the file
                with atomic_files.atomic_path(path) as temporary, open(temporary, "wb") as stream:
                    stream.write(b"PK half a checkpoint")
                    stream.flush()
                    os.kill(os.getpid(), signal.SIGKILL)
        save(obj, path)

    checkpoints.save_checkpoint = save_or_die
    import main
    sys.exit(main.main(sys.argv[1:]))
""")


def test_1_3_a_kill_while_model_best_is_written_loses_no_best_and_leaves_no_temporary(tmp_path, monkeypatch,
                                                                                       caplog):
    workspace = tmp_path / "ws"
    argv = [sys.executable, "-c", KILLING_RUN, "synthetic", "--data-backend", "synthetic", "--prof", "2", "--num-classes", "10",
            "--arch", "resnet18", "--wmul", "0.125", "--image-size", "32", "-b", "2", "--device", "cpu",
            "--workspace", str(workspace), "--raport-file", "raport.json", "--epochs", "3"]
    killed = subprocess.run(argv, env=dict(ENV, KILL_AT_BEST="2"), capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    recorded = checkpoints.load_checkpoint(workspace / "checkpoint.pth.tar")
    best = checkpoints.load_checkpoint(workspace / "model_best.pth.tar")
    assert recorded.best_prec1 == best.best_prec1 == best.epoch * 10.0  # the best it records is on disk
    assert len(temporaries(workspace)) == 1  # what the kill left

    from image_classification import training  # the resumed run, in this process (no second start-up)

    monkeypatch.setattr(training.Trainer, "validate", lambda self, loader, epoch, model=None, prefix="val": {
        f"{prefix}.top1": 10.0 * (epoch + 1), f"{prefix}.top5": 100.0, f"{prefix}.loss": 1.0})
    with caplog.at_level(logging.INFO):
        assert cli.main(argv[3:] + ["--resume", str(workspace / "checkpoint.pth.tar")]) == 0
    assert any("removed 1 temporary file(s) left by an interrupted save" in r.getMessage() for r in caplog.records)
    assert temporaries(workspace) == []
    final, best = (checkpoints.load_checkpoint(workspace / name)
                   for name in ("checkpoint.pth.tar", "model_best.pth.tar"))
    assert (final.epoch, final.best_prec1) == (best.epoch, best.best_prec1) == (3, 30.0)


def test_3_only_this_projects_temporaries_of_dead_writers_are_removed(tmp_path):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(finished.stdout)
    stale = tmp_path / f".checkpoint.pth.tar.{dead}-abcd_123.tmp.tar"
    live = tmp_path / f".model_best.pth.tar.{os.getpid()}-abcd_123.tmp.tar"
    others = [tmp_path / "notes.tmp", tmp_path / f".checkpoint.pth.tar.{dead}.tmp.tar", tmp_path / "checkpoint.pth.tar"]
    nested = tmp_path / "sub" / stale.name
    nested.parent.mkdir()
    for path in [stale, live, nested, *others]:
        path.write_bytes(b"x")
    assert atomic_files.remove_stale_temporaries(str(tmp_path)) == [str(stale)]
    assert not stale.exists() and live.exists() and nested.exists() and all(p.exists() for p in others)


# --------------------------------------------------------------------------------------------------------------
# 2: report lines whole or not at all; readers skip a broken last line


def test_2_a_short_write_leaves_no_half_report_line(tmp_path):
    """RLIMIT_FSIZE makes the write that crosses the limit short, then fail, as a filling disk does."""
    path = tmp_path / "raport.json"
    script = textwrap.dedent(f"""
        import resource, signal
        from image_classification.dllog import Report
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        report = Report({str(path)!r}, 1)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))
        for step in range(1, 200):
            report.log([1, step], {{"train.loss": 1.0 / step, "note": "x" * 100}}, verbose=False)
        report.close()
    """)
    result = subprocess.run([sys.executable, "-c", script], env=ENV, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("dropping its lines") == 1
    text = path.read_text()
    assert text.endswith("\n") and len(text) <= 20000
    lines = text.splitlines()
    assert all(json.loads(line[5:]) for line in lines)  # every line whole
    assert any('"step": [1, 1]' in line for line in lines)


def _report_with_broken_last_line(path: Path) -> None:
    report = Report(str(path), 1)
    report.parameters({"arch": "resnet18", "dynamic": True, "wmul": 0.25})
    for step in (1, 2):
        report.log([1, step], {"train.loss": 2.0, "train.lr": 0.1, "train.total_ips": 10.0}, verbose=False)
    report.log([1], {"val.top1": 50.0, "train.loss": 2.0}, verbose=False)
    report.close()
    with open(path, "a") as stream:
        stream.write('DLLL {"timestamp": "17327900')  # a write cut short


def test_2_readers_skip_a_broken_last_line_with_one_warning(tmp_path, caplog):
    path = tmp_path / "raport.json"
    _report_with_broken_last_line(path)
    with caplog.at_level(logging.WARNING):
        entries = list(read_report(path))
        run = load_run(str(path))  # the report tool; the benchmarks read through read_report too
    assert [e["step"] for e in entries if e["type"] == "LOG"] == ["PARAMETER", [1, 1], [1, 2], [1]]
    assert len(run.iterations) == 2 and run.epochs[1]["val.top1"] == 50.0
    warnings = [r.getMessage() for r in caplog.records if "broken last line" in r.getMessage()]
    assert len(warnings) == 2 and all(str(path) in w for w in warnings)  # one per read
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-3] + lines[-1:] + lines[-3:-1]) + "\n")  # the broken line in the middle
    with pytest.raises(ValueError, match="line .* is broken"):
        list(read_report(path))


def test_2_a_reopened_report_drops_the_broken_line_before_appending(tmp_path):
    path = tmp_path / "raport.json"
    _report_with_broken_last_line(path)
    report = Report(str(path), 1, resume=True)  # a resumed run
    report.log([2, 1], {"train.loss": 1.0}, verbose=False)
    report.close()
    assert [e["step"] for e in read_report(path) if e["type"] == "LOG"][-1] == [2, 1]
    assert all(json.loads(line[5:]) for line in path.read_text().splitlines())


# --------------------------------------------------------------------------------------------------------------
# 4, 5: decompression bombs and damaged JPEGs


def write_jpeg_bomb(path: Path, width: int = 20000, height: int = 20000) -> Path:
    """A small JPEG (about 1 KB) whose frame header declares ``width`` x ``height`` pixels."""
    write_jpeg(path, (90, 90, 90), 16, 16, random.Random(0))
    data = bytearray(path.read_bytes())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    path.write_bytes(bytes(data))
    assert path.stat().st_size < 2000
    return path


def write_png_bomb(path: Path) -> Path:
    from PIL import Image

    Image.new("RGB", (8, 8)).save(path)
    data = bytearray(path.read_bytes())
    data[16:24] = (30000).to_bytes(4, "big") + (30000).to_bytes(4, "big")
    path.write_bytes(bytes(data))
    return path


def write_undecodable_jpeg(path: Path) -> Path:
    """A JPEG whose header is well formed but names a quantization table it never defines: only a decoder notices."""
    write_jpeg(path, (120, 120, 120), 40, 40, random.Random(1))
    data = bytearray(path.read_bytes())
    sof = data.index(b"\xff\xc0")
    for component in range(data[sof + 9]):
        data[sof + 10 + 3 * component + 2] = 3
    path.write_bytes(bytes(data))
    return path


def test_4_the_quick_scan_reads_the_declared_size(tmp_path):
    jpeg, png = write_jpeg_bomb(tmp_path / "bomb.jpg"), write_png_bomb(tmp_path / "bomb.png")
    assert "declares 20000 x 20000 pixels, more than the limit of 178956970" in integrity.quick_error(str(jpeg))
    assert "declares 30000 x 30000 pixels" in integrity.quick_error(str(png))
    fine = write_jpeg_bomb(tmp_path / "fine.jpg", 13000, 13000)  # under the limit: a header alone is no reason
    assert integrity.quick_error(str(fine)) is None


@pytest.mark.parametrize("backend", ["pytorch", pytest.param("dali-cpu", marks=needs_dali)])
def test_4_every_backend_skips_a_decompression_bomb(tmp_path, backend, caplog):
    root = make_dataset(tmp_path / "data", {"a": 4, "b": 4}, size_range=(36, 40))
    bomb = write_jpeg_bomb(root / "val" / "a" / "a_bomb.jpg")
    with caplog.at_level(logging.WARNING):
        val = get_loaders(LoaderOptions(backend, root, 4, workers=0 if backend == "pytorch" else 1, image_size=32,
                                        device="cpu", train=False)).val
        images = sum(len(labels) for _, labels in val)
    assert images == 8  # the bomb is neither decoded nor counted
    assert any(str(bomb) in record.getMessage() for record in caplog.records)


def test_5_the_quick_scan_catches_damaged_jpeg_headers(tmp_path):
    path = write_jpeg(tmp_path / "x.jpg", (10, 200, 10), 48, 40, random.Random(2))
    data = bytearray(path.read_bytes())
    rng = random.Random(5)
    for index in range(20, len(data) - 2):  # the start and the end are intact
        data[index] = rng.randrange(256)
    path.write_bytes(bytes(data))
    assert integrity.quick_error(str(path)).startswith("broken JPEG header")


@needs_dali
def test_5_a_dali_decode_failure_names_the_file_and_the_next_run_skips_it(tmp_path, capsys, caplog):
    root = make_dataset(tmp_path / "data", {"a": 6, "b": 6}, {"a": 2, "b": 2}, size_range=(36, 40))
    bad = write_undecodable_jpeg(root / "train" / "a" / "a_0002.jpg")
    assert integrity.quick_error(str(bad)) is None  # gets past the quick scan
    argv = tiny(root, tmp_path / "ws", "--data-backend", "dali-cpu", "-j", "1", "--training-only")
    assert cli.main(argv) == 2
    message = one_line_error(capsys)
    assert f"DALI cannot decode train image {bad}" in message and "the next run skips it" in message
    with caplog.at_level(logging.WARNING):
        assert cli.main(argv) == 0
    assert any(f"skipping unreadable train image {bad}" in r.getMessage() for r in caplog.records)


@needs_dali
def test_5_a_decode_failure_dali_does_not_name_is_found_with_pil(tmp_path):
    root = make_dataset(tmp_path / "data", {"a": 4, "b": 4}, size_range=(36, 40))
    bad = write_undecodable_jpeg(root / "train" / "b" / "b_0001.jpg")
    train = get_loaders(LoaderOptions("dali-cpu", root, 4, workers=1, image_size=32, device="cpu", val=False)).train
    error = RuntimeError("Critical error in pipeline:\nError in CPU operator "
                         "`nvidia.dali.fn.decoders.image_random_crop`\nencountered:\n\nnvImageCodec failure: '#3'\n"
                         "Current pipeline object is no longer valid.")
    message = train._failure_message(error)
    assert f"DALI cannot decode train image {bad}" in message
    assert str(bad) in integrity.find_unreadable(list_image_folder(root, "train"), "quick")  # cached for the next run


# --------------------------------------------------------------------------------------------------------------
# 6, 7, 8: symlink loops, unreadable folders, a run of unreadable files


def test_6_a_symlink_loop_is_followed_once(tmp_path, caplog):
    make_image_folder(tmp_path / "train", {"a": 3, "b": 2})
    (tmp_path / "train" / "a" / "loop").symlink_to(".")
    (tmp_path / "train" / "a" / "again.jpg").symlink_to("a_0000.jpg")
    make_image_folder(tmp_path / "train" / "b", {"sub": 1}, seed=3)
    (tmp_path / "train" / "b" / "sub" / "up").symlink_to("..")  # a loop one level down
    outside = tmp_path / "elsewhere"
    make_image_folder(outside, {"b": 2}, seed=5)
    (tmp_path / "train" / "b" / "more").symlink_to(outside / "b")  # a link to a real folder is followed
    with caplog.at_level(logging.WARNING):
        listing = list_image_folder(tmp_path, "train")
    assert [label for _, label in listing.samples] == [0] * 3 + [1] * (2 + 2 + 1)
    assert len({os.path.realpath(path) for path, _ in listing.samples}) == len(listing)
    warned = [r.getMessage() for r in caplog.records if "listed once" in r.getMessage()]
    assert len(warned) == 2 and "train/a " in warned[0] and "train/b " in warned[1]


def test_7_an_unreadable_class_folder_is_reported_as_unreadable(tmp_path, monkeypatch):
    make_image_folder(tmp_path / "train", {"a": 2, "b": 2})
    locked = tmp_path / "train" / "b"
    locked.chmod(0)
    try:
        if os.access(locked, os.R_OK):  # root reads anyway: refuse the listing as a permission check would
            scandir = os.scandir

            def refusing(path="."):
                if os.fspath(path) == str(locked):
                    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
                return scandir(path)

            monkeypatch.setattr(os, "scandir", refusing)
        with pytest.raises(DataError, match=f"cannot read class folder {locked}: Permission denied"):
            list_image_folder(tmp_path, "train")
    finally:
        locked.chmod(0o755)


def test_8_a_run_of_unreadable_images_is_a_one_line_error(tmp_path, capsys):
    root = tmp_path / "data"
    make_image_folder(root / "train", {"a": 4, "b": 4})
    for index in range(20):
        write_garbage_jpeg(root / "train" / "a" / f"a_bad_{index:02d}.jpg", seed=index)  # sorted before a_good
    for path in (root / "train" / "a").glob("a_0*.jpg"):
        path.rename(path.with_name(path.name.replace("a_0", "a_good_0")))
    assert cli.main(tiny(root, tmp_path / "ws", "--data-backend", "pytorch", "--training-only")) == 2
    assert "unreadable images in a row" in one_line_error(capsys)


# --------------------------------------------------------------------------------------------------------------
# 9, 10, 11: arguments and output paths checked before any work


@pytest.mark.parametrize("extra, message", [
    (["--lr", "nan"], "--lr must be a positive number, got nan"),
    (["--lr", "inf"], "--lr must be a positive number, got inf"),
    (["--lr", "-0.1"], "--lr must be a positive number, got -0.1"),
    (["--momentum", "nan"], "--momentum must be in [0, 1), got nan"),
    (["--epochs", "0"], "--epochs must be at least 1, got 0"),
    (["--epochs", "-3"], "--epochs must be at least 1, got -3"),
    (["--num-classes", "1"], "--num-classes 1 is less than the 2 class folders"),
])
def test_9_11_bad_numbers_are_one_line_errors_at_start(data_root, tmp_path, capsys, extra, message):
    assert cli.main(tiny(data_root, tmp_path / "ws", *extra)) == 2
    assert message in one_line_error(capsys)
    report = tmp_path / "ws" / "raport.json"
    assert not report.exists() or "[1, 1]" not in report.read_text()  # stopped before training


def test_10_a_checkpoint_filename_in_subfolders_is_created_at_start(data_root, tmp_path):
    workspace = tmp_path / "ws"
    assert cli.main(tiny(data_root, workspace, "--checkpoint-filename", "sub/dir/c.pth.tar", "--training-only")) == 0
    assert checkpoints.load_checkpoint(workspace / "sub" / "dir" / "c.pth.tar").epoch == 1


@pytest.mark.parametrize("case", ["workspace-is-a-file", "checkpoint-under-a-file", "long-workspace",
                                  "long-checkpoint-name"])
def test_11_unusable_output_paths_are_one_line_errors_at_start(data_root, tmp_path, capsys, monkeypatch, case):
    (tmp_path / "file").write_text("x")
    workspace, extra = tmp_path / "ws", []
    if case == "workspace-is-a-file":
        workspace, expected = tmp_path / "file", f"--workspace {tmp_path / 'file'} is a file, not a folder"
    elif case == "checkpoint-under-a-file":
        extra, expected = ["--checkpoint-filename", str(tmp_path / "file" / "c.pth.tar")], "cannot write the checkpoint"
    elif case == "long-workspace":
        workspace, expected = tmp_path / ("w" * 300), "File name too long"
    else:  # the name fits (250 characters), its temporary name does not
        extra, expected = ["--checkpoint-filename", "c" * 250], "File name too long"
    monkeypatch.setattr("image_classification.runner._loaders", lambda *a: pytest.fail("data read before the check"))
    assert cli.main(tiny(data_root, workspace, *extra)) == 2
    assert expected in one_line_error(capsys)


def _can_mount_tmpfs() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /tmp"],
                           capture_output=True, timeout=30)
    return probe.returncode == 0


@pytest.mark.parametrize("disk", ["tmpfs", "patched"])
def test_11_a_full_disk_during_a_save_is_one_line_naming_the_file(data_root, tmp_path, capsys, monkeypatch, disk):
    workspace = tmp_path / "ws"
    workspace.mkdir()
    target = workspace / "checkpoint.pth.tar"
    if disk == "tmpfs":
        if not _can_mount_tmpfs():
            pytest.skip("no unprivileged mount namespace (unshare -rm) here")
        out = tmp_path / "out"
        out.mkdir()
        command = (f"mount -t tmpfs -o size=256k tmpfs {workspace} && {sys.executable} {ROOT / 'main.py'} "
                   + " ".join(tiny(data_root, workspace, "--training-only"))
                   + f"; code=$?; ls -A {workspace} > {out}/listing; cp {workspace}/raport.json {out}/; exit $code")
        result = subprocess.run(["unshare", "-rm", "sh", "-c", command], env=ENV, capture_output=True, text=True,
                                timeout=300)
        code, last = result.returncode, result.stderr.strip().splitlines()[-1]
        assert "Traceback" not in result.stderr
        left = (out / "listing").read_text().split()
        report = out / "raport.json"
    else:
        real_open = open

        class FullDisk(io.FileIO):
            def write(self, data):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(checkpoints, "open", lambda path, mode="r", *a, **k: FullDisk(path, "wb") if "w" in mode
                            else real_open(path, mode, *a, **k), raising=False)
        code = cli.main(tiny(data_root, workspace, "--training-only"))
        last, left, report = one_line_error(capsys), os.listdir(workspace), workspace / "raport.json"
    assert code == 2
    assert last == f"error: cannot save checkpoint {target}: No space left on device"
    assert left == ["raport.json"]  # no temporary file, no half checkpoint
    assert all(json.loads(line[5:]) for line in report.read_text().splitlines())


# --------------------------------------------------------------------------------------------------------------
# 12: NaN or infinite weights


@pytest.fixture(scope="module")
def nan_checkpoint(tmp_path_factory):
    model = build_model("resnet18", dynamic=True, num_classes=2, wmul=0.125)
    with torch.no_grad():
        model.layer2[0].bn1.running_var[3] = float("inf")
        model.fc.weight[0, 0] = float("nan")
    path = tmp_path_factory.mktemp("nan") / "diverged.pth.tar"
    checkpoints.save_checkpoint(checkpoints.make_checkpoint(model, 3, best_prec1=50.0), path)
    return path


NAN_MESSAGE = "tensor 'layer2.0.bn1.running_var' holds infinite values"


def test_12_evaluation_refuses_nan_weights(data_root, tmp_path, capsys, nan_checkpoint):
    argv = tiny(data_root, tmp_path / "ws", "--evaluate", "--pretrained-weights", str(nan_checkpoint))
    assert cli.main(argv) == 2
    assert NAN_MESSAGE in one_line_error(capsys)


def test_12_the_tools_refuse_nan_weights_and_export_may_override(data_root, tmp_path, capsys, nan_checkpoint):
    image = str(next((data_root / "val" / "a").iterdir()))
    assert classify.main(["--pretrained-from-file", str(nan_checkpoint), "--image-size", "32", image]) == 2
    assert NAN_MESSAGE in one_line_error(capsys)
    weights = tmp_path / "weights.pth"
    assert checkpoint2model.main(["--checkpoint-path", str(nan_checkpoint), "--weight-path", str(weights)]) == 2
    assert NAN_MESSAGE in one_line_error(capsys) and not weights.exists()
    onnx = tmp_path / "m.onnx"
    assert export_onnx.main(["--pretrained-from-file", str(nan_checkpoint), "--image-size", "32", "-o", str(onnx)]) == 2
    assert NAN_MESSAGE in one_line_error(capsys) and not onnx.exists()
    assert export_onnx.main(["--pretrained-from-file", str(nan_checkpoint), "--image-size", "32", "-o", str(onnx),
                             "--allow-nonfinite"]) == 0
    assert onnx.exists()
