"""PEDConv's measured path choice (pedconv.autotune): once per key, candidates, cache, switches, ranks, compile.

Timings come from a fake clock: each candidate run advances it by a cost chosen by the test, so which path wins is
decided by the test, not by the machine."""
import json
import os

import pytest
import torch
import torch.nn as nn

import pedconv
import pedconv.functional as functional
from image_classification.distributed import exit_process
from pedconv import PEDConv2d, autotune
from pedconv.paths.unfold import onednn_matmul_available

# oneDNN's matrix product is a candidate on the CPU wherever this PyTorch has it (every x86 wheel).
ONEDNN = ["unfold:onednn-matmul"] if onednn_matmul_available("cpu", torch.float32) else []


class FakeClock:
    """Advances by ``costs[path]`` (default 1.0) whenever a path runs; records the runs."""

    def __init__(self, costs):
        self.now = 0.0
        self.costs = costs
        self.runs = []

    def __call__(self):
        return self.now


def fake_clock(monkeypatch, costs, fail=()):
    clock = FakeClock(costs)
    real = functional.run_path

    def run_path(path, *args, **kwargs):
        clock.runs.append(path)
        clock.now += costs.get(path, 1.0)
        if path in fail:
            raise RuntimeError(f"{path} is broken here")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(functional, "run_path", run_path)
    autotune.TUNER.clock = clock
    return clock


@pytest.fixture
def measuring(monkeypatch):
    monkeypatch.setenv(autotune.ENV_SWITCH, "1")
    autotune.TUNER.reset()


