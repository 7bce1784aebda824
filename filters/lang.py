"""Language identification of captions: py3langid (offline, default) or fastText lid.176.

DataComp's basic filter uses fastText lid.176 (top-1 label 'en') and its LAION-2B reproduction uses
cld3; neither ships offline, so py3langid is the default and fastText is used when the user points
at the lid.176 model file. Predictions are cached per batch, so filters that all ask "is it
English?" (basic, laion2b, text_based, image_based) identify each caption once.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal, Sequence

import numpy as np

from clipsift.filters.base import Batch, FilterError


@dataclass
class LangConfig:
    backend: Literal["py3langid", "fasttext"] = "py3langid"
    fasttext_model: str = ""  # path to lid.176.bin / .ftz (backend fasttext)


class LanguageId:
    def __init__(self, cfg: LangConfig | None = None):
        self.cfg = cfg or LangConfig()
        if self.cfg.backend == "fasttext":
            self._model = _load_fasttext(self.cfg.fasttext_model)
        else:
            self._model = _py3langid_model()

    @property
    def name(self) -> str:
        return f"fasttext:{Path(self.cfg.fasttext_model).name}" if self.cfg.backend == "fasttext" else "py3langid"

    def predict(self, texts: Sequence[str | None]) -> np.ndarray:
        """Top-1 ISO 639-1 code per text ('' for a missing caption)."""
        clean = ["" if t is None else str(t).replace("\n", " ") for t in texts]
        out = np.full(len(clean), "", dtype=object)
        if self.cfg.backend == "fasttext":
            labels, _ = self._model.predict(clean, k=1)
            for i, lab in enumerate(labels):
                out[i] = lab[0].replace("__label__", "") if lab else ""
        else:
            for i, t in enumerate(clean):
                out[i] = self._model.classify(t)[0] if t else ""
        return out

    def english(self, batch: Batch) -> np.ndarray:
        """Boolean mask: top-1 language of the caption is English (computed once per batch)."""
        langs = batch.derived(("lang", self.name), lambda: self.predict(batch.column("text")))
        return langs == "en"


@lru_cache(maxsize=1)
def _py3langid_model():
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE)  # ~2 s to load: once per process


def _load_fasttext(path: str):
    if not path:
        raise FilterError("lang.backend=fasttext needs lang.fasttext_model=/path/to/lid.176.bin")
    if not Path(path).is_file():
        raise FilterError(f"fastText language model {path} does not exist")
    try:
        import fasttext  # optional: not a dependency of clipsift
    except ImportError:
        raise FilterError("lang.backend=fasttext needs the `fasttext` package (pip install fasttext-wheel), "
                          "or use lang.backend=py3langid") from None
    return fasttext.load_model(str(path))
