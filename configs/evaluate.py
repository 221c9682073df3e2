"""Robustness evaluation of a trained checkpoint: clean, FGSM, PGD-20, CW∞ and AutoAttack, report and plots.

Usage: ``python main.py --config=configs/evaluate.py --workdir=runs/c10/sa_mdrad_r18`` evaluates the best
checkpoint of the training run in the workdir and writes ``eval.json``, ``eval.md`` and PNG plots there.
Arguments: ``checkpoint`` (a training workdir or checkpoint directory; '' = the workdir itself),
``aa`` (standard | apgd), ``num_examples`` (-1 = the whole test split), ``attacks`` (names joined by '+'),
``sweep`` (also an ε sweep at 0, ¼, ½, 1, 1½ and 2 × ε), ``which`` (best | latest) and ``small`` (a quick run:
500 examples, APGD-only AutoAttack, Square check on 100 points with 1000 queries).  The dataset and ε come
from the trained run's ``config.json`` (0.1 on Fashion-MNIST and digits, 8/255 on colour data) unless
overridden: ``--config.evaluate.eps=0.0314``, ``--config.data.name=...``.  See docs/evaluation.md.
"""

from mdrad_jax import config_lib


def get_config(arg=None):
  a = config_lib.parse_arg(
    arg,
    dict(
      checkpoint="",
      aa="standard",
      num_examples=-1,
      attacks="clean+fgsm+pgd20+cw+autoattack",
      sweep=False,
      which="best",
      small=False,
    ),
  )
  c = config_lib.base_config()
  c.job = "evaluate"
  c.data.name = ""  # '' = the trained run's dataset
  e = c.evaluate = config_lib.evaluate_config(job=True)
  e.checkpoint = a.checkpoint
  e.which = a.which
  e.aa_version = a.aa
  e.num_examples = a.num_examples
  e.attacks = tuple(x for x in a.attacks.split("+") if x)
  if a.sweep:
    e.eps_sweep_multiples = (0.0, 0.25, 0.5, 1.0, 1.5, 2.0)
  if a.small:
    if a.num_examples == -1:
      e.num_examples = 500
    if a.aa == "standard" and "aa=" not in (arg or ""):
      e.aa_version = "apgd"
    e.masking_square_examples = 100
    e.masking_square_queries = 1000
  if a.aa not in ("standard", "apgd"):
    raise ValueError(f"config argument aa must be 'standard' or 'apgd', got {a.aa!r}")
  if a.which not in ("best", "latest"):
    raise ValueError(f"config argument which must be 'best' or 'latest', got {a.which!r}")
  return c
