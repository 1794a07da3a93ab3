"""LSC / AND rewards for verl (0.9.x reward loop): a reward manager, a served-reward-model scorer, a group estimator.

- `LSCRewardManager`, registered as `lsc`: the user's `compute_score` returns K named raw rewards per response;
  the manager turns them into one utility (`reward_score`) with `openrlhf_lsc.rewards.reward_utilities`
  (label or constant references, transform, AND / weighted aggregation) and returns the `lsc/*` metrics as
  `reward_extra_info`. Settings live under `reward.lsc` of verl's config (keys: `MANAGER_KEYS`).
- `served_reward_model`: a custom reward function that scores the response with the reward model verl serves
  (through verl's reward-model router), so a served model goes through the manager too.
- `lsc_group`, a registered advantage estimator: group references (the q-quantile of a prompt's own samples)
  need the whole group, which a reward manager never sees; the estimator transforms the K = 1 sequence reward
  in `rm_scores` with them and then runs a verl outcome estimator (GRPO by default). Settings: `algorithm.lsc`.

`import verl` imports this module through the `verl.plugins` entry point declared in setup.py (verl/__init__.py
loads every entry point of that group, logging a failure at debug level only), which registers both names in every
process that imports verl (driver and Ray workers). docs/verl.md is the user's page. Facts about verl below are
from verl 0.9.1 (site-packages/verl).

What verl 0.9.1 cannot do, in either trainer: group references for K > 1 rewards. They need each prompt's K raw
rewards for all its samples; the reward manager sees one sample (RewardLoopWorker.compute_score_batch), and an
advantage estimator sees one summed reward per sample: the v1 trainer's `_compute_advantage`
(trainer/ppo/v1/trainer_base.py) reads only uid, response_mask, rm_scores, log-probs and values back from its
TransferQueue, and the legacy `ray_trainer.compute_advantage` passes the per-sample extra info to `gdpo` alone.
"""

import asyncio
import inspect
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from verl import DataProto
from verl.experimental.reward_loop.reward_manager import register
from verl.experimental.reward_loop.reward_manager.base import RewardManagerBase
from verl.trainer.ppo.core_algos import get_adv_estimator_fn, register_adv_est

from openrlhf_lsc.rewards import RewardSpec, reward_utilities

# reward.lsc.* keys (all but `names` and `reference` optional): the RewardSpec fields a per-sample manager can use.
MANAGER_KEYS = ("names", "transform", "aggregate", "weights", "reference", "reference_value", "label_key")
# algorithm.lsc.* keys of the `lsc_group` estimator.
ESTIMATOR_KEYS = ("quantile", "transform", "estimator")
# verl outcome estimators whose result depends on the sequence reward alone (they sum `token_level_rewards`):
# the ones `lsc_group` can hand its utilities to (verl/trainer/ppo/core_algos.py).
THEN_ESTIMATORS = ("grpo", "grpo_vectorized", "rloo", "rloo_vectorized", "reinforce_plus_plus_baseline")
# The math layer's errors name OpenRLHF flags; a verl user sets these config keys instead.
_FLAG_WORDS = (
    ("--lsc.reward_names", "{s}.names"),
    ("--lsc.reward_models", "{s}.names"),
    ("--data.label_key", "{s}.label_key"),
    ("--rollout.n_samples_per_prompt", "actor_rollout_ref.rollout.n"),
    ("--lsc.", "{s}."),
)


def _in_verl_words(error: ValueError, section: str, where: str = "") -> ValueError:
    msg = str(error)
    for flag, key in _FLAG_WORDS:
        msg = msg.replace(flag, key.format(s=section))
    if where and where not in msg:
        msg = f"{where}: {msg}"
    return ValueError(msg)


