"""The paper's claims about conditioning augmentation (METHOD.md §2), checked against the points:
a difference counts when it exceeds twice the combined bootstrap standard error of the FIDs."""

from __future__ import annotations

import math

Z = 2.0  # differences beyond Z combined standard errors count


def _cond(r: dict) -> str:
    return "ground-truth" if r["conditioning"] == "ground-truth" else r["mode"]


def _series(pts: list[dict], row: str, cond: str) -> list[dict]:
    return sorted((r for r in pts if r["row"] == row and _cond(r) == cond), key=lambda r: r["level"])


def _fid(r: dict) -> tuple[float, float]:
    m = r.get("metrics", {})
    return m.get("fid", r["value"]), m.get("fid_se", 0.0)


def _gap(a: dict, b: dict) -> tuple[float, float]:
    """``(FID(a) - FID(b), combined SE)``."""
    (fa, sa), (fb, sb) = _fid(a), _fid(b)
    return fa - fb, math.hypot(sa, sb)


def _verdict(d: float, se: float) -> str:
    """For a claim that ``d > 0``."""
    if d > Z * se:
        return "holds"
    if d < -Z * se:
        return "does not hold"
    return "not resolved"


def _show(r: dict, name: str) -> str:
    f, se = _fid(r)
    return f"{name} {f:.3g} ± {se:.2g}"


def _z(d: float, se: float) -> str:
    return f"Δ = {d:+.3g} ({d / se:+.1f} SE)" if se > 0 else f"Δ = {d:+.3g}"


def claims(pts: list[dict]) -> list[tuple[str, str, str]]:
    """``(claim, what was measured, verdict)`` for each claim that the points can address."""
    out = []
    single = _series(pts, "single", "single-stage")
    none = _series(pts, "sr-none", "non-truncated")
    gen = _series(pts, "sr-gaussian", "truncated") + _series(pts, "sr-gaussian", "non-truncated")
    best = min(gen, key=lambda r: (r["value"], r["level"])) if gen else None
    if single and none:
        d, se = _gap(none[0], single[0])
        out.append(("without augmentation the cascade is worse than a single-stage model (FID 6.02 vs 2.35)",
                    f"{_show(none[0], 'no aug')} vs {_show(single[0], 'single')}; {_z(d, se)}", _verdict(d, se)))
    if single and best:
        d, se = _gap(single[0], best)
        out.append(("with Gaussian augmentation the cascade is better than the single-stage model (2.13 vs 2.35)",
                    f"{_show(best, 'best Gaussian (' + _cond(best) + ', s = ' + str(best['level']) + ')')} vs "
                    f"{_show(single[0], 'single')}; {_z(d, se)} (best s chosen on these samples: "
                    f"optimistic)", _verdict(d, se)))
    if none and best:
        d, se = _gap(none[0], best)
        out.append(("Gaussian augmentation improves the cascade (6.02 → 2.13)",
                    f"{_show(none[0], 'no aug')} vs {_show(best, 'best Gaussian')}; {_z(d, se)}", _verdict(d, se)))
    out += _modes_claim(pts) + _level_claims(pts)
    return out


def _modes_claim(pts: list[dict]) -> list[tuple[str, str, str]]:
    tr = {r["level"]: r for r in _series(pts, "sr-gaussian", "truncated")}
    nt = {r["level"]: r for r in _series(pts, "sr-gaussian", "non-truncated")}
    both = [s for s in sorted(tr) if s in nt and s > 0]
    if not both:
        return []
    gaps = [(s, *_gap(tr[s], nt[s])) for s in both]
    s_max, d_max, se_max = max(gaps, key=lambda g: abs(g[1]) / max(g[2], 1e-12))
    bt, bn = min(tr.values(), key=lambda r: r["value"]), min(nt.values(), key=lambda r: r["value"])
    d, se = _gap(bt, bn)
    beyond = sum(abs(g) > Z * e for _, g, e in gaps)
    verdict = "holds" if abs(d) <= Z * se else f"does not hold ({'non-truncated' if d > 0 else 'truncated'} is better)"
    return [("truncated and non-truncated augmentation do about equally well",
             f"best truncated (s = {bt['level']}) vs best non-truncated (s = {bn['level']}): {_z(d, se)}; at equal s "
             f"the gap exceeds {Z:g} SE at {beyond} of {len(gaps)} levels "
             f"(largest at s = {s_max}: {_z(d_max, se_max)})",
             verdict)]


def _level_claims(pts: list[dict]) -> list[tuple[str, str, str]]:
    out = []
    gt = _series(pts, "sr-gaussian", "ground-truth")
    if len(gt) >= 2:
        d, se = _gap(gt[-1], gt[0])
        drops = [(a["level"], b["level"]) for a, b in zip(gt, gt[1:]) if _gap(a, b)[0] > Z * _gap(a, b)[1]]
        seq = ", ".join(f"{_fid(r)[0]:.3g}" for r in gt)
        verdict = _verdict(d, se)
        if verdict == "holds" and drops:
            verdict = "partly: rises overall but not steadily"
        out.append(("with ground-truth inputs quality falls steadily as s grows",
                    f"FID at s = {', '.join(str(r['level']) for r in gt)}: {seq}; s = {gt[-1]['level']} vs 0: "
                    f"{_z(d, se)}; significant improvements between neighbouring s: "
                    f"{', '.join(f'{a}→{b}' for a, b in drops) or 'none'}", verdict))
    for mode in ("non-truncated", "truncated"):
        ser = _series(pts, "sr-gaussian", mode)
        if len(ser) < 2 or ser[0]["level"] != 0:
            continue
        b = min(ser, key=lambda r: (r["value"], r["level"]))
        d, se = _gap(ser[0], b)
        verdict = "does not hold (best at s = 0)" if b["level"] == 0 else _verdict(d, se)
        out.append((f"with generated inputs ({mode}) quality first rises with s",
                    f"best s = {b['level']}: {_show(b, 'FID')} vs {_show(ser[0], 's = 0')}; {_z(d, se)}", verdict))
    return out
