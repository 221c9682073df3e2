"""Comparative studies: every method under the same teachers, student, data, budget and evaluation.

Usage: ``python main.py --config=configs/study.py:NAME --workdir=DIR [--config.study.only=PATTERNS]``.
Names:

* ``small``: every method once on scikit-learn's digits with two tiny teachers, in a few minutes (tested);
* ``fashion_mnist``: the CPU-scale study of docs/results.md -- three heterogeneous standard teachers and a robust
  one, a ``tiny_cnn`` student, tables 2 (SA-MDRAD's setting: standard teachers), 3 (the other methods' own
  setting: an adversarially trained teacher) and 4 (ablation of SA-MDRAD's inferred choices).

The grid is data: ``study.teachers`` (name -> model, training method and recipe), ``study.rows`` (name -> method,
teachers, overrides of the cell's config, table), ``study.seeds``.  Teachers may be named by rank:
``best1`` is the most accurate of ``study.ranked_teachers``, ``best2`` the next.  Every field can be overridden
(``--config.study.train.epochs=4``, ``--config.study.rows.sa_mdrad.overrides.method.temperature=1``), and
``study.only`` selects rows (``sa_mdrad,pgd_at``), tables (``table2``) or cells (``sa_mdrad/seed1``), with
shell-style wildcards.  See mdrad_jax/study.py for the outputs.
"""

import ml_collections

from mdrad_jax import config_lib

STUDIES = ("small", "fashion_mnist")


def teacher(
  model,
  *,
  method="natural",
  epochs,
  num_train_examples=-1,
  batch_size=128,
  lr=0.05,
  schedule="cosine",
  boundary_fractions=(),
  weight_decay=5e-4,
  seed=0,
  **model_kwargs,
):
  return ml_collections.ConfigDict(
    dict(
      model=model,
      model_kwargs=model_kwargs,
      method=method,
      epochs=epochs,
      num_train_examples=num_train_examples,
      batch_size=batch_size,
      lr=lr,
      schedule=schedule,
      boundary_fractions=tuple(boundary_fractions),
      weight_decay=weight_decay,
      seed=seed,
    )
  )


def row(method_name, teachers=(), /, *, table="2", label="", seeds=(), also_in=(), **overrides):
  """A row: ``overrides`` are nested config fields, e.g. ``method=dict(temperature=1.0)``."""
  return ml_collections.ConfigDict(
    dict(
      method=method_name,
      teachers=tuple(teachers),
      table=table,
      label=label or "",
      seeds=tuple(seeds),
      also_in=tuple(also_in),
      overrides=ml_collections.ConfigDict(overrides),
    )
  )


# SA-MDRAD's settings before the study chose its defaults (docs/methods.md §6.3): the base of the study's SA-MDRAD
# rows, written out so that the study's cells, and those of its snapshot, do not change with the library's
# defaults.  The ablation rows change one of them at a time; `abl_rect_dyn_label` is today's defaults.
STUDY_BASE = dict(
  teacher_view="clean",
  rectifier="swap",
  fusion="camkd",
  temperature=4.0,
  feature_weight=1.0,
  inner="ce",
  dynamic_target="student",
)


def distillation_rows(standard, *, table="2"):
  """Every method of SA-MDRAD's setting: standard teachers only; single-teacher methods take the strongest,
  MTARD's two roles the two strongest; PGD-AT and TRADES as floors."""
  return dict(
    sa_mdrad=row("sa_mdrad", standard, table=table, label="SA-MDRAD (study base: swap)", method=dict(STUDY_BASE)),
    adaad=row("adaad", ("best1",), table=table, label="AdaAD"),
    rslad=row("rslad", ("best1",), table=table, label="RSLAD"),
    ard=row("ard", ("best1",), table=table, label="ARD"),
    iad1=row("iad1", ("best1",), table=table, label="IAD-I"),
    mtard=row("mtard", ("best1", "best2"), table=table, label="MTARD"),
    bmtard=row("bmtard", ("best1", "best2"), table=table, label="B-MTARD"),
    kd=row("kd", standard, table=table, label="KD (clean)"),
    pgd_at=row("pgd_at", table=table, label="PGD-AT"),
    trades=row("trades", table=table, label="TRADES"),
  )


