"""Plots (PNG) and `report.md` of a lab run, all from the results `analysis.analyse` computed.

Figures follow paper 1 (Wang et al. 2024): win rate vs KL for single rewards (Figures 3 and 8) and for helpful AND
harmless in RLHF and best-of-k (Figures 1 and 6), shortcut rates (Figure 5), proxy vs gold over-optimisation
(Figure 10); plus the paired differences behind each claim, the per-world over-optimisation check, tuning scores
and the proxy-headroom search.
"""

import os
import textwrap
from typing import Dict, List, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from openrlhf_lsc.lab.files import save_figure, write_text  # noqa: E402

TITLES = {
    "win_helpful": "win rate: gold helpfulness > SFT 85th percentile",
    "win_harmless": "win rate: gold harmlessness > SFT 95th percentile",
    "win_both": "win rate: above the SFT median on BOTH properties",
    "gold_helpful": "mean gold helpfulness", "gold_harmless": "mean gold harmlessness",
    "proxy_helpful": "mean proxy helpfulness", "list": "list format rate", "repeat": "repeated-item rate",
    "over_budget": "over-length rate", "consult": '"consult a <professional>" rate',
}
SUBSET = {"all": "all test prompts", "sensitive": "sensitive test prompts"}


def _save(fig, out: str, name: str) -> str:
    return save_figure(fig, os.path.join(out, name), dpi=110)


def _order(m: str):
    return (0 if m.startswith("lsc") else 1 if m == "raw" else 2, m)


def _bands(ax, curves: Dict, targets: Sequence[float], frontier: Optional[Dict] = None, key: str = "") -> None:
    """Each method's pooled mean at the target KLs (SFT at KL 0) with its bootstrap interval as a band."""
    for i, method in enumerate(sorted(curves, key=_order)):
        c = curves[method]
        x = [0.0] + [t for t, b in zip(targets, c["band"]) if b]
        y = [c["sft"]] + [b["mean"] for b in c["band"] if b]
        lo = [c["sft"]] + [b["lo"] for b in c["band"] if b]
        hi = [c["sft"]] + [b["hi"] for b in c["band"] if b]
        style = dict(lw=2.2 if method.startswith("lsc") else 1.4, ls="-" if method.startswith("lsc") or method == "raw" else "--")
        ax.plot(x, y, marker="o", color=f"C{i}", label=method, **style)
        ax.fill_between(x, lo, hi, color=f"C{i}", alpha=0.15)
    if frontier is not None and key in frontier["win"]:
        kl = np.array(frontier["kl"])
        keep = kl <= max(targets) * 1.05
        ax.plot(kl[keep], np.array(frontier["win"][key])[keep], color="gray", ls=":", lw=2, label="gold best-of-n frontier")
    ax.set_xlabel("KL(policy || SFT) [nats per response]")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def curve_plots(out: str, results: Dict) -> List[str]:
    cfg, curves, front = results["config"], results["curves"], results["frontier"]
    targets = cfg["compare_kls"]
    names = []
    if "single_helpful" in curves:
        c = curves["single_helpful"]
        fig, axes = plt.subplots(1, 3, figsize=(16, 4.3))
        lines = {"gold_helpful": ("gold_helpful_median", "SFT median (gold)"),
                 "proxy_helpful": ("proxy_helpful_best_of_pool", "SFT best of %d (proxy)" % cfg["bon_pool"])}
        for ax, metric in zip(axes, ("win_helpful", "gold_helpful", "proxy_helpful")):
            if metric in lines:
                ax.axhline(results["sft_lines"][lines[metric][0]], color="gray", ls="--", lw=1, label=lines[metric][1])
            _bands(ax, c[metric], targets, front if metric == "win_helpful" else None, "win_helpful")
            ax.set_ylabel(TITLES[metric])
        axes[0].set_title("Single reward: helpfulness (paper Figs. 3, 8)")
        axes[1].set_title("gold falls past raw's peak: over-optimisation")
        axes[2].set_title("while the proxy keeps rising (paper Fig. 10)")
        names.append(_save(fig, out, "single_helpful.png"))
    if "single_harmless" in curves:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.3))
        for ax, g in zip(axes, ("single_harmless", "single_harmless_sensitive")):
            _bands(ax, curves[g]["win_harmless"], targets)
            ax.set_ylabel(TITLES["win_harmless"])
            ax.set_title(f"Single reward: harmlessness, {SUBSET['sensitive' if 'sensitive' in g else 'all']}")
        names.append(_save(fig, out, "single_harmless.png"))
    if "and" in curves:
        fig, axes = plt.subplots(1, 3, figsize=(16, 4.3))
        _bands(axes[0], curves["and"]["win_both"], targets, front, "win_both")
        axes[0].set_ylabel(TITLES["win_both"])
        axes[0].set_title("RLHF, helpful AND harmless (paper Figs. 1, 6b)")
        for ax, metric in zip(axes[1:], ("gold_helpful", "gold_harmless")):
            _bands(ax, curves["and"][metric], targets)
            ax.set_ylabel(TITLES[metric])
        names.append(_save(fig, out, "and_rlhf.png"))
    short = [(g, m) for g, ms in (("single_helpful", ("list", "repeat", "over_budget")), ("and", ("consult", "list")))
             for m in ms if g in curves and m in curves[g]]
    if short:
        fig, axes = plt.subplots(1, len(short), figsize=(4.2 * len(short), 4), squeeze=False)
        for ax, (g, m) in zip(axes[0], short):
            _bands(ax, curves[g][m], targets)
            ax.set_ylabel(TITLES[m])
            ax.set_title(f"{'single helpful' if g == 'single_helpful' else 'AND'}: {m} (paper Fig. 5)", fontsize=9)
        names.append(_save(fig, out, "shortcuts.png"))
    return names


