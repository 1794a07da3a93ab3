"""The lab's file helpers: atomic writes (`openrlhf_lsc.files.write_atomic`) of text, JSON, figures and model
folders, and JSON reading."""

import json
import os
import shutil
from typing import Dict, Sequence

from openrlhf_lsc.files import write_atomic


def write_text(path: str, text: str) -> None:
    """Write a text file atomically, creating its folder."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    write_atomic(path, text)


def save_figure(fig, path: str, dpi: int = 100) -> str:
    """Save a matplotlib figure as PNG atomically and close it; returns the file name."""
    import matplotlib.pyplot as plt

    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=dpi, bbox_inches="tight"))
    plt.close(fig)
    return os.path.basename(path)


def write_json(path: str, obj) -> None:
    write_text(path, json.dumps(obj, indent=1))


def write_jsonl(path: str, rows: Sequence[Dict]) -> None:
    write_text(path, "".join(json.dumps(row) + "\n" for row in rows))


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


def pin_json(path: str, config: Dict, what: str) -> Dict:
    """Write a run's configuration to `path`, or refuse if the file holds another one (a run resumes only with the
    configuration it started with). Returns the configuration as JSON reads it back (tuples as lists)."""
    config = json.loads(json.dumps(config))
    if not os.path.exists(path):
        write_json(path, config)
    elif read_json(path) != config:
        raise ValueError(f"{os.path.dirname(path)} holds a {what} with a different configuration ({path}); resume it "
                         "with the same flags or choose another --out")
    return config


def save_model_dir(path: str, model, tokenizer) -> None:
    """`save_pretrained` into a temporary folder, then rename it into place."""
    tmp = f"{path}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
