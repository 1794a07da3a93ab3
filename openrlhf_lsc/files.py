"""The package's one atomic write: a crash (even kill -9) leaves the old file or the new one. Standard library only."""

import os
from pathlib import Path
from typing import IO, Callable, Iterable, Union


def write_atomic(path: Union[str, Path], content: Union[str, bytes, Iterable[str], Callable[[IO[bytes]], None]]) -> None:
    """Write `path` through a temporary file in its folder, synced, then renamed over it in one step.

    Args:
        path: the file to (re)write; its folder must exist.
        content: text, bytes, an iterable of lines (each written with a newline), or `write(f)` given the open binary
            temporary file (e.g. `lambda f: fig.savefig(f, format="png")`).

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "a.jsonl"
        >>> write_atomic(p, ['{"x": 1}', '{"x": 2}'])
        >>> p.read_text()
        '{"x": 1}\\n{"x": 2}\\n'
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            if isinstance(content, bytes):
                f.write(content)
            elif isinstance(content, str):
                f.write(content.encode())
            elif callable(content):
                content(f)
            else:
                for line in content:
                    f.write(f"{line}\n".encode())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
