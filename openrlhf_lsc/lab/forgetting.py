"""`python -m openrlhf_lsc.lab.forgetting --out DIR [--smoke | --full]`: forgetting with and without Selective
Rehearsal (Peng et al. 2023) over several worlds of the CPU lab.

In each world (`world<w>/lab`: the lab's prompts, SFT policy and helpfulness proxy) the expert (the lab's
demonstrator, fresh draws) answers every training prompt once; k-means clusters of bag-of-words prompt features and
the proxy's scores of those answers give the selection (`openrlhf_lsc.rehearsal.select`): PPO gets the lower
`ppo_fraction` of each cluster, the rehearsal set D_R is the top `rehearsal_k` expert pairs of each cluster. PPO on
the raw helpfulness proxy (`lab.ppo`, fixed KL coefficient, the same steps for every arm) then runs in these arms:
- `stock`: every training prompt, no rehearsal;
- `select`: the selected prompts only;
- `select+rehearse g=<gamma>`: the selected prompts + gamma * NLL(D_R) in the same backward (`ppo.train`'s
  `extra_loss`), the paper's method;
- `select+random g=<gamma>`: the selected prompts + gamma * NLL of a random D_R of the same size
  (`random_rehearsal`: per cluster as many pairs as D_R holds there, drawn from the cluster's pairs outside D_R,
  redrawn for every world and seed; most of them are prompts PPO trains on);
- `select+random-nonppo g=<gamma>`: the same with a random D_R drawn from the training prompts outside D_R and outside
  the PPO set (not stratified by cluster: small clusters have too few such prompts);
- `rehearse g=<gamma>`: every training prompt + gamma * NLL(D_R) (rehearsal without selection).
At the end each run is measured per eval prompt (prompts no arm trains on): forgetting = the NLL of a held-out
expert set (fresh demonstrations on the eval prompts, `heldout_demos` each); reward = the gold helpfulness win rate
against SFT samples of the same prompt, P(gold(policy) > gold(SFT)) + P(tie) / 2; also gold harmlessness and the
proxy. Paired by world, PPO seed and eval prompt, with the main lab's hierarchical bootstrap and verdicts
(`lab.paper2.compare`, `lab.stats`). Outputs in DIR: forgetting.md, forgetting.png, forgetting.json, config.json;
world<w>/ (lab/, setup.json, runs/) for resuming: rerun the same command.
"""

import argparse
import dataclasses
import os
import random
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from openrlhf_lsc.lab import models, paper2, ppo, world
from openrlhf_lsc.lab.config import PRESETS as LAB_PRESETS
from openrlhf_lsc.lab.evaluation import gold_scores
from openrlhf_lsc.lab.files import read_json, save_figure, write_json, write_text
from openrlhf_lsc.lab.world_setup import Lab
from openrlhf_lsc.rehearsal import cluster_prompts, select, token_nll

TRACKED = ("heldout_nll", "gold_helpful", "proxy_helpful", "rehearsal_nll")  # the curves over training
MEASURED = ("heldout_nll", "win", "gold_harmless", "proxy_helpful")  # per eval prompt at the end


@dataclasses.dataclass
class Config:
    """Sizes of one run (presets: `PRESETS`); each world's prompts, SFT policy and proxy come from the lab preset `lab`."""

    mode: str
    lab: str = "quick"
    worlds: Tuple[int, ...] = (0,)
    seeds: Tuple[int, ...] = (0, 1, 2)  # PPO seeds (and the random D_R's draw)
    gammas: Tuple[float, ...] = (0.01, 0.1)  # the paper's and one above
    ppo: Dict = dataclasses.field(default_factory=lambda: {"steps": 60})  # PPOConfig overrides
    n_clusters: int = 8
    rehearsal_k: int = 4  # D_R pairs per cluster
    ppo_fraction: float = 0.5  # PPO prompts per cluster (its lowest-scoring)
    heldout_demos: int = 4  # held-out expert answers per eval prompt
    sft_pool: int = 16  # SFT samples per eval prompt: the win-rate reference
    eval_samples: int = 8  # policy samples per eval prompt at the end
    track_every: int = 6  # curve points every this many PPO steps
    track_prompts: int = 48  # eval prompts (one sample each) of the curves' gold and proxy points
    reward_margin: float = 0.02  # "without costing reward": win rate at most this far below stock's
    bootstrap: int = 2000
    workers: int = 2


