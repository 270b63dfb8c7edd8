"""A progress bar where asked for (tqdm comes with huggingface-hub), the bare iterable otherwise."""

from __future__ import annotations

AUTO_PROGRESS_MIN_TEXTS = 256  # below this a progress bar is noise


def progress(items, show: bool, desc: str, unit: str):
    if not show:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit=unit)


def show_progress(show: bool | None, num_texts: int) -> bool:
    """show_progress_bar=None: a bar from AUTO_PROGRESS_MIN_TEXTS texts."""
    return num_texts >= AUTO_PROGRESS_MIN_TEXTS if show is None else show
