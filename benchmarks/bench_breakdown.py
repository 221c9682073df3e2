#!/usr/bin/env python
"""Where the train step's time goes: each part of one case timed on its own, JAX against the PyTorch reference.

    .venv/bin/python benchmarks/bench_breakdown.py --configs resnet18:32 --json benchmarks/results/breakdown_r18_b32.json
    .venv/bin/python benchmarks/bench_breakdown.py --configs tiny_cnn:4 --image-size 8 --pgd-steps 1 --steps 1 \
        --warmup 0 --torch off                                     # a tiny configuration

For one (method, student, batch) case, built exactly as ``bench_train_step.py`` builds it (``build_case``: the
same student, teachers of ``TEACHER_SETS``, train state and step), a JAX child process compiles and times, each
as its own jitted function on the step's shapes:

* each teacher's eval-mode forward on the clean batch (with its feature map where the method distils features),
  and on the adversarial batch where the method's plan asks for it;
* the student's attack: PGD-k with the method's objective (k forwards + input gradients of the student, and of
  the teachers where the objective goes through them), in the method's BatchNorm mode;
* the student's train-mode forward + backward (parameter gradients for random cotangents of its logits and,
  on the feature view, its last feature map) for each view the loss uses; a forward alone for a view that only
  moves BatchNorm statistics;
* the feature projectors' forward + backward (parameters and input), all of them in one function;
* the method's outer loss, forward + backward with respect to the student's logits and projected features;
* the optimizer update (``TrainState.apply_gradients``);
* the whole step (``train_step.jit_train_step``, as the benchmark and the training loop run it).

A PyTorch child (``torch_reference.breakdown``) times the same parts of the eager reference step.  The table
gives per part the median time of ``--steps`` calls after ``--warmup``, the ratio torch / JAX (> 1: JAX
faster), XLA's FLOPs of the part and the rate they imply; ``sum of parts`` against ``whole step`` shows what
the compiled step gains (fusion across parts) or loses.  ``--depthwise conv,shifted`` adds a JAX child per
lowering of the depthwise convolutions (the MobileNetV2 teacher).  The load average is printed before and
after every child.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import bench_train_step as bts  # noqa: E402  (the case construction and the child runners)


def parse_args(argv=None):
  p = argparse.ArgumentParser(
    description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--method", default="sa_mdrad")
  p.add_argument("--configs", type=bts._csv, default=["resnet18:32"], help="student:batch cases, e.g. resnet18:32")
  p.add_argument("--teacher-set", default="", help=f"default: the student's; one of {sorted(bts.TEACHER_SETS)}")
  p.add_argument("--image-size", type=int, default=32)
  p.add_argument("--channels", type=int, default=3)
  p.add_argument("--num-classes", type=int, default=10)
  p.add_argument("--pgd-steps", type=int, default=10)
  p.add_argument("--steps", type=int, default=5, help="timed calls of each part (the median is reported)")
  p.add_argument("--warmup", type=int, default=1, help="untimed calls of each part after compiling it")
  p.add_argument("--jax-dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--depthwise", type=bts._csv, default=["conv"], help="JAX variants: conv, shifted (one child each)")
  p.add_argument("--unroll", type=bts._bool, default=True, help="unrolled attack loop (the default, as the step)")
  p.add_argument("--donate", type=bts._bool, default=True, help="donate the state to the whole step")
  p.add_argument("--torch", choices=("auto", "on", "off"), default="auto")
  p.add_argument("--torch-dtypes", type=bts._csv, default=["fp32"], help="reference variants: fp32, bf16")
  p.add_argument("--torch-channels-last", action="store_true")
  p.add_argument("--torch-threads", type=int, default=0)
  p.add_argument("--real-init", action="store_true")
  p.add_argument("--json", default="")
  p.add_argument("--child-timeout", type=float, default=3600.0)
  p.add_argument("--quiet", action="store_true")
  p.add_argument("--child-spec", default="", help=argparse.SUPPRESS)
  p.add_argument("--child-out", default="", help=argparse.SUPPRESS)
  return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# Child: the JAX parts of one case.
# ---------------------------------------------------------------------------------------------
def run_child(spec: dict) -> dict:
  xla_used = bts.setup_xla(spec)

  import jax
  import jax.numpy as jnp
  import numpy as np
  from mdrad_jax import attacks, precision
  from mdrad_jax import train_step as ts

  case = bts.build_case(spec)
  out: dict = {"backend": jax.default_backend(), "xla_flags": xla_used, **case.info}
  method, hp, plan, attack, model = case.method, case.hparams, case.plan, case.attack, case.model
  tmods, tvars, projectors, state = case.teacher_models, case.teacher_vars, case.projectors, case.state
  x, y = case.batch["image"], case.batch["label"]
  params_m, stats_m = state.params["model"], state.batch_stats.get("model", {})
  names = [n for n, _ in case.info["teachers"]]
  t_clean_on = [("clean" in v) or plan.teacher_features for v in plan.teacher_views]
  t_adv_on = [("adv" in v) for v in plan.teacher_views]
  warmup, reps = spec["warmup"], spec["steps"]
  rng = np.random.default_rng(1)
  parts: dict = {}

  def rnd_like(tree):
    return jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape), s.dtype), tree)

  def timed(name, fn, *args):
    """Compiles ``fn`` for ``args``, times it, records it under ``name``; returns its output."""
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    res = compiled(*args)
    jax.block_until_ready(res)
    for _ in range(warmup):
      jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(reps):
      t = time.perf_counter()
      jax.block_until_ready(compiled(*args))
      times.append(time.perf_counter() - t)
    parts[name] = {
      "median_s": statistics.median(times),
      "min_s": min(times),
      "times_s": times,
      "compile_s": compile_s,
      "flops": bts._flops(compiled),
      "temp_bytes": _temp_bytes(compiled),
    }
    return res

  def variables(p, s):
    return {"params": p, **({"batch_stats": s} if s else {})}

  # teachers on the clean batch (with features where the loss distils them)
  t_clean, t_feats = [None] * len(tmods), [None] * len(tmods)
  for i, (tm, tv) in enumerate(zip(tmods, tvars)):
    if not t_clean_on[i]:
      continue
    feat = plan.teacher_features
    res = timed(
      f"teacher{i} {names[i]} forward (clean)",
      lambda v, xx, tm=tm, feat=feat: tm.apply(v, xx, train=False, **({"return_features": True} if feat else {})),
      tv,
      x,
    )
    if feat:
      t_clean[i], t_feats[i] = res[0].astype(jnp.float32), res[1]["last"]
    else:
      t_clean[i] = res.astype(jnp.float32)
  t_clean = tuple(t_clean)

  # the attack, as the step runs it (train_step.make_train_step's inner maximisation)
  x_adv = x
  if method.make_objective is not None:
    attack_model = precision.with_dtype(model, attack.dtype) if attack.dtype else model

    def run_attack(p, s, tv, t_clean, xx, yy, key):
      def student_logits(xa, aux):
        if attack.bn_mode == "eval":
          return ts._apply(attack_model, p, s, xa, train=False)[0], aux
        if attack.bn_mode == "train_no_update":
          return ts._apply(attack_model, p, s, xa, train=True, update_stats=False)[0], aux
        return ts._apply(attack_model, p, aux, xa, train=True)

      objective = method.make_objective(
        student_logits=student_logits,
        teacher_logits=[
          (lambda xa, k=k: tmods[k].apply(tv[k], xa, train=False).astype(jnp.float32)) for k in range(len(tmods))
        ],
        x=xx,
        labels=yy,
        teacher_clean=t_clean,
        hparams=hp,
      )
      x_adv, _ = attacks.pgd_linf(
        objective,
        xx,
        key,
        eps=attack.eps,
        step_size=attack.step_size,
        num_steps=attack.num_steps,
        init=attack.init,
        aux=s if attack.bn_mode == "train_update" else None,
        unroll=attack.unroll,
        clip_start=attack.clip_start,
      )
      return x_adv

    x_adv = timed(
      f"attack: PGD-{attack.num_steps}", run_attack, params_m, stats_m, tvars, t_clean, x, y, jax.random.key(0)
    )

  for i, (tm, tv) in enumerate(zip(tmods, tvars)):
    if t_adv_on[i]:
      timed(f"teacher{i} {names[i]} forward (adv)", lambda v, xx, tm=tm: tm.apply(v, xx, train=False), tv, x_adv)

  # the student's train-mode forward + backward per view (a forward alone for a statistics-only view)
  used = bts.views_with_gradient(
    method=method,
    hparams=hp,
    plan=plan,
    state=state,
    teacher_models=tmods,
    teacher_vars=tvars,
    projectors=projectors,
    model=model,
    x=x,
    y=y,
  )
  for view in plan.student_views:
    xin = x_adv if view == "adv" else x
    feat = plan.student_features and view == "adv"  # features are distilled on the adversarial view

    def forward(p, s, xx, feat=feat):
      o, upd = model.apply(
        variables(p, s), xx, train=True, mutable=["batch_stats"], **({"return_features": True} if feat else {})
      )
      return ((o[0], o[1]["last"]) if feat else o), upd

    if view not in used:
      timed(f"student forward, statistics only ({view})", forward, params_m, stats_m, xin)
      continue
    cot = rnd_like(jax.eval_shape(forward, params_m, stats_m, xin)[0])

    def fwd_bwd(p, s, xx, cot, forward=forward):
      _, vjp, upd = jax.vjp(lambda pp: forward(pp, s, xx), p, has_aux=True)
      return vjp(cot)[0], upd

    timed(f"student forward+backward ({view})", fwd_bwd, params_m, stats_m, xin, cot)

  # feature projectors: forward + backward (parameters and input), every projector in one function
  if plan.student_features and projectors:
    _, s_feats = jax.eval_shape(lambda: model.apply(variables(params_m, stats_m), x, train=False, return_features=True))
    fmap = rnd_like(s_feats["last"])
    pvars = [
      (state.params["projectors"][str(i)], state.batch_stats["projectors"].get(str(i), {}))
      for i in range(len(projectors))
    ]

    def proj_apply(proj, p, s, f):
      o, upd = proj.apply(variables(p, s), f, train=True, mutable=["batch_stats"])
      return o, upd

    cots = [
      rnd_like(jax.eval_shape(lambda p, s, proj=proj: proj_apply(proj, p, s, fmap), p, s)[0])
      for proj, (p, s) in zip(projectors, pvars)
    ]

    def proj_fwd_bwd(pv, f, cots):
      grads = []
      for proj, (p, s), c in zip(projectors, pv, cots):
        _, vjp, _ = jax.vjp(lambda pp, ff, proj=proj, s=s: proj_apply(proj, pp, s, ff), p, f, has_aux=True)
        grads.append(vjp(c))
      return grads

    timed(f"projectors forward+backward x{len(projectors)}", proj_fwd_bwd, pvars, fmap, cots)

  # the outer loss's own forward + backward, on random inputs of the step's shapes
  views, projected, loss = bts.loss_inputs(
    method=method,
    hparams=hp,
    plan=plan,
    state=state,
    teacher_models=tmods,
    teacher_vars=tvars,
    model=model,
    x=x,
    y=y,
  )
  timed("loss forward+backward", jax.value_and_grad(loss, argnums=(0, 1)), views, projected)

  # the optimizer update
  grads = jax.tree.map(lambda a: 1e-3 * a, rnd_like(state.params))
  timed("optimizer update", lambda st, g: st.apply_gradients(g), state, grads)

  # the whole step (last: with donation it consumes the state's buffers)
  jitted = ts.jit_train_step(case.step, case.mesh, donate=bool(spec["donate"]))
  t0 = time.perf_counter()
  compiled = jitted.lower(state, tvars, case.batch).compile()
  compile_s = time.perf_counter() - t0
  st = state
  for _ in range(max(1, warmup)):
    st, metrics = compiled(st, tvars, case.batch)
    jax.block_until_ready((st, metrics))
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    st, metrics = compiled(st, tvars, case.batch)
    jax.block_until_ready((st, metrics))
    times.append(time.perf_counter() - t)
  parts["whole step"] = {
    "median_s": statistics.median(times),
    "min_s": min(times),
    "times_s": times,
    "compile_s": compile_s,
    "flops": bts._flops(compiled),
    "temp_bytes": _temp_bytes(compiled),
  }
  out["loss"] = float(metrics["loss"])
  out["views_with_gradient"] = sorted(used)
  out["parts"] = parts
  return out


def _temp_bytes(compiled):
  try:
    return int(compiled.memory_analysis().temp_size_in_bytes)
  except Exception:  # noqa: BLE001 - not every backend reports it
    return None


# ---------------------------------------------------------------------------------------------
# Parent: children, table, JSON.
# ---------------------------------------------------------------------------------------------
WHOLE, SUM = "whole step", "sum of parts"


def with_sum(parts: dict) -> dict:
  """``parts`` with ``sum of parts`` (the medians of every part but the whole step) before ``whole step``."""
  if not parts:
    return {}
  out = {k: v for k, v in parts.items() if k != WHOLE}
  out[SUM] = {"median_s": sum(v["median_s"] for v in out.values())}
  if WHOLE in parts:
    out[WHOLE] = parts[WHOLE]
  return out


def table_rows(jax_res: dict, torch_res: dict) -> list[dict]:
  """One row per part (the JAX child's order; torch-only parts at the end): medians and the ratio torch / JAX."""
  jp = with_sum(jax_res.get("parts") or {})
  tps = {name: with_sum(r.get("parts") or {}) for name, r in torch_res.items()}
  order = list(jp) + [k for tp in tps.values() for k in tp if k not in jp]
  rows = []
  for part in dict.fromkeys(order):
    j = jp.get(part) or {}
    row = {
      "part": part,
      "jax_s": j.get("median_s"),
      "jax_min_s": j.get("min_s"),
      "jax_compile_s": j.get("compile_s"),
      "flops": j.get("flops"),
      "torch_s": {},
      "ratio": {},
    }
    for name, tp in tps.items():
      t = (tp.get(part) or {}).get("median_s")
      row["torch_s"][name] = t
      row["ratio"][name] = t / row["jax_s"] if (t and row["jax_s"]) else None
    rows.append(row)
  return rows


def print_table(title: str, rows: list[dict], torch_names: list[str]) -> None:
  head = ["part", "JAX ms", "JAX min ms"]
  for n in torch_names:
    head += [f"{n} ms", f"{n} / JAX"]
  head += ["GFLOP (XLA)", "JAX GFLOP/s", "JAX compile s"]
  print(f"\n{title}\n")
  print("| " + " | ".join(head) + " |")
  print("|---|" + "---:|" * (len(head) - 1))
  for r in rows:
    cells = [r["part"], _ms(r["jax_s"]), _ms(r["jax_min_s"])]
    for n in torch_names:
      cells += [_ms(r["torch_s"].get(n)), _fmt(r["ratio"].get(n), "{:.2f}")]
    f, t = r["flops"], r["jax_s"]
    cells += [
      _fmt(f and f / 1e9, "{:.3g}"),
      _fmt(f and t and f / t / 1e9, "{:.3g}"),
      _fmt(r["jax_compile_s"], "{:.1f}"),
    ]
    print("| " + " | ".join(cells) + " |")


def _ms(t):
  return "-" if t is None else f"{t * 1e3:.1f}"


def _fmt(v, spec):
  return "-" if v is None else spec.format(v)


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.child_spec:
    res = run_child(json.loads(args.child_spec))
    with open(args.child_out, "w") as f:
      json.dump(res, f)
    return 0

  import importlib.util

  info = bts.machine_info()
  cmdline = " ".join([os.path.relpath(sys.executable), os.path.relpath(os.path.abspath(__file__)), *sys.argv[1:]])
  have_torch = importlib.util.find_spec("torch") is not None
  use_torch = args.torch == "on" or (args.torch == "auto" and have_torch)
  if args.torch == "on" and not have_torch:
    print("error: --torch on but torch is not installed (pip install -e '.[bench]')", file=sys.stderr)
    return 2
  print(f"command: {cmdline}")
  print(f"machine: {info['cpu']}, {info['cpu_count']} CPUs; {info['platform']}")
  print("versions: python " + info["python"] + ", " + ", ".join(f"{k} {v}" for k, v in info["versions"].items() if v))
  print(f"load average at start: {bts.loadavg()}")
  if not use_torch:
    print("PyTorch reference: skipped (" + ("--torch off" if args.torch == "off" else "torch is not installed") + ")")

  results, failed = [], []
  for cfg in args.configs:
    model, _, b = cfg.partition(":")
    if not b:
      raise SystemExit(f"--configs entries are model:batch, got {cfg!r}")
    tset = args.teacher_set or model
    if tset not in bts.TEACHER_SETS:
      raise SystemExit(f"no teacher set for {model!r}; give --teacher-set (one of {sorted(bts.TEACHER_SETS)})")
    base = dict(bts.case_spec(args, method=args.method, model=model, batch=int(b), teacher_set=tset), breakdown=True)
    jax_runs = {}
    for dw in args.depthwise:
      spec = bts.jax_spec(base, unroll=args.unroll, donate=args.donate, dtype=args.jax_dtype, depthwise=dw)
      name = bts.jax_variant_name(spec)
      print(f"[{args.method} {model} b{b}] {name} ...", flush=True)
      jax_runs[name] = dict(spec, **bts.run_jax_case(spec, args, script=os.path.abspath(__file__)))
      _print_child(name, jax_runs[name])
      if "error" not in jax_runs[name]:  # the parts at once: a later child that is stopped loses nothing
        print_table(f"{args.method} {model} b{b}, {name} (JAX alone)", table_rows(jax_runs[name], {}), [])
      if args.json:
        partial = {"method": args.method, "model": model, "batch": int(b), "jax": jax_runs, "torch": {}}
        _write_json(args.json, cmdline, info, results + [dict(partial, tables={}, partial=True)], complete=False)
    torch_runs = {}
    for d in args.torch_dtypes if use_torch else []:
      name = f"torch[{d}]"
      print(f"[{args.method} {model} b{b}] {name} ...", flush=True)
      torch_runs[name] = dict(base, **bts.run_torch_case(base, d, args))
      _print_child(name, torch_runs[name])
    ok_torch = {n: r for n, r in torch_runs.items() if "error" not in r}
    tables = {}
    for name, r in jax_runs.items():
      if "error" in r:
        failed.append((model, b, name))
        continue
      tables[name] = table_rows(r, ok_torch)
      print_table(f"{args.method} {model} b{b}, {name}", tables[name], list(ok_torch))
    failed += [(model, b, n) for n, r in torch_runs.items() if "error" in r]
    results.append(
      {"method": args.method, "model": model, "batch": int(b), "jax": jax_runs, "torch": torch_runs, "tables": tables}
    )
    if args.json:
      _write_json(args.json, cmdline, info, results, complete=False)
  print(
    "\nms: median of the timed calls of each part on its own (compiled separately in JAX); torch / JAX > 1: JAX "
    "faster.  sum of parts: the parts' medians added; whole step: the compiled step (JAX) / the eager step "
    "(torch).  GFLOP (XLA): the cost analysis of the part's compiled function."
  )
  print(f"load average at end: {bts.loadavg()}")
  if args.json:
    _write_json(args.json, cmdline, info, results, complete=True)
    print(f"wrote {args.json}")
  if failed:
    print(f"FAILED: {failed}", file=sys.stderr)
    return 1
  return 0


def _print_child(name, r):
  if "error" in r:
    print(f"    {name}: ERROR {r['error']}")
    return
  whole = (r.get("parts") or {}).get(WHOLE, {}).get("median_s")
  print(
    f"    {name}: whole step {_ms(whole)} ms, {len(r.get('parts') or {})} parts, wall {r['wall_s']:.0f} s, "
    f"load {r['load_before']} -> {r['load_after']}"
  )


def _write_json(path, cmdline, info, results, complete):
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path + ".tmp", "w") as f:
    json.dump(
      {"command": cmdline, "machine": info, "complete": complete, "load_at_end": bts.loadavg(), "results": results},
      f,
      indent=1,
      default=str,
    )
  os.replace(path + ".tmp", path)


if __name__ == "__main__":
  sys.exit(main())