def _settings(node: Any, section: str, allowed: Sequence[str], needed_for: str, example: str) -> Dict[str, Any]:
    """The `section` block of verl's config as a plain dict; unknown keys are refused.

    `+reward.lsc.*` / `+algorithm.lsc.*` reach us because verl keeps `config.reward` and `config.algorithm` plain
    DictConfigs: the trainers never build RewardConfig / AlgoConfig from them (and RewardManagerConfig cannot be
    built at all in 0.9.1: its __post_init__ calls a missing super().__post_init__).
    """
    if node is None:
        raise ValueError(f"{needed_for} reads its settings from `{section}`, which is not set: add e.g. "
                         f"`{example}` to the command line")
    settings = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    unknown = sorted(set(settings) - set(allowed))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in `{section}`: expected some of {list(allowed)}")
    return settings


def manager_spec(config: Any) -> RewardSpec:
    """The `RewardSpec` of the `lsc` reward manager, read from `config.reward.lsc`.

    Args:
        config: verl's trainer config (the one the reward loop receives). `reward.lsc` holds `names` (the K reward
            names `compute_score` returns), `reference` (`label`, `constant` or `none`), and optionally
            `transform` (default `lsc`), `aggregate` (default `and`), `weights`, `reference_value` and
            `label_key` (the batch field holding the labels, needed by `label`).

    Returns:
        The checked `RewardSpec`; a bad setting raises one ValueError naming the `reward.lsc.*` key.

    Example:
        >>> from omegaconf import OmegaConf
        >>> lsc = {"names": ["a"], "reference": "constant", "reference_value": [0.5]}
        >>> cfg = OmegaConf.create({"reward": {"lsc": lsc}})
        >>> manager_spec(cfg).transform
        'lsc'
    """
    s = _settings(config.reward.get("lsc"), "reward.lsc", MANAGER_KEYS, "reward.reward_manager.name=lsc",
                  "+reward.lsc.names=[helpful,harmless] +reward.lsc.reference=label +reward.lsc.label_key=lsc_ref")
    if s.get("reference") == "group":
        raise ValueError(
            "reward.lsc.reference=group needs the whole group of a prompt's samples, and a reward manager scores "
            "one sample at a time (verl RewardLoopWorker.compute_score_batch). For one reward, keep your reward "
            "manager (e.g. naive) and set algorithm.adv_estimator=lsc_group +algorithm.lsc.quantile=q"
        )
    s.setdefault("transform", "lsc")
    if "names" not in s or "reference" not in s:
        raise ValueError("reward.lsc needs `names` (the rewards compute_score returns) and `reference` "
                         "(label | constant | none)")
    for key in ("names", "weights", "reference_value"):
        if isinstance(s.get(key), str):  # a bare string would be split into characters
            raise ValueError(f"reward.lsc.{key} must be a list, e.g. [{s[key]}], got the string {s[key]!r}")
    try:
        return RewardSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in s.items()})
    except (TypeError, ValueError) as e:
        raise _in_verl_words(ValueError(str(e)), "reward.lsc") from None


