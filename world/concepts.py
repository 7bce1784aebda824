"""The world's vocabulary: concepts, their words in four languages, and caption templates.

On-task content is shapes (what the downstream tasks ask about) with colour, count, size,
position, background and drawing style. Off-task families (letters, bare patterns) are real,
well-captioned content that no downstream task asks about, like most of a web crawl.
"""
from __future__ import annotations

import re

import numpy as np

SHAPES = ["circle", "square", "triangle", "star", "cross", "hexagon", "diamond", "ring", "arrow", "crescent"]
COLOURS = {  # name -> base RGB; per-example jitter keeps hues apart but not identical
    "red": (215, 40, 40), "green": (40, 170, 60), "blue": (45, 80, 215), "yellow": (235, 215, 40),
    "purple": (140, 50, 185), "orange": (245, 135, 30), "pink": (245, 130, 190), "cyan": (40, 200, 215),
}
BACKGROUNDS = ["plain", "striped", "checkered", "dotted", "gradient"]
SIZES = ["small", "large"]
POSITIONS = ["center", "left", "right", "top", "bottom"]
COUNTS = [1, 2, 3]
LETTERS = list("ABCDEFGHJKLMNPRSTUVWXYZ")

# English synonyms: varied wording is what real captions look like and what a CLIP must learn.
SHAPE_WORDS = {
    "circle": ["circle", "disc", "round dot"], "square": ["square", "box"], "triangle": ["triangle"],
    "star": ["star", "five-pointed star"], "cross": ["cross", "plus sign"], "hexagon": ["hexagon"],
    "diamond": ["diamond", "rhombus"], "ring": ["ring", "hoop"], "arrow": ["arrow"],
    "crescent": ["crescent", "crescent moon"],
}
COLOUR_WORDS = {
    "red": ["red", "crimson"], "green": ["green", "emerald"], "blue": ["blue", "navy"],
    "yellow": ["yellow", "golden"], "purple": ["purple", "violet"], "orange": ["orange", "tangerine"],
    "pink": ["pink", "rose"], "cyan": ["cyan", "turquoise"],
}
BACKGROUND_WORDS = {
    "plain": ["plain", "blank"], "striped": ["striped"], "checkered": ["checkered", "chequered"],
    "dotted": ["dotted", "polka dot"], "gradient": ["gradient", "shaded"],
}
COUNT_WORDS = {1: ["a", "one", "a single"], 2: ["two", "a pair of"], 3: ["three"]}
POSITION_WORDS = {"center": "in the middle", "left": "on the left", "right": "on the right",
                  "top": "at the top", "bottom": "at the bottom"}

ENGLISH_TEMPLATES = [
    "{count} {colour} {shape}",
    "{count} {size} {colour} {shape} on a {background} background",
    "photo of {count} {colour} {shape} {position}",
    "{colour} {shape} icon",
    "a drawing of {count} {shape}, coloured {colour}",
    "clipart: {count} {colour} {shape} over a {background} backdrop",
    "{count} {size} {colour} {shape}",
    "illustration with {count} {colour} {shape} {position}",
    "simple graphic of {count} {colour} {shape}",
    "{count} {colour} {shape} on {background} paper",
    "this picture shows {count} {colour} {shape}",
    "{colour} coloured {shape} {position} of the frame",
]
OUTLINE_SUFFIXES = ["drawn as an outline", "line drawing", "outline only"]

# Foreign-language captions use real words so a real language identifier can catch them.
FOREIGN = {
    "de": {
        "shape": {"circle": "Kreis", "square": "Quadrat", "triangle": "Dreieck", "star": "Stern", "cross": "Kreuz",
                  "hexagon": "Sechseck", "diamond": "Raute", "ring": "Ring", "arrow": "Pfeil", "crescent": "Halbmond"},
        "colour": {"red": "roter", "green": "grüner", "blue": "blauer", "yellow": "gelber", "purple": "lila",
                   "orange": "oranger", "pink": "rosa", "cyan": "türkiser"},
        "templates": ["ein {colour} {shape} auf einem Hintergrund mit Streifen",
                      "Zeichnung von einem {colour} {shape}, schön und einfach",
                      "hier sieht man einen {colour} {shape} in der Mitte des Bildes",
                      "ein kleiner {colour} {shape} und der Hintergrund ist hell"],
    },
    "fr": {
        "shape": {"circle": "cercle", "square": "carré", "triangle": "triangle", "star": "étoile", "cross": "croix",
                  "hexagon": "hexagone", "diamond": "losange", "ring": "anneau", "arrow": "flèche", "crescent": "croissant"},
        "colour": {"red": "rouge", "green": "vert", "blue": "bleu", "yellow": "jaune", "purple": "violet",
                   "orange": "orange", "pink": "rose", "cyan": "turquoise"},
        "templates": ["un {shape} {colour} sur un fond rayé",
                      "dessin d'un {shape} {colour}, très simple et joli",
                      "on voit un {shape} {colour} au milieu de l'image",
                      "une petite image avec un {shape} de couleur {colour}"],
    },
    "es": {
        "shape": {"circle": "círculo", "square": "cuadrado", "triangle": "triángulo", "star": "estrella", "cross": "cruz",
                  "hexagon": "hexágono", "diamond": "rombo", "ring": "anillo", "arrow": "flecha", "crescent": "media luna"},
        "colour": {"red": "rojo", "green": "verde", "blue": "azul", "yellow": "amarillo", "purple": "morado",
                   "orange": "naranja", "pink": "rosado", "cyan": "turquesa"},
        "templates": ["un {shape} {colour} sobre un fondo de rayas",
                      "dibujo de un {shape} {colour}, muy sencillo y bonito",
                      "se puede ver un {shape} {colour} en el centro de la imagen",
                      "una imagen pequeña con un {shape} de color {colour}"],
    },
}

