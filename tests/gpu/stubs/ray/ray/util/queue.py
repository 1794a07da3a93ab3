class Queue:  # openrlhf.trainer.ppo_trainer_async imports it at module level
    def __init__(self, *args, **kwargs):
        raise RuntimeError("Ray is not installed here: the GPU suite's stand-in only lets OpenRLHF's modules import")
