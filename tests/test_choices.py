"""Each list of valid values has one home (choices.py, torch-free, or pedconv's own for the operator's methods),
and the command lines offer exactly those lists."""
import subprocess
import sys

import choices
import main as cli
import pedconv
from dataloading import options as loader_options
from image_classification import models, optim


def _choices(parser, dest):
    return next(a for a in parser._actions if a.dest == dest).choices


def test_main_help_choices_come_from_the_library_constants():
    parser = cli.build_parser()
    assert tuple(_choices(parser, "pedconv_method")) == choices.PEDCONV_METHODS
    backends = loader_options.BACKENDS + tuple(loader_options.BACKEND_ALIASES)
    assert tuple(_choices(parser, "data_backend")) == backends
    assert tuple(_choices(parser, "memory_format")) == tuple(loader_options.MEMORY_FORMATS)
    assert tuple(_choices(parser, "interpolation")) == choices.INTERPOLATIONS
    assert tuple(_choices(parser, "device")) == choices.DEVICES
    assert tuple(_choices(parser, "lr_schedule")) == optim.SCHEDULES


def test_the_parsers_list_of_pedconv_methods_is_the_operator_librarys():
    # pedconv stays independent (and importing it imports torch): choices.py spells its list out for the parsers.
    assert choices.PEDCONV_METHODS == pedconv.METHODS + tuple(p for p in pedconv.PATHS if p not in pedconv.METHODS)


def test_every_architecture_name_has_a_layout_and_builds():
    assert models.ARCHITECTURES is choices.ARCHITECTURES
    assert set(models._LAYOUTS) | set(models._OTHER_FAMILIES) == set(choices.ARCHITECTURES)
    assert len(models._LAYOUTS) + len(models._OTHER_FAMILIES) == len(choices.ARCHITECTURES)
    for name in models._LAYOUTS:
        models.layout(name)
    for name in choices.ARCHITECTURES:
        assert callable(getattr(models, name.replace("-", "_")))


def test_the_libraries_use_the_one_list():
    assert loader_options.BACKENDS is choices.DATA_BACKENDS
    assert loader_options.BACKEND_ALIASES is choices.DATA_BACKEND_ALIASES
    assert set(choices.SYNTHETIC_BACKENDS) == {"synthetic", *(alias for alias, name in
                                                                choices.DATA_BACKEND_ALIASES.items()
                                                                if name == "synthetic")}
    assert optim.SCHEDULES is choices.LR_SCHEDULES


def test_main_help_imports_no_torch():
    code = "import sys, main; main.build_parser().format_help(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