# Uninformative captions, as scraped alt-texts often are.
JUNK_TEMPLATES = ["IMG_{n:04d}", "DSC{n:05d}.JPG", "click here", "image", "untitled", "photo {m} of {k}",
                  "", "thumbnail", "download now", "img{n}", "Screenshot {n}", "banner_{n}.png"]

LETTER_TEMPLATES = ["the letter {letter}", "capital letter {letter} in {colour}", "a {colour} letter {letter}",
                    "typography: the character {letter}", "{colour} glyph of the letter {letter}"]
PATTERN_TEMPLATES = ["a {background} pattern", "{background} texture", "abstract {background} wallpaper",
                     "seamless {background} background"]

# Downstream zero-shot templates (the prompts a task's classifier is built from).
SHAPE_TASK_TEMPLATES = ["a {c}.", "a drawing of a {c}.", "a picture of a {c}.", "a {c} shape.", "an image of a {c}."]
OUTLINE_TASK_TEMPLATES = ["an outline of a {c}.", "a line drawing of a {c}.", "a sketch of a {c}.", "a {c}."]
COUNT_CLASSNAMES = ["one shape", "two shapes", "three shapes"]
COUNT_TASK_TEMPLATES = ["a picture of {c}.", "{c}.", "a drawing of {c}."]


def plural(word: str) -> str:
    if word.endswith(("s", "x", "sh", "ch")):
        return word + "es"
    return word + "s"


def pluralise_phrase(phrase: str) -> str:
    """Pluralise the head noun of a shape phrase ("round dot" -> "round dots")."""
    head, _, tail = phrase.partition(" of ")  # none of our phrases use "of", kept for safety
    words = head.split(" ")
    words[-1] = plural(words[-1])
    return " ".join(words) + (f" of {tail}" if tail else "")


def english_caption(rng: np.random.Generator, c: dict) -> str:
    """A varied English caption that is true of the scene `c`."""
    shape_word = rng.choice(SHAPE_WORDS[c["shape"]])
    count_word = rng.choice(COUNT_WORDS[c["count"]])
    if c["count"] > 1:
        shape_word = pluralise_phrase(shape_word)
    template = ENGLISH_TEMPLATES[rng.integers(len(ENGLISH_TEMPLATES))]
    if c["count"] > 1 and "{count}" not in template:
        template = "{count} " + template
    text = template.format(
        count=count_word, colour=rng.choice(COLOUR_WORDS[c["colour"]]), shape=shape_word, size=c["size"],
        background=rng.choice(BACKGROUND_WORDS[c["background"]]), position=POSITION_WORDS[c["position"]],
    )
    if c["style"] == "outline":
        text = f"{text}, {rng.choice(OUTLINE_SUFFIXES)}"
    return _articles(text)


def canonical_caption(c: dict) -> str:
    """One fixed wording per scene: retrieval ground truth and the ground-truth sidecar."""
    count = {1: "a", 2: "two", 3: "three"}[c["count"]]
    shape = c["shape"] if c["count"] == 1 else plural(c["shape"])
    style = "outline of " if c["style"] == "outline" else ""
    return f"{style}{count} {c['size']} {c['colour']} {shape} {POSITION_WORDS[c['position']]} on a {c['background']} background"


def _articles(text: str) -> str:
    """'a orange box' -> 'an orange box'."""
    return re.sub(r"\b([Aa]) (?=[aeiou])", r"\1n ", text)


def foreign_caption(rng: np.random.Generator, c: dict, lang: str) -> str:
    vocab = FOREIGN[lang]
    template = vocab["templates"][rng.integers(len(vocab["templates"]))]
    return template.format(shape=vocab["shape"][c["shape"]], colour=vocab["colour"][c["colour"]])


def junk_caption(rng: np.random.Generator) -> str:
    template = JUNK_TEMPLATES[rng.integers(len(JUNK_TEMPLATES))]
    k = int(rng.integers(2, 20))
    return template.format(n=int(rng.integers(0, 100000)), m=int(rng.integers(1, k + 1)), k=k)


def letter_caption(rng: np.random.Generator, letter: str, colour: str) -> str:
    template = LETTER_TEMPLATES[rng.integers(len(LETTER_TEMPLATES))]
    return template.format(letter=letter, colour=rng.choice(COLOUR_WORDS[colour]))


def pattern_caption(rng: np.random.Generator, background: str) -> str:
    template = PATTERN_TEMPLATES[rng.integers(len(PATTERN_TEMPLATES))]
    return template.format(background=rng.choice(BACKGROUND_WORDS[background]))