PRESETS = {
    "default": Config(mode="default"),
    "full": Config(mode="full", worlds=(0, 1, 2, 3, 4)),
    "smoke": Config(mode="smoke", lab="smoke", seeds=(0, 1), gammas=(0.0, 1.0), n_clusters=4, rehearsal_k=2,
                    ppo={"steps": 3, "rollout_prompts": 8, "train_batch": 8}, heldout_demos=2, sft_pool=4,
                    eval_samples=2, track_every=1, track_prompts=8, bootstrap=200, workers=1),
}


def arms(gammas: Sequence[float]) -> List[Dict]:
    """The arms: name, whether PPO gets the selected prompts only, which D_R is rehearsed (None, "selected",
    "random", "random-nonppo") and gamma."""
    out = [{"name": "stock", "select": False, "d_r": None, "gamma": 0.0},
           {"name": "select", "select": True, "d_r": None, "gamma": 0.0}]
    for g in gammas:
        out += [{"name": f"select+rehearse g={g:g}", "select": True, "d_r": "selected", "gamma": g},
                {"name": f"select+random g={g:g}", "select": True, "d_r": "random", "gamma": g},
                {"name": f"select+random-nonppo g={g:g}", "select": True, "d_r": "random-nonppo", "gamma": g},
                {"name": f"rehearse g={g:g}", "select": False, "d_r": "selected", "gamma": g}]
    return out


def random_rehearsal(clusters: Sequence[int], selected: Sequence[int], seed: int, exclude: Sequence[int] = ()) -> List[int]:
    """A random rehearsal set of the same size as `selected`: per cluster as many rows as `selected` has there, drawn
    uniformly without replacement from the cluster's rows outside `selected` and `exclude` (so the sets are disjoint).

    Args:
        clusters: `[N]` cluster id of every row (all equal: one draw from every row, not stratified).
        selected: the selected rehearsal rows (e.g. `Selection.rehearsal`).
        seed: numpy seed of the draw (the same seed gives the same rows).
        exclude: rows that may not be drawn either (e.g. the PPO prompts).

    Returns:
        The drawn rows, cluster by cluster (ascending within a cluster).

    Example:
        >>> random_rehearsal([0, 0, 1, 1], [0, 2], seed=0)  # one row per cluster, the only one left
        [1, 3]
    """
    clusters = np.asarray(clusters)
    chosen, barred = set(int(r) for r in selected), set(int(r) for r in selected) | set(int(r) for r in exclude)
    rng = np.random.default_rng(seed)
    out = []
    for c in np.unique(clusters):
        rows = np.flatnonzero(clusters == c)
        k = sum(int(r) in chosen for r in rows)
        pool = np.array([r for r in rows if int(r) not in barred], dtype=int)
        if k > len(pool):
            raise ValueError(f"cluster {c} has {len(rows)} rows, {k} of them selected and {len(pool)} free to draw (not "
                             "selected, not excluded): too few for a disjoint random rehearsal set of the same size; lower "
                             "rehearsal_k or n_clusters")
        out += sorted(rng.choice(pool, size=k, replace=False).tolist()) if k else []
    return out


def loss_mask(prompt_ids: torch.Tensor, responses: torch.Tensor) -> torch.Tensor:
    """`token_nll`'s mask for prompt+response sequences: column t scores token t+1, so the response tokens."""
    mask = torch.zeros(len(responses), prompt_ids.shape[1] + responses.shape[1])
    mask[:, prompt_ids.shape[1] - 1 : -1] = models.action_mask(responses)
    return mask


def expert_nll(policy, prompt_ids: torch.Tensor, responses: torch.Tensor) -> torch.Tensor:
    """Mean per-token NLL of expert responses under `policy` (`rehearsal.token_nll`, with grad if enabled): the
    rehearsal loss."""
    seq = torch.cat([prompt_ids, responses], 1)
    return token_nll(policy(seq).logits, seq, loss_mask(prompt_ids, responses))


@torch.no_grad()
def nll_per_prompt(policy, prompt_ids: torch.Tensor, responses: torch.Tensor, per_prompt: int) -> np.ndarray:
    """Per-token NLL of expert responses pooled per prompt (`per_prompt` consecutive responses each): `[P]`."""
    mask = models.action_mask(responses)
    logp = models.response_logprobs(policy.eval(), prompt_ids, responses) * mask
    return (-logp.sum(1).reshape(-1, per_prompt).sum(1) / mask.sum(1).reshape(-1, per_prompt).sum(1)).numpy()


