"""Checks that this Python environment has what pedconv needs, and prints the versions that matter.

Run by the Dockerfile at build time (no GPU needed), so that a base image lacking a feature fails the build
rather than a training run; also useful inside a container: `python docker/check_image.py`.
Features are checked rather than version numbers, since NGC builds carry versions like 2.14.0a0+4fdf77b.
"""

import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project root


def main() -> int:
    import numpy
    import PIL
    import torch
    import torchvision

    problems = []
    checks = {
        "torch.compile": lambda: torch.compile,
        "torch.amp.autocast / GradScaler": lambda: (torch.amp.autocast, torch.amp.GradScaler),
        "torch.utils.flop_counter": lambda: importlib.import_module("torch.utils.flop_counter").FlopCounterMode,
        "torch.distributed (gloo)": lambda: torch.distributed.is_gloo_available() or None,
        "torch.distributed (nccl)": lambda: torch.distributed.is_nccl_available() or None,
        "nvidia.dali.fn.decoders.image_random_crop": lambda: importlib.import_module(
            "nvidia.dali.fn").decoders.image_random_crop,
        "nvidia.dali.auto_aug.auto_augment": lambda: importlib.import_module("nvidia.dali.auto_aug.auto_augment"),
        "nvidia.dali.plugin.pytorch": lambda: importlib.import_module("nvidia.dali.plugin.pytorch"),
        "PyYAML (launch.py's configs.yml)": lambda: importlib.import_module("yaml").safe_load,
        "scikit-learn (demo data)": lambda: importlib.import_module("sklearn.datasets").load_digits,
        "pedconv, dataloading, image_classification": lambda: [
            importlib.import_module(name) for name in ("pedconv", "dataloading", "image_classification")],
    }
    for name, check in checks.items():
        try:
            if check() is None:
                problems.append(f"{name}: not available")
        except (ImportError, AttributeError) as error:
            problems.append(f"{name}: {error}")

    dali_version = "missing"
    try:
        dali_version = importlib.import_module("nvidia.dali").__version__
    except ImportError:
        pass
    print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}, "
          f"cuDNN {torch.backends.cudnn.version()}), torchvision {torchvision.__version__}, DALI {dali_version}, "
          f"numpy {numpy.__version__}, Pillow {PIL.__version__}")
    for problem in problems:
        print(f"missing: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