def robust_teacher_rows(robust, *, table="3"):
  """The other methods' own setting: an adversarially trained teacher (MTARD: robust + best standard)."""
  return dict(
    rslad_rt=row("rslad", (robust,), table=table, label="RSLAD (robust teacher)"),
    ard_rt=row("ard", (robust,), table=table, label="ARD (robust teacher)"),
    adaad_rt=row("adaad", (robust,), table=table, label="AdaAD (robust teacher)"),
    iad1_rt=row("iad1", (robust,), table=table, label="IAD-I (robust teacher)"),
    mtard_rt=row("mtard", (robust, "best1"), table=table, label="MTARD (robust + standard)"),
  )


def ablation_rows(standard, *, table="4", seeds=(0, 1)):
  """SA-MDRAD with one inferred choice of ``STUDY_BASE`` (table 2's SA-MDRAD row) changed at a time
  (docs/methods.md §6)."""

  def m(**kw):
    return dict(method=dict(STUDY_BASE, **kw))

  def a(label, teachers=standard, /, **kw):
    return row("sa_mdrad", teachers, table=table, label=label, seeds=seeds, **{"method": dict(STUDY_BASE), **kw})

  return dict(
    abl_rect_none=a("rectifier none", **m(rectifier="none")),
    abl_rect_adr=a("rectifier adr", **m(rectifier="adr")),
    abl_rect_dyn=a("rectifier dynamic (student)", **m(rectifier="dynamic")),
    abl_rect_dyn_label=a("rectifier dynamic (label) = defaults", **m(rectifier="dynamic", dynamic_target="label")),
    abl_fuse_uniform=a("fusion uniform", **m(fusion="uniform")),
    abl_fuse_ptrue=a("fusion ptrue", **m(fusion="ptrue")),
    abl_fuse_entropy=a("fusion entropy", **m(fusion="entropy")),
    abl_view_adv=a("teacher view adv", **m(teacher_view="adv")),
    abl_feat_off=a("features off", **m(feature_weight=0.0)),
    abl_feat_10=a("feature weight 10", **m(feature_weight=10.0)),
    abl_tau1=a("tau 1", **m(temperature=1.0)),
    abl_inner_kl=a("inner fused_kl", **m(inner="fused_kl")),
    abl_inner_adaad=a("inner adaad", **m(inner="adaad")),
    abl_k1=a("1 teacher (best)", ("best1",)),
    abl_k2=a("2 teachers (best two)", ("best1", "best2")),
  )


