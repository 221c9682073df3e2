"""Reading a network's weights from a file written elsewhere: a flat ``{name: float32 array}`` state dict.

Formats, by extension:

* ``.pt`` / ``.pth`` / ``.th`` / ``.tar`` / ``.bin``: PyTorch pickles, read with
  ``torch.load(weights_only=True)`` (PyTorch is the optional ``torch`` extra).  Only tensors, containers and
  plain values are unpickled; a pickle that would build any other object (and so could run code) is refused
  with a :class:`UserError` before anything of it runs;
* ``.safetensors``: read with the ``safetensors`` package's NumPy loader (no PyTorch needed);
* ``.npz``: NumPy's archive, read with ``allow_pickle=False``.

Checkpoints often wrap the state dict: :func:`unwrap` descends into ``state_dict`` / ``model_state_dict`` /
``model`` / ``net`` / ``state`` entries (a training checkpoint's optimizer and epoch entries are left out), and
strips the ``module.`` prefix of ``DataParallel`` and the ``model.`` prefix of wrapper modules when every key
has it.  BatchNorm's ``num_batches_tracked`` counters are dropped.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from mdrad_jax.errors import UserError

TORCH_EXTENSIONS = (".pt", ".pth", ".th", ".tar", ".bin")
FORMATS = TORCH_EXTENSIONS + (".safetensors", ".npz")
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "state")
WRAPPER_PREFIXES = ("module.", "model.")
NPZ_METADATA_KEY = "__metadata__"  # mdrad_jax.export's metadata entry in an .npz (not a variable)


def file_format(path: str) -> str:
  ext = os.path.splitext(path)[1].lower()
  if ext in TORCH_EXTENSIONS:
    return "torch"
  if ext == ".safetensors":
    return "safetensors"
  if ext == ".npz":
    return "npz"
  raise UserError(f"{path}: unknown weights format {ext or '(no extension)'!r}; expected one of {', '.join(FORMATS)}")


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """The unwrapped state dict in ``path`` as float32 NumPy arrays (integer buffers kept as they are)."""
  path = os.path.abspath(os.path.expanduser(path))
  fmt = file_format(path)
  if not os.path.isfile(path):
    raise UserError(f"weights file not found: {path}")
  if fmt == "torch":
    raw = _load_torch(path)
  elif fmt == "safetensors":
    raw = _load_safetensors(path)
  else:
    raw = _load_npz(path)
  return unwrap(raw, path)


def _load_torch(path: str):
  try:
    import torch
  except ImportError:
    raise UserError(
      f"{path}: reading PyTorch files needs PyTorch (pip install 'mdrad_jax[torch]'), or "
      f"convert the file to .safetensors or .npz elsewhere"
    ) from None
  import pickle

  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise UserError(
      f"{path}: refused, the pickle holds more than tensors (only plain state dicts are "
      f"read, e.g. torch.save(model.state_dict()); nothing of it was run): {first}"
    ) from None
  except (RuntimeError, EOFError, OSError, ValueError) as e:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise UserError(f"{path}: not a readable PyTorch file: {first}") from None
  return _torch_to_numpy(obj)


def _torch_to_numpy(obj):
  import torch

  if isinstance(obj, torch.Tensor):
    t = obj.detach().cpu()
    if t.is_floating_point():
      t = t.to(torch.float32)
    return t.numpy()
  if isinstance(obj, dict):
    return {k: _torch_to_numpy(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return type(obj)(_torch_to_numpy(v) for v in obj)
  return obj


def _load_safetensors(path: str) -> dict:
  from safetensors import SafetensorError
  from safetensors.numpy import load_file

  try:
    return load_file(path)
  except (SafetensorError, OSError, ValueError, TypeError) as e:
    raise UserError(f"{path}: not a readable safetensors file: {' '.join(str(e).split())}") from None


def _load_npz(path: str) -> dict:
  try:
    with np.load(path, allow_pickle=False) as z:
      return {k: z[k] for k in z.files if k != NPZ_METADATA_KEY}
  except ValueError as e:  # object arrays need pickle: refused
    raise UserError(f"{path}: refused, the archive holds pickled objects, not plain arrays ({e})") from None
  except (OSError, EOFError) as e:
    raise UserError(f"{path}: not a readable .npz archive: {e}") from None


def _is_array(v: Any) -> bool:
  return isinstance(v, np.ndarray) or np.isscalar(v) and isinstance(v, np.generic)


def unwrap(obj: Any, path: str = "weights") -> dict[str, np.ndarray]:
  """The flat state dict inside a (possibly wrapped) checkpoint object; see the module docstring."""
  seen = []
  while isinstance(obj, dict) and not any(_is_array(v) for v in obj.values()):
    inner = next((k for k in WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
    if inner is None:
      break
    seen.append(inner)
    obj = obj[inner]
  if not isinstance(obj, dict) or not obj:
    raise UserError(
      f"{path}: no state dict found (expected a mapping of parameter names to tensors"
      f"{', looked inside ' + '/'.join(seen) if seen else ''})"
    )
  state = {}
  for k, v in obj.items():
    if not _is_array(v):
      raise UserError(
        f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor (expected a flat state "
        f"dict{', found under ' + '/'.join(seen) if seen else ''})"
      )
    if str(k).endswith("num_batches_tracked"):
      continue
    a = np.asarray(v)
    if np.issubdtype(a.dtype, np.floating):
      a = a.astype(np.float32)
    state[str(k)] = a
  changed = True
  while changed and state:
    changed = False
    for prefix in WRAPPER_PREFIXES:
      if all(k.startswith(prefix) for k in state):
        state = {k[len(prefix) :]: v for k, v in state.items()}
        changed = True
  return state
