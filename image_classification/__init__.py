"""The PEDConv training system's engine and its parts (models, checkpoints, the training loop, reports).

The engine's entry point: ``image_classification.run(config: RunConfig) -> RunResult`` (see :mod:`.engine` for the
two types and :func:`.runner.run`); main.py and launch.py run through it, code builds a config with
``main.run_config``. The three names are imported on first use, so that importing a part (main.py's parser imports
``image_classification.affinity``) does not import the engine and torch.
"""

_ENGINE_NAMES = {"run": "runner", "RunConfig": "engine", "RunResult": "engine"}


def __getattr__(name: str):
    if name not in _ENGINE_NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".{_ENGINE_NAMES[name]}", __name__), name)
