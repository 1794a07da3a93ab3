"""OpenRLHF's reward-model actor scoring K local reward models: `--reward.model_name_or_path A,B` -> `[b, K]`.

Stock OpenRLHF loads one reward model per `RewardModelActor`; these wrappers load each comma-separated path with
stock's own `init_model_from_pretrained` and stack the K scores of stock's own `forward`. A patched OpenRLHF
(`patches/0002`) does this natively: nothing is wrapped there. One path runs as stock.
"""

import torch

from openrlhf_lsc.integration import wrap


def apply() -> None:
    try:
        from openrlhf.utils import plugins
    except ImportError:
        plugins = None
    if plugins is not None and hasattr(plugins, "REWARD_HOOKS"):
        return
    from openrlhf.trainer.ray.launcher import RewardModelActor

    cls = RewardModelActor.__ray_metadata__.modified_class
    wrap(cls, "init_model_from_pretrained", ["self", "strategy", "pretrain"], _wrap_init)
    wrap(cls, "forward", ["self", "sequences", "attention_mask", "packed_seq_lens", "pad_sequence"], _wrap_forward)


def _wrap_init(original):
    def init_model_from_pretrained(self, strategy, pretrain, **ray_kwargs):
        paths = pretrain.split(",")
        if len(paths) == 1:
            return original(self, strategy, pretrain, **ray_kwargs)
        models = []
        try:
            for path in paths:
                original(self, strategy, path, **ray_kwargs)
                models.append(self.model)
                # The process group exists after the first load; stock init would set it up again.
                self._setup_distributed = lambda strategy: None
        finally:  # a failed load must not leave the stub behind
            self.__dict__.pop("_setup_distributed", None)
        self.lsc_models = models

    return init_model_from_pretrained


def _wrap_forward(original):
    def forward(self, *args, **kwargs):
        models = getattr(self, "lsc_models", None)
        if models is None:
            return original(self, *args, **kwargs)
        rewards = []
        for model in models:
            self.model = model
            rewards.append(original(self, *args, **kwargs))
        self.model = models[0]
        return torch.stack(rewards, dim=-1)  # [b, K]

    return forward
