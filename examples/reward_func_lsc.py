"""Drop-in reward_func for `--reward.remote_url examples/reward_func_lsc.py`: scores every rollout on two
reward-model servers started with `python -m openrlhf.cli.serve_rm ...` and returns the AND-aggregated LSC
utility. Edit the URLs (or set LSC_HELPFUL_URL / LSC_HARMLESS_URL in the Ray job's env_vars).

The prompt dataset must carry per-prompt references in the field named by --data.label_key
(schema: openrlhf_lsc.references; made by `python -m openrlhf_lsc.cli.estimate_reference`).
"""

import os

from openrlhf_lsc.remote import RemoteRewardCombiner

reward_func = RemoteRewardCombiner(
    urls={
        "helpful": os.environ.get("LSC_HELPFUL_URL", "http://127.0.0.1:5000/get_reward"),
        "harmless": os.environ.get("LSC_HARMLESS_URL", "http://127.0.0.1:5001/get_reward"),
    },
    transform="lsc",
    aggregate="and",
    reference="label",
    label_key=os.environ.get("LSC_LABEL_KEY", "lsc_ref"),
)
