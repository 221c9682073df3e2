"""The main job: offline end-to-end demo on scikit-learn's digits (8×8 grayscale, embedded in its wheel).

Three heterogeneous standard teachers, an SA-MDRAD student and a PGD-AT student of the same architecture,
clean and PGD-20 accuracy for all, a table, ``results.json`` and ``results.png``.  About two to three minutes on
two CPU cores.  Usage: ``python main.py --config=configs/quickstart.py --workdir=runs/quickstart``.
"""

import ml_collections

from mdrad_jax import config_lib


def get_config(arg=None):
  a = config_lib.parse_arg(arg, dict(small=False))
  c = config_lib.base_config()
  c.job = "quickstart"
  config_lib.apply_dataset_defaults(c, "digits")
  c.attack.num_steps = 10
  q = c.quickstart = ml_collections.ConfigDict()
  q.teachers = ("tiny_cnn", "mlp", "small_cnn")
  q.teacher_epochs = 15
  q.teacher_lr = 0.05
  q.student = "tiny_cnn"
  q.student_methods = ("sa_mdrad", "pgd_at")
  q.student_epochs = 15
  q.student_lr = 0.05
  q.batch_size = 64
  q.eval_batch_size = 360
  q.log_every_steps = 10
  q.eval_every_epochs = 5
  if a.small:  # for tests: one epoch each
    q.teachers = ("tiny_cnn", "mlp")
    q.teacher_epochs = 1
    q.student_epochs = 1
    q.eval_every_epochs = 1
  return c
