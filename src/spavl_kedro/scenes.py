"""Rendered shape scenes with known contents: the capability evaluation set asks about them, and tiny models
are taught to answer such questions on scenes of their own (no torch here).

A scene is 1-4 shapes of one colour and kind on white, one per quadrant, each at its own size and position
inside the quadrant, so two scenes rarely share pixels and a model cannot pass by remembering images.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

COLOURS = {"red": (200, 30, 30), "green": (30, 160, 60), "blue": (40, 70, 200), "yellow": (230, 200, 20)}
SHAPES = ("circle", "square", "triangle")
NUMBER_WORDS = ("zero", "one", "two", "three", "four")
COUNTS = (1, 2, 3, 4)  # how many shapes a scene holds, one per quadrant
KINDS = ("colour", "shape", "count")  # what a capability question asks about


def chance(kind: str) -> float:
    """What a uniform guess among the answers a scene can have scores on a question of `kind`: the floor a
    capability accuracy is read against."""
    return 1 / len({"colour": COLOURS, "shape": SHAPES, "count": COUNTS}[kind])


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    count: int

    @classmethod
    def draw_random(cls, rng: random.Random) -> Scene:
        return cls(rng.choice(sorted(COLOURS)), rng.choice(SHAPES), rng.randint(COUNTS[0], COUNTS[-1]))

    @property
    def caption(self) -> str:
        """What the scene shows, in words ("three red square shapes")."""
        return f"{NUMBER_WORDS[self.count]} {self.colour} {self.shape} shape{'s' if self.count > 1 else ''}"

    def answers(self, kind: str) -> list[str]:
        """The accepted answers to a question of `kind` about this scene."""
        if kind == "count":
            return [str(self.count), NUMBER_WORDS[self.count]]
        return [{"colour": self.colour, "shape": self.shape}[kind]]

    def render(self, size: int, rng: random.Random) -> Image.Image:
        """The scene at `size` px; `rng` places the shapes (which quadrants, how big, where in each)."""
        image = Image.new("RGB", (size, size), "white")
        draw = ImageDraw.Draw(image)
        cell = size // 2
        for slot in rng.sample(range(4), self.count):  # one shape per quadrant, so they never overlap
            side = rng.randint(cell * 9 // 20, cell * 4 // 5)
            x0 = (slot % 2) * cell + rng.randint(1, cell - side - 1)
            y0 = (slot // 2) * cell + rng.randint(1, cell - side - 1)
            box, fill = (x0, y0, x0 + side, y0 + side), COLOURS[self.colour]
            if self.shape == "circle":
                draw.ellipse(box, fill=fill)
            elif self.shape == "square":
                draw.rectangle(box, fill=fill)
            else:
                draw.polygon([(x0 + side // 2, y0), (x0 + side, y0 + side), (x0, y0 + side)], fill=fill)
        return image


__all__ = ["COLOURS", "SHAPES", "NUMBER_WORDS", "KINDS", "Scene"]
