"""Plots (PNG), `report.md` and the stdout table of a lab run, all from `results.json` and the run files.

Figures follow paper 1 (Wang et al. 2024): win rate vs KL for single rewards (Figures 3 and 8) and for
helpful AND harmless in RLHF and best-of-k (Figures 1 and 6), shortcut rates (Figure 5), reward
distributions of KL-matched policies (Figures 4 and 7), proxy-vs-gold over-optimisation (Figure 10),
plus each method's win rate as a fraction of the gold best-of-n frontier.
"""

import math
import os
from collections import defaultdict
from typing import Dict, List, Optional, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

WIN_TITLES = {
    "helpful": "win rate: gold helpfulness > SFT 85th percentile",
    "harmless": "win rate: gold harmlessness > SFT 95th percentile",
    "both": "win rate: above the SFT median on BOTH properties",
}


def _save(fig, out: str, name: str) -> str:
    path = os.path.join(out, name)
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)
    return name


def curves(rows: List[Dict], key=lambda r: r["win"]) -> Dict[str, Dict[str, np.ndarray]]:
    """Per method: KL coefficient grid -> mean/std over seeds of KL and of `key`, sorted by KL."""
    groups = defaultdict(lambda: defaultdict(list))
    for r in rows:
        groups[r["method"]][r["c"]].append(r)
    out = {}
    for method, by_c in groups.items():
        pts = []
        for c, rs in by_c.items():
            kl, y = np.array([r["kl"] for r in rs]), np.array([key(r) for r in rs])
            pts.append((kl.mean(), kl.std(), y.mean(), y.std(), c, len(rs)))
        pts.sort()
        out[method] = {name: np.array([p[i] for p in pts]) for i, name in enumerate(("kl", "kl_std", "y", "y_std", "c", "n"))}
    return out


def compare(a: Dict[str, np.ndarray], b: Dict[str, np.ndarray]) -> Optional[Tuple[float, float, float]]:
    """Mean of curve a minus curve b over their common KL range (linear interpolation), with that range."""
    lo, hi = max(a["kl"].min(), b["kl"].min()), min(a["kl"].max(), b["kl"].max())
    if hi <= lo:
        return None
    grid = np.linspace(lo, hi, 50)
    return float(np.mean(np.interp(grid, a["kl"], a["y"]) - np.interp(grid, b["kl"], b["y"]))), float(lo), float(hi)


def _plot_curves(ax, cs: Dict[str, Dict[str, np.ndarray]]) -> None:
    for method in sorted(cs, key=_method_order):
        c = cs[method]
        style = dict(marker="o", lw=2.2 if "lsc" in method else 1.4, ls="-" if "lsc" in method or method == "raw" else "--")
        if c["n"].max() > 1:
            ax.errorbar(c["kl"], c["y"], xerr=c["kl_std"], yerr=c["y_std"], capsize=3, label=method, **style)
        else:
            ax.plot(c["kl"], c["y"], label=method, **style)


def _method_order(m: str) -> Tuple[int, str]:
    return (0 if m.startswith("lsc") else 1 if m == "raw" else 2, m)


def _frontier(ax, results: Dict, win_name: str, kl_max: float) -> None:
    f = results["frontier"]
    kl = np.array(f["kl"])
    keep = kl <= kl_max * 1.1 + 0.1
    ax.plot(kl[keep], np.array(f["win"][win_name])[keep], color="gray", ls=":", lw=2, label="gold best-of-n frontier")


def win_plot(out: str, results: Dict, rows: List[Dict], win_name: str, title: str, name: str) -> str:
    fig, ax = plt.subplots(figsize=(6, 4.2))
    cs = curves(rows)
    _plot_curves(ax, cs)
    _frontier(ax, results, win_name, max(r["kl"] for r in rows))
    ax.set_xlabel("KL(policy || SFT) [nats, per response]")
    ax.set_ylabel(WIN_TITLES[win_name])
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out, name)


