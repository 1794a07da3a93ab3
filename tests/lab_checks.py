"""Shared checks of the lab smoke tests."""


def numbers(obj):
    """Every int/float inside nested dicts/lists/tuples (bools excluded), to check they are all finite."""
    if isinstance(obj, dict):
        for v in obj.values():
            yield from numbers(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from numbers(v)
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield obj
