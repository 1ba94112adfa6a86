"""How far the dry-run estimate is from measured job times, and the efficiencies the measurements imply.

Usage: python benchmarks/estimate.py SPEC DB [--data-root DIR]
  SPEC: the spec (or preset) the store DB was produced with; DB: a finished store of that spec.
Prints per job the estimate, the measured wall time (started_at -> finished_at) and their ratio, then per method the
efficiency (fraction of this CPU's measured 3x3-conv FLOP/s) that its measured fit + predict time implies, and the
same for the backbones (from the minimum batch-1 latency at the timing thread count). Constants in
``adspine/study/estimate.py`` and each method's ``MethodInfo.efficiency`` were set from these figures.
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
from collections import defaultdict

from adspine.methods import get_method_class
from adspine.methods.base import CostShape
from adspine.study import timing
from adspine.study.estimate import backbone_shape
from adspine.study.plan import plan
from adspine.study.store import ResultStore


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("spec")
    ap.add_argument("db")
    ap.add_argument("--data-root", default=None)
    args = ap.parse_args()
    p = plan(args.spec, data_root=args.data_root)
    est = {e["job"].job_id: e for e in p.estimate()}
    store = ResultStore(args.db, readonly=True)
    jobs = {j["job_id"]: j for j in store.jobs("done")}
    rate = timing.conv_flops_per_second(p.spec.threads)
    rate1 = timing.conv_flops_per_second(p.spec.timing.threads or p.spec.threads)
    print(f"conv rate: {rate / 1e9:.1f} GFLOP/s at {p.spec.threads} thread(s), {rate1 / 1e9:.1f} at the timing's")
    print(f"{'job':16s} {'category':9s} {'backbone':22s} {'init':9s} {'est s':>6s} {'meas s':>6s} {'meas/est':>8s}")
    ratios = []
    for jid, e in est.items():
        j = jobs.get(jid)
        if j is None:
            continue
        meas = (dt.datetime.fromisoformat(j["finished_at"]) - dt.datetime.fromisoformat(j["started_at"])).total_seconds()
        ratios.append(meas / e["seconds"])
        print(f"{jid:16s} {j['category']:9s} {j['backbone']:22s} {j['init']:9s} {e['seconds']:6.1f} {meas:6.0f} "
              f"{meas / e['seconds']:8.2f}")
    if ratios:
        print(f"measured / estimated: min {min(ratios):.2f}, median {statistics.median(ratios):.2f}, "
              f"max {max(ratios):.2f} over {len(ratios)} jobs")

    implied: dict[str, list[float]] = defaultdict(list)
    backbone: list[float] = []
    shapes = {}
    for r in store.rows():
        job = next(j for j in p.jobs if j.job_id == r["job_id"])
        if job.job_id not in shapes:
            shapes[job.job_id] = backbone_shape(job)
            if r.get("backbone_ms_b1_min"):
                backbone.append(shapes[job.job_id].flops / (rate1 * r["backbone_ms_b1_min"] / 1e3))
        bs = shapes[job.job_id]
        klass = get_method_class(r["method"])
        if klass.info.cost is None:
            continue
        d = r["d"] or sum(bs.channels)
        shape = CostShape(r["n_train"], r["n_test"], bs.positions, bs.channels, d, bs.flops)
        import json

        flops = klass.info.cost(shape, {**klass.defaults(), **json.loads(r["settings"])})
        seconds = r["fit_s"] + r["predict_ms"] / 1e3 * r["n_test"]
        implied[r["method"]].append(flops / (rate * seconds))
    print(f"backbone efficiency implied (median over jobs): {statistics.median(backbone):.3f}" if backbone else "")
    for m, v in implied.items():
        print(f"{m:10s} efficiency implied: median {statistics.median(v):.3f} (min {min(v):.3f}, max {max(v):.3f}); "
              f"declared {get_method_class(m).info.efficiency}")


if __name__ == "__main__":
    main()