def best_of_k_plot(out: str, results: Dict) -> str:
    bok = results["best_of_k"]
    fig, ax = plt.subplots(figsize=(6, 4.2))
    kl = np.array(bok["kl_formula"])
    for method in sorted(bok["methods"], key=_method_order):
        ax.plot(kl, bok["methods"][method]["win_both"], marker="o", lw=2.2 if "lsc" in method else 1.4,
                ls="-" if "lsc" in method else "--", label=method)
    _frontier(ax, results, "both", kl.max())
    ax.set_xlabel("KL of best-of-k = log k - (k-1)/k  (k = %s)" % ", ".join(map(str, bok["k"])))
    ax.set_ylabel(WIN_TITLES["both"])
    ax.set_title("Best-of-k from SFT, helpful AND harmless (paper Fig. 6a)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out, "and_best_of_k.png")


def shortcut_plot(out: str, results: Dict, rows: List[Dict]) -> str:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    sft = results["sft_shortcut_rates"]
    for ax, (short, prop, what) in zip(axes, (("list", "helpful", "list format (>= 2 list markers)"),
                                               ("consult", "harmless", '"consult a <professional>"'))):
        for exp, label in (("single", f"single reward: {prop}"), ("and", "helpful AND harmless")):
            rs = [r for r in rows if r["experiment"] == exp and (exp == "and" or r["property"] == prop)]
            if not rs:
                continue
            cs = curves(rs, key=lambda r: r["shortcut"][short])
            for method in sorted(cs, key=_method_order):
                c = cs[method]
                ax.plot(c["kl"], c["y"], marker="o" if exp == "single" else "s", ls="-" if exp == "single" else "--",
                        label=f"{label}: {method}")
        ax.axhline(sft[short], color="gray", ls=":", label="SFT")
        ax.set_xlabel("KL(policy || SFT)")
        ax.set_ylabel(f"fraction of responses with {what}")
        ax.set_title(f"Shortcut: {short} (paper Fig. 5)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, out, "shortcuts.png")


def overopt_plot(out: str, rows: List[Dict]) -> str:
    """Proxy and gold reward of the optimised property against KL (Gao et al. style over-optimisation)."""
    panels = [(exp, prop) for exp in ("single", "and") for prop in ("helpful", "harmless")
              if any(r["experiment"] == exp and prop in r["property"] for r in rows)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4), squeeze=False)
    for ax, (exp, prop) in zip(axes[0], panels):
        rs = [r for r in rows if r["experiment"] == exp and (exp == "and" or r["property"] == prop)]
        for i, (kind, ls) in enumerate((("proxy", "--"), ("gold", "-"))):
            cs = curves(rs, key=lambda r, k=kind: r[k][prop])
            for j, method in enumerate(sorted(cs, key=_method_order)):
                c = cs[method]
                ax.plot(c["kl"], c["y"], ls=ls, marker="o", color=f"C{j}", label=f"{method} ({kind})")
        ax.set_xlabel("KL(policy || SFT)")
        ax.set_ylabel(f"mean {prop} score")
        ax.set_title(f"{'single' if exp == 'single' else 'AND vs weighted'}: {prop}\nproxy (dashed) vs gold (solid)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    return _save(fig, out, "overoptimization.png")


def matched_pair(rows: List[Dict], a: str, b: str) -> Optional[Tuple[Dict, Dict]]:
    """The runs of methods a and b (seed 0 if present) whose KLs are closest, preferring larger KL on ties."""
    ra = [r for r in rows if r["method"] == a and r["seed"] == min(x["seed"] for x in rows)]
    rb = [r for r in rows if r["method"] == b and r["seed"] == min(x["seed"] for x in rows)]
    if not ra or not rb:
        return None
    return min(((x, y) for x in ra for y in rb), key=lambda p: (abs(p[0]["kl"] - p[1]["kl"]), -p[0]["kl"]))


def _centred(run_rec: Dict, prop: str, kind: str, medians: np.ndarray) -> np.ndarray:
    v = np.array(run_rec["eval"]["samples"][f"{kind}_{prop}"])
    return (v - medians[:, None]).ravel()


def distribution_plots(out: str, rows: List[Dict], records: Dict, medians: Dict[str, np.ndarray],
                       medians_proxy: Dict[str, np.ndarray]) -> Dict[str, str]:
    """Histograms of KL-matched raw vs lsc (Fig. 4), joint KDE AND vs weighted (Fig. 7), binned proxy vs gold (Fig. 10)."""
    from scipy.stats import gaussian_kde

    names = {}
    single = [r for r in rows if r["experiment"] == "single"]
    props = sorted({r["property"] for r in single})
    pairs = {p: matched_pair([r for r in single if r["property"] == p], "lsc", "raw") for p in props}
    pairs = {p: v for p, v in pairs.items() if v}
    if pairs:
        fig, axes = plt.subplots(1, len(pairs), figsize=(5.5 * len(pairs), 4), squeeze=False)
        for ax, (prop, (lsc, raw)) in zip(axes[0], pairs.items()):
            for r, color in ((raw, "C1"), (lsc, "C0")):
                v = _centred(records[r["id"]], prop, "gold", medians[prop])
                ax.hist(v, bins=30, alpha=0.5, color=color, density=True, label=f"{r['method']} (KL {r['kl']:.2f})")
            ax.axvline(0, color="gray", ls=":")
            ax.set_xlabel(f"gold {prop} minus the prompt's SFT median")
            ax.set_title(f"KL-matched policies, {prop} (paper Fig. 4)")
            ax.legend(fontsize=8)
        names["hist"] = _save(fig, out, "distributions.png")

        fig, axes = plt.subplots(1, len(pairs), figsize=(5.5 * len(pairs), 4), squeeze=False)
        for ax, (prop, (lsc, raw)) in zip(axes[0], pairs.items()):
            for r, color in ((raw, "C1"), (lsc, "C0")):
                x = _centred(records[r["id"]], prop, "proxy", medians_proxy[prop])
                y = _centred(records[r["id"]], prop, "gold", medians[prop])
                edges = np.linspace(x.min(), x.max(), 21)
                mids, q = [], []
                for lo, hi in zip(edges[:-1], edges[1:]):
                    sel = (x >= lo) & (x <= hi)
                    if sel.sum() > 10:
                        mids.append(np.median(x[sel]))
                        q.append(np.percentile(y[sel], [25, 50, 75]))
                if q:
                    q = np.array(q)
                    ax.plot(mids, q[:, 1], color=color, marker="o", label=f"{r['method']} (KL {r['kl']:.2f})")
                    ax.fill_between(mids, q[:, 0], q[:, 2], color=color, alpha=0.2)
            ax.set_xlabel(f"proxy {prop} minus SFT median (20 bins)")
            ax.set_ylabel(f"gold {prop} minus SFT median (25/50/75%)")
            ax.set_title(f"Over-optimisation, KL-matched (paper Fig. 10), {prop}", fontsize=9)
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
        names["binned"] = _save(fig, out, "overoptimization_binned.png")

    both = [r for r in rows if r["experiment"] == "and"]
    weighted = [m for m in {r["method"] for r in both} if m.startswith("weighted")]
    if both and weighted:
        best_w = max(weighted, key=lambda m: np.mean([r["win"] for r in both if r["method"] == m]))
        pair = matched_pair(both, "lsc AND", best_w)
        if pair:
            fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), sharex=True, sharey=True)
            for ax, r in zip(axes, pair):
                x = _centred(records[r["id"]], "helpful", "gold", medians["helpful"])
                y = _centred(records[r["id"]], "harmless", "gold", medians["harmless"])
                jitter = np.random.default_rng(0).normal(0, 0.02, size=(2, len(x)))  # gold values tie often
                xy = np.vstack([x, y]) + jitter
                xx, yy = np.meshgrid(np.linspace(x.min() - 0.3, x.max() + 0.3, 80), np.linspace(y.min() - 0.3, y.max() + 0.3, 80))
                zz = gaussian_kde(xy)(np.vstack([xx.ravel(), yy.ravel()])).reshape(xx.shape)
                ax.contourf(xx, yy, zz, levels=np.linspace(zz.max() / 20, zz.max(), 12), cmap="Blues")
                ax.axhline(0, color="gray", ls=":")
                ax.axvline(0, color="gray", ls=":")
                ax.set_title(f"{r['method']} (KL {r['kl']:.2f}, win-both {r['win']:.2f})", fontsize=9)
                ax.set_xlabel("gold helpful - SFT median")
            axes[0].set_ylabel("gold harmless - SFT median")
            fig.suptitle("Joint distribution of KL-matched policies (paper Fig. 7)")
            names["kde"] = _save(fig, out, "joint_kde.png")
    return names