class LSCRewardManager(RewardManagerBase):
    """verl reward manager: K named raw rewards from `compute_score` -> one LSC / AND utility per response.

    `compute_score` (verl's `reward.custom_reward_function`, or verl's default scorer) is called as verl's `naive`
    manager calls it (`data_source`, `solution_str`, `ground_truth`, `extra_info`, plus `reward_router_address` and
    `reward_model_tokenizer` when verl serves a reward model) and returns a dict with one number per name in
    `reward.lsc.names` (a bare number when there is one name). Other keys of that dict pass into
    `reward_extra_info` unchanged, as with `naive`.

    Returns per response `{"reward_score": utility, "reward_extra_info": {"lsc/utility", "lsc/<name>/reward",
    "lsc/<name>/utility", and with references "lsc/<name>/margin", "lsc/<name>/above_ref", ...}}`.

    Example:
        >>> from verl.experimental.reward_loop.reward_manager import get_reward_manager_cls
        >>> get_reward_manager_cls("lsc") is LSCRewardManager
        True
    """

    def __init__(self, config, tokenizer, compute_score, reward_router_address=None, reward_model_tokenizer=None):
        super().__init__(config, tokenizer, compute_score)
        self.spec = manager_spec(config)
        # RewardLoopWorker.compute_score sends every sample to a served discriminative reward model directly,
        # never to the manager, unless a custom reward function is set (verl reward_loop.py).
        reward_model = config.reward.reward_model
        if reward_model.enable and not config.reward.custom_reward_function.get("path"):
            raise ValueError(
                "reward.reward_model.enable=True without reward.custom_reward_function: verl scores with the served "
                "model and skips the lsc manager. Set reward.custom_reward_function.path=pkg://"
                "openrlhf_lsc.frameworks.verl and reward.custom_reward_function.name=served_reward_model "
                "(or a function of yours that awaits served_reward_model)"
            )
        self.served = None
        if reward_model.enable:
            self.served = {"model": reward_model.model_path, "engine": reward_model.rollout.name}
        self.is_async = inspect.iscoroutinefunction(compute_score)
        self.reward_router_address = reward_router_address
        self.reward_model_tokenizer = reward_model_tokenizer

    async def run_single(self, data: DataProto) -> dict:
        # Multi-turn sessions: score the last sequence, as verl's naive manager does.
        item = data[-1:][0]
        fields = item.non_tensor_batch
        where = f"prompt index {fields.get('index', '?')} (data_source {fields.get('data_source')!r})"
        response_ids = item.batch["responses"]
        n_valid = item.batch["attention_mask"][-response_ids.shape[-1]:].sum()
        loop = asyncio.get_running_loop()  # not self.loop: that is the loop current when verl built the manager
        response = await loop.run_in_executor(
            None, lambda: self.tokenizer.decode(response_ids[:n_valid], skip_special_tokens=True)
        )
        extra_info = dict(fields.get("extra_info") or {})
        if self.served is not None and "raw_prompt" in fields:  # served_reward_model needs the chat and the model
            extra_info["lsc_served_rm"] = {**self.served, "prompt": list(fields["raw_prompt"])}
        kwargs = dict(
            data_source=fields.get("data_source"),
            solution_str=response,
            # .get: the v1 trainer's colocated reward model sends only `raw_prompt` (_compute_reward_colocate)
            ground_truth=(fields.get("reward_model") or {}).get("ground_truth"),
            extra_info=extra_info,
        )
        if self.reward_router_address is not None:
            kwargs.update(reward_router_address=self.reward_router_address,
                          reward_model_tokenizer=self.reward_model_tokenizer)
        if self.is_async:
            result = await self.compute_score(**kwargs)
        else:
            result = await loop.run_in_executor(None, lambda: self.compute_score(**kwargs))
        return self.utility(result, fields, where)

    def utility(self, result: Any, fields: Dict[str, Any], where: str) -> dict:
        """`compute_score`'s result for one response -> verl's `{"reward_score", "reward_extra_info"}`."""
        names = self.spec.names
        if not isinstance(result, dict):
            if len(names) > 1:
                raise ValueError(f"{where}: compute_score returned {result!r:.80}; with reward.lsc.names={list(names)} "
                                 "it must return a dict with one number per name")
            result = {names[0]: result}
        missing = [n for n in names if n not in result]
        if missing:
            raise ValueError(f"{where}: compute_score returned keys {sorted(result)}, missing {missing} "
                             f"(reward.lsc.names={list(names)})")
        try:
            rewards = torch.tensor([[float(result[n]) for n in names]], dtype=torch.float64)
        except (TypeError, ValueError):
            bad = next(n for n in names if not isinstance(result[n], (int, float, np.number, torch.Tensor)))
            raise ValueError(f"{where}: compute_score returned {result[bad]!r:.80} for {bad!r}: expected a number") \
                from None
        labels = None
        if self.spec.reference == "label":
            key = self.spec.label_key
            if key not in fields:
                raise ValueError(
                    f"{where}: the batch has no field {key!r} (reward.lsc.label_key) holding the reference labels; "
                    f"fields: {sorted(fields)}. Add it as a dataset column (the v1 trainer's colocated reward "
                    "model passes only raw_prompt: set reward.reward_model.enable_resource_pool=True)"
                )
            labels = [fields[key]]
        try:
            utility, metrics = reward_utilities(rewards, self.spec, labels=labels, where=[where])
        except ValueError as e:
            raise _in_verl_words(e, "reward.lsc", where) from None
        extra = {k: v for k, v in result.items() if k not in names}
        extra.update({k: float(v[0]) for k, v in metrics.items()})
        return {"reward_score": float(utility[0]), "reward_extra_info": extra}


