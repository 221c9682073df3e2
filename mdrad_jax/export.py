"""Export a trained network's variables to one ``.safetensors`` (or ``.npz``) file, to share or check elsewhere.

Usage: ``python -m mdrad_jax.export --workdir=RUN --out=FILE.safetensors [--which=best|latest]``.

Layout (docs/teachers.md): one float32 array per variable, keyed by its Flax path joined by ``/`` under its
collection, e.g. ``params/conv1/kernel`` (convolutions HWIO ``[kh, kw, in/groups, out]``, dense kernels
``[in, out]``), ``params/bn1/scale``, ``params/bn1/bias``, ``batch_stats/bn1/mean``, ``batch_stats/bn1/var``.  The
metadata (safetensors' string header; in an ``.npz`` the UTF-8 JSON array ``__metadata__``) holds ``format``
(``mdrad_jax.export/1``) and ``model``: a JSON object with the zoo name, its options (input normalisation
included), ``num_classes`` and ``image_shape``, enough to rebuild the network with
``mdrad_jax.models.get_model``; also the workdir and checkpoint it came from.  The file imports back with
``configs/import_teacher.py:source=FILE,arch=mdrad:export``.  The file is written to a temporary name and
renamed, so an interrupted export never leaves a truncated file in its place.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from mdrad_jax.errors import UserError

from mdrad_jax.importers.files import NPZ_METADATA_KEY

FORMAT = "mdrad_jax.export/1"


def flatten(variables: dict) -> dict[str, np.ndarray]:
  """``{'params': {...}, 'batch_stats': {...}}`` -> ``{'params/a/b/kernel': array, ...}`` (float32)."""
  out = {}

  def walk(node, prefix):
    for k, v in node.items():
      if hasattr(v, "items"):
        walk(v, prefix + (str(k),))
      else:
        out["/".join(prefix + (str(k),))] = np.ascontiguousarray(np.asarray(v, np.float32))

  for col in ("params", "batch_stats"):
    if col in variables:
      walk(variables[col], (col,))
  return out


def export(workdir: str, out: str, *, which: str = "best") -> dict:
  """Writes the network of run ``workdir`` to ``out``; returns the metadata written."""
  from mdrad_jax import runs

  ext = os.path.splitext(out)[1].lower()
  if ext not in (".safetensors", ".npz"):
    raise UserError(f"--out must end in .safetensors or .npz, got {out!r}")
  if which not in ("best", "latest"):
    raise UserError(f"--which must be 'best' or 'latest', got {which!r}")
  try:
    variables, run_cfg = runs.load_model_variables(workdir, which=which, what="--workdir")
  except FileNotFoundError as e:
    raise UserError(str(e)) from None
  if not run_cfg or "model" not in run_cfg:
    raise UserError(f"{workdir}: no config.json with a model block next to the checkpoint")
  model = {
    "name": run_cfg["model"]["name"],
    "kwargs": run_cfg["model"].get("kwargs", {}) or {},
    "num_classes": run_cfg.get("num_classes"),
    "image_shape": run_cfg.get("image_shape"),
  }
  metadata = {
    "format": FORMAT,
    "model": json.dumps(model, sort_keys=True),
    "workdir": os.path.abspath(workdir),
    "which": which,
  }
  arrays = flatten(variables)
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  tmp = out + ".tmp" + ext
  if ext == ".safetensors":
    from safetensors.numpy import save_file

    save_file(arrays, tmp, metadata=metadata)
  else:
    blob = np.frombuffer(json.dumps(metadata, sort_keys=True).encode("utf-8"), np.uint8)
    np.savez(tmp, **arrays, **{NPZ_METADATA_KEY: blob})
  os.replace(tmp, out)
  return metadata


def read_metadata(path: str) -> dict[str, str]:
  """The metadata of an exported file ({} when it has none)."""
  if path.lower().endswith(".safetensors"):
    from safetensors import safe_open

    with safe_open(path, framework="numpy") as f:
      return dict(f.metadata() or {})
  if path.lower().endswith(".npz"):
    with np.load(path, allow_pickle=False) as z:
      if NPZ_METADATA_KEY in z.files:
        return json.loads(bytes(z[NPZ_METADATA_KEY]).decode("utf-8"))
  return {}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m mdrad_jax.export", description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True, help="training (or import) workdir")
  parser.add_argument("--out", required=True, help="output file, .safetensors or .npz")
  parser.add_argument("--which", default="best", help="best | latest checkpoint")
  args = parser.parse_args(argv)
  try:
    meta = export(args.workdir, args.out, which=args.which)
  except UserError as e:
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    return 2
  print(f"wrote {args.out} ({json.loads(meta['model'])['name']}, {args.which} checkpoint of {args.workdir})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