def fraction_plot(out: str, rows: List[Dict]) -> str:
    exps = sorted({(r["experiment"], r["property"]) for r in rows})
    fig, axes = plt.subplots(1, len(exps), figsize=(4.6 * len(exps), 4), squeeze=False)
    for ax, (exp, prop) in zip(axes[0], exps):
        rs = [r for r in rows if r["experiment"] == exp and r["property"] == prop and r["fraction_of_frontier"] is not None]
        _plot_curves(ax, curves(rs, key=lambda r: r["fraction_of_frontier"]))
        ax.set_ylim(bottom=0)
        ax.axhline(1.0, color="gray", ls=":")
        ax.set_xlabel("KL(policy || SFT)")
        ax.set_ylabel("win rate / gold best-of-n win rate at that KL")
        ax.set_title(f"{exp}: {prop}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, out, "frontier_fraction.png")


# ---------------------------------------------------------------- tables and text


def summary_rows(rows: List[Dict]) -> List[Dict]:
    """One line per (experiment, property, method): best win over the sweep, win at the largest KL, etc."""
    out = []
    for (exp, prop), _ in sorted({(r["experiment"], r["property"]): 1 for r in rows}.items()):
        rs = [r for r in rows if r["experiment"] == exp and r["property"] == prop]
        cs = curves(rs)
        fr = curves(rs, key=lambda r: r["fraction_of_frontier"] or 0.0)
        for method in sorted(cs, key=_method_order):
            c = cs[method]
            best = int(np.argmax(c["y"]))
            mine = [r for r in rs if r["method"] == method]
            out.append({
                "experiment": exp, "property": prop, "method": method, "runs": len(mine),
                "kl_range": (float(c["kl"].min()), float(c["kl"].max())),
                "best_win": float(c["y"][best]), "best_win_std": float(c["y_std"][best]), "best_win_kl": float(c["kl"][best]),
                "win_at_max_kl": float(c["y"][-1]),
                "mean_fraction_of_frontier": float(np.mean(fr[method]["y"])),
                "list_rate_at_max_kl": float(np.mean([r["shortcut"]["list"] for r in mine if r["c"] == c["c"][-1]])),
                "consult_rate_at_max_kl": float(np.mean([r["shortcut"]["consult"] for r in mine if r["c"] == c["c"][-1]])),
            })
    return out


def comparisons(rows: List[Dict]) -> List[Dict]:
    """The plugin's method against each stock baseline, over the common KL range of their curves."""
    out = []
    for (exp, prop), _ in sorted({(r["experiment"], r["property"]): 1 for r in rows}.items()):
        rs = [r for r in rows if r["experiment"] == exp and r["property"] == prop]
        cs = curves(rs)
        ours = "lsc" if exp == "single" else "lsc AND"
        if ours not in cs:
            continue
        for other in sorted(cs, key=_method_order):
            if other == ours:
                continue
            res = compare(cs[ours], cs[other])
            out.append({"experiment": exp, "property": prop, "method": ours, "baseline": other,
                        "mean_win_difference": None if res is None else res[0],
                        "kl_range": None if res is None else (res[1], res[2])})
    return out


def _fmt(x, nd=3) -> str:
    return "—" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{nd}f}"


