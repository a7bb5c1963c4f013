"""One command for a GPU machine: the CUDA tests, then the layer and model benchmarks, into one JSON file.

    python benchmarks/gpu_check.py --out DIR

1. ``python -m pytest -m cuda``: the operator's CUDA paths (float32/float16/bfloat16, NCHW and channels_last)
   against the release's computation, the training step (AMP, host synchronizations, fused SGD), the pytorch
   backend's prefetcher, the DALI loaders on the GPU, a CUDA checkpoint read on the CPU;
2. ``benchmarks/pedconv_layer.py``: ResNet-18 and -50 PEDConv layers against static convolutions, float16 with
   channels_last, with the ``grouped`` and ``unfold`` paths also forced (is the CUDA rule right?);
3. ``benchmarks/models.py``: the ResNet-18 and -50 training step, static vs PEDConv, float32 and AMP +
   channels_last;
4. torch's fused SGD step against apex's FusedSGD, where apex imports (``--optimizer-impl apex`` is worth it only
   if apex is faster);
5. whether every library DALI's backend loads resolves.

``DIR/gpu_check.json`` gets every figure, each stage's output, the GPU, the driver and the library versions;
``DIR/cuda_tests.xml`` the tests' JUnit report. Each stage has a time limit, the whole run takes at most about 8
minutes on one GPU. Exit status: 0 when the tests passed, 1 when a test or stage failed, 2 without CUDA (one line).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from typing import Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Seconds per stage: the whole check stays under 8 minutes.
LIMITS = {"tests": 180, "layers": 100, "models": 150, "optimizer": 30}
RATIO = re.compile(r"^RATIO (.+?) = ([0-9.]+)")
PYTEST_SUMMARY = re.compile(r"(\d+) (passed|failed|skipped|error|errors|deselected)")


def parse_ratios(output: str) -> Dict[str, float]:
    """The ``RATIO <name> = <value>`` lines the benchmarks print (a models.py line may hold two)."""
    ratios = {}
    for line in output.splitlines():
        for part in line.split("   "):
            match = RATIO.match(part.strip()) or re.match(r"^(memory .+?) = ([0-9.]+)", part.strip())
            if match:
                ratios[match.group(1)] = float(match.group(2))
    return ratios


def parse_pytest_counts(output: str) -> Dict[str, int]:
    lines = [line for line in output.splitlines() if re.search(r"\d+ (passed|failed|skipped|error)", line)]
    counts: Dict[str, int] = {}
    for number, word in PYTEST_SUMMARY.findall(lines[-1] if lines else ""):
        counts["errors" if word.startswith("error") else word] = int(number)
    return counts


def run_stage(command: List[str], limit: int) -> dict:
    """Run one stage as a subprocess with a time limit; its status, time and output."""
    start = time.perf_counter()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    try:
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=limit, env=env)
        status, output = result.returncode, result.stdout + result.stderr
    except subprocess.TimeoutExpired as error:
        status = "timeout"
        output = (error.stdout or b"").decode(errors="replace") if isinstance(error.stdout, bytes) else (
            error.stdout or "")
    return {"command": " ".join(command), "status": status, "seconds": round(time.perf_counter() - start, 1),
            "output": output[-20000:]}


def _version(module: str) -> Optional[str]:
    try:
        imported = __import__(module, fromlist=["__version__"])
    except Exception:  # noqa: BLE001 - any import failure means "not usable here"
        return None
    return getattr(imported, "__version__", "unknown")


def environment() -> dict:
    """The GPU, the driver and the library versions."""
    import torch

    properties = torch.cuda.get_device_properties(0)
    driver = None
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=30).stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        pass
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "host_cpu": platform.processor() or platform.machine(),
        "gpu": properties.name,
        "gpu_count": torch.cuda.device_count(),
        "compute_capability": f"{properties.major}.{properties.minor}",
        "gpu_memory_gib": round(properties.total_memory / 2**30, 1),
        "driver": driver,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if hasattr(torch.cuda, "nccl") else None,
        "torchvision": _version("torchvision"),
        "dali": _version("nvidia.dali"),
        "apex": _version("apex"),
    }


def fused_sgd_versus_apex(steps: int = 50) -> dict:
    """Median optimizer step time over ResNet-50's parameters: torch's fused SGD and, where it imports, apex's."""
    import torch

    from image_classification.models import build_model
    from image_classification.optim import build_optimizer

    result = {}
    model = build_model("resnet50", dynamic=True).cuda()
    for parameter in model.parameters():
        parameter.grad = torch.randn_like(parameter)
    for implementation in ("torch", "apex"):
        try:
            optimizer = build_optimizer(model, "sgd", 0.1, 0.9, 1e-4, device_type="cuda",
                                        implementation=implementation)
        except ValueError as error:
            result[implementation] = str(error)
            continue
        times = []
        for _ in range(steps):
            torch.cuda.synchronize()
            start = time.perf_counter()
            optimizer.step()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        result[f"{implementation}_step_ms"] = round(sorted(times)[len(times) // 2] * 1e3, 3)
    if "apex_step_ms" in result:
        result["apex/torch"] = round(result["apex_step_ms"] / result["torch_step_ms"], 3)
    return result


def write_json(path: str, data: dict) -> None:
    temporary = f"{path}.tmp{os.getpid()}"
    with open(temporary, "w", encoding="utf-8") as stream:
        json.dump(data, stream, indent=1)
    os.replace(temporary, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for gpu_check.json and cuda_tests.xml")
    parser.add_argument("--skip-benchmarks", action="store_true", help="only the CUDA tests and the versions")
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device is available (torch.cuda.is_available() is False): nothing to check",
              file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    python = sys.executable
    report = {"environment": environment(), "stages": {}, "figures": {}}
    path = os.path.join(args.out, "gpu_check.json")

    def record(name: str, stage: dict) -> None:
        report["stages"][name] = stage
        write_json(path, report)  # a partial report survives a stage that hangs or kills the process
        print(f"gpu_check: {name}: {stage['status']} in {stage['seconds']} s", flush=True)

    tests = run_stage([python, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider",
                       "--junitxml", os.path.join(os.path.abspath(args.out), "cuda_tests.xml")], LIMITS["tests"])
    tests["counts"] = parse_pytest_counts(tests["output"])
    record("tests", tests)
    if not args.skip_benchmarks:
        layers = run_stage([python, "benchmarks/pedconv_layer.py", "--arch", "resnet18", "resnet50", "-b", "64",
                            "--dtype", "float16", "--channels-last", "--methods", "grouped", "unfold",
                            "--iters", "5", "--no-memory", "--no-reference"], LIMITS["layers"])
        layers["ratios"] = parse_ratios(layers["output"])
        record("layers", layers)
        for arch in ("resnet18", "resnet50"):
            models = run_stage([python, "benchmarks/models.py", "--arch", arch, "-b", "64", "--iters", "5",
                                "--no-reference"], LIMITS["models"] // 2)
            models["ratios"] = parse_ratios(models["output"])
            record(f"models_{arch}", models)
        start = time.perf_counter()
        try:
            optimizer = {"status": 0, "figures": fused_sgd_versus_apex()}
        except Exception as error:  # noqa: BLE001 - reported, the check goes on
            optimizer = {"status": f"error: {error}"}
        optimizer["seconds"] = round(time.perf_counter() - start, 1)
        record("optimizer", optimizer)
    from dataloading import dali_libraries

    dali = dali_libraries.check()
    report["dali_libraries"] = dali.describe()
    for name, stage in report["stages"].items():
        for key, value in stage.get("ratios", {}).items():
            report["figures"][f"{name}: {key}"] = value
        for key, value in stage.get("figures", {}).items():
            report["figures"][f"{name}: {key}"] = value
    write_json(path, report)
    counts = tests["counts"]
    print(f"gpu_check: {counts.get('passed', 0)} CUDA tests passed, {counts.get('failed', 0)} failed, "
          f"{counts.get('skipped', 0)} skipped; {len(report['figures'])} figures; DALI: {report['dali_libraries']}")
    print(f"gpu_check: report: {path}")
    failed = tests["status"] != 0 or any(stage["status"] != 0 for stage in report["stages"].values())
    return 1 if failed or not dali.ok and dali.dali_dir is not None else 0


if __name__ == "__main__":
    sys.exit(main())