def bag_of_words(prompts: List[world.Prompt]) -> np.ndarray:
    """One-hot features of each prompt's words (verb, noun, modifier): the offline stand-in for a sentence encoder."""
    ids = models.encode_prompts([p.text for p in prompts])
    x = np.zeros((len(prompts), len(world.vocabulary())))
    np.put_along_axis(x, ids.numpy(), 1.0, axis=1)
    return x


def world_lab(out: str, cfg: Config, w: int) -> Lab:
    return Lab(os.path.join(out, f"world{w}", "lab"), dataclasses.replace(LAB_PRESETS[cfg.lab], seeds=(w,), workers=1), w)


def setup_world(job: Tuple[str, Config, int]) -> Dict:
    """SFT policy and proxies (the lab's stages), expert answers, clusters and selection, the held-out expert set and
    the SFT pool of world `w` (`world<w>/setup.json`)."""
    out, cfg, w = job
    marker = os.path.join(out, f"world{w}", "setup.json")
    if os.path.exists(marker):
        return read_json(marker)
    torch.set_num_threads(1)
    cpu = time.process_time()
    lab = world_lab(out, cfg, w)
    lab.setup(progress=False, last="reward_models")  # SFT and reward models only
    sft, rm = lab.load_sft(), lab.load_rms()["helpful"]
    rng = random.Random(w + 77)
    train = lab.train_prompts
    train_demo = [world.demonstrate(p, rng) for p in train]
    held_demo = [world.demonstrate(p, rng) for p in lab.eval_prompts for _ in range(cfg.heldout_demos)]
    expert_score = models.score(rm, models.encode_prompts([p.text for p in train]),
                                models.encode_responses(train_demo)).numpy()
    clusters = cluster_prompts(bag_of_words(train), cfg.n_clusters, seed=w)
    sel = select(expert_score, clusters, cfg.rehearsal_k, ppo_fraction=cfg.ppo_fraction)
    flat = [p for p in lab.eval_prompts for _ in range(cfg.sft_pool)]
    pool = models.sample_batched(sft, models.encode_prompts([p.text for p in flat]), torch.Generator().manual_seed(w + 5))
    setup = {"world": w, "train_demo": train_demo, "heldout_demo": held_demo, "expert_score": expert_score.tolist(),
             "clusters": clusters.tolist(), "ppo_rows": sel.ppo, "rehearsal_rows": sel.rehearsal,
             "cluster_stats": sel.clusters,
             "gold_sft": gold_scores("helpful", flat, models.decode_responses(pool)).reshape(-1, cfg.sft_pool).tolist(),
             "cpu_seconds": time.process_time() - cpu}
    write_json(marker, setup)
    return setup


def run_path(out: str, w: int, arm: str, s: int) -> str:
    return os.path.join(out, f"world{w}", "runs", f"{arm.replace(' ', '_').replace('=', '')}-s{s}.json")