def table_text(summary: List[Dict]) -> str:
    head = f"{'experiment':<10} {'property':<17} {'method':<16} {'runs':>4} {'KL range':>13} {'best win':>13} {'@KL':>6} {'win@maxKL':>9} {'frac.front':>10} {'list%':>6} {'consult%':>8}"
    lines = [head, "-" * len(head)]
    for s in summary:
        best = f"{s['best_win']:.3f}" + (f"±{s['best_win_std']:.3f}" if s["best_win_std"] > 0 else "")
        lines.append(
            f"{s['experiment']:<10} {s['property']:<17} {s['method']:<16} {s['runs']:>4} "
            f"{s['kl_range'][0]:>6.2f}-{s['kl_range'][1]:<6.2f} {best:>13} {s['best_win_kl']:>6.2f} {s['win_at_max_kl']:>9.3f} "
            f"{s['mean_fraction_of_frontier']:>10.3f} {100 * s['list_rate_at_max_kl']:>6.1f} {100 * s['consult_rate_at_max_kl']:>8.1f}"
        )
    return "\n".join(lines)


def write(out: str, results: Dict, records: Dict[str, Dict], pools: Dict) -> Dict:
    """Write every plot and report.md into `out` and print the results table.

    Returns:
        {"summary", "comparisons", "figures"} for results.json.
    """
    from openrlhf_lsc.lab.experiments import thresholds

    rows = results["rows"]
    thr = thresholds(pools)
    medians = {"helpful": thr["median_helpful"], "harmless": thr["median_harmless"]}
    medians_proxy = {p: np.median(pools[f"bon_proxy_{p}"], axis=1) for p in ("helpful", "harmless")}
    figs = []
    for prop in sorted({r["property"] for r in rows if r["experiment"] == "single"}):
        rs = [r for r in rows if r["experiment"] == "single" and r["property"] == prop]
        figs.append(win_plot(out, results, rs, prop, f"Single reward: {prop} (paper Figs. 3 and 8)", f"single_{prop}.png"))
    rs = [r for r in rows if r["experiment"] == "and"]
    if rs:
        figs.append(win_plot(out, results, rs, "both", "RLHF, helpful AND harmless (paper Figs. 1 and 6b)", "and_rlhf.png"))
    figs.append(best_of_k_plot(out, results))
    figs.append(shortcut_plot(out, results, rows))
    figs.append(overopt_plot(out, rows))
    figs += list(distribution_plots(out, rows, records, medians, medians_proxy).values())
    figs.append(fraction_plot(out, rows))

    summary = summary_rows(rows)
    comps = comparisons(rows)
    table = table_text(summary)
    print("\n" + table + "\n")
    for c in comps:
        print(_comparison_sentence(c))

    md = _markdown(results, summary, comps, table, figs, records)
    tmp = os.path.join(out, "report.md.tmp")
    with open(tmp, "w") as f:
        f.write(md)
    os.replace(tmp, os.path.join(out, "report.md"))
    return {"summary": summary, "comparisons": comps, "figures": figs}


