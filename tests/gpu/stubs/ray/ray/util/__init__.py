from . import placement_group, scheduling_strategies  # noqa: F401