async def served_reward_model(
    data_source: Any = None,
    solution_str: str = "",
    ground_truth: Any = None,
    extra_info: Optional[dict] = None,
    reward_router_address: Optional[str] = None,
    reward_model_tokenizer: Any = None,
    **kwargs: Any,
) -> float:
    """A verl custom reward function: the score of the reward model verl serves, for one response.

    Builds the reward model's input as verl's own `RewardLoopWorker.compute_score_disrm` does (the prompt's chat
    plus the response as the assistant turn, the reward model's chat template, a leading BOS removed) and asks
    verl's reward-model router: `/classify` for vLLM, `/v1/embeddings` for SGLang. The `lsc` manager passes the
    chat and the model in `extra_info["lsc_served_rm"]`. For several rewards, await it from your own function.

    Args:
        solution_str: the decoded response.
        extra_info: the sample's extra info, with `lsc_served_rm` = {"model", "engine", "prompt"}.
        reward_router_address: `host:port` of verl's router (verl passes it when `reward.reward_model.enable`).
        reward_model_tokenizer: the served reward model's tokenizer (verl passes it too).

    Returns:
        The raw reward (a float), which the manager then transforms.

    Example:
        ```text
        reward.custom_reward_function.path=pkg://openrlhf_lsc.frameworks.verl
        reward.custom_reward_function.name=served_reward_model
        ```
    """
    import aiohttp

    served = (extra_info or {}).get("lsc_served_rm")
    if reward_router_address is None or served is None:
        raise ValueError(
            "served_reward_model scores with the reward model verl serves: it needs reward.reward_model.enable=True "
            "and reward.reward_manager.name=lsc (which passes the prompt and the model name)"
        )
    chat = list(served["prompt"]) + [{"role": "assistant", "content": solution_str}]
    text = reward_model_tokenizer.apply_chat_template(chat, add_generation_prompt=False, tokenize=False)
    bos = reward_model_tokenizer.bos_token
    if bos is not None and text.startswith(bos):  # the server adds it again (as verl's compute_score_disrm notes)
        text = text[len(bos):]
    if served["engine"] == "vllm":
        endpoint, payload = "classify", {"model": served["model"], "input": text, "use_activation": False}
    elif served["engine"] == "sglang":
        endpoint, payload = "v1/embeddings", {"model": served["model"], "input": text}
    else:
        raise ValueError(f"served_reward_model: reward.reward_model.rollout.name={served['engine']!r} is not "
                         "supported (vllm or sglang, as in verl's RewardLoopWorker.compute_score_disrm)")
    async with aiohttp.ClientSession() as session:
        async with session.post(f"http://{reward_router_address}/{endpoint}", json=payload) as resp:
            resp.raise_for_status()
            out = await resp.json()
    last = out["data"][-1]
    return float(last["probs"][-1] if endpoint == "classify" else last["embedding"][-1])


def estimator_settings(config: Any) -> Dict[str, Any]:
    """The `lsc_group` settings from `config.lsc` (verl's `algorithm` section): quantile, transform, estimator.

    Example:
        >>> estimator_settings({"lsc": {"quantile": 0.85}})
        {'quantile': 0.85, 'transform': 'lsc', 'estimator': 'grpo'}
    """
    s = _settings(None if config is None else config.get("lsc"), "algorithm.lsc", ESTIMATOR_KEYS,
                  "algorithm.adv_estimator=lsc_group", "+algorithm.lsc.quantile=0.85")
    s = {"quantile": s.get("quantile"), "transform": s.get("transform", "lsc"), "estimator": s.get("estimator", "grpo")}
    if s["estimator"] not in THEN_ESTIMATORS:
        raise ValueError(f"algorithm.lsc.estimator={s['estimator']!r}: expected one of {list(THEN_ESTIMATORS)} "
                         "(outcome estimators that use the sequence reward only)")
    return s