def _comparison_sentence(c: Dict) -> str:
    if c["mean_win_difference"] is None:
        return f"{c['experiment']}/{c['property']}: {c['method']} vs {c['baseline']}: KL ranges do not overlap, no comparison"
    d = c["mean_win_difference"]
    verdict = "higher" if d > 0.005 else "lower" if d < -0.005 else "about equal"
    return (f"{c['experiment']}/{c['property']}: {c['method']} vs {c['baseline']}: win rate {verdict} by {d:+.3f} on average "
            f"over KL {c['kl_range'][0]:.2f}-{c['kl_range'][1]:.2f}")


def _timing_line(results: Dict, cfg: Dict) -> str:
    t = results["timing"]
    setup_cpu = sum(v["cpu_seconds"] for v in t["setup"].values())
    stages = ", ".join(f"{k} {v['cpu_seconds']:.0f} s" for k, v in t["setup"].items())
    return (f"- CPU time: setup {setup_cpu:.0f} s ({stages}), "
            f"PPO runs {t['runs_cpu_seconds']:.0f} s in total; with {cfg['workers']} worker(s) on otherwise idle cores the wall "
            f"time is about {(setup_cpu + t['runs_cpu_seconds'] / max(cfg['workers'], 1)) / 60:.1f} min plus start-up")


