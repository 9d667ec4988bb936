"""Dataset loader of the task files in this folder (lm-eval imports it by path).

``custom_dataset: !function utils.load_jsonl_beside`` in a task YAML reads the task's
``dataset_kwargs.data_files`` with relative paths taken from this folder, not from the
working directory, so a packaged task runs from anywhere, offline.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def load_jsonl_beside(data_files: dict[str, str], **_: Any) -> Any:
    """``{split: datasets.Dataset}`` of the JSONL files named in ``data_files`` (paths
    relative to this folder, or absolute); lm-eval's other keyword arguments (the model's
    arguments, passed on as task metadata) are ignored."""
    import datasets

    splits = {}
    for split, name in data_files.items():
        path = Path(name) if Path(name).is_absolute() else HERE / name
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()
                if line.strip()]
        splits[split] = datasets.Dataset.from_list(rows)
    return datasets.DatasetDict(splits)
