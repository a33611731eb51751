"""The recipes ship in the package and `--config` takes their names (gta_jax/recipes/)."""

import os
import subprocess
import sys

import pytest

from gta_jax import recipes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_configs_is_the_recipes_folder():
  """One copy of each recipe: the repository's configs/ is the package's folder."""
  assert os.path.samefile(os.path.join(REPO, "configs"), recipes.DIRECTORY)
  assert os.path.dirname(recipes.DIRECTORY) == os.path.join(REPO, "gta_jax")


def test_names_are_the_recipe_files():
  names = recipes.names()
  assert {"synthetic_gta", "synthetic_tsm", "ssv2_gta_r50_8f", "k400_ssa_r50_8f"} <= set(names)
  assert not any(n.startswith("_") for n in names)
  assert recipes.path("synthetic_gta") == os.path.join(recipes.DIRECTORY, "synthetic_gta.py")


@pytest.mark.parametrize("argument,want", [
    ("synthetic_gta", os.path.join(recipes.DIRECTORY, "synthetic_gta.py")),
    ("synthetic_gta:small", os.path.join(recipes.DIRECTORY, "synthetic_gta.py") + ":small"),
    ("configs/synthetic_gta.py", "configs/synthetic_gta.py"),
    ("mine.py", "mine.py"),
    ("/abs/mine.py:arg", "/abs/mine.py:arg"),
    ("../synthetic_gta", "../synthetic_gta"),
])
def test_resolve_names_and_paths(argument, want):
  assert recipes.resolve(argument) == want


def test_an_unknown_name_lists_the_recipes():
  with pytest.raises(ValueError, match="no recipe named 'synthetic_gat'.*synthetic_gta"):
    recipes.resolve("synthetic_gat")


FLAG_SCRIPT = """
from absl import app
from gta_jax import cli
config = cli.define_config_flag("A config.")
app.run(lambda argv: print(config.value.model.temporal_modules, config.value.data.num_frames,
                           config.value.is_locked))
"""


@pytest.mark.parametrize("argument,want", [
    ("synthetic_gta", "gta 4 True"),
    (os.path.join("configs", "synthetic_tsm.py"), "tsm 4 True"),
])
def test_config_flag_takes_a_name_or_a_path_with_overrides(argument, want):
  result = subprocess.run(
      [sys.executable, "-c", FLAG_SCRIPT, f"--config={argument}", "--config.data.num_frames=4"],
      cwd=REPO, capture_output=True, text=True, timeout=120, check=True)
  assert result.stdout.strip() == want


def test_config_flag_reports_an_unknown_name():
  result = subprocess.run([sys.executable, "-c", FLAG_SCRIPT, "--config=nope"], cwd=REPO,
                          capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode == 1
  assert "no recipe named 'nope'" in result.stderr and "synthetic_gta" in result.stderr


def test_the_listing_names_every_recipe():
  out = subprocess.run([sys.executable, "-m", "gta_jax.recipes"], capture_output=True,
                       text=True, timeout=120, check=True).stdout
  listed = [line.split()[0] for line in out.splitlines()[1:] if line and " " in line
            and not line.startswith("files:")]
  assert listed == recipes.names()
  line = next(l for l in out.splitlines() if l.startswith("synthetic_gta "))
  assert line.split()[1:5] == ["classification", "synthetic_motion", "resnet2d-50[1,1,1,1]",
                               "gta"]