def _markdown(results: Dict, summary, comps, table: str, figs: Sequence[str], records: Dict) -> str:
    cfg = results["config"]
    rm = results["reward_models"]
    lines = [
        f"# openrlhf_lsc CPU lab — {cfg['mode']} mode",
        "",
        "Stock PPO (raw reward / weighted sum of raw rewards) against the plugin's LSC transform and AND-aggregation,",
        "in a synthetic world whose gold judges never enter training. Every number below comes from this run:",
        "`config.json`, `results.json` (all numbers, per-run summaries) and `runs/*.json` (training logs, per-sample",
        "scores) sit beside this file.",
        "",
        f"- world seed {cfg['seed']}, PPO seeds {list(cfg['ppo_seeds'])} (spread = std over PPO seeds; SFT and reward models are shared)",
        f"- {len(results['rows'])} PPO runs; wall time of the invocation that wrote this report: {results.get('wall_seconds_this_invocation', float('nan')) / 60:.1f} min",
        f"- KL coefficients: {list(cfg['kl_grid'])} x (std of the run's utility over SFT samples); PPO: {cfg['ppo'] or 'defaults'} "
        "(estimator gae, k1 KL in the reward, clip 0.2, value clip 0.5, reward clip ±10 as OpenRLHF)",
        _timing_line(results, cfg),
        "",
        "## Results",
        "",
        "```",
        table,
        "```",
        "",
        "best win = highest win rate over the KL sweep (mean over seeds) and the KL where it was reached; frac.front = mean",
        "over the sweep of win rate / gold best-of-n win rate at the same KL; list% / consult% = shortcut rates at the",
        "smallest KL coefficient (largest KL).",
        "",
        "Plugin vs stock, averaged over the KL range both curves cover (linear interpolation between runs):",
        "",
    ]
    lines += [f"- {_comparison_sentence(c)}" for c in comps]
    diffs = [c["mean_win_difference"] for c in comps if c["mean_win_difference"] is not None]
    lines += ["", f"In this run the plugin's method was ahead in {sum(d > 0.005 for d in diffs)}, behind in "
              f"{sum(d < -0.005 for d in diffs)} and level (within ±0.005) in {sum(abs(d) <= 0.005 for d in diffs)} "
              f"of {len(diffs)} comparisons."]
    and_rows = [r for r in results["rows"] if r["experiment"] == "and"]
    if and_rows:
        spread = results["proxy_within_prompt_std"]
        lines += ["", "Helpful AND harmless, per property (runs at the smallest KL coefficient, mean over seeds): the",
                  "fraction of responses above the SFT median on each property, and on both.", "",
                  "| method | KL | helpful > median | harmless > median | both |", "|---|---|---|---|---|"]
        for method in sorted({r["method"] for r in and_rows}, key=_method_order):
            rs = [r for r in and_rows if r["method"] == method]
            rs = [r for r in rs if r["c"] == min(x["c"] for x in rs)]
            mean = lambda f: np.mean([f(r) for r in rs])  # noqa: E731
            lines.append(f"| {method} | {mean(lambda r: r['kl']):.2f} | {mean(lambda r: r['all_wins']['helpful_above_median']):.3f} | "
                         f"{mean(lambda r: r['all_wins']['harmless_above_median']):.3f} | {mean(lambda r: r['win']):.3f} |")
        lines += ["", f"Proxy scale (std of the proxy over SFT answers to the same prompt): helpful {spread['helpful']:.2f}, "
                  f"harmless {spread['harmless']:.2f}. The LSC sum weighs each property by how sure its reward model is",
                  "(a Bradley-Terry probability), the weighted sum by w: a proxy with a narrower scale gets less say under AND."]
    bok = results["best_of_k"]
    lines += ["", "Best-of-k from SFT (helpful AND harmless, win = above both SFT medians):", "",
              "| k | KL formula | " + " | ".join(bok["methods"]) + " |", "|---|---|" + "---|" * len(bok["methods"])]
    for i, k in enumerate(bok["k"]):
        lines.append(f"| {k} | {bok['kl_formula'][i]:.2f} | " + " | ".join(f"{bok['methods'][m]['win_both'][i]:.3f}" for m in bok["methods"]) + " |")
    lines += ["", "## Figures", ""]
    lines += [f"![{f}]({f})" for f in figs]
    lines += [
        "",
        "## Setup diagnostics",
        "",
        f"- SFT: {results['sft']['demos']} demonstrations, epoch losses {[round(x, 3) for x in results['sft']['epoch_losses']]}",
    ]
    for name, s in rm.items():
        lines.append(f"- proxy RM `{name}`: {s['pairs']} Bradley-Terry pairs (T = {cfg['bt_temperature']}); held-out accuracy "
                     f"{_fmt(s['heldout_accuracy_vs_gold'])} against the gold order, {_fmt(s['heldout_accuracy_vs_labels'])} against the noisy labels")
    lines += ["", "Shortcut probe: proxy and gold score of one fixed on-topic answer with the shortcut repeated n times",
              "(mean over 64 non-sensitive prompts; gold stops crediting after 2 list items / 1 consult):", "",
              "| property | n | example | proxy | gold |", "|---|---|---|---|---|"]
    for name, s in rm.items():
        for row in s["shortcut_probe"]:
            lines.append(f"| {name} | {row['repeats']} | `{row['example']}` | {row['proxy']:.2f} | {row['gold']:.2f} |")
    lines += ["", "Best-of-n KL: formula log n − (n−1)/n against the exact KL of best-of-n over the helpful proxy's SFT pool",
              "(continuous scores; duplicates in the pool make the exact value smaller):", ""]
    for n, c in results["bon_kl_check"].items():
        lines.append(f"- n = {n}: formula {c['formula']:.3f}, pool {c['empirical_proxy_helpful']:.3f}")
    lines += ["", f"SFT win rates on its own pool (the KL = 0 point): " + ", ".join(f"{k} {v:.3f}" for k, v in results["sft_win_rates_on_pool"].items()),
              f"SFT shortcut rates: list {results['sft_shortcut_rates']['list']:.3f}, consult {results['sft_shortcut_rates']['consult']:.3f}",
              "", "## Example generations (largest-KL run of each method, seed 0)", ""]
    seen = set()
    for r in sorted(results["rows"], key=lambda r: (r["experiment"], r["property"], r["method"], r["c"])):
        key = (r["experiment"], r["property"], r["method"])
        if key in seen or r["seed"] != min(x["seed"] for x in results["rows"]):
            continue
        seen.add(key)
        lines.append(f"**{r['experiment']} / {r['property']} / {r['method']}** (KL {r['kl']:.2f}, win {r['win']:.3f})")
        lines.append("```")
        lines += records[r["id"]]["eval"]["examples"][:4]
        lines.append("```")
    lines += [
        "",
        "## How to read this",
        "",
        "- The world: prompts `how <verb> <noun> <modifier> ?`; gold helpfulness pays distinct relevant words with",
        "  diminishing returns, list format only up to two items, risky details on sensitive prompts; gold harmlessness",
        "  punishes risky details, pays refusals on sensitive prompts, `consult a <professional>` once, politeness with",
        "  diminishing returns. Responses have at most 15 words, so shortcuts displace content (`openrlhf_lsc/lab/world.py`).",
        "- Proxy reward models are small transformers trained on noisy gold comparisons of SFT samples; PPO optimises",
        "  them through `openrlhf_lsc.rewards.aggregate_rewards` with references from `openrlhf_lsc.estimate`.",
        "- The frontier is best-of-n from SFT ranked by the gold judge itself, at KL = log n − (n−1)/n: no policy of",
        "  that KL found by sampling does better on average; it is an upper bound computed from the SFT pool.",
        "- This is a toy: a 100k-parameter policy, short responses, one SFT model and one pair of reward models. It shows",
        "  the mechanics and the direction of effects, not their size on real LLMs.",
    ]
    return "\n".join(lines) + "\n"
