from . import placement_group, queue, scheduling_strategies  # noqa: F401