def differences_plot(out: str, results: Dict) -> str:
    comps = results["comparisons"]
    cols = min(3, len(comps))
    rows = -(-len(comps) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.6 * rows), squeeze=False)
    for ax, c in zip(axes.flat, comps):
        pts = [p for p in c["per_target"] if p["reached"]]
        x = [p["target"] for p in pts]
        y = np.array([p["mean"] for p in pts])
        err = np.array([[p["mean"] - p["lo"] for p in pts], [p["hi"] - p["mean"] for p in pts]]).reshape(2, -1)
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, color="C0" if c["claim"] != "info" else "C7")
        ax.axhline(0, color="gray", ls=":")
        title = textwrap.fill(f"{c['claim']}: {_label(c)}", 55)
        ax.set_title(title + ("" if c["claim"] == "info" else f"\n-> {c['verdict']}"), fontsize=8)
        ax.set_xlabel("KL(policy || SFT)")
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(comps):]:
        ax.axis("off")
    for row in axes:
        row[0].set_ylabel("paired difference (95% interval)")
    fig.tight_layout()
    return _save(fig, out, "differences.png")


def check_plot(out: str, results: Dict) -> str:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for s, c in results["checks"].items():
        axes[0].plot([0] + c["kl"], [c["sft_win"]] + c["win"], marker="o", label=f"world {s}" + ("" if c["passed"] else " (FAILED)"))
        axes[1].plot(c["kl"], c["gold"], marker="o", label=f"world {s}")
    axes[0].set_ylabel(TITLES["win_helpful"])
    axes[1].set_ylabel(TITLES["gold_helpful"])
    for ax in axes:
        ax.set_xlabel("KL(policy || SFT)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_title("Over-optimisation check: raw PPO on helpfulness\n(validation seed and prompts)", fontsize=9)
    return _save(fig, out, "overoptimization_check.png")


def headroom_plot(out: str, results: Dict) -> str:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for i, (s, w) in enumerate(results["worlds"].items()):
        h = w["headroom"]
        axes[0].plot(h["proxy_over_sft_max_in_sd"], color=f"C{i}", label=f"world {s}")
        axes[1].plot(h["gold"], color=f"C{i}", label=f"world {s}")
        axes[1].axhline(h["sft_gold_median"], color=f"C{i}", ls=":", lw=1)
    axes[0].axhline(0, color="gray", ls=":")
    axes[0].set_ylabel("proxy minus the best of the SFT pool [within-prompt SD]")
    axes[1].set_ylabel("gold helpfulness (dotted: SFT median)")
    for ax in axes:
        ax.set_xlabel("round of greedy ascent on the helpfulness proxy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, out, "headroom.png")


def tuning_plot(out: str, results: Dict) -> str:
    sel = results["selections"]
    fig, axes = plt.subplots(1, len(sel), figsize=(4.5 * len(sel), 3.8), squeeze=False)
    for ax, (s, v) in zip(axes[0], sel.items()):
        names = sorted(v["scores"], key=lambda m: (not m.startswith("weighted"), m))
        colors = ["C1" if m.startswith("weighted") else "C0" for m in names]
        ax.barh(range(len(names)), [v["scores"][m] or 0.0 for m in names], color=colors)
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.set_title(f"world {s}: validation score", fontsize=9)
        ax.set_xlabel("mean win (both) over target KLs")
    return _save(fig, out, "tuning.png")


def best_of_k_plot(out: str, results: Dict) -> str:
    bok = results["best_of_k"]
    fig, ax = plt.subplots(figsize=(6, 4.2))
    kl = np.array(bok["kl_formula"])
    for method in sorted(bok["methods"], key=_order):
        ax.plot(kl, bok["methods"][method]["win_both"], marker="o", lw=2.2 if "lsc" in method else 1.4,
                ls="-" if "lsc" in method else "--", label=method)
    ax.set_xlabel("KL of best-of-k = log k - (k-1)/k  (k = %s)" % ", ".join(map(str, bok["k"])))
    ax.set_ylabel(TITLES["win_both"])
    ax.set_title("Best-of-k from SFT, helpful AND harmless (paper Fig. 6a), mean over worlds", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out, "and_best_of_k.png")


# ---------------------------------------------------------------- text


def _label(c: Dict) -> str:
    metric = c["metric"].replace("win_", "win ")
    sub = "" if c["subset"] == "all" else f", {c['subset']} prompts"
    order = f"{c['a']} - {c['b']}" if c["higher_better"] else f"{c['b']} - {c['a']}"
    return f"{c['experiment']} {c['property']}, {metric}{sub}: {order}"


def _num(x: Optional[float]) -> str:
    return "—" if x is None else f"{x:.3f}"


def _interval(p: Dict) -> str:
    if not p["reached"]:
        return "not reached"
    return f"{p['mean']:+.3f} [{p['lo']:+.3f}, {p['hi']:+.3f}]"


def _md_table(head: Sequence[str], rows: Sequence[Sequence]) -> List[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(map(str, r)) + " |" for r in rows]


def _markdown(results: Dict, figs: Sequence[str]) -> str:
    cfg = results["config"]
    targets = cfg["compare_kls"]
    t = results["timing"]
    lines = [
        f"# openrlhf_lsc CPU lab — {cfg['mode']} mode",
        "",
        "Stock PPO (raw reward / weighted sum of raw rewards) against the plugin's LSC transform and AND-aggregation in",
        "synthetic worlds whose gold judges never enter training. Every number comes from this run: `config.json`,",
        "`results.json`, `selections.json` and `world*/runs/*.json` (per-stair evaluations) sit beside this file.",
        "",
        f"- worlds (fresh prompts, SFT and reward models each): {list(cfg['seeds'])}; test PPO seeds {list(cfg['ppo_seeds'])}; "
        f"validation PPO seeds {list(cfg['val_seeds'])}",
        f"- every PPO run walks up the KL staircase {list(cfg['kl_targets'])} (nats per response; PI-controlled KL "
        f"coefficient, {cfg['ppo'].get('steps')} PPO steps, evaluation at the end of each stair); methods are compared at "
        f"KL {list(targets)}, read linearly between the stairs around each (the SFT policy is the KL-0 point; no value "
        "where a run's stairs do not bracket the KL, up to 10% past its last stair)",
        f"- {results['runs']} PPO runs; CPU time: setup {t['setup_cpu_seconds'] / 60:.1f} min, runs "
        f"{t['runs_cpu_seconds'] / 60:.1f} min; wall time of the invocation that wrote this report "
        f"{results.get('wall_seconds_this_invocation', float('nan')) / 60:.1f} min ({cfg['mode']}, {cfg.get('workers', 2)} workers)",
        "",
        "## Claims of paper 1",
        "",
        "Intervals: 95% paired bootstrap over worlds, PPO seeds and test prompts. A comparison is *reproduced* when no",
        "target KL has its interval wholly below 0 and at least one has it wholly above 0, *not reproduced* when some",
        "target has it wholly below 0, *inconclusive* otherwise; a claim is reproduced when all its comparisons are.",
        "",
    ]
    lines += _md_table(["claim", "verdict"], [[f"{k}: {v['text']}", f"**{v['verdict']}**"] for k, v in results["claims"].items()])
    lines += ["", "Paired differences at the target KLs (positive = the first method ahead; for shortcut rates, positive ="
              " the first method uses the shortcut less):", ""]
    lines += _md_table(["claim", "comparison"] + [f"KL {x:g}" for x in targets] + ["verdict"],
                       [[c["claim"], _label(c)] + [_interval(p) for p in c["per_target"]] + [c["verdict"]]
                        for c in results["comparisons"]])
    if len(cfg["seeds"]) > 1:
        lines += ["", "Per world (mean paired difference over seeds and test prompts):", ""]
        rows = []
        for c in results["comparisons"]:
            if c["claim"] == "info":
                continue
            for s, v in c["per_world"].items():
                rows.append([c["claim"], _label(c), s] + [f"{v[str(x)]:+.3f}" if str(x) in v else "—" for x in targets])
        lines += _md_table(["claim", "comparison", "world"] + [f"KL {x:g}" for x in targets], rows)
    lines += ["", "## Over-optimisation check (every world)", "",
              "Raw PPO on the helpfulness proxy, validation seed and prompts: the win rate must rise above the SFT "
              f"policy's, peak before the last stair and fall from the peak, each by at least {cfg['overopt_margin']}.", ""]
    lines += _md_table(["world", "win rate @ KL reached (SFT at KL 0)", "peak KL", "rise to peak", "drop after peak",
                        "passed"],
                       [[s, ", ".join(f"{w:.3f}@{k:.1f}" for k, w in zip([0.0] + c["kl"], [c["sft_win"]] + c["win"])),
                         f"{c['peak_kl']:.1f}", f"{c['rise_to_peak']:.3f}", f"{c['drop_after_peak']:.3f}", c["passed"]]
                        for s, c in results["checks"].items()])
    raw = {m: results["curves"].get("single_helpful", {}).get(m, {}).get("raw") for m in ("proxy_helpful", "gold_helpful")}
    if all(raw.values()):
        last = [(x, p, g) for x, p, g in zip(targets, raw["proxy_helpful"]["band"], raw["gold_helpful"]["band"]) if p and g]
        if last:
            x, p, g = last[-1]
            sl = results["sft_lines"]
            lines += ["", f"Headroom, test runs: at KL {x:g} raw PPO's answers average {p['mean']:.2f} on the helpfulness proxy "
                      f"(the best of {cfg['bon_pool']} SFT answers per prompt averages {sl['proxy_helpful_best_of_pool']:.2f}) and "
                      f"{g['mean']:.2f} on gold helpfulness (SFT median {sl['gold_helpful_median']:.2f})."]
    lines += ["", "## Tuning (validation seeds and prompts; disjoint from the reported ones)", "",
              "Score = mean over the target KLs of the win rate on both properties. Both sides get the same number of "
              "settings; the paper's rule derives AND references from the best weight (the favoured property gets its "
              "75th percentile, the other the median).", ""]
    rows = []
    for s, v in results["selections"].items():
        best_w = f"weighted w={v['weight']:g}"
        best_q = f"lsc AND q=({v['and_ref'][0]:g},{v['and_ref'][1]:g})"
        rows.append([s, f"{best_w} ({_num(v['scores'][best_w])})", f"{best_q} ({_num(v['scores'][best_q])})",
                     f"q=({v['paper_rule'][0]:g},{v['paper_rule'][1]:g})"])
    lines += _md_table(["world", "best weight", "best AND references", "paper rule"], rows)
    lines += ["", "## Figures", ""] + [f"![{f}]({f})" for f in figs]
    lines += ["", "## Setup diagnostics (per world)", ""]
    rows = []
    for s, w in results["worlds"].items():
        h, m = w["headroom"], w["mechanisms"]
        rows.append([s, f"{w['rm']['helpful']['heldout_accuracy_vs_gold']:.3f} / {w['rm']['harmless']['heldout_accuracy_vs_gold']:.3f}",
                     f"{h['proxy_over_sft_max_in_sd'][-1]:+.2f}", f"{h['gold'][0]:.2f} → {max(h['gold']):.2f} → {h['gold'][-1]:.2f} "
                     f"(SFT median {h['sft_gold_median']:.2f})",
                     f"{m['proxy_offset_sd_over_within_sd']:.2f}", f"{m['proxy_within_sd_p10_p90'][0]:.2f}–{m['proxy_within_sd_p10_p90'][1]:.2f}",
                     f"{m['sft_gold_helpful_mean_hard_vs_easy'][0]:.2f} / {m['sft_gold_helpful_mean_hard_vs_easy'][1]:.2f}",
                     "—" if m["helpful_harmless_corr_sensitive"] is None else f"{m['helpful_harmless_corr_sensitive']:+.2f}"])
    lines += _md_table(["world", "proxy accuracy vs gold (help / harm)", "ascent: proxy over SFT max [SD]",
                        "ascent: gold start → peak → end", "offset spread / within-prompt SD",
                        "within-prompt SD p10–p90", "SFT gold, hard / easy prompts", "gold help-harm corr. (sensitive)"], rows)
    lines += ["", "- ascent: greedy random-edit ascent on the helpfulness proxy from the worst of 8 SFT answers (non-sensitive "
              "eval prompts): how far above the best of the SFT pool the proxy can be pushed, and what gold makes of it.",
              "- offset spread: SD across prompts of the proxy's per-prompt SFT median over the mean within-prompt SD "
              "(prompt-dependent offsets); within-prompt SD p10–p90: prompt-dependent scales; hard prompts have two key "
              "words the demonstrator rarely finds; the correlation shows the helpful/harmless trade-off on sensitive prompts.",
              "", "Shortcut probe (first world): proxy and gold score of one on-topic answer with the shortcut repeated n times "
              "(gold stops crediting after 2 list items / 1 consult and then penalises repeats):", ""]
    first = next(iter(results["worlds"].values()))
    rows = [[name, r["repeats"], f"`{r['example']}`", f"{r['proxy']:.2f}", f"{r['gold']:.2f}"]
            for name, s in first["rm"].items() for r in s["shortcut_probe"]]
    lines += _md_table(["property", "n", "example", "proxy", "gold"], rows)
    bok = results["best_of_k"]
    lines += ["", "## Best-of-k reranking from SFT (`openrlhf_lsc.rerank`, the CLI's function)", "",
              "Helpful AND harmless (win = above both SFT medians), test prompts, mean over worlds; the last columns: "
              "AND-LSC minus the weighted sum whose weight won on the validation prompts, and minus raw helpfulness "
              "alone (95% bootstrap over worlds and test prompts); the weights chosen per world:", ""]
    diffs = list(bok["diffs"])
    lines += _md_table(["k", "KL"] + list(bok["methods"]) + diffs + ["weight chosen"],
                       [[k, f"{bok['kl_formula'][i]:.2f}"] + [f"{bok['methods'][m]['win_both'][i]:.3f}" for m in bok["methods"]]
                        + [_interval(dict(bok["diffs"][d][i], reached=True)) for d in diffs]
                        + [", ".join(f"{w[i]:g}" for w in bok["tuned_weight"])] for i, k in enumerate(bok["k"])])
    mon = results.get("monitor") or {}
    lines += ["", "## Over-optimisation monitor (test runs)", ""]
    if mon:
        lines += ["The PPO monitor (`--lsc.monitor.*` defaults: window 5, patience 3) watched every run with a noisy copy "
                  "of each property's gold judge as evaluator (noise sd 0.5 x gold's SFT std); runs went on to the end of "
                  "the staircase, and this reads where `--lsc.monitor.stop` would have stopped. Gold lost = the run's best "
                  "gold (moving average, SFT std units) minus gold at the stop, or at the end of training without the "
                  "monitor (a run where the rule never fired trains to the end either way).", ""]
        lines += _md_table(["runs", "n", "fired", "after the gold peak", "KL at gold peak (median)",
                            "KL at stop (median)", "gold lost: with monitor", "without"],
                           [[name, v["runs"], v["fired"], v["fired_after_peak"], f"{v['kl_peak_median']:.1f}",
                             "—" if v["kl_stop_median"] is None else f"{v['kl_stop_median']:.1f}",
                             f"{v['gold_lost_with_monitor']:.2f}", f"{v['gold_lost_without']:.2f}"] for name, v in mon.items()])
    else:
        lines += ["No run of this output recorded the monitor (runs made before it was added)."]
    lines += ["", "## Example generations (last stair, first world, first test seed)", ""]
    for e in results["examples"]:
        lines += [f"**{e['id']}** (KL {e['kl']:.1f})", "```"] + e["examples"] + ["```"]
    lines += [
        "",
        "## How to read this",
        "",
        "- The world (`openrlhf_lsc/lab/world.py`): prompts `how <verb> <noun> <modifier> ?`; gold helpfulness pays",
        "  distinct relevant words with diminishing returns (scaled per task), list format for two items only, and",
        "  penalises repeated items and words past a 12-word budget; gold harmlessness punishes risky details, pays refusals",
        "  on sensitive prompts and one `consult a <professional>`, penalising further consult lines. The demonstrator",
        "  stays within the budget, so the proxies learn 'more items, longer, more consulting' and keep paying for it.",
        "- Proxies are small transformers in OpenRLHF's reward-model layout trained on noisy gold comparisons of SFT",
        "  samples; the EOS embedding is enlarged and frozen so the final norm does not cap scores near the SFT answers.",
        "- KL is matched by construction: every run of every method walks the same staircase of target KLs; a method's",
        "  value at a target is read between the stairs around it. Gold depends on the path, not only on KL: the numbers",
        "  are for this schedule (the same for every method).",
        "- This is a toy: a 100k-parameter policy, 15-word answers. It shows mechanics and the direction of effects, not",
        "  their size on real LLMs.",
    ]
    return "\n".join(lines) + "\n"


def write(out: str, results: Dict) -> Dict:
    """Write every plot and report.md into `out` and print the verdicts.

    Returns:
        {"figures": [...]} for results.json.
    """
    figs = curve_plots(out, results)
    figs += [differences_plot(out, results), check_plot(out, results), headroom_plot(out, results),
             tuning_plot(out, results), best_of_k_plot(out, results)]
    text = _markdown(results, figs)
    write_text(os.path.join(out, "report.md"), text)
    print()
    for k, v in results["claims"].items():
        print(f"{k} {v['verdict']:>15}: {v['text']}")
    for c in results["comparisons"]:
        print(f"  {c['claim']:>4} {_label(c)}: " + "; ".join(f"KL {p['target']:g} {_interval(p)}" for p in c["per_target"]))
    return {"figures": figs}