def run_one(job: Tuple[str, Config, int, Dict, int]) -> Dict:
    """One arm with PPO seed `s` in world `w`: curves over training and the per-prompt measures at the end."""
    out, cfg, w, arm, s = job
    target = run_path(out, w, arm["name"], s)
    if os.path.exists(target):
        return read_json(target)
    torch.set_num_threads(1)
    cpu, start = time.process_time(), time.time()
    lab = world_lab(out, cfg, w)
    sft, rm = lab.load_sft(), lab.load_rms()["helpful"]
    setup = read_json(os.path.join(out, f"world{w}", "setup.json"))
    train_ids = models.encode_prompts([p.text for p in lab.train_prompts])
    train_demo = models.encode_responses(setup["train_demo"])
    evals = lab.eval_prompts
    held_ids = models.encode_prompts([p.text for p in evals for _ in range(cfg.heldout_demos)])
    held_demo = models.encode_responses(setup["heldout_demo"])
    if arm["d_r"] == "random":
        d_r_rows = random_rehearsal(setup["clusters"], setup["rehearsal_rows"], seed=1000 * w + s)
    elif arm["d_r"] == "random-nonppo":
        d_r_rows = random_rehearsal([0] * len(setup["clusters"]), setup["rehearsal_rows"], seed=1000 * w + s,
                                    exclude=setup["ppo_rows"])
    else:  # the selected D_R (tracked but not trained on without rehearsal)
        d_r_rows = setup["rehearsal_rows"]
    d_r = (train_ids[d_r_rows], train_demo[d_r_rows])
    track = evals[: cfg.track_prompts]
    track_ids = models.encode_prompts([p.text for p in track])

    @torch.no_grad()
    def probe(policy) -> Dict[str, float]:
        responses = models.sample(policy, track_ids, torch.Generator().manual_seed(4242))
        return {"heldout_nll": float(expert_nll(policy.eval(), held_ids, held_demo)),
                "gold_helpful": float(gold_scores("helpful", track, models.decode_responses(responses)).mean()),
                "proxy_helpful": float(models.score(rm, track_ids, responses).mean()),
                "rehearsal_nll": float(expert_nll(policy, *d_r))}

    curve = []

    def on_step(step: int, policy) -> None:
        if step % cfg.track_every == 0:
            curve.append({"step": step, **probe(policy)})

    pcfg = ppo.PPOConfig(**cfg.ppo)
    pipeline = ppo.RewardPipeline([rm], ["helpful"], [{}] * len(lab.train_prompts), "raw")
    ids = train_ids[setup["ppo_rows"]] if arm["select"] else train_ids
    rehearse = None
    if arm["d_r"] is not None:
        rehearse = lambda policy: arm["gamma"] * expert_nll(policy, *d_r)  # noqa: E731
    result = ppo.train(sft, ids, pipeline, pcfg, seed=1000 + s, desc=f"{arm['name']} w{w} s{s}",
                       progress=cfg.workers <= 1, extra_loss=rehearse, on_step=on_step)
    curve.append({"step": pcfg.steps, **probe(result.policy)})
    # The end measures, per eval prompt.
    policy = result.policy.eval()
    gen = torch.Generator().manual_seed(2000 + s)
    flat = [p for p in evals for _ in range(cfg.eval_samples)]
    flat_ids = models.encode_prompts([p.text for p in flat])
    with torch.no_grad():
        responses = models.sample_batched(policy, flat_ids, gen)
        mask = models.action_mask(responses)
        kl = ((models.response_logprobs(policy, flat_ids, responses) - models.response_logprobs(sft, flat_ids, responses))
              * mask).sum(1)
    words = models.decode_responses(responses)
    gold = gold_scores("helpful", flat, words).reshape(-1, cfg.eval_samples)
    end = {"heldout_nll": nll_per_prompt(policy, held_ids, held_demo, cfg.heldout_demos),
           "win": paper2.win_rate_vs(gold, np.array(setup["gold_sft"])),
           "gold_harmless": gold_scores("harmless", flat, words).reshape(-1, cfg.eval_samples).mean(1),
           "proxy_helpful": models.score_batched(rm, flat_ids, responses).numpy().reshape(-1, cfg.eval_samples).mean(1)}
    record = {"world": w, "arm": arm["name"], "gamma": arm["gamma"], "seed": s, "n_prompts": len(ids),
              "d_r_rows": d_r_rows if arm["d_r"] else None, "curve": curve, "kl": kl.mean().item(),
              "end": {k: np.round(v, 5).tolist() for k, v in end.items()},
              "history": result.history, "seconds": time.time() - start, "cpu_seconds": time.process_time() - cpu}
    write_json(target, record)
    return record


def claims(gammas: Sequence[float], margin: float) -> Dict[str, str]:
    out = {}
    for g in gammas:
        out[f"F1 g={g:g}"] = "selective rehearsal reduces forgetting: lower held-out expert NLL than stock"
        out[f"F2 g={g:g}"] = ("selective rehearsal reduces forgetting more than random rehearsal of the same size: lower "
                              "held-out expert NLL than select+random and select+random-nonppo")
        out[f"F3 g={g:g}"] = (f"selective rehearsal costs no reward: gold win rate vs SFT at most {margin:g} below "
                              "stock's")
    return out


