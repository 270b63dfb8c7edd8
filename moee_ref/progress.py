"""A progress bar where asked for (tqdm comes with huggingface-hub), the bare iterable otherwise."""

from __future__ import annotations


def progress(items, show: bool, desc: str, unit: str):
    if not show:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit=unit)
