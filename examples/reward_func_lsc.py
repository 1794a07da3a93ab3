"""Drop-in reward_func for `--reward.remote_url examples/reward_func_lsc.py`: scores every rollout on two
reward-model servers started with `python -m openrlhf.cli.serve_rm ...` (retries, timeouts, errors naming the
server: openrlhf_lsc.serve_rm). Edit the URLs, or set LSC_HELPFUL_URL / LSC_HARMLESS_URL in the Ray job's env_vars.

- With the stock CLI it trains on its own AND-aggregated LSC utility (the spec below; references per prompt in the
  --data.label_key field, made by `python -m openrlhf_lsc.cli.estimate_reference`).
- With `python -m openrlhf_lsc.cli.train_ppo_ray ... --lsc.reward_names helpful,harmless --lsc.transform lsc ...`
  the plugin reads the two raw rewards it returns in extra_logs and applies its own --lsc.* flags.
"""

import os

from openrlhf_lsc.remote import RemoteRewardCombiner
from openrlhf_lsc.rewards import RewardSpec

reward_func = RemoteRewardCombiner(
    urls={
        "helpful": os.environ.get("LSC_HELPFUL_URL", "http://127.0.0.1:5000/get_reward"),
        "harmless": os.environ.get("LSC_HARMLESS_URL", "http://127.0.0.1:5001/get_reward"),
    },
    spec=RewardSpec(names=("helpful", "harmless"), transform="lsc", aggregate="and", reference="label",
                    label_key=os.environ.get("LSC_LABEL_KEY", "lsc_ref")),
)
