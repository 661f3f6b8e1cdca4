"""Where the time of an ADM UNet's forward + VJP (the DPS step) goes on XLA:CPU, with the library's XLA:CPU settings
(``mapreps_jax/xla_cpu.py``) and without them (``MAPREPS_JAX_XLA_DEFAULTS=0``): the bundled digits ADM (default,
batch 64) or the FFHQ-256 ADM (``--net ffhq``, random weights, batch 1).

Each setting runs in its own interpreter (XLA reads its flags once per process) and measures:

* **time and thread use**: median wall time of the jitted forward + VJP, and the process's CPU time over wall time
  during the timed calls (2.0 = both cores busy on this machine);
* **the convolutions alone**: the network's 3x3 convolution shapes timed one at a time (``conv_isolated``,
  GFLOP/s), to compare with the matmul reference of ``bench_roofline.py``;
* **a breakdown by operation**: one call traced with ``jax.profiler`` (``--xla_cpu_enable_xprof_traceme``). Each
  event is matched to its HLO instruction and put in a category: ``conv`` (by output shape and window), ``dot``
  (attention and linear layers), ``reduce`` (the GroupNorm statistics and their gradients), ``elementwise`` (fused
  loops: normalisation, SiLU, adds, scale-shift), ``copy/transpose``, and for the opt-out run ``ynn:*`` (the
  YNNPACK fusions that replace them). Shares are of the summed traced time. Caveat: XLA's own (Eigen)
  convolutions run asynchronously on its thread pool and their events cover only the launch, so with the
  package's settings the ``conv`` share is near zero and the convolutions' time is what ``conv_isolated``
  measures; YNNPACK's convolutions (the opt-out run) are synchronous and fully traced.

Writes ``benchmarks/results/profile_cpu.json`` (one section per network).

Usage::

    python benchmarks/bench_profile.py [--net digits|ffhq] [--batch B] [--reps 3]
"""

