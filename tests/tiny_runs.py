"""Configs of the tiny training runs that several test files share (tests/ is on sys.path)."""

from mdrad_jax import config_lib


def digits_pgd_at(data_dir):
  """PGD-AT of a tiny CNN (8, 16) on digits with 2 attack steps: two epochs of 4 steps, logged every 2 steps,
  evaluated on 128 test points."""
  c = config_lib.base_config()
  config_lib.apply_dataset_defaults(c, "digits")
  c.data.data_dir = str(data_dir)
  c.model.name = "tiny_cnn"
  c.model.kwargs.widths = (8, 16)
  c.method = config_lib.method_config("pgd_at")
  c.attack.num_steps = 2
  c.num_epochs = 2
  c.num_train_examples = 256
  c.batch_size = 64
  c.eval_batch_size = 128
  c.eval.num_examples = 128
  c.log_every_steps = 2
  return c
