"""NVIDIA DLE's recipe launcher: a named recipe from configs.yml, then main.py with the command line over it.

    python ./launch.py --model resnet50 --precision AMP --mode convergence --platform DGXA100 /imagenet \\
        --workspace ./ --raport-file raport.json
    python ./multiproc.py --nproc_per_node 8 ./launch.py --model pedconv-resnet18 --precision AMP \\
        --mode convergence --platform DGX1V /imagenet
    python ./launch.py --model pedconv-resnet50 --precision FP32 --mode convergence --platform CPU /data/tiny \\
        --epochs 1 --prof 10                                              # try a recipe on a laptop

``--model``, ``--precision`` (AMP, FP32, TF32), ``--mode`` (convergence, benchmark_training,
benchmark_training_short, benchmark_inference, evaluate) and ``--platform`` (DGX1V, DGX1V-16G, DGX1V-32G, DGX2V,
DGXA100, T4, CPU) pick the recipe from ``--cfg_file`` (configs.yml beside this file); its settings become main.py's
defaults, so every other argument is main.py's and overrides them. An unknown argument is an error (exit status
2), as is a recipe the config does not have.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import main as training
from errors import EXIT_BAD_INPUT, UserError

LEVELS = ("model", "platform", "precision", "mode")


class RecipeError(UserError):
    """A config file or a recipe choice that cannot be used; the message is one line."""


def default_config_path() -> Path:
    return Path(__file__).resolve().parent / "configs.yml"


def read_config(path) -> Dict[str, Any]:
    import yaml

    try:
        with open(path, encoding="utf-8") as stream:
            config = yaml.safe_load(stream)
    except OSError as error:
        raise RecipeError(f"{path}: cannot read: {error.strerror or error}") from None
    except yaml.YAMLError as error:
        raise RecipeError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None
    sections = ("precision", "platform", "mode", "models")
    missing = [key for key in sections if not isinstance((config or {}).get(key), dict)]
    if missing:
        raise RecipeError(f"{path}: no {', '.join(missing)} section (see configs.yml)")
    return config


def _pick(section: Dict[str, Any], name: str, what: str) -> Dict[str, Any]:
    if name not in section:
        raise RecipeError(f"unknown {what} {name!r}; valid: {', '.join(map(str, section))}")
    return dict(section[name] or {})


def recipe(config: Dict[str, Any], model: str, platform: str, precision: str, mode: str) -> Dict[str, Any]:
    """The merged settings: precision, platform, the model's recipe for that platform and precision, mode."""
    precision_settings = _pick(config["precision"], precision, "--precision")
    platform_settings = _pick(config["platform"], platform, "--platform")
    mode_settings = _pick(config["mode"], mode, "--mode")
    platforms = _pick(config["models"], model, "--model")
    if platform not in platforms:
        raise RecipeError(f"--model {model} has no recipe for --platform {platform}; its platforms: "
                          f"{', '.join(platforms)}")
    if precision not in (platforms[platform] or {}):
        raise RecipeError(f"--model {model} has no {precision} recipe on {platform}; its precisions there: "
                          f"{', '.join(platforms[platform] or {})}")
    return {**precision_settings, **platform_settings, **dict(platforms[platform][precision] or {}), **mode_settings}


def auto_workers() -> int:
    """Data workers per process on the CPU platform: a quarter of this process's CPUs, shared by the node's
    processes, at least one."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    processes = max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1)
    return max(1, cpus // processes // 4)


def _recipe_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="launch.py", add_help=False, allow_abbrev=False)
    parser.add_argument("--cfg_file", default=None, metavar="FILE",
                        help="recipes (default: configs.yml beside launch.py)")
    parser.add_argument("--model", default=None, help="a recipe name under models: (resnet50, pedconv-resnet18, ...)")
    parser.add_argument("--precision", default=None, help="AMP | FP32 | TF32")
    parser.add_argument("--mode", default=None,
                        help="convergence | benchmark_training | benchmark_training_short | benchmark_inference | "
                             "evaluate")
    parser.add_argument("--platform", default=None, help="DGX1V | DGX1V-16G | DGX1V-32G | DGX2V | DGXA100 | T4 | CPU")
    return parser


def build_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """main.py's arguments for a launch.py command line: the recipe's settings under the command line's flags.
    RecipeError for a bad recipe; argparse's usage error (exit status 2) for an unknown argument."""
    chosen, rest = _recipe_parser().parse_known_args(argv)
    absent = [f"--{level}" for level in LEVELS if getattr(chosen, level) is None]
    if absent:
        raise RecipeError(f"{', '.join(absent)} required (see python launch.py --help)")
    path = chosen.cfg_file or default_config_path()
    settings = recipe(read_config(path), chosen.model, chosen.platform, chosen.precision, chosen.mode)
    parser = training.build_parser()
    parser.prog = "launch.py"
    known = {action.dest for action in parser._actions}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise RecipeError(f"{path}: recipe {chosen.model}/{chosen.platform}/{chosen.precision}/{chosen.mode} sets "
                          f"{', '.join(unknown)}, which main.py does not have")
    if settings.get("workers") == "auto":
        settings["workers"] = auto_workers()
    parser.set_defaults(**settings)

    def one_line_error(message: str):
        raise RecipeError(f"{message} (see python launch.py --help)")

    parser.error = one_line_error  # an unknown or malformed argument: one line, exit status 2
    args = parser.parse_args(rest)
    if args.data is None:
        raise RecipeError("no data folder given: launch.py needs DIR (a folder with train/ and val/)")
    args.demo = False
    if args.workspace is None:
        from image_classification.workspace import default_workspace

        args.workspace = default_workspace(args.arch)
    args.recipe = f"{chosen.model}/{chosen.platform}/{chosen.precision}/{chosen.mode} from {path}"  # in the report
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(__doc__.strip() + "\n")
        _recipe_parser().print_help()
        print("\nThe other arguments are main.py's:\n")
        training.build_parser().print_help()
        return 0
    try:
        args = build_args(argv)
    except UserError as error:  # RecipeError, main.py's UsageError
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return training.run_parsed(args)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    status = main()
    from image_classification.distributed import exit_with

    exit_with(status)  # a rank of several leaves without the interpreter's shutdown (see exit_process)
