"""The records a preference dataset becomes: a `Pair` (one prompt, two images, the preferred one), a `Group` (all
images of a prompt, ranked) and a `Rated` image (the absolute-score variant of section 5).

An image is whatever `images.load_image` reads: a path (`images.ImagePath`), a parquet cell (`images.ParquetImage`),
bytes or a PIL image.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Pair:
    """Two images for one prompt; `label` is the index (0 or 1) of the image people preferred."""
    prompt: str
    images: tuple  # (image 0, image 1)
    label: int
    votes: tuple[float, float] | None = None  # human votes for (image 0, image 1), where the dataset has them


@dataclass
class Group:
    """All images generated for one prompt; `ranking[i]` is image i's human rank, 1 is best, ties allowed."""
    prompt: str
    images: list
    ranking: list[int]


@dataclass
class Rated:
    """One image and its target rating, 1 (worst) .. R (best): the absolute-score variant (section 5)."""
    prompt: str
    image: object
    rating: int


def swapped(pair: Pair) -> Pair:
    """The same pair shown in the other order; the label and votes follow the images."""
    votes = None if pair.votes is None else (pair.votes[1], pair.votes[0])
    return Pair(pair.prompt, (pair.images[1], pair.images[0]), 1 - pair.label, votes)