def analyse(cfg: Config, setups: Dict[int, Dict], runs: Dict[Tuple[int, str, int], Dict]) -> Dict:
    """Per-arm means and every paired comparison of the report."""
    def end(arm: str, key: str) -> Dict[int, np.ndarray]:  # per world [S, P]
        return {w: np.array([runs[(w, arm, s)]["end"][key] for s in cfg.seeds]) for w in cfg.worlds}

    n, c, m = cfg.bootstrap, paper2.compare, cfg.reward_margin
    nll = lambda arm: end(arm, "heldout_nll")  # noqa: E731
    win = lambda arm: end(arm, "win")  # noqa: E731
    rows = [c("info", "held-out NLL: stock - select (> 0: selection alone forgets less)", nll("stock"), nll("select"), n, 1),
            c("info", "win rate: select - stock", win("select"), win("stock"), n, 2, margin=m)]
    for i, g in enumerate(cfg.gammas):
        sr, rnd, reh = f"select+rehearse g={g:g}", f"select+random g={g:g}", f"rehearse g={g:g}"
        off = f"select+random-nonppo g={g:g}"
        k = 20 * (i + 1)
        rows += [
            c(f"F1 g={g:g}", f"held-out NLL: stock - {sr}", nll("stock"), nll(sr), n, k),
            c(f"F2 g={g:g}", f"held-out NLL: {rnd} - {sr}", nll(rnd), nll(sr), n, k + 1),
            c(f"F2 g={g:g}", f"held-out NLL: {off} - {sr}", nll(off), nll(sr), n, k + 10),
            c(f"F3 g={g:g}", f"win rate: {sr} - stock", win(sr), win("stock"), n, k + 2, margin=m),
            c("info", f"held-out NLL: select - {sr} (rehearsal on top of selection)", nll("select"), nll(sr), n, k + 3),
            c("info", f"held-out NLL: stock - {reh} (rehearsal without selection)", nll("stock"), nll(reh), n, k + 4),
            c("info", f"held-out NLL: {reh} - {sr} (selection on top of rehearsal)", nll(reh), nll(sr), n, k + 5),
            c("info", f"win rate: {reh} - stock", win(reh), win("stock"), n, k + 6, margin=m),
            c("info", f"win rate: {sr} - {rnd}", win(sr), win(rnd), n, k + 7),
            c("info", f"proxy reward: {sr} - stock", end(sr, "proxy_helpful"), end("stock", "proxy_helpful"), n, k + 8),
            c("info", f"gold harmlessness: {sr} - stock", end(sr, "gold_harmless"), end("stock", "gold_harmless"), n, k + 9),
        ]
    table = []
    for arm in arms(cfg.gammas):
        rs = [runs[(w, arm["name"], s)] for w in cfg.worlds for s in cfg.seeds]
        table.append({"arm": arm["name"], "n_prompts": float(np.mean([r["n_prompts"] for r in rs])),
                      "kl": float(np.mean([r["kl"] for r in rs])),
                      **{k: float(np.mean([np.mean(r["end"][k]) for r in rs])) for k in MEASURED},
                      **{f"{k}_start": float(np.mean([r["curve"][0][k] for r in rs])) for k in TRACKED},
                      **{f"{k}_end": float(np.mean([r["curve"][-1][k] for r in rs])) for k in TRACKED}})
    # How much of each rehearsal set PPO also trains on (the selected D_R is the top of its clusters, PPO the bottom).
    overlap = {kind: float(np.mean([np.isin(r["d_r_rows"], setups[w]["ppo_rows"]).mean() for (w, a, _), r in runs.items()
                                    if a.startswith(f"select+{kind} ")])) for kind in ("rehearse", "random", "random-nonppo")}
    return {"comparisons": rows, "claims": paper2.claim_verdicts(claims(cfg.gammas, m), rows), "table": table,
            "d_r_in_ppo_set": overlap}