import argparse
import collections
import glob
import gzip
import json
import os
import re
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def _categorise(hlo_text):
    """``{instruction name: category}`` for the instructions of an optimised HLO module (fusions by what they
    contain)."""
    comps, defs, cur = {}, {}, None
    for line in hlo_text.splitlines():
        s = line.strip()
        head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) \(.*\{$", s)
        if head and not line.startswith(" "):
            cur = head.group(1)
            comps[cur] = []
            continue
        inst = re.match(r"^(?:ROOT )?%?([\w.\-]+) = (.*)$", s)
        if inst:
            defs[inst.group(1)] = inst.group(2)
            if cur:
                comps[cur].append(inst.group(2))

    def category(name, text):
        called = re.search(r"calls=%?([\w.\-]+)", text)
        body = comps.get(called.group(1), []) if called else [text]
        prefix = "ynn:" if "__ynn_fusion" in text or name.startswith("ynn") else ""
        for b in body:
            if " convolution(" in b:
                win = re.search(r"window=\{([^}]*)\}", b)
                return f"{prefix}conv {b.split(' convolution(')[0].split('{')[0]} {win.group(1) if win else ''}"
        ops = set(re.findall(r"[\]}] ([a-z][\w\-]*)\(", " ".join(body)))
        if "dot" in ops:
            return prefix + "dot"
        if "reduce" in ops:
            return prefix + "reduce"
        if ops <= {"copy", "transpose", "bitcast", "parameter"} and ops & {"copy", "transpose"}:
            return prefix + "copy/transpose"
        return prefix + "elementwise"

    return {name: category(name, text) for name, text in defs.items()}


def conv_isolated(batch, reps, shapes=((32, 32, 32), (32, 64, 64), (16, 64, 64), (8, 64, 64))):
    """The digits ADM's 3x3 convolution shapes ``(size, c_in, c_out)`` timed one at a time (jitted, best of
    ``reps``): ``[{"shape", "ms", "gflop_per_s"}]``. Their rate against the matmul reference separates the
    convolutions' speed from the rest of the network's."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    rows = []
    for hw, ci, co in shapes:
        x = jnp.asarray(np.random.default_rng(0).standard_normal((batch, hw, hw, ci)).astype(np.float32))
        w = jnp.asarray(np.random.default_rng(1).standard_normal((3, 3, ci, co)).astype(np.float32) * 0.05)
        f = jax.jit(lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                                              dimension_numbers=("NHWC", "HWIO", "NHWC")))
        f(x, w).block_until_ready()
        best = float("inf")
        for _ in range(max(reps, 3)):
            t0 = time.perf_counter()
            f(x, w).block_until_ready()
            best = min(best, time.perf_counter() - t0)
        flops = 2.0 * batch * hw * hw * co * 9 * ci
        rows.append({"shape": f"{batch}x{hw}x{hw}x{ci} -> {co}, 3x3", "ms": round(best * 1e3, 2),
                     "gflop_per_s": round(flops / best / 1e9, 1)})
    return rows


def child(net, batch, reps, trace_dir):
    """Runs in a fresh interpreter: time + thread use, then the single-thread trace breakdown; prints JSON."""
    sys.path.insert(0, HERE)
    from _common import machine_info  # noqa: F401  (imports mapreps_jax first: the XLA:CPU settings apply)

    import jax
    import jax.numpy as jnp
    import numpy as np

    from mapreps_jax.app.pretrained import load_default_prior
    from mapreps_jax.networks.adm import ADMConfig, adm_apply, init_adm_params

    if net == "digits":
        m, size, ch = load_default_prior(), 32, 1

        def eps(model, z, t):
            return model.eps(z, t)
    else:
        cfg = ADMConfig.ffhq256()
        m, size, ch = init_adm_params(jax.random.PRNGKey(0), cfg), 256, 3

        def eps(params, z, t):
            return adm_apply(cfg, params, z, t)
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (batch, size, size, ch)).astype(np.float32))
    t = jnp.full((batch,), 500, jnp.int32)

    def fwd_vjp(model, x):
        out, pull = jax.vjp(lambda z: eps(model, z, t), x)
        return pull(out)[0]

    fn = jax.jit(fwd_vjp)
    t0 = time.perf_counter()
    fn(m, x).block_until_ready()
    first = time.perf_counter() - t0
    walls, cpus = [], []
    for _ in range(reps):
        c0, w0 = os.times(), time.perf_counter()
        fn(m, x).block_until_ready()
        c1, w1 = os.times(), time.perf_counter()
        walls.append(w1 - w0)
        cpus.append((c1.user + c1.system - c0.user - c0.system) / (w1 - w0))
    out = {"info": machine_info(), "first_call_s": first, "median_s": float(np.median(walls)),
           "cpu_per_wall": float(np.median(cpus))}
    if net == "digits" and not trace_dir:
        out["conv_isolated"] = conv_isolated(batch, reps)
    if trace_dir:
        cats = _categorise(fn.lower(m, x).compile().as_text())
        jax.profiler.start_trace(trace_dir)
        fn(m, x).block_until_ready()
        jax.profiler.stop_trace()
        path = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)[0]
        events = [e for e in json.load(gzip.open(path))["traceEvents"] if e.get("ph") == "X"]
        tot, cnt = collections.Counter(), collections.Counter()
        for e in events:
            c = cats.get(e["name"])
            if c is not None:
                tot[c] += e["dur"] / 1e3
                cnt[c] += 1
        total = sum(tot.values())
        coarse = collections.Counter()
        for c, ms in tot.items():
            coarse[c.split(" ")[0]] += ms
        out["traced_ms"] = total
        out["shares"] = {c: round(ms / total, 4) for c, ms in coarse.most_common()}
        out["top"] = [{"op": c, "ms": round(ms, 2), "n": cnt[c], "share": round(ms / total, 4)}
                      for c, ms in tot.most_common(15)]
    print("RESULT " + json.dumps(out))


def run_setting(name, env_extra, net, batch, reps):
    results = {}
    for mode in ("threads", "trace"):
        env = dict(os.environ)
        env.pop("XLA_FLAGS", None)
        env.update(env_extra)
        args = [sys.executable, os.path.abspath(__file__), "--child", "--net", net, "--batch", str(batch), "--reps", str(reps)]
        with tempfile.TemporaryDirectory() as td:
            if mode == "trace":
                flags = env.get("XLA_FLAGS", "")
                env["XLA_FLAGS"] = (flags + " --xla_cpu_enable_xprof_traceme=true").strip()
                args += ["--trace-dir", td]
            proc = subprocess.run(args, env=env, capture_output=True, text=True)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not line:
            raise RuntimeError(f"{name}/{mode} failed:\n{proc.stderr[-3000:]}")
        results[mode] = json.loads(line[-1][len("RESULT "):])
        print(f"{name} {mode}: {results[mode]['median_s']:.3f} s, CPU/wall {results[mode]['cpu_per_wall']:.2f}"
              + (f", shares {results[mode]['shares']}" if mode == "trace" else "")
              + (f", convolutions alone {results[mode]['conv_isolated']}" if "conv_isolated" in results[mode]
                 else ""), flush=True)
    return results


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--net", choices=("digits", "ffhq"), default="digits")
    ap.add_argument("--batch", type=int, default=None, help="default: 64 for digits, 1 for ffhq")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--trace-dir", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.batch is None:
        args.batch = 64 if args.net == "digits" else 1
    if args.child:
        return child(args.net, args.batch, args.reps, args.trace_dir)

    sys.path.insert(0, HERE)
    from _common import finish_result

    res = {"batch": args.batch, "reps": args.reps, "what": f"{args.net} ADM forward + input VJP, float32",
           "settings": {}}
    res["settings"]["library_defaults"] = run_setting("library defaults", {}, args.net, args.batch, args.reps)
    res["settings"]["xla_defaults"] = run_setting("XLA defaults", {"MAPREPS_JAX_XLA_DEFAULTS": "0"}, args.net,
                                                  args.batch, args.reps)
    a = res["settings"]["library_defaults"]["threads"]["median_s"]
    b = res["settings"]["xla_defaults"]["threads"]["median_s"]
    res["speedup_library_over_xla_defaults"] = b / a
    res["info"] = res["settings"]["library_defaults"]["threads"]["info"]
    res["note"] = ("threads: wall time and CPU/wall, conv_isolated: the 3x3 convolution shapes alone; trace: one "
                   "traced call, each thunk's time put in a category (shares of the summed traced time; Eigen "
                   "convolutions are asynchronous and traced as their launch only)")
    finish_result(res, os.path.join(args.out, "profile_cpu.json"), section=args.net)


if __name__ == "__main__":
    main()
