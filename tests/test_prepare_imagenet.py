"""dataloading.prepare_imagenet: ILSVRC2012's two tars to a checked ImageFolder tree.

The tars are built here with the real layout (the training tar holds one tar per class, <wnid>.tar, of
<wnid>_<n>.JPEG files; the validation tar holds ILSVRC2012_val_<8 digits>.JPEG at its top) but a few tiny images.
"""
import collections
import io
import os
import random
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest

import main as cli
from dataloading import prepare_imagenet
from image_classification.dllog import read_report
from tests.data_utils import CLASS_COLOURS, synthetic_image

ROOT = Path(__file__).resolve().parents[1]

# The three facts the issue names, written out here rather than read from the labels file.
KNOWN_VAL_LABELS = {1: "n01751748", 2: "n09193705", 50_000: "n02437616"}
A, B, C = "n01751748", "n09193705", "n02437616"
D = "n01440764"  # a fourth class (tench), for the subset cases


def jpeg_bytes(class_index: int, seed: int, size: int = 40) -> bytes:
    buffer = io.BytesIO()
    image = synthetic_image(CLASS_COLOURS[class_index % len(CLASS_COLOURS)], size, size, random.Random(seed))
    image.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def add_bytes(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 1_300_000_000
    archive.addfile(info, io.BytesIO(data))


def write_train_tar(path: Path, images_per_class: dict) -> dict:
    """ILSVRC2012_img_train.tar's layout; returns {wnid: {file name: bytes}}."""
    contents = {}
    with tarfile.open(path, "w") as outer:
        for index, (wnid, count) in enumerate(images_per_class.items()):
            images = {f"{wnid}_{1000 + 7 * k}.JPEG": jpeg_bytes(index, 100 * index + k) for k in range(count)}
            class_tar = io.BytesIO()
            with tarfile.open(fileobj=class_tar, mode="w") as inner:
                for name, data in images.items():
                    add_bytes(inner, name, data)
            add_bytes(outer, f"{wnid}.tar", class_tar.getvalue())
            contents[wnid] = images
    return contents


def val_numbers(wnids, per_class: int) -> list:
    """Validation image numbers of these classes (per_class each, from the shipped labels), the known ones first."""
    labels = prepare_imagenet.load_val_labels()
    numbers = [number for number, wnid in KNOWN_VAL_LABELS.items() if wnid in wnids]
    for wnid in wnids:
        have = sum(labels[number - 1] == wnid for number in numbers)
        more = [i + 1 for i, label in enumerate(labels) if label == wnid and i + 1 not in numbers]
        numbers += more[:per_class - have]
    return numbers


def write_val_tar(path: Path, numbers, extra_names=()) -> dict:
    """ILSVRC2012_img_val.tar's layout; returns {file name: bytes}."""
    contents = {}
    with tarfile.open(path, "w") as archive:
        for number in list(numbers):
            name = f"ILSVRC2012_val_{number:08d}.JPEG"
            contents[name] = jpeg_bytes(number % 6, number)
            add_bytes(archive, name, contents[name])
        for name in extra_names:
            add_bytes(archive, name, jpeg_bytes(0, 0))
    return contents


@pytest.fixture
def tars(tmp_path):
    """Three classes (6, 5 and 4 training images; 3 validation images each, images 1, 2 and 50,000 among them)."""
    train = write_train_tar(tmp_path / "ILSVRC2012_img_train.tar", {A: 6, B: 5, C: 4})
    numbers = val_numbers([A, B, C], 3)
    val = write_val_tar(tmp_path / "ILSVRC2012_img_val.tar", numbers)
    return tmp_path / "ILSVRC2012_img_train.tar", tmp_path / "ILSVRC2012_img_val.tar", train, val


def prepare(train_tar, val_tar, out, *extra):
    argv = ["--out", str(out), *extra]
    if train_tar:
        argv += ["--train-tar", str(train_tar)]
    if val_tar:
        argv += ["--val-tar", str(val_tar)]
    return prepare_imagenet.main(argv)


def tree(root: Path) -> dict:
    """Every file under root (hidden ones included) -> bytes."""
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def expected_tree(train: dict, val: dict, labels=None) -> dict:
    labels = labels or prepare_imagenet.load_val_labels()
    files = {f"train/{wnid}/{name}": data for wnid, images in train.items() for name, data in images.items()}
    for name, data in val.items():
        files[f"val/{labels[int(name[15:23]) - 1]}/{name}"] = data
    return files


def images_under(out: Path) -> dict:
    """The images a loader sees: train/ and val/, less hidden (temporary) files."""
    return {name: data for name, data in tree(out).items()
            if name.split("/")[0] in ("train", "val") and not name.split("/")[-1].startswith(".")}


def stats(out: Path) -> dict:
    return {str(p): (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.rglob("*")}


# --- the labels file ------------------------------------------------------------------------------------------

def test_val_labels_file_has_the_known_labels_and_50_images_in_each_of_1000_classes():
    labels = prepare_imagenet.load_val_labels()
    assert len(labels) == 50_000
    for number, wnid in KNOWN_VAL_LABELS.items():
        assert labels[number - 1] == wnid
    per_class = collections.Counter(labels)
    assert len(per_class) == 1000 and set(per_class.values()) == {50}
    assert all(prepare_imagenet.WNID.fullmatch(wnid) for wnid in per_class)


# --- layout, labels, checks -----------------------------------------------------------------------------------

def test_writes_train_and_val_class_folders_with_the_tar_bytes_and_the_right_labels(tars, tmp_path, capsys):
    train_tar, val_tar, train, val = tars
    out = tmp_path / "imagenet"
    assert prepare(train_tar, val_tar, out, "--allow-partial") == 0
    assert images_under(out) == expected_tree(train, val)
    for number, wnid in KNOWN_VAL_LABELS.items():  # independent of the labels file
        assert (out / "val" / wnid / f"ILSVRC2012_val_{number:08d}.JPEG").is_file()
    assert not [name for name in tree(out) if name.endswith(".part")]
    summary = capsys.readouterr().out.strip().splitlines()
    assert len(summary) == 1
    assert "train 15 images in 3 classes" in summary[0] and "val 9 images in 3 classes" in summary[0]
    assert "a subset" in summary[0] and "header check" in summary[0]
    assert (out / ".prepare_imagenet" / "train.json").is_file() and (out / ".prepare_imagenet" / "val.json").is_file()


def test_ilsvrc_counts_are_required_without_allow_partial(tars, tmp_path, capsys, monkeypatch):
    train_tar, val_tar, train, val = tars
    out = tmp_path / "imagenet"
    assert prepare(train_tar, val_tar, out) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: ") and "--allow-partial" in err
    assert "ILSVRC2012 has 1,281,167" in err or "ILSVRC2012 has 50,000" in err
    assert not (out / ".prepare_imagenet").exists()  # nothing vouched for

    # With this tiny set's counts as ILSVRC2012's, the same tars pass as complete (what extracted stays: resumed).
    monkeypatch.setattr(prepare_imagenet, "ILSVRC2012_COUNTS", {"train": (15, 3), "val": (9, 3)})
    monkeypatch.setattr(prepare_imagenet, "VAL_PER_CLASS", 3)
    assert prepare(train_tar, val_tar, out) == 0
    summary = capsys.readouterr().out
    assert "ILSVRC2012's counts" in summary and "val 9 images in 3 classes (3 each)" in summary
    assert "0 images written" in summary
    assert images_under(out) == expected_tree(train, val)


def test_val_needs_50_images_per_class_for_ilsvrc_counts(tmp_path, monkeypatch, capsys):
    numbers = val_numbers([A, B, C], 4)[:-1]  # 4, 4 and 3: the total is right, one class short
    val_tar = tmp_path / "val.tar"
    write_val_tar(val_tar, numbers)
    monkeypatch.setattr(prepare_imagenet, "ILSVRC2012_COUNTS", {"train": (15, 3), "val": (11, 3)})
    monkeypatch.setattr(prepare_imagenet, "VAL_PER_CLASS", 4)
    assert prepare(None, val_tar, tmp_path / "out") == 2
    assert "--allow-partial" in capsys.readouterr().err


def test_either_tar_alone(tars, tmp_path, capsys):
    train_tar, val_tar, train, val = tars
    assert prepare(None, val_tar, tmp_path / "v", "--allow-partial") == 0
    assert images_under(tmp_path / "v") == expected_tree({}, val)
    assert prepare(train_tar, None, tmp_path / "t", "--allow-partial") == 0
    assert images_under(tmp_path / "t") == expected_tree(train, {})


# --- subsets --------------------------------------------------------------------------------------------------

def test_allow_partial_creates_only_the_classes_present_in_both_splits(tmp_path, capsys):
    train = write_train_tar(tmp_path / "train.tar", {A: 3, B: 3, D: 3})   # D has no validation images here
    val = write_val_tar(tmp_path / "val.tar", val_numbers([A, B, C], 2))  # C has no training images here
    out = tmp_path / "imagenet"
    assert prepare(tmp_path / "train.tar", tmp_path / "val.tar", out, "--allow-partial") == 0
    assert sorted(os.listdir(out / "train")) == sorted(os.listdir(out / "val")) == sorted([A, B])
    labels = prepare_imagenet.load_val_labels()
    kept_val = {name: data for name, data in val.items() if labels[int(name[15:23]) - 1] != C}
    assert images_under(out) == expected_tree({A: train[A], B: train[B]}, kept_val)
    assert "2 classes left out" in capsys.readouterr().out


def test_classes_option_selects_a_subset(tars, tmp_path, capsys):
    train_tar, val_tar, train, val = tars
    out = tmp_path / "imagenet"
    class_file = tmp_path / "classes.txt"
    class_file.write_text(f"# my subset\n{B}\n{C}  # elephant\n")
    assert prepare(train_tar, val_tar, out, "--classes", str(class_file)) == 0  # implies --allow-partial
    assert sorted(os.listdir(out / "train")) == sorted(os.listdir(out / "val")) == sorted([B, C])
    assert prepare(train_tar, val_tar, tmp_path / "other", "--classes", f"{A},{C}") == 0
    assert sorted(os.listdir(tmp_path / "other" / "val")) == sorted([A, C])
    capsys.readouterr()
    assert prepare(train_tar, val_tar, tmp_path / "none", "--classes", D) == 2
    assert capsys.readouterr().err.strip() == f"error: {val_tar}: no images of the selected classes"


# --- reruns and interruptions ---------------------------------------------------------------------------------

def test_rerun_leaves_a_finished_folder_alone(tars, tmp_path, capsys):
    train_tar, val_tar, train, val = tars
    out = tmp_path / "imagenet"
    assert prepare(train_tar, val_tar, out, "--allow-partial") == 0
    before, files_before = stats(out), tree(out)
    capsys.readouterr()
    assert prepare(train_tar, val_tar, out, "--allow-partial") == 0
    assert "already prepared" in capsys.readouterr().out
    assert stats(out) == before and tree(out) == files_before
    # Only the missing split is prepared when the other is done.
    (out / ".prepare_imagenet" / "val.json").unlink()
    assert prepare(train_tar, val_tar, out, "--allow-partial") == 0
    summary = capsys.readouterr().out
    assert "val 9 images in 3 classes" in summary and "train as prepared before" in summary
    assert images_under(out) == expected_tree(train, val)


def test_interrupted_run_resumes_and_duplicates_nothing(tars, tmp_path, monkeypatch, capsys):
    train_tar, val_tar, train, val = tars
    out = tmp_path / "imagenet"
    real_write = prepare_imagenet.write_image
    calls = []

    def interrupted_write(folder, name, source, size):
        calls.append(name)
        if len(calls) == 13:  # in the training tar (9 validation images come first): as a kill mid-write leaves it
            (folder / f".{name}.part").write_bytes(source.read(size // 2))
            raise KeyboardInterrupt
        return real_write(folder, name, source, size)

    monkeypatch.setattr(prepare_imagenet, "write_image", interrupted_write)
    assert prepare(train_tar, val_tar, out, "--allow-partial") == 130
    assert capsys.readouterr().err.strip() == "error: interrupted"
    monkeypatch.setattr(prepare_imagenet, "write_image", real_write)

    expected = expected_tree(train, val)
    partial = images_under(out)
    assert len(partial) == 12 and all(expected[name] == data for name, data in partial.items())
    assert len([name for name in tree(out) if name.endswith(".part")]) == 1
    assert not (out / ".prepare_imagenet").exists()
    # A file cut short under its final name (a crash before the data reached the disk) is written again.
    damaged = out / sorted(partial)[-1]
    damaged.write_bytes(damaged.read_bytes()[:100])
    # A temporary file of an image that this run will not write again (a kill in an earlier, other run).
    (out / "val" / A / ".ILSVRC2012_val_00049999.JPEG.part").write_bytes(b"\xff\xd8\xff")

    assert prepare(train_tar, val_tar, out, "--allow-partial") == 0
    assert f"{len(expected) - 11} images written" in capsys.readouterr().out
    assert tree(out).keys() - expected.keys() == {".prepare_imagenet/train.json", ".prepare_imagenet/val.json"}
    assert images_under(out) == expected


def test_killed_process_resumes(tmp_path):
    """A real SIGKILL in the middle of the training tar (fed through a pipe that stops after part of it)."""
    tar_path = tmp_path / "ILSVRC2012_img_train.tar"
    train = write_train_tar(tar_path, {A: 6, B: 5, C: 4, D: 3})
    data = tar_path.read_bytes()
    fifo = tmp_path / "pipe.tar"
    os.mkfifo(fifo)
    out = tmp_path / "imagenet"

    stop = threading.Event()

    def feed():
        try:
            with open(fifo, "wb") as pipe:
                pipe.write(data[: len(data) * 2 // 3])
                pipe.flush()
                stop.wait(600)  # hold the pipe open: the reader blocks on it until it is killed
        except OSError:
            pass

    threading.Thread(target=feed, daemon=True).start()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    process = subprocess.Popen([sys.executable, "-m", "dataloading.prepare_imagenet", "--train-tar", str(fifo),
                                "--out", str(out), "--allow-partial"], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (out / "train" / B).is_dir() and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.2)
        assert (out / "train" / B).is_dir(), process.communicate(timeout=5)
        time.sleep(0.5)  # it is blocked on the pipe now, somewhere after the start of class B
    finally:
        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=30)
        stop.set()
    expected = expected_tree(train, {})
    partial = images_under(out)
    assert 6 <= len(partial) < len(expected) and all(expected[name] == data for name, data in partial.items())
    assert not (out / ".prepare_imagenet").exists()

    result = subprocess.run([sys.executable, "-m", "dataloading.prepare_imagenet", "--train-tar", str(tar_path),
                             "--out", str(out), "--allow-partial"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"{len(expected) - len(partial)} images written" in result.stdout
    assert images_under(out) == expected
    assert not [name for name in tree(out) if name.endswith(".part")]


def test_progress_shows_images_gigabytes_and_eta(caplog):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal = Terminal()
    progress = prepare_imagenet.Progress("train", total_bytes=4_000_000_000, stream=terminal)
    progress.start -= 100  # 100 s in, a quarter read: 300 s to go
    progress.show(12_345, 1_000_000_000)
    line = terminal.getvalue()
    assert line.startswith("\r") and "\n" not in line
    assert "train: 12,345 images" in line and "1.0 / 4.0 GB (25 %)" in line and "10 MB/s" in line
    assert "ETA 5 min" in line
    # Not a terminal: plain log lines, no carriage returns; a stream of unknown size has no ETA.
    log = io.StringIO()
    progress = prepare_imagenet.Progress("val", total_bytes=None, stream=log)
    with caplog.at_level("INFO", logger=prepare_imagenet.__name__):
        progress.close(7, 2_500_000_000)
    assert log.getvalue() == "" and "val: 7 images, 2.5 GB" in caplog.text and "ETA" not in caplog.text


def test_files_that_are_not_from_the_tar_are_found(tars, tmp_path, capsys):
    """A folder that holds more than the tars (an earlier, other preparation) fails the check, and nothing is lost."""
    train_tar, val_tar, train, val = tars
    out = tmp_path / "imagenet"
    stray = out / "train" / A / f"{A}_99999.JPEG"
    stray.parent.mkdir(parents=True)
    stray.write_bytes(jpeg_bytes(0, 1))
    assert prepare(train_tar, val_tar, out, "--allow-partial") == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: {out / 'train' / A}: the images differ from the tar's: "
                   f"1 not from the tar (e.g. {stray.name})")
    stray.unlink()
    (out / "val" / D).mkdir()
    (out / "val" / D / "ILSVRC2012_val_00000005.JPEG").write_bytes(jpeg_bytes(0, 2))
    assert prepare(None, val_tar, out, "--allow-partial") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {out / 'val'} has class folders that the tar") and D in err
    assert not (out / ".prepare_imagenet").exists() and (out / "val" / D / "ILSVRC2012_val_00000005.JPEG").exists()


# --- bad input ------------------------------------------------------------------------------------------------

def flat_train_tar(path: Path) -> None:
    """A training tar already unpacked into folders (another layout)."""
    with tarfile.open(path, "w") as archive:
        add_bytes(archive, f"train/{A}/{A}_1.JPEG", jpeg_bytes(0, 0))


def nested_val_tar(path: Path) -> None:
    """A validation tar already sorted into class folders (another layout)."""
    with tarfile.open(path, "w") as archive:
        add_bytes(archive, f"val/{A}/ILSVRC2012_val_00000001.JPEG", jpeg_bytes(0, 0))


def class_tar_not_a_tar(path: Path) -> None:
    with tarfile.open(path, "w") as archive:
        add_bytes(archive, f"{A}.tar", b"these are not tar blocks" * 100)


def class_tar_with_folder(path: Path) -> None:
    inner = io.BytesIO()
    with tarfile.open(fileobj=inner, mode="w") as archive:
        add_bytes(archive, f"{A}/{A}_1.JPEG", jpeg_bytes(0, 0))
    with tarfile.open(path, "w") as archive:
        add_bytes(archive, f"{A}.tar", inner.getvalue())


def truncated_train_tar(path: Path) -> None:
    write_train_tar(path, {A: 4, B: 4})
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


BAD_INPUTS = {
    # name: (which tar, how to write it, words the one-line error must hold)
    "train not a tar": ("train", lambda p: p.write_bytes(b"\x89PNG not a tar" * 300), "not a tar file"),
    "val not a tar": ("val", lambda p: p.write_bytes(b"GIF89a" + bytes(3000)), "not a tar file"),
    "empty file": ("train", lambda p: p.write_bytes(b""), "not a tar file"),
    "train of another layout": ("train", flat_train_tar, "is not a class tar <wnid>.tar"),
    "val of another layout": ("val", nested_val_tar, "is not a validation image"),
    "val tar given as train": ("train", lambda p: write_val_tar(p, [1]), "looks like the validation tar"),
    "train tar given as val": ("val", lambda p: write_train_tar(p, {A: 1}), "looks like the training tar"),
    "val image number without label": ("val", lambda p: write_val_tar(p, [50_001]),
                                       "no label for validation image ILSVRC2012_val_00050001.JPEG"),
    "val image name without label": ("val", lambda p: write_val_tar(p, [1, 2], ["holiday.JPEG"]),
                                     "no label for validation image holiday.JPEG"),
    "class tar not a tar": ("train", class_tar_not_a_tar, "truncated or damaged tar"),
    "class tar with a folder": ("train", class_tar_with_folder, "not an image file at its top"),
    "truncated train tar": ("train", truncated_train_tar, "truncated or damaged tar"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line(case, tmp_path, capsys):
    split, write, words = BAD_INPUTS[case]
    path = tmp_path / f"{split}.tar"
    write(path)
    out = tmp_path / "imagenet"
    status = prepare(path if split == "train" else None, path if split == "val" else None, out, "--allow-partial")
    err = capsys.readouterr().err.strip()
    assert status == 2 and err.startswith("error: ") and "\n" not in err and words in err, err
    assert not (out / ".prepare_imagenet").exists()
    if case in ("val image name without label", "truncated train tar"):  # found mid-stream: what came before stays
        assert images_under(out)
    assert not [name for name in tree(tmp_path) if name.endswith(".part")]


@pytest.mark.parametrize("argv, words", [
    (["--out", "OUT"], "give --train-tar, --val-tar or both"),
    (["--out", "OUT", "--train-tar", "missing.tar"], "no such file"),
    (["--out", "OUT", "--val-tar", "."], "a folder, not a tar file"),
    (["--out", "OUT", "--val-tar", "VAL", "--classes", "dogs,cats"], "not a list of WordNet ids"),
    (["--val-tar", "VAL"], "the following arguments are required: --out"),
])
def test_bad_arguments_are_one_line(argv, words, tars, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = [str(tars[1]) if item == "VAL" else item for item in argv]
    try:
        status = prepare_imagenet.main(argv)
    except SystemExit as stop:  # argparse's usage errors
        status = stop.code
    assert status == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and words in err, err
    assert not (tmp_path / "OUT").exists()


def test_too_little_free_space_stops_before_writing(tars, tmp_path, capsys, monkeypatch):
    train_tar, val_tar, _, _ = tars
    tar_bytes = train_tar.stat().st_size + val_tar.stat().st_size
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(prepare_imagenet.shutil, "disk_usage", lambda path: usage(10**12, 0, tar_bytes - 1))
    out = tmp_path / "imagenet"
    assert prepare(train_tar, val_tar, out, "--allow-partial") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: not enough free space in ") and "\n" not in err
    assert not out.exists()
    # Enough for the tars plus the margin: it runs.
    monkeypatch.setattr(prepare_imagenet.shutil, "disk_usage", lambda path: usage(10**12, 0, int(tar_bytes * 1.03)))
    assert prepare(train_tar, val_tar, out, "--allow-partial") == 0


# --- the prepared folder trains -------------------------------------------------------------------------------

def test_main_trains_one_epoch_on_the_prepared_folder(tars, tmp_path):
    train_tar, val_tar, _, _ = tars
    out = tmp_path / "imagenet"
    assert prepare(train_tar, val_tar, out, "--allow-partial") == 0
    workspace = tmp_path / "ws"
    argv = [str(out), "--data-backend", "pytorch", "--arch", "resnet18", "--dynamic", "--wmul", "0.125",
            "--image-size", "32", "-b", "5", "--lr", "0.05", "--device", "cpu", "-j", "0", "--seed", "1",
            "--epochs", "1", "--workspace", str(workspace), "--raport-file", "raport.json", "-p", "1"]
    assert cli.main(argv) == 0
    entries = [entry.get("data", {}) for entry in read_report(workspace / "raport.json")]
    assert [data["val.images"] for data in entries if "val.images" in data][-1] == 9
    assert sum("train.loss" in data for data in entries) >= 3  # 15 images, batch 5