def plot(out: str, cfg: Config, runs: Dict, analysis: Dict) -> str:
    """Curves per arm (means over worlds and seeds) and the paired held-out NLL differences with their intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(18, 10), constrained_layout=True)
    top, bottom = fig.subfigures(2, 1, height_ratios=(1, 1.1))  # each lays out on its own: long labels below
    for i, (key, ax) in enumerate(zip(TRACKED, top.subplots(1, len(TRACKED)))):
        for arm in arms(cfg.gammas):
            rs = [runs[(w, arm["name"], s)] for w in cfg.worlds for s in cfg.seeds]
            steps = [p["step"] for p in rs[0]["curve"]]
            ax.plot(steps, np.mean([[p[key] for p in r["curve"]] for r in rs], 0), marker=".", label=arm["name"],
                    ls="--" if str(arm["d_r"]).startswith("random") else "-")
        ax.set_xlabel("PPO step")
        ax.set_title(key.replace("_", " ") + {"heldout_nll": " (held-out expert set)", "rehearsal_nll": " (own D_R)"}
                     .get(key, f" (first {cfg.track_prompts} eval prompts)"), fontsize=10)
        if i == 0:
            ax.legend(fontsize=8)
    ax = bottom.subplots()
    rows = [r for r in analysis["comparisons"] if r["label"].startswith("held-out NLL")]
    for y, r in enumerate(rows):
        p = r["per_target"][0]
        lo, hi = (p["lo"], p["hi"]) if p["lo"] is not None else (p["mean"], p["mean"])
        ax.errorbar(p["mean"], y, xerr=[[p["mean"] - lo], [hi - p["mean"]]], fmt="o", capsize=3,
                    color="C3" if r["claim"] != "info" else "gray")
    ax.axvline(0, color="k", lw=0.8)
    ax.set_yticks(range(len(rows)), [f"{r['claim']}: {r['label'].split(': ', 1)[1]}" for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_title("held-out expert NLL at the end, A - B (> 0: B forgets less); 95% paired bootstrap intervals, claims in red",
                 fontsize=10)
    return save_figure(fig, os.path.join(out, "forgetting.png"))


def report(cfg: Config, setups: Dict, analysis: Dict, fig: str, timing: Dict) -> str:
    first = setups[cfg.worlds[0]]
    n_ppo = np.mean([len(s["ppo_rows"]) for s in setups.values()])
    n_dr = np.mean([len(s["rehearsal_rows"]) for s in setups.values()])
    score = lambda s, rows: float(np.mean(np.array(s["expert_score"])[rows]))  # noqa: E731
    lines = [f"# Forgetting with and without Selective Rehearsal ({cfg.mode} mode)", "",
             f"- worlds {list(cfg.worlds)} x PPO seeds {list(cfg.seeds)}; PPO on the raw helpfulness proxy "
             f"({ppo.PPOConfig(**cfg.ppo).steps} steps, fixed KL coefficient {ppo.PPOConfig(**cfg.ppo).kl_coef:g}, the same for "
             "every arm)",
             f"- selection: {cfg.n_clusters} k-means clusters of bag-of-words prompt features; PPO gets the lower "
             f"{cfg.ppo_fraction:g} of each cluster by proxy score of an expert answer ({n_ppo:.0f} of "
             f"{len(first['clusters'])} training prompts on average, mean expert score "
             f"{np.mean([score(s, s['ppo_rows']) for s in setups.values()]):.3f}); D_R = top {cfg.rehearsal_k} expert pairs per "
             f"cluster ({n_dr:.0f} pairs, mean score {np.mean([score(s, s['rehearsal_rows']) for s in setups.values()]):.3f}); "
             "random D_R (`random_rehearsal`, redrawn per world and seed): per cluster the same number of pairs drawn from the "
             "cluster's other pairs (`select+random`), or the same number drawn from the training prompts outside D_R and "
             "the PPO set (`select+random-nonppo`); share of D_R prompts that are also PPO prompts: selected "
             f"{analysis['d_r_in_ppo_set']['rehearse']:.2f}, random {analysis['d_r_in_ppo_set']['random']:.2f}, "
             f"random-nonppo {analysis['d_r_in_ppo_set']['random-nonppo']:.2f}",
             f"- measured at the end on the {len(first['gold_sft'])} eval prompts (no arm trains on them): forgetting = "
             f"per-token NLL of {cfg.heldout_demos} fresh expert answers per prompt; reward = gold helpfulness win rate vs "
             f"{cfg.sft_pool} SFT samples per prompt ({cfg.eval_samples} policy samples per prompt)",
             f"- CPU time of all jobs {timing['jobs_cpu_seconds'] / 60:.1f} min (setup {timing['setup_cpu_seconds'] / 60:.1f}, "
             f"PPO {timing['runs_cpu_seconds'] / 60:.1f}); wall time of the invocation that wrote this report "
             f"{timing['wall_seconds'] / 60:.1f} min ({cfg.workers} worker(s))", "",
             "## Claims of paper 2 (Selective Rehearsal), at the paper's gamma and one above", ""]
    lines += paper2.claims_markdown(analysis["claims"], analysis["comparisons"], ["value"])
    if len(cfg.worlds) > 1:
        lines += ["", "Per world (mean paired difference over seeds and prompts) of the claims' comparisons:", ""]
        rows = [[c["claim"], c["label"], w, f"{vals[0]:+.3f}"] for c in analysis["comparisons"] if c["claim"] != "info"
                for w, vals in c["per_world"].items()]
        lines += paper2.md_table(["claim", "comparison", "world", "value"], rows)
    lines += ["", "## Arms (means over worlds and seeds)", "",
              "End measures on the eval prompts; curves: start -> end of the tracked values.", ""]
    lines += paper2.md_table(
        ["arm", "PPO prompts", "held-out NLL", "win rate vs SFT", "gold harmless", "proxy helpful", "rollout KL at end",
         "held-out NLL curve", "own D_R NLL curve"],
        [[r["arm"], f"{r['n_prompts']:.0f}", f"{r['heldout_nll']:.3f}", f"{r['win']:.3f}", f"{r['gold_harmless']:.3f}",
          f"{r['proxy_helpful']:.3f}", f"{r['kl']:.2f}", f"{r['heldout_nll_start']:.3f} -> {r['heldout_nll_end']:.3f}",
          f"{r['rehearsal_nll_start']:.3f} -> {r['rehearsal_nll_end']:.3f}"] for r in analysis["table"]])
    lines += ["", f"![curves and paired differences]({fig})", "",
              "Caveats: synthetic worlds and proxies; the held-out expert set comes from the lab's demonstrator, the SFT "
              "policy's own teacher, so its NLL measures drift away from the SFT distribution; the arms run the same "
              "number of PPO steps at the same KL coefficient (not matched KL: rehearsal also holds the policy nearer "
              "SFT); the selected arms train on half the prompts; the bag-of-words features stand in for SimCSE.", ""]
    return "\n".join(lines)


def run(out: str, cfg: Config) -> Dict:
    """Run (or resume) the experiment in `out`; write forgetting.{md,png,json}; return the results."""
    start, cfg_json, setups = paper2.start(out, cfg, setup_world, "forgetting run")
    keys = [(w, a["name"], s) for w in cfg.worlds for s in cfg.seeds for a in arms(cfg.gammas)]
    by_name = {a["name"]: a for a in arms(cfg.gammas)}
    runs = dict(zip(keys, paper2.run_jobs(run_one, [(out, cfg, w, by_name[a], s) for w, a, s in keys], cfg.workers,
                                          "PPO runs", lambda j: os.path.exists(run_path(out, j[2], j[3]["name"], j[4])))))
    analysis = analyse(cfg, setups, runs)
    timing = {"setup_cpu_seconds": sum(s["cpu_seconds"] for s in setups.values()),
              "runs_cpu_seconds": sum(r["cpu_seconds"] for r in runs.values()), "wall_seconds": time.time() - start}
    timing["jobs_cpu_seconds"] = timing["setup_cpu_seconds"] + timing["runs_cpu_seconds"]
    fig = plot(out, cfg, runs, analysis)
    text = report(cfg, setups, analysis, fig, timing)
    write_text(os.path.join(out, "forgetting.md"), text)
    results = {"config": cfg_json, **analysis, "timing": timing, "figures": [fig],
               "selection": {str(w): {"n_train": len(s["clusters"]), "ppo_rows": s["ppo_rows"],
                                 "rehearsal_rows": s["rehearsal_rows"], "clusters": s["cluster_stats"]}
                             for w, s in setups.items()},
               "runs": [{k: v for k, v in r.items() if k != "history"} for r in runs.values()]}
    write_json(os.path.join(out, "forgetting.json"), results)
    return results


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="python -m openrlhf_lsc.lab.forgetting", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output folder; an interrupted run resumes from it (same command)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--smoke", action="store_true", help="tiny sizes, for CI")
    mode.add_argument("--full", action="store_true", help="5 worlds x 3 PPO seeds (the report's intervals and verdicts)")
    p.add_argument("--workers", type=int, default=None, help="processes side by side (default: the mode's)")
    args = p.parse_args(argv)
    cfg = PRESETS["smoke" if args.smoke else "full" if args.full else "default"]
    if args.workers is not None:
        if args.workers < 1:
            raise SystemExit(f"error: --workers must be >= 1, got {args.workers}")
        cfg = dataclasses.replace(cfg, workers=args.workers)
    try:
        results = run(args.out, cfg)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    with open(os.path.join(args.out, "forgetting.md")) as f:
        print(f.read())
    print(f"finished in {results['timing']['wall_seconds'] / 60:.1f} min: {args.out}/forgetting.md")


if __name__ == "__main__":
    main()
