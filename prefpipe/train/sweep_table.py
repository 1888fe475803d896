"""The end-of-sweep table printed by `prefpipe train` (the same numbers are in summary.json)."""

from __future__ import annotations

from prefpipe.wording import plural


def _f(x, spec=".4f") -> str:
    return "-" if x is None else format(x, spec)


def format_summary(summary: dict) -> str:
    runs = summary["runs"]
    has_eval = any(r.get("eval") for r in runs)
    head = f"{'run':<22} {'steps':>6} {'loss':>8} {'acc':>6} {'margin':>8}"
    if has_eval:
        head += f"  {'eval loss':>9} {'eval acc':>8} {'eval margin':>11}"
    lines = [head, "-" * len(head)]
    for r in runs:
        fin = r.get("final") or {}
        line = (f"{r['name']:<22} {r['steps']:>6} {_f(fin.get('loss')):>8} {_f(fin.get('acc'), '.3f'):>6} "
                f"{_f(fin.get('margin')):>8}")
        if has_eval:
            ev = r.get("eval") or {}
            line += f"  {_f(ev.get('loss')):>9} {_f(ev.get('acc'), '.3f'):>8} {_f(ev.get('margin')):>11}"
        lines.append(line)
    drift = (summary.get("validation") or {}).get("drift")
    if drift:
        lines.append(f"step-0 drift vs cached reference: {drift['mean_abs_per_token']:.3g} nats/token "
                     f"({plural(drift['rows'], 'row')})")
    return "\n".join(lines)
