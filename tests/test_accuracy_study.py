"""benchmarks/accuracy.py without training: its statistics against hand-computed cases, its resumption with a
stubbed run function, its main.py command lines."""
import json
import math

import pytest

import main as cli
from benchmarks import accuracy


def test_sign_test_matches_the_binomial_tail():
    # 10 of 10 the same way: 2 x 0.5^10; 8 of 10: 2 x (45 + 10 + 1) / 1024; 5 of 10: 1
    assert accuracy.sign_test([1.0] * 10)["p"] == pytest.approx(2 / 1024)
    assert accuracy.sign_test([-0.5] * 8 + [2.0] * 2)["p"] == pytest.approx(2 * 56 / 1024)
    assert accuracy.sign_test([1, -1] * 5)["p"] == pytest.approx(1.0)
    # ties are dropped: 3 positives of 3 non-zero -> 2 x 0.5^3
    result = accuracy.sign_test([0.0, 0.0, 1.0, 2.0, 3.0])
    assert (result["positive"], result["negative"], result["ties"]) == (3, 0, 2)
    assert result["p"] == pytest.approx(0.25)
    assert accuracy.sign_test([0.0, 0.0])["p"] == 1.0


def test_bootstrap_ci_of_two_values_is_their_range_and_a_constant_has_no_width():
    # Resampled means of [0, 1]: 0 (1/4), 0.5 (1/2), 1 (1/4): the 2.5 % and 97.5 % quantiles are 0 and 1.
    assert accuracy.bootstrap_ci([0.0, 1.0]) == pytest.approx((0.0, 1.0))
    assert accuracy.bootstrap_ci([2.5] * 7) == pytest.approx((2.5, 2.5))
    with pytest.raises(ValueError):
        accuracy.bootstrap_ci([])


def test_bootstrap_ci_approaches_the_normal_interval_of_the_mean():
    import numpy as np

    values = np.random.default_rng(1).normal(3.0, 2.0, size=400)
    half = 1.96 * values.std(ddof=0) / math.sqrt(values.size)
    low, high = accuracy.bootstrap_ci(values, resamples=20_000)
    assert low == pytest.approx(values.mean() - half, abs=0.05)
    assert high == pytest.approx(values.mean() + half, abs=0.05)
    # a narrower level gives a narrower interval
    low80, high80 = accuracy.bootstrap_ci(values, level=0.8, resamples=20_000)
    assert low < low80 < high80 < high


def test_paired_summary_is_second_minus_first():
    summary = accuracy.paired_summary([50.0, 60.0, 70.0], [52.0, 61.0, 70.0])
    assert summary["differences"] == [2.0, 1.0, 0.0]
    assert summary["mean"] == pytest.approx(1.0)
    assert summary["sign_test"]["positive"] == 2 and summary["sign_test"]["ties"] == 1


def test_equal_time_epochs():
    assert accuracy.equal_time_epochs(6, 10.0, 25.0) == 15
    assert accuracy.equal_time_epochs(6, 10.0, 5.0) == 6  # never fewer than the pair's epochs


SETTINGS = {"data": "/d", "run_data": "/d", "arch": "resnet18", "wmul": 0.25, "image_size": 32, "batch_size": 16,
            "epochs": 3, "train_fraction": 1.0, "equal_time": True, "extra": [], "nproc_per_node": 1, "workers": 2,
            "threads": None, "gpus": [], "device": "cpu"}


class StubRuns:
    """Records calls; PEDConv takes twice the static model's time and scores seed + 1 points more."""

    def __init__(self, fail_on=None):
        self.calls, self.fail_on = [], fail_on

    def __call__(self, settings, model, seed, epochs, out, slot):
        if (model, seed) == self.fail_on:
            raise RuntimeError("stopped")
        self.calls.append((model, seed, epochs))
        top1 = 50.0 + seed + (seed + 1 if model == accuracy.PEDCONV else 0) + (0.5 if "equal" in model else 0)
        seconds = 20.0 if model == accuracy.PEDCONV else 10.0
        return {"model": model, "seed": seed, "epochs": epochs, "seconds": seconds + 5, "train_seconds": seconds,
                "top1": [top1 - 10] * (epochs - 1) + [top1], "final_top1": top1, "best_top1": top1,
                "best_epoch": epochs - 1}


