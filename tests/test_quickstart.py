"""The main job end to end (its small variant): files written, numbers consistent with the checkpoints."""

import json
import os

import jax.numpy as jnp
import numpy as np
from PIL import Image

from mdrad_jax import data, quickstart, runs
from mdrad_jax.config_lib import parse_arg  # noqa: F401  (config files import it)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _quickstart_config(data_dir):
  import importlib.util

  spec = importlib.util.spec_from_file_location("qs", os.path.join(ROOT, "configs", "quickstart.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config("small")
  c.data.data_dir = str(data_dir)
  c.attack.num_steps = 2
  return c


def test_quickstart_small_end_to_end(tmp_path):
  cfg = _quickstart_config(tmp_path / "data")
  work = tmp_path / "qs"
  res = quickstart.run(cfg, str(work))
  for name in ("results.json", "results.md", "results.png", "config.json"):
    assert (work / name).is_file()
  Image.open(work / "results.png").verify()
  with open(work / "results.json") as f:
    saved = json.load(f)
  assert saved == json.loads(json.dumps(res))
  roles = [(r["role"], r["name"]) for r in saved["rows"]]
  assert roles == [("teacher", "tiny_cnn"), ("teacher", "mlp"), ("student", "sa_mdrad"), ("student", "pgd_at")]
  # the SA-MDRAD student was distilled from both teachers
  with open(work / "students" / "sa_mdrad" / "config.json") as f:
    assert len(json.load(f)["teachers"]) == 2
  # clean accuracy in the report equals a direct forward pass of the saved checkpoint
  images, labels = data.load_arrays("digits", "test", data_dir=str(tmp_path / "data"))
  model, variables = runs.load_trained(str(work / "teachers" / "mlp"), "latest", num_classes=10)[:2]
  pred = np.argmax(np.asarray(model.apply(variables, jnp.asarray(images), train=False)), -1)
  assert saved["rows"][1]["clean"] == np.mean(pred == labels)
  for r in saved["rows"]:
    assert 0.0 <= r["pgd20"] <= r["clean"] <= 1.0
