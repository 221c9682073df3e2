"""The gradient-masking check of a robustness report (``evaluation_job.robustness_report``).

:func:`masking_flags` looks for the signs that an attack's numbers overstate robustness, each flag with its
reason:

* (a) a multi-step white-box attack (PGD-20, CW∞, APGD-CE) is weaker than the black-box Square attack run alone
  on the same points (by more than the margin, and significantly by a paired sign test), or Square inside
  AutoAttack flips many points that survived APGD-CE, APGD-T and FAB-T;
* (b) PGD-20 accuracy above FGSM accuracy;
* (c) accuracy that does not fall as ε grows in the sweep (rises between two ε, or is flat over the sweep);
* (d) AutoAttack accuracy far (``aa_gap``, 10 points by default) below PGD-20 accuracy.
"""

from __future__ import annotations

import math

from mdrad_jax import evaluation

NAMES = evaluation.TITLES
# The white-box attacks compared with Square alone on the same points: the gradient-sign attacks of the
# protocol and AutoAttack's APGD-CE.
WHITE_BOX = tuple(a.name for a in evaluation.PROTOCOL if a.loss is not None) + ("apgd-ce",)
# Check (a) flags only the multi-step ones.  Single-step FGSM is not among them: on an ordinary network it is
# often weaker than 5000 Square queries, which says that one step is a weak attack, not that gradients are masked.
MULTI_STEP_WHITE_BOX = tuple(a.name for a in evaluation.PROTOCOL if a.loss is not None and a.steps > 1) + ("apgd-ce",)


def sign_test_p(b: int, c: int) -> float:
  """One-sided exact sign test (McNemar): P(X >= b) for X ~ Binomial(b + c, 1/2); 1.0 when b = c = 0."""
  m = b + c
  return float(sum(math.comb(m, k) for k in range(b, m + 1)) / 2**m) if m else 1.0


def masking_flags(
  report: dict, *, tolerance: float = 0.01, aa_gap: float = 0.10, significance: float = 0.05
) -> list[dict]:
  """Signs of gradient masking in a report of ``evaluation_job.robustness_report``: a list of
  ``{'check', 'attack', 'reason'}``.

  ``tolerance`` (a fraction, 0.01 = one point of accuracy) is the margin a comparison must exceed, so that
  sampling noise between attacks with random starts does not raise a flag.  The comparison with Square alone
  (a), made on the same points, also needs the paired difference to be significant: among the points exactly
  one of the two attacks broke, Square's share must pass a one-sided sign test at ``significance``
  (on 100 points a 2-point gap with no point the other way is not evidence; 5 or more points are).
  """
  flags = []
  res = report["attacks"]
  acc = {k: v["accuracy"] for k, v in res.items()}
  pct = lambda v: f"{100 * v:.2f}%"  # noqa: E731

  # (a) multi-step white-box weaker than black-box Square on the same points.
  sq = report.get("square_alone")
  if sq:
    for name, wb in sq["white_box_on_same_points"].items():
      if name not in MULTI_STEP_WHITE_BOX:
        continue
      b = wb["square_broke_white_box_survivors"]
      c = wb.get("white_box_broke_square_survivors", sq["correct"] - (wb["correct"] - b))
      p = sign_test_p(b, c)
      if wb["accuracy"] - sq["accuracy"] > tolerance and p < significance:
        flags.append(
          {
            "check": "a",
            "attack": name,
            "accuracy": wb["accuracy"],
            "square_accuracy": sq["accuracy"],
            "p_value": p,
            "reason": f"{NAMES[name]} accuracy {pct(wb['accuracy'])} is above the black-box Square "
            f"attack's {pct(sq['accuracy'])} on the same {sq['n']} points (Square broke "
            f"{b} points {NAMES[name]} left correct, {NAMES[name]} {c} the other way; sign "
            f"test p = {p:.2g}): the gradients may not point to adversarial examples",
          }
        )
  stages = {s["attack"]: s for s in report.get("autoattack_stages", [])}
  n = report["num_examples"]
  if "square" in stages and n:
    flips = stages["square"]["flips"] or 0
    if flips / n > tolerance:
      before = [NAMES[s] for s in stages if s not in ("clean", "square")]
      flags.append(
        {
          "check": "a",
          "attack": "square",
          "flips": flips,
          "reason": f"Square flipped {flips} of {n} points ({pct(flips / n)}) that survived "
          f"{', '.join(before)} inside AutoAttack: a gradient-free attack finds what the "
          f"gradient-based ones miss",
        }
      )
  # (b) more iterations, weaker attack.
  if "pgd20" in acc and "fgsm" in acc and acc["pgd20"] - acc["fgsm"] > tolerance:
    flags.append(
      {
        "check": "b",
        "attack": "pgd20",
        "reason": f"PGD-20 accuracy {pct(acc['pgd20'])} is above FGSM accuracy {pct(acc['fgsm'])}: "
        f"iterating the attack makes it weaker",
      }
    )
  # (c) accuracy that does not fall with ε.
  sw = report.get("eps_sweep")
  if sw and len(sw["points"]) >= 2:
    pts = sw["points"]
    for a, b in zip(pts, pts[1:]):
      if b["accuracy"] - a["accuracy"] > tolerance:
        flags.append(
          {
            "check": "c",
            "attack": sw["attack"],
            "reason": f"{NAMES.get(sw['attack'], sw['attack'])} accuracy rises from {pct(a['accuracy'])} "
            f"at eps = {a['eps']:.4g} to {pct(b['accuracy'])} at eps = {b['eps']:.4g}",
          }
        )
    positive = [p for p in pts if p["eps"] > 0]
    first, last = pts[0], pts[-1]
    if len(positive) >= 2 and last["accuracy"] >= first["accuracy"] - tolerance:
      flags.append(
        {
          "check": "c",
          "attack": sw["attack"],
          "reason": f"{NAMES.get(sw['attack'], sw['attack'])} accuracy does not fall as eps grows: "
          f"{pct(first['accuracy'])} at eps = {first['eps']:.4g}, {pct(last['accuracy'])} at "
          f"eps = {last['eps']:.4g}",
        }
      )
  # (d) AutoAttack far below PGD-20.
  for key in ("autoattack", "autoattack_apgd_subset"):
    if key in acc and "pgd20" in acc and acc["pgd20"] - acc[key] > aa_gap:
      flags.append(
        {
          "check": "d",
          "attack": key,
          "reason": f"{NAMES[key]} accuracy {pct(acc[key])} is {100 * (acc['pgd20'] - acc[key]):.1f} "
          f"points below PGD-20's {pct(acc['pgd20'])} (more than {100 * aa_gap:g}): PGD "
          f"overestimates robustness",
        }
      )
  return flags