def get_config(arg=None):
  name = (arg or "small").strip()
  if name not in STUDIES:
    raise ValueError(f"configs/study.py: unknown study {name!r}; known: {STUDIES}")
  c = config_lib.base_config()
  c.job = "study"
  s = c.study = ml_collections.ConfigDict()
  s.name = name
  s.only = ""
  s.command = ""  # recorded in study.md; '' = the generic command line
  s.data_dir = ""
  s.source_dir = ""
  s.log_every_steps = 50
  # A previous study.json (e.g. docs/study_fashion_mnist/study.json), or several joined by commas (parts of one
  # study run apart; the first listed wins): their finished cells are taken over when their config equals this
  # study's and their teachers have the same records ('' = none).
  s.restore = ""
  # With study.restore: import each teacher from teachers/<name>.safetensors next to that study.json (when the
  # snapshot trained it with this config) instead of training it again.
  s.restore_teachers = True
  s.table_titles = ml_collections.ConfigDict(
    {
      "2": "SA-MDRAD's setting, standard teachers only",
      "3": "the other methods' own setting, an adversarially trained teacher",
      "4": "ablation of SA-MDRAD's inferred choices (one change at a time from table 2's SA-MDRAD row)",
    }
  )
  t = s.train = ml_collections.ConfigDict()
  e = s.eval = ml_collections.ConfigDict()
  e.batch_size = 250
  e.seed = 0
  e.in_training_examples = 500
  e.in_training_pgd_steps = 10
  e.square_examples = 100  # Square alone on the first points, the masking check's black-box reference
  e.square_queries = 1000
  e.aa_overrides = ""
  e.full_aa_rows = 1  # rows per table that also get the full standard AutoAttack

  if name == "small":
    s.dataset = "digits"
    s.seeds = (0,)
    s.log_every_steps = 10
    s.teachers = ml_collections.ConfigDict(
      dict(
        tiny=teacher("tiny_cnn", epochs=2, batch_size=64),
        mlp=teacher("mlp", epochs=2, batch_size=64),
        tiny_robust=teacher(
          "tiny_cnn", method="pgd_at", epochs=1, num_train_examples=256, batch_size=64, lr=0.05, schedule="constant"
        ),
      )
    )
    s.ranked_teachers = ("tiny", "mlp")
    t.student, t.student_kwargs = "tiny_cnn", ml_collections.ConfigDict(dict(widths=(8, 16)))
    t.epochs, t.num_train_examples, t.batch_size = 1, 128, 64
    t.lr, t.schedule, t.boundary_fractions = 0.05, "constant", ()
    t.pgd_steps = 2
    rows = distillation_rows(("tiny", "mlp"))
    rows.update(mtard_rt=robust_teacher_rows("tiny_robust")["mtard_rt"])
    rows.update(abl_rect_dyn=ablation_rows(("tiny", "mlp"), seeds=(0,))["abl_rect_dyn"])
    s.rows = ml_collections.ConfigDict(rows)
    e.num_examples, e.aa_examples, e.full_aa_examples = 64, 32, 16
    e.batch_size, e.in_training_examples, e.in_training_pgd_steps = 32, 64, 2
    e.square_examples, e.square_queries = 0, 50  # no Square check: one compilation less per cell
    e.aa_overrides = "apgd-ce.n_iter=4,apgd-t.n_iter=4,apgd-t.n_target_classes=2"
    e.full_aa_rows = 0
    return c

  # fashion_mnist: sized for a 2-core CPU (docs/results.md says what was chosen and why).
  s.dataset = "fashion_mnist"
  s.seeds = (0, 1, 2)
  standard = ("cnn", "mlp", "tiny")
  s.teachers = ml_collections.ConfigDict(
    dict(
      cnn=teacher("small_cnn", epochs=10),
      mlp=teacher("mlp", epochs=10, hidden=(512, 256)),
      tiny=teacher("tiny_cnn", epochs=10, widths=(32, 64)),
      # the robust teacher: PGD-AT of the strongest standard teacher's architecture, the cells' budget
      cnn_robust=teacher(
        "small_cnn",
        method="pgd_at",
        epochs=8,
        num_train_examples=10000,
        lr=0.1,
        schedule="piecewise",
        boundary_fractions=(0.5, 0.75),
      ),
    )
  )
  s.ranked_teachers = standard
  t.student, t.student_kwargs = "tiny_cnn", ml_collections.ConfigDict()
  t.epochs, t.num_train_examples, t.batch_size = 8, 10000, 128
  t.lr, t.schedule, t.boundary_fractions = 0.1, "piecewise", (0.5, 0.75)
  t.pgd_steps = 10
  rows = distillation_rows(standard)
  rows["sa_mdrad"].also_in = ("3", "4")
  rows.update(robust_teacher_rows("cnn_robust"))
  rows.update(ablation_rows(standard))
  rows["abl_rect_dyn_label"].seeds = (0, 1, 2)  # the row that became the defaults: table 2's seeds, shown there
  rows["abl_rect_dyn_label"].also_in = ("2", "3")
  s.rows = ml_collections.ConfigDict(rows)
  e.num_examples, e.aa_examples, e.full_aa_examples = 1000, 500, 500
  return c
