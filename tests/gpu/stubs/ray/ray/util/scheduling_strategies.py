class PlacementGroupSchedulingStrategy:
    def __init__(self, *args, **kwargs):
        raise RuntimeError("Ray is not installed here: the GPU suite's stand-in only lets OpenRLHF's modules import")
