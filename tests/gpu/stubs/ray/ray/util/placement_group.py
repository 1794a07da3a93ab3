class PlacementGroup:
    pass


def placement_group(*args, **kwargs):
    raise RuntimeError("Ray is not installed here: the GPU suite's stand-in only lets OpenRLHF's modules import")