def compute_lsc_group_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: np.ndarray,
    config: Any = None,
    **kwargs: Any,
):
    """verl advantage estimator `lsc_group`: group-quantile references, LSC transform, then a verl outcome estimator.

    For each prompt (`index` = verl's `uid`), r_ref is the `algorithm.lsc.quantile` quantile of its samples'
    sequence rewards (the sum of `token_level_rewards`, i.e. `rm_scores` for K = 1);
    u = transform(r, r_ref) via `reward_utilities`; then `algorithm.lsc.estimator` (default `grpo`) computes the
    advantages from u. Samples of a prompt need not be adjacent (verl may reorder the batch) and groups may differ
    in size, but each needs >= 2 samples.

    Args:
        token_level_rewards: `[B, T]` rewards (verl puts the sequence reward at the last response token).
        response_mask: `[B, T]`.
        index: `[B]` prompt ids (verl passes `non_tensor_batch["uid"]`).
        config: verl's `algorithm` config with the `lsc` block.

    Returns:
        `(advantages, returns)`, each `[B, T]`, from the chosen verl estimator.
    """
    s = estimator_settings(config)
    if config.get("use_kl_in_reward", False):
        raise ValueError("algorithm.adv_estimator=lsc_group transforms the sequence reward; with "
                         "algorithm.use_kl_in_reward=True it would transform the KL penalty too: use the actor's "
                         "KL loss (actor_rollout_ref.actor.use_kl_loss=True) instead")
    try:
        spec = RewardSpec(names=("reward",), transform=s["transform"], reference="group", quantile=s["quantile"])
    except ValueError as e:
        raise _in_verl_words(e, "algorithm.lsc") from None
    scores = token_level_rewards.sum(-1)
    utility = torch.empty_like(scores, dtype=torch.float32)
    uids, inverse = np.unique(np.asarray(index, dtype=object).astype(str), return_inverse=True)
    for g, uid in enumerate(uids):
        rows = torch.as_tensor(np.flatnonzero(inverse == g))
        try:
            u, _ = reward_utilities(scores[rows, None], spec, group_size=len(rows), where=[f"uid {uid}"])
        except ValueError as e:
            raise _in_verl_words(e, "algorithm.lsc", f"lsc_group, prompt uid {uid} ({len(rows)} samples)") from None
        utility[rows] = u.float()
    # The chosen estimators sum token rewards: put each utility at its last response token, where
    # RewardManagerBase.assemble_rm_scores puts a reward_score.
    last = (response_mask * torch.arange(1, response_mask.shape[1] + 1, device=response_mask.device)).argmax(-1)
    rewards = torch.zeros_like(token_level_rewards, dtype=torch.float32)
    rewards[torch.arange(len(last)), last] = utility
    then = get_adv_estimator_fn(s["estimator"])
    extra = {}
    if s["estimator"].startswith("grpo"):  # verl's compute_advantage passes this to its own GRPO branch only
        extra["norm_adv_by_std_in_grpo"] = config.get("norm_adv_by_std_in_grpo", True)
    return then(token_level_rewards=rewards, response_mask=response_mask, index=index, config=config, **extra)


# verl's `source: importlib` with a file path runs this file again under another module name and takes the class
# from it; registering that copy too would clash with the registration made through the entry point.
if __name__ == "openrlhf_lsc.frameworks.verl":
    register("lsc")(LSCRewardManager)
    register_adv_est("lsc_group")(compute_lsc_group_advantage)

__all__: List[str] = [
    "LSCRewardManager",
    "compute_lsc_group_advantage",
    "estimator_settings",
    "manager_spec",
    "served_reward_model",
]