def layer_and_input(k=3, stride=1, cin=8, cout=8, size=6, batch=6, seed=0):
    torch.manual_seed(seed)
    layer = PEDConv2d(cin, cout, k, stride, k // 2, reduction=4, noise_std=0.0)
    return layer, torch.randn(batch, cin, size, size, requires_grad=True)


def train_step(layer, x):
    layer.train()
    layer(x).square().sum().backward()


def test_choice_is_made_once_per_key_and_reused(measuring, monkeypatch):
    clock = fake_clock(monkeypatch, {"unfold:matmul": 0.1})
    layer, x = layer_and_input()
    for _ in range(3):
        train_step(layer, x)
    assert autotune.TUNER.measured == 1
    # Each candidate once, the best (the only one within 3x of it) again, then the three steps on the choice.
    assert clock.runs == ["grouped", "grouped:chunks", "grouped:per-sample-input-grad", "unfold:conv",
                          "unfold:matmul"] + ONEDNN + ["unfold:matmul"] * 4
    assert layer.path_for(x, training=True) == "unfold:matmul"
    train_step(layer, x[:5])  # another batch of the same bucket (<= 8): same key
    assert autotune.TUNER.measured == 1
    with torch.no_grad():
        layer.eval()(x)  # evaluation is keyed separately, and measured forward only
        layer(x)
    assert autotune.TUNER.measured == 2
    train_step(layer, torch.randn(9, 8, 6, 6))  # batch bucket 16: a new key
    assert autotune.TUNER.measured == 3
    report = pedconv.autotune_report()
    assert report.count(" train: ") == 2 and report.count(" eval: ") == 1
    assert "unfold:matmul (measured; unfold:matmul 100.00 ms, grouped 1000.00 ms" in report


def test_fixed_path_runs_first_and_hopeless_candidates_skip_their_backward(measuring, monkeypatch):
    """A candidate whose forward alone takes longer than the best complete run stops there (a backward costs about
    twice its forward: it would take about 3x the best), and is neither run again nor chosen."""
    clock = fake_clock(monkeypatch, {"unfold:conv": 0.1, "grouped:chunks": 0.25, "unfold:matmul": 0.09})
    backward_calls = []
    real_backward = torch.Tensor.backward
    monkeypatch.setattr(torch.Tensor, "backward",
                        lambda self, *a, **k: backward_calls.append(self.shape) or real_backward(self, *a, **k))
    layer, x = layer_and_input(cin=32, cout=32, size=4)  # kernel over twice the output map: the rule says unfold
    layer.train()(x)  # the first call measures
    assert clock.runs == ["unfold:conv", "grouped", "grouped:chunks", "grouped:per-sample-input-grad",
                          "unfold:matmul"] + ONEDNN + [
                          "unfold:matmul", "unfold:conv", "unfold:matmul"]  # the last: the call's own
    # unfold:conv and unfold:matmul twice each, with their backward; the other three stopped after their forward
    # (grouped:chunks too, although its forward is within 3x of the best).
    assert len(backward_calls) == 4
    (decision,) = autotune.TUNER.decisions.values()
    assert decision.path == "unfold:matmul"
    assert set(decision.pruned) == {"grouped", "grouped:chunks", "grouped:per-sample-input-grad"} | set(ONEDNN)
    assert "grouped:chunks 250.00 ms (forward)" in pedconv.autotune_report()
    assert "unfold:conv 100.00 ms," in pedconv.autotune_report()


def test_candidate_sets_per_shape(monkeypatch):
    assert functional.candidate_paths("cpu", 16, (1, 1), 1, (0, 0), True) == ["pointwise:per-sample",
                                                                             "pointwise:shared"]
    assert functional.candidate_paths("cpu", 16, (1, 1), 2, (0, 0), True) == ["pointwise:shared"]
    # Training keeps per-sample matrices for the backward: only where they are no larger than the output.
    assert functional.candidate_paths("cpu", 16, (1, 1), 1, (0, 0), True, 256, 256) == ["pointwise:per-sample",
                                                                                       "pointwise:shared"]
    assert functional.candidate_paths("cpu", 16, (1, 1), 1, (0, 0), True, 257, 256) == ["pointwise:shared"]
    assert functional.candidate_paths("cpu", 16, (1, 1), 1, (0, 0), False, 257, 256)[0] == "pointwise:per-sample"
    assert functional.candidate_paths("cpu", 16, (3, 3), 1, (1, 1), True) == [
        "grouped", "grouped:chunks", "grouped:per-sample-input-grad", "unfold:conv", "unfold:matmul"] + ONEDNN
    assert functional.candidate_paths("cpu", 16, (3, 3), 1, (1, 1), False) == [  # evaluation: forward only
        "grouped", "grouped:chunks", "unfold:conv", "unfold:matmul"] + ONEDNN + ["taps"]
    assert functional.candidate_paths("cpu", 4, (3, 3), 1, (1, 1), True) == [
        "grouped", "grouped:per-sample-input-grad", "unfold:conv", "unfold:matmul"] + ONEDNN
    # oneDNN's matrix product takes float32 (and bfloat16 where supported) CPU tensors only.
    assert "unfold:onednn-matmul" not in functional.candidate_paths("cpu", 16, (3, 3), 1, (1, 1), True,
                                                                    dtype=torch.float64)
    assert "unfold:onednn-matmul" not in functional.candidate_paths("cuda", 16, (3, 3), 1, (1, 1), True)
    assert functional.candidate_paths("cpu", 16, (3, 3), 2, (1, 1), True) == [
        "grouped", "grouped:chunks", "grouped:per-sample-input-grad"]
    assert functional.candidate_paths("cuda", 16, (3, 3), 1, (1, 1), True)[-1] == "triton"
    assert "triton" not in functional.candidate_paths("cpu", 16, (3, 3), 1, (1, 1), True)


def test_measured_path_is_exact_and_a_failing_path_is_dropped_with_one_warning(measuring, monkeypatch):
    fake_clock(monkeypatch, {"grouped:chunks": 0.1, "unfold:conv": 0.2}, fail=("grouped:chunks",))
    layer, x = layer_and_input()
    reference, _ = layer_and_input()
    reference.method = "reference"
    with pytest.warns(RuntimeWarning, match="'grouped:chunks' failed while measured and is dropped") as caught:
        out = layer.train()(x)
        train_step(layer, x)
    assert len([w for w in caught if "dropped" in str(w.message)]) == 1
    assert layer.path_for(x, training=True) == "unfold:conv"
    torch.testing.assert_close(out, reference.train()(x), rtol=1e-5, atol=1e-6)
    assert "dropped: grouped:chunks (RuntimeError: grouped:chunks is broken here)" in pedconv.autotune_report()


def test_cache_round_trip_and_entries_of_another_machine(measuring, monkeypatch, tmp_path):
    path = tmp_path / "cache" / "autotune.json"
    other_key = "cpu | Some Other CPU | torch 0.0 | threads 2 | float32 | ... | train"
    path.parent.mkdir()
    path.write_text(json.dumps({"format": autotune.CACHE_FORMAT,
                                "entries": {other_key: {"path": "taps", "times_ms": {"taps": 1.0}}}}))
    monkeypatch.setenv(autotune.ENV_CACHE, str(path))
    autotune.TUNER.reset()
    fake_clock(monkeypatch, {"unfold:matmul": 0.1, "grouped:chunks": 2.0})  # grouped:chunks stops after its forward
    layer, x = layer_and_input()
    train_step(layer, x)
    assert autotune.TUNER.measured == 1  # the other machine's entry does not serve this one
    entries = json.loads(path.read_text())["entries"]
    assert entries[other_key]["path"] == "taps"
    (key,) = [k for k in entries if k != other_key]
    # unfold:onednn-matmul runs after unfold:matmul, at ten times its cost: stopped after its forward too.
    assert entries[key]["path"] == "unfold:matmul" and entries[key]["pruned"] == ["grouped:chunks"] + ONEDNN
    assert f" | {autotune.device_name('cpu')} | torch {torch.__version__} | " in key
    assert [p.name for p in path.parent.iterdir()] == ["autotune.json"]  # no temporary file left

    autotune.TUNER.reset()  # a new process: the choice comes from the file, nothing is measured
    clock = fake_clock(monkeypatch, {})
    train_step(layer, x)
    assert autotune.TUNER.measured == 0 and clock.runs == ["unfold:matmul"]
    assert "unfold:matmul (cache;" in pedconv.autotune_report()
    assert "grouped:chunks 2000.00 ms (forward)" in pedconv.autotune_report()


@pytest.mark.parametrize("content", ["{not json", json.dumps({"format": "something-else", "entries": {}}),
                                     json.dumps({"format": autotune.CACHE_FORMAT, "entries": {"k": 3}})])
def test_a_corrupt_or_foreign_cache_is_ignored_with_a_warning_and_left_alone(measuring, monkeypatch, tmp_path,
                                                                             content):
    path = tmp_path / "autotune.json"
    path.write_text(content)
    monkeypatch.setenv(autotune.ENV_CACHE, str(path))
    autotune.TUNER.reset()
    fake_clock(monkeypatch, {"unfold:matmul": 0.1})
    layer, x = layer_and_input()
    with pytest.warns(RuntimeWarning, match="autotune cache .* ignored"):
        train_step(layer, x)
    assert layer.path_for(x, training=True) == "unfold:matmul"  # measured, kept in memory
    assert path.read_text() == content


def test_an_unwritable_cache_location_keeps_the_choices_in_memory(measuring, monkeypatch, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv(autotune.ENV_CACHE, str(blocker / "autotune.json"))  # its folder cannot be made
    autotune.TUNER.reset()
    fake_clock(monkeypatch, {"unfold:matmul": 0.1})
    layer, x = layer_and_input()
    with pytest.warns(RuntimeWarning, match="cannot be written"):
        train_step(layer, x)
    train_step(layer, x)
    assert autotune.TUNER.measured == 1 and layer.path_for(x, training=True) == "unfold:matmul"


SHAPES = [(3, 1, 8, 8, 6), (3, 2, 8, 16, 9), (3, 1, 32, 32, 3), (1, 1, 16, 8, 5), (1, 2, 64, 8, 3)]


@pytest.mark.parametrize("switch", ["set_autotune", "environment", "deterministic"])
def test_measuring_off_runs_the_fixed_rule(measuring, monkeypatch, switch):
    if switch == "set_autotune":
        pedconv.set_autotune(False)  # undone by conftest's reset after the test
    elif switch == "environment":
        monkeypatch.setenv(autotune.ENV_SWITCH, "0")
    else:
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        clock = fake_clock(monkeypatch, {})
        for k, stride, cin, cout, size in SHAPES:
            layer, x = layer_and_input(k, stride, cin, cout, size)
            out_size = functional.conv_output_size((size, size), (k, k), (stride,) * 2, (k // 2,) * 2, (1, 1))
            fixed = functional.method_path(functional.choose_method(cin, cout, (k, k), 1, out_size), "cpu",
                                           (k, k), 1, (k // 2,) * 2)
            table = PEDConv2d(cin, cout, k, stride, k // 2, reduction=4, noise_std=0.0, method=fixed)
            table.load_state_dict(layer.state_dict())
            clock.runs.clear()
            assert torch.equal(layer.train()(x), table.train()(x))
            assert clock.runs == [fixed, fixed]
            assert layer.path_for(x) == fixed
        assert autotune.TUNER.measured == 0
    finally:
        torch.use_deterministic_algorithms(False)
    assert not pedconv.is_autotune_enabled() or switch == "deterministic"


def test_nothing_is_measured_while_tracing_or_under_torch_func(measuring, monkeypatch):
    fake_clock(monkeypatch, {})
    layer, x = layer_and_input()
    layer.eval()
    with torch.no_grad():
        traced = torch.jit.trace(layer, x.detach(), check_trace=False)
    torch.testing.assert_close(traced(x.detach()), layer(x.detach()), rtol=1e-5, atol=1e-6)
    autotune.TUNER.reset()
    autotune.TUNER.clock = lambda: 0.0
    params = {name: p.detach() for name, p in layer.named_parameters()}
    torch.func.grad(lambda p: torch.func.functional_call(layer, p, (x.detach(),)).sum())(params)
    torch.func.vmap(lambda sample: layer(sample[None]))(x.detach())
    assert autotune.TUNER.measured == 0


def _ranks_agree_worker(rank, world_size, store, results, costs):
    os.environ[autotune.ENV_SWITCH] = "1"
    os.environ[autotune.ENV_CACHE] = ""
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        autotune.TUNER.reset()
        autotune.TUNER.clock = FakeClock(costs[rank])
        real = functional.run_path

        def run_path(path, *args, **kwargs):
            autotune.TUNER.clock.now += costs[rank].get(path, 1.0)
            return real(path, *args, **kwargs)

        functional.run_path = run_path
        layer, x = layer_and_input()
        train_step(layer, x)
        before = layer.path_for(x, training=True)
        shared = pedconv.share_choices()
        after = layer.path_for(x, training=True)
        with open(f"{results}.{rank}", "w") as file:
            json.dump({"measured": autotune.TUNER.measured, "before": before, "after": after, "shared": shared,
                       "report": pedconv.autotune_report()}, file)
    finally:
        torch.distributed.destroy_process_group()
    # As the engine's ranks do: gloo's threads can outlive destroy_process_group, and a rank that then leaves through
    # the interpreter's shutdown aborted (SIGABRT) in about 1 run in 5 of this test.
    exit_process(0)


def test_ddp_ranks_take_rank_zeros_choices(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    # Rank 0 would pick unfold:matmul, rank 1 (if it measured) grouped:chunks; the fixed rule says grouped.
    costs = [{"unfold:matmul": 0.1}, {"grouped:chunks": 0.1}]
    torch.multiprocessing.spawn(_ranks_agree_worker, args=(2, tmp_path / "store", tmp_path / "result", costs),
                                nprocs=2)
    results = [json.loads((tmp_path / f"result.{rank}").read_text()) for rank in range(2)]
    assert results[0]["measured"] == 1 and results[1]["measured"] == 0
    assert results[0]["before"] == "unfold:matmul" and results[1]["before"] == "grouped"
    assert results[0]["after"] == results[1]["after"] == "unfold:matmul"
    assert results[0]["shared"] == results[1]["shared"] == 1
    assert "unfold:matmul (rank 0;" in results[1]["report"]


def test_compiled_model_equals_eager_on_every_path_without_graph_breaks(measuring):
    """One small model with a layer on each path (and one on auto, measured while compiling)."""
    paths = ["grouped", "grouped:chunks", "unfold:conv", "unfold:matmul", "taps", "auto"] + ONEDNN

    def build():
        torch.manual_seed(0)
        layers = [PEDConv2d(8, 8, 3, 1, 1, reduction=4, noise_std=0.0, method=path) for path in paths]
        layers += [PEDConv2d(8, 8, 3, 1, 1, groups=2, reduction=4, noise_std=0.0, method="unfold"),  # unfold:plain
                   PEDConv2d(8, 16, 1, reduction=4, noise_std=0.0, method="pointwise:per-sample"),
                   PEDConv2d(16, 8, 1, reduction=4, noise_std=0.0, method="pointwise:shared")]
        for layer in layers:
            for linear in layer.attn.modules():
                if isinstance(linear, nn.Linear):
                    nn.init.normal_(linear.weight, 0, 0.5)
        return nn.Sequential(*layers).train()

    x = torch.randn(5, 8, 5, 5).contiguous(memory_format=torch.channels_last)
    eager, compiled_model = build(), build()
    explained = torch._dynamo.explain(compiled_model)(x.clone().requires_grad_(True))
    assert explained.graph_break_count == 0, explained.break_reasons
    torch._dynamo.reset()
    compiled = torch.compile(compiled_model, options=pedconv.inductor_options(compiled_model))  # as the engine
    outputs, grads = [], []
    for model in (eager, compiled):
        leaf = x.clone().requires_grad_(True)
        out = model(leaf)
        loss = (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum() + pedconv.info_max_loss(model)
        loss.backward()
        outputs.append(out)
        grads.append([leaf.grad] + [p.grad for p in model.parameters()])
    assert outputs[1].is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-6)
    for compiled_grad, eager_grad in zip(grads[1], grads[0]):
        torch.testing.assert_close(compiled_grad, eager_grad, rtol=1e-4, atol=1e-6)



def test_inductor_options_turn_layout_optimization_off_for_pedconv_models_only():
    """A PEDConv layer anywhere in the model (the optimization would convert every such layer's tensors between
    layouts); a model without one compiles with Inductor's defaults."""
    static = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Sequential(nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3)))
    assert pedconv.inductor_options(static) == {}
    dynamic = pedconv.convert(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Sequential(nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3))))
    assert isinstance(dynamic[1][1], PEDConv2d)
    assert pedconv.inductor_options(dynamic) == {"layout_optimization": False}
    import torch._inductor.config as inductor_config
    assert hasattr(inductor_config, "layout_optimization")  # the setting exists under this name in this torch


def test_compiled_gate_noise_is_eager_modes_draw():
    """Under torch.compile the gate noise comes from the same generator as in eager mode (an opaque call, not one
    Inductor kernel per layer): with the same seed a compiled noisy layer gives the eager layer's output."""
    torch.manual_seed(0)
    layers = nn.Sequential(PEDConv2d(8, 8, 3, 1, 1, reduction=4, noise_std=1.0),
                           PEDConv2d(8, 8, 3, 1, 1, reduction=4, noise_std=1.0)).train()
    for linear in layers.modules():
        if isinstance(linear, nn.Linear):
            nn.init.normal_(linear.weight, 0, 0.5)
    x = torch.randn(4, 8, 5, 5)
    outputs, grads = [], []
    torch._dynamo.reset()  # static shapes: no sizes seen by earlier tests' compiles
    for model in (layers, torch.compile(layers, fullgraph=True)):
        torch.manual_seed(1)
        leaf = x.clone().requires_grad_(True)
        outputs.append(model(leaf))
        outputs[-1].square().sum().backward()  # the backward sees the same draw (not one drawn again)
        grads.append(leaf.grad)
    torch.manual_seed(2)
    other_draw = layers(x)
    assert not torch.allclose(other_draw, outputs[0], rtol=1e-3, atol=1e-4)  # the noise matters at this size
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)


def test_compiled_model_takes_batches_of_other_sizes_without_graph_breaks(measuring):
    """A batch of another size makes torch.compile recompile with a symbolic batch (automatic dynamic shapes):
    the measured choice must still be a constant of the graph (fullgraph: a graph break raises)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(PEDConv2d(8, 8, 3, 1, 1, reduction=4, noise_std=0.0),
                          PEDConv2d(8, 8, 1, reduction=4, noise_std=0.0)).train()
    compiled = torch.compile(model, fullgraph=True)
    for batch in (4, 3, 2):
        x = torch.randn(batch, 8, 5, 5)
        torch.testing.assert_close(compiled(x.clone().requires_grad_(True)), model(x), rtol=1e-5, atol=1e-6)

def test_main_offers_every_method_and_path_of_the_library():
    import main as cli

    action = next(a for a in cli.build_parser()._actions if a.dest == "pedconv_method")
    assert sorted(action.choices) == sorted(set(functional.METHODS + functional.PATHS))