def test_study_resumes_without_rerunning_finished_runs(tmp_path):
    stub = StubRuns(fail_on=(accuracy.PEDCONV, 1))
    with pytest.raises(RuntimeError):
        accuracy.run_study(SETTINGS, str(tmp_path), [0, 1, 2], run=stub)
    # static and PEDConv of seed 0 and static of seed 1 finished before the failure and are on disk
    stored = json.loads((tmp_path / accuracy.RESULTS).read_text())
    assert set(stored["runs"]) == {"static-seed0", "PEDConv-seed0", "static-seed1"}

    stub = StubRuns()
    study = accuracy.run_study(SETTINGS, str(tmp_path), [0, 1, 2], run=stub)
    assert (accuracy.STATIC, 0, 3) not in stub.calls and (accuracy.STATIC, 1, 3) not in stub.calls
    assert (accuracy.PEDCONV, 1, 3) in stub.calls and (accuracy.STATIC, 2, 3) in stub.calls
    # the equal-time static run gets the PEDConv run's time: 3 epochs x 20 s / 10 s
    assert sorted(c for c in stub.calls if c[0] == accuracy.STATIC_LONG) == [
        (accuracy.STATIC_LONG, seed, 6) for seed in (0, 1, 2)]
    assert len(study["runs"]) == 9

    again = StubRuns()
    accuracy.run_study(SETTINGS, str(tmp_path), [0, 1, 2], run=again)
    assert again.calls == []

    stats = accuracy.analyse(study)
    final = stats["PEDConv - static: final_top1"]
    assert final["differences"] == [1.0, 2.0, 3.0] and final["mean"] == pytest.approx(2.0)
    assert final["sign_test"]["positive"] == 3 and final["sign_test"]["p"] == pytest.approx(0.25)
    assert stats["time_ratio"]["median"] == pytest.approx(2.0)
    assert stats["PEDConv - static-equal-time: final_top1"]["differences"] == [0.5, 1.5, 2.5]
    text = accuracy.markdown(study, stats, "python benchmarks/accuracy.py")
    assert "| PEDConv - static, final | +2.00 |" in text


def test_study_with_other_settings_is_refused_and_equal_time_can_be_added_later(tmp_path):
    accuracy.run_study(dict(SETTINGS, equal_time=False), str(tmp_path), [0], run=StubRuns())
    with pytest.raises(accuracy.ToolError, match="other settings"):
        accuracy.run_study(dict(SETTINGS, epochs=4), str(tmp_path), [0], run=StubRuns())
    later = StubRuns()
    accuracy.run_study(SETTINGS, str(tmp_path), [0], run=later)
    assert later.calls == [(accuracy.STATIC_LONG, 0, 6)]


def test_plots_are_written(tmp_path):
    study = accuracy.run_study(SETTINGS, str(tmp_path), [0, 1], run=StubRuns())
    written = accuracy.plot(study, accuracy.analyse(study), str(tmp_path))
    assert [p.rsplit("/", 1)[-1] for p in written] == ["paired.png", "curves.png"]
    assert all((tmp_path / name).stat().st_size > 1000 for name in ("paired.png", "curves.png"))


def test_runs_share_the_recipe_and_seed_and_differ_only_in_the_model(tmp_path):
    settings = dict(SETTINGS, extra=["--lr", "0.05"])
    static = cli.parse_args(accuracy.recipe_argv(settings, accuracy.STATIC, 3, 4, "/w"))
    dynamic = cli.parse_args(accuracy.recipe_argv(settings, accuracy.PEDCONV, 3, 4, "/w"))
    long = cli.parse_args(accuracy.recipe_argv(settings, accuracy.STATIC_LONG, 3, 9, "/w"))
    for key in ("data_backend", "label_smoothing", "momentum", "weight_decay", "warmup", "crop_area_min"):
        assert getattr(static, key) == getattr(dynamic, key) == cli.DEMO_DEFAULTS[key], key
    assert (static.dynamic, dynamic.dynamic, long.dynamic) == (False, True, False)
    assert static.seed == dynamic.seed == 3 and (static.epochs, long.epochs) == (4, 9)
    assert (static.image_size, static.batch_size, static.wmul) == (32, 16, 0.25)
    assert static.lr == dynamic.lr == 0.05  # flags after -- override the recipe
    assert not static.save_checkpoints


def test_train_fraction_subset_is_fixed_per_class_and_keeps_val(tmp_path):
    for split, count in (("train", 8), ("val", 2)):
        for name in ("a", "b"):
            folder = tmp_path / "data" / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                (folder / f"{i}.jpg").write_bytes(b"x")
    first = accuracy.subset_folder(str(tmp_path / "data"), 0.25, str(tmp_path / "out1"))
    second = accuracy.subset_folder(str(tmp_path / "data"), 0.25, str(tmp_path / "out2"))
    import os

    for name in ("a", "b"):
        chosen = sorted(os.listdir(os.path.join(first, "train", name)))
        assert len(chosen) == 2 and chosen == sorted(os.listdir(os.path.join(second, "train", name)))
    assert sorted(os.listdir(os.path.join(first, "val", "a"))) == ["0.jpg", "1.jpg"]


@pytest.mark.parametrize("argv, message", [
    (["--seeds", "0"], "--seeds"), (["--epochs", "0"], "--epochs"), (["--train-fraction", "1.5"], "--train-fraction"),
    (["/nonexistent-data"], "not a folder with train/ and val/"),
])
def test_bad_arguments_are_one_line_errors(argv, message, capsys):
    assert accuracy.main(argv) != 0
    assert message in capsys.readouterr().err


def test_in_process_is_refused_for_parallel_runs(tmp_path, capsys):
    for split in ("train", "val"):
        (tmp_path / "data" / split / "a").mkdir(parents=True)
    argv = [str(tmp_path / "data"), "--in-process", "--jobs", "2", "--out", str(tmp_path / "out")]
    assert accuracy.main(argv) != 0
    assert "--in-process is for one CPU run at a time" in capsys.readouterr().err
    assert not (tmp_path / "out" / accuracy.RESULTS).exists()
