"""Scene model of the synthetic benchmark: objects on a 3x3 grid, and the edits that turn one scene into another.

A scene is a handful of objects, each with a shape, a colour, a size and a grid cell. Within a scene the pair
(colour, shape) is unique, so "the red circle" always names exactly one object. Edits never introduce a
(colour, shape) pair that the reference scene already has, so a phrase that names an object of the reference stays
unambiguous across the whole caption.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace

GRID = 3
"""Cells per side of the placement grid."""
SIZES = ("small", "large")
CELL_NAMES = {
    (0, 0): "top left",
    (0, 1): "top",
    (0, 2): "top right",
    (1, 0): "left",
    (1, 1): "center",
    (1, 2): "right",
    (2, 0): "bottom left",
    (2, 1): "bottom",
    (2, 2): "bottom right",
}
"""Language name of each (row, column) cell."""
EDIT_KINDS = ("replace", "recolour", "add", "remove", "resize")


@dataclass(frozen=True)
class SceneSpec:
    """Knobs of the generator: which attributes exist and how busy a scene is."""

    shapes: tuple[str, ...] = ("circle", "square", "triangle")
    """Shapes objects may take (any of circle, square, triangle, diamond, cross)."""
    colors: tuple[str, ...] = ("red", "green", "blue", "yellow")
    """Colours objects may take (names from render.PALETTE)."""
    backgrounds: tuple[str, ...] = ("white",)
    """Canvas tints (names from render.BACKGROUNDS); a reference and all its edits share one. One by default: with
    several, the tiny model spends its first few hundred steps on the tint and learns the edits later."""
    min_objects: int = 2
    """Fewest objects in a reference scene."""
    max_objects: int = 4
    """Most objects in a reference scene."""
    max_jitter: float = 0.05
    """Largest random offset of an object from its cell centre, as a fraction of the cell."""
    edit_weights: tuple[tuple[str, float], ...] = (
        ("replace", 1.0),
        ("recolour", 1.0),
        ("add", 1.0),
        ("remove", 1.0),
        ("resize", 1.0),
    )
    """Relative frequency of each edit kind among the edits proposed on a reference."""

    def __post_init__(self) -> None:
        if len(self.shapes) < 2 or len(self.colors) < 2 or not self.backgrounds:
            raise ValueError("a scene spec needs at least two shapes, two colours and one background")
        if not 1 <= self.min_objects <= self.max_objects <= GRID * GRID - 2:
            raise ValueError(f"need 1 <= min_objects <= max_objects <= {GRID * GRID - 2}")
        if len(self.shapes) * len(self.colors) < self.max_objects + 4:
            raise ValueError("too few (colour, shape) pairs for the scene size: add shapes or colours")
        if not 0 <= self.max_jitter <= 0.08:
            raise ValueError("max_jitter must be in [0, 0.08] so that objects never touch or leave their cell")
        unknown = {kind for kind, _ in self.edit_weights} - set(EDIT_KINDS)
        if unknown:
            raise ValueError(f"unknown edit kinds {sorted(unknown)}; known: {EDIT_KINDS}")


@dataclass(frozen=True)
class SceneObject:
    """One object: what it looks like and where it sits."""

    id: str
    shape: str
    color: str
    size: str
    cell: tuple[int, int]
    offset: tuple[float, float] = (0.0, 0.0)
    """(dx, dy) from the cell centre as fractions of a cell; kept when the object is edited in place."""

    @property
    def kind(self) -> tuple[str, str]:
        return (self.color, self.shape)


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    background: str = "white"

    def canonical(self) -> tuple:
        """What the image shows, independent of object ids: two scenes with equal keys render identically."""
        return (self.background, *sorted((o.cell, o.offset, o.shape, o.color, o.size) for o in self.objects))

    def by_id(self, object_id: str) -> SceneObject:
        return next(o for o in self.objects if o.id == object_id)


@dataclass(frozen=True)
class Edit:
    """One atomic change. `subject` is the id of the reference object it touches (None for `add`)."""

    kind: str
    subject: str | None = None
    shape: str | None = None
    color: str | None = None
    size: str | None = None
    cell: tuple[int, int] | None = None
    offset: tuple[float, float] = (0.0, 0.0)
    new_id: str | None = None
    """Id of the object the edit creates (replace, add)."""
    claims: tuple[tuple[str, str], ...] = field(default=(), compare=False)
    """(colour, shape) pairs this edit brings into the scene; no two edits of one pool share one."""


def random_scene(rng: random.Random, spec: SceneSpec) -> Scene:
    """A reference scene with unique (colour, shape) pairs on distinct cells."""
    count = rng.randint(spec.min_objects, spec.max_objects)
    cells = rng.sample(sorted(CELL_NAMES), count)
    kinds = rng.sample([(c, s) for c in spec.colors for s in spec.shapes], count)
    objects = tuple(
        SceneObject(
            id=f"o{index}",
            shape=shape,
            color=color,
            size=rng.choice(SIZES),
            cell=cell,
            offset=_random_offset(rng, spec),
        )
        for index, (cell, (color, shape)) in enumerate(zip(cells, kinds))
    )
    return Scene(objects, background=rng.choice(spec.backgrounds))


def _random_offset(rng: random.Random, spec: SceneSpec) -> tuple[float, float]:
    return (round(rng.uniform(-1, 1) * spec.max_jitter, 3), round(rng.uniform(-1, 1) * spec.max_jitter, 3))


def propose_edit_pool(rng: random.Random, scene: Scene, spec: SceneSpec, pool_size: int) -> list[Edit]:
    """`pool_size` edits of `scene` that pairwise commute: each touches a different object or a different free cell,
    and each new (colour, shape) is absent from the reference and from the other edits. Any subset of the pool
    therefore applies cleanly in any order."""
    used_kinds = {o.kind for o in scene.objects}
    free_cells = [cell for cell in sorted(CELL_NAMES) if cell not in {o.cell for o in scene.objects}]
    untouched = [o.id for o in scene.objects]
    removable = len(scene.objects) - 1  # never empty the scene, even when every removal of the pool applies
    next_id = len(scene.objects)
    kinds = [kind for kind, _ in spec.edit_weights]
    weights = [weight for _, weight in spec.edit_weights]
    pool: list[Edit] = []
    for _attempt in range(100 * pool_size):
        if len(pool) == pool_size:
            return pool
        kind = rng.choices(kinds, weights)[0]
        if kind == "add":
            if not free_cells:
                continue
            fresh = [(c, s) for c in spec.colors for s in spec.shapes if (c, s) not in used_kinds]
            color, shape = rng.choice(fresh)
            cell = free_cells.pop(rng.randrange(len(free_cells)))
            edit = Edit(
                kind,
                shape=shape,
                color=color,
                size=rng.choice(SIZES),
                cell=cell,
                offset=_random_offset(rng, spec),
                new_id=f"o{next_id}",
                claims=((color, shape),),
            )
            next_id += 1
        else:
            if not untouched or (kind == "remove" and removable == 0):
                continue
            subject = scene.by_id(untouched.pop(rng.randrange(len(untouched))))
            edit = _edit_of_object(rng, kind, subject, spec, used_kinds, next_id)
            if edit is None:
                untouched.append(subject.id)
                untouched.sort()
                continue
            if kind == "remove":
                removable -= 1
            if edit.new_id is not None:
                next_id += 1
        used_kinds.update(edit.claims)
        pool.append(edit)
    if len(pool) == pool_size:
        return pool
    raise ValueError(f"cannot find {pool_size} compatible edits of a {len(scene.objects)}-object scene with {spec}")


def _edit_of_object(
    rng: random.Random,
    kind: str,
    subject: SceneObject,
    spec: SceneSpec,
    used_kinds: set[tuple[str, str]],
    next_id: int,
) -> Edit | None:
    if kind == "remove":
        return Edit(kind, subject=subject.id)
    if kind == "resize":
        return Edit(kind, subject=subject.id, size=SIZES[1 - SIZES.index(subject.size)])
    if kind == "recolour":
        options = [c for c in spec.colors if c != subject.color and (c, subject.shape) not in used_kinds]
        if not options:
            return None
        color = rng.choice(options)
        return Edit(kind, subject=subject.id, color=color, claims=((color, subject.shape),))
    # replace: a different shape (and any colour) in the same place and at the same size
    options = [(c, s) for c in spec.colors for s in spec.shapes if s != subject.shape and (c, s) not in used_kinds]
    if not options:
        return None
    color, shape = rng.choice(options)
    return Edit(kind, subject=subject.id, shape=shape, color=color, new_id=f"o{next_id}", claims=((color, shape),))


def apply_edits(scene: Scene, edits: list[Edit] | tuple[Edit, ...]) -> Scene:
    """The scene after every edit; edits from one pool commute, so order does not matter."""
    objects = {o.id: o for o in scene.objects}
    for edit in edits:
        if edit.kind == "add":
            objects[edit.new_id] = SceneObject(edit.new_id, edit.shape, edit.color, edit.size, edit.cell, edit.offset)
            continue
        subject = objects.pop(edit.subject)
        if edit.kind == "remove":
            continue
        if edit.kind == "resize":
            objects[subject.id] = replace(subject, size=edit.size)
        elif edit.kind == "recolour":
            objects[subject.id] = replace(subject, color=edit.color)
        else:
            objects[edit.new_id] = replace(subject, id=edit.new_id, shape=edit.shape, color=edit.color)
    return Scene(tuple(sorted(objects.values(), key=lambda o: int(o.id[1:]))), background=scene.background)
