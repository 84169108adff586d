"""A procedural text-to-image world: 16x16 scenes of colored shapes with captions.

Nine objects (``COLORS`` x ``SHAPES``: red/green/blue x square/cross/ring) drawn on a black
canvas at random positions and sizes. Two namings (``NAMINGS``) of the same objects:

- "attributes": "a red square and a blue ring" (a color word and a shape word per object; the
  shape word is the object token SepEn acts on);
- "nouns": "a red_square and a blue_ring" (one word per object, as in the paper's animal/object
  pairs, so a failure cannot be an attribute-binding error).

The training mix (``ShapesWorld.sample_batch``) is single objects plus, with probability
``pair_fraction``, a *seen* pair; the held-out pairs never appear in training. What a small model
does with a held-out pair depends on that fraction and on the naming (benchmarks/RESULTS.md):
with no pairs at all it draws the first-named object only (a missing object, "catastrophic
neglect"); with 1-10% pairs and attribute captions it draws two objects with their shapes swapped
between the colors; with 2% pairs and one-word nouns it fails on held-out pairs by both dropping
(9-15% at 4000 steps) and confusing (16-22%) objects.
``score_samples`` scores the two failure kinds separately.

Uncaptioned extras (``extra_fraction``): with that probability a single-object scene also holds
the object's *companion* (``companion``: the next color and the next shape, so it differs in
both), which its caption does not name, as a dining table in a photo usually comes with chairs.
"a red_square" then often draws a green_cross too, so "red_square AND NOT green_cross" has
something to reject: the world in which CompLift's NOT and the main-job benchmark mean something.

Text side: a word-level tokenizer (``build_tokenizer``) that saves and loads like Stable
Diffusion's ``tokenizer/`` folder. The world's models (its frozen text encoder and tiny
text-to-image model) live in ``compkern.models.shapes``, its detector in
``compkern.models.detector`` (trained by ``compkern.train.detector``).

Images are (B, 3, 16, 16) in [-1, 1], channel order RGB.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

COLORS: dict[str, tuple[float, float, float]] = {"red": (1.0, -1.0, -1.0), "green": (-1.0, 1.0, -1.0),
                                                  "blue": (-1.0, -1.0, 1.0)}
SHAPES: tuple[str, ...] = ("square", "cross", "ring")
OBJECTS: tuple[tuple[str, str], ...] = tuple((c, s) for c in COLORS for s in SHAPES)  # 9 objects, id = index
IMAGE_SIZE = 16
MAX_OBJECTS = 3
WORDS = ("a", "and") + tuple(COLORS) + SHAPES
NOUNS = tuple(f"{c}_{s}" for c, s in OBJECTS)  # the one-word names of the "nouns" naming
NAMINGS = ("attributes", "nouns")
SPECIAL = ("<pad>", "<unk>", "<bos>", "<eos>")
MAX_LENGTH = 12


def _check_naming(naming: str) -> None:
    if naming not in NAMINGS:
        raise ValueError(f"naming must be one of {NAMINGS}, got {naming!r}")


def object_name(obj: int, naming: str = "attributes") -> str:
    """"red square" ("attributes") or "red_square" ("nouns")."""
    _check_naming(naming)
    return NOUNS[obj] if naming == "nouns" else " ".join(OBJECTS[obj])


def object_token(obj: int, naming: str = "attributes") -> str:
    """The word of an object that names it (SepEn's object token): the shape word, or the noun."""
    _check_naming(naming)
    return NOUNS[obj] if naming == "nouns" else OBJECTS[obj][1]


def caption(objs: tuple[int, ...] | list[int], naming: str = "attributes") -> str:
    """(obj ids) -> "a red square and a blue ring"; () -> "" (the unconditional caption)."""
    return " and ".join(f"a {object_name(o, naming)}" for o in objs)


def parse_caption(text: str, naming: str = "attributes") -> tuple[int, ...]:
    """The inverse of ``caption``: "a red square and a blue ring" -> (0, 8)."""
    names = {object_name(o, naming): o for o in range(len(OBJECTS))}
    objs = []
    for part in text.lower().split(" and "):
        words = part.split()
        key = " ".join(words[1:] if words and words[0] == "a" else words)
        if key not in names:
            raise ValueError(f"prompt part {part!r} names no object; objects: {sorted(names)} "
                             f"(form: {caption((0, 8), naming)!r})")
        objs.append(names[key])
    return tuple(objs)


def companion(obj: int) -> int:
    """The uncaptioned extra that object ``obj`` brings along: next color, next shape
    (red_square -> green_cross -> blue_ring -> red_square; a permutation of the nine objects)."""
    c, s = divmod(int(obj), len(SHAPES))
    return ((c + 1) % len(COLORS)) * len(SHAPES) + (s + 1) % len(SHAPES)


def distinct_pairs() -> list[tuple[int, int]]:
    """Unordered pairs (i < j) of objects that differ in both color and shape (18 pairs)."""
    return [(i, j) for i, j in itertools.combinations(range(len(OBJECTS)), 2)
            if OBJECTS[i][0] != OBJECTS[j][0] and OBJECTS[i][1] != OBJECTS[j][1]]


def split_pairs(n_held_out: int = 6, seed: int = 0) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(seen, held_out) unordered pairs; every object keeps at least two seen partners."""
    pairs = distinct_pairs()
    g = torch.Generator().manual_seed(seed)
    for _ in range(1000):
        perm = torch.randperm(len(pairs), generator=g).tolist()
        held = sorted(pairs[i] for i in perm[:n_held_out])
        seen = sorted(pairs[i] for i in perm[n_held_out:])
        counts = [sum(o in p for p in seen) for o in range(len(OBJECTS))]
        if min(counts) >= 2:
            return seen, held
    raise RuntimeError("could not split the pairs")


# -- rendering ----------------------------------------------------------------------------------

def render(objs: torch.Tensor, pos: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """objs (B, M) int64 object ids (-1: none), pos (B, M, 2) int64 top-left (y, x), size (B, M)
    int64 side length -> images (B, 3, 16, 16) in [-1, 1]; later objects are drawn on top."""
    B, M = objs.shape
    H = IMAGE_SIZE
    yy = torch.arange(H, dtype=torch.float32).view(1, 1, H, 1)
    xx = torch.arange(H, dtype=torch.float32).view(1, 1, 1, H)
    s = size.float().view(B, M, 1, 1)
    cy = pos[..., 0].float().view(B, M, 1, 1) + (s - 1) / 2
    cx = pos[..., 1].float().view(B, M, 1, 1) + (s - 1) / 2
    dy, dx = (yy - cy).abs(), (xx - cx).abs()
    R = s / 2
    inside = torch.maximum(dx, dy) <= R - 0.5
    r = torch.sqrt(dx ** 2 + dy ** 2)
    masks = torch.stack([inside,                                                    # square
                         inside & ((dx <= 1) | (dy <= 1)),                          # cross
                         (r >= R - 1.25) & (r <= R - 0.05)], 0)                     # ring
    shape_id = (objs.clamp(min=0) % len(SHAPES))
    mask = masks.gather(0, shape_id.view(1, B, M, 1, 1).expand(1, B, M, H, H))[0] & (objs >= 0).view(B, M, 1, 1)
    palette = torch.tensor(list(COLORS.values()))                                   # (3 colors, 3 channels)
    rgb = palette[objs.clamp(min=0) // len(SHAPES)]                                 # (B, M, 3)
    img = torch.full((B, 3, H, H), -1.0)
    for m in range(M):
        mk = mask[:, m].unsqueeze(1)
        img = torch.where(mk, rgb[:, m].view(B, 3, 1, 1), img)
    return img


def random_layout(n: torch.Tensor, generator: torch.Generator | None = None, *, sizes: tuple[int, int] = (6, 7),
                  max_objects: int = MAX_OBJECTS) -> tuple[torch.Tensor, torch.Tensor]:
    """n (B,) objects per image -> pos (B, M, 2), size (B, M): random sizes in [sizes[0], sizes[1]],
    positions that keep every pair of boxes apart (rejection, retried per image)."""
    B, M = len(n), max_objects
    size = torch.randint(sizes[0], sizes[1] + 1, (B, M), generator=generator)
    pos = torch.zeros(B, M, 2, dtype=torch.long)
    todo = torch.arange(B)
    for _ in range(1000):  # joint rejection over all boxes of the images still to place
        if len(todo) == 0:
            break
        hi = (IMAGE_SIZE - size[todo] + 1).unsqueeze(-1).float()
        pos[todo] = (torch.rand(len(todo), M, 2, generator=generator) * hi).long()
        ok = torch.ones(len(todo), dtype=torch.bool)
        for a, b in itertools.combinations(range(M), 2):  # boxes [p, p + s) must not overlap on both axes
            a0, a1 = pos[todo, a], pos[todo, a] + size[todo, a].unsqueeze(1)
            b0, b1 = pos[todo, b], pos[todo, b] + size[todo, b].unsqueeze(1)
            used = n[todo] > b
            ok &= ~(((a0 < b1) & (b0 < a1)).all(1) & used)
        todo = todo[~ok]
    if len(todo):
        raise RuntimeError("random_layout: no free position found")
    return pos, size


# -- the world ----------------------------------------------------------------------------------

@dataclass
class ShapesWorld:
    """The training distribution and the prompt sets.

    ``sample_batch`` draws (images, named objects): with probability ``pair_fraction`` a seen pair
    (in random order), else a single object, which with probability ``extra_fraction`` also
    brings its uncaptioned ``companion``; captions come from ``self.caption(objs)``; caption
    dropout is the trainer's business."""

    pair_fraction: float = 0.1
    n_held_out: int = 6
    split_seed: int = 0
    naming: str = "attributes"
    extra_fraction: float = 0.0

    def __post_init__(self):
        if not 0 <= self.pair_fraction <= 1:
            raise ValueError(f"pair_fraction must lie in [0, 1], got {self.pair_fraction}")
        if not 0 <= self.extra_fraction <= 1:
            raise ValueError(f"extra_fraction must lie in [0, 1], got {self.extra_fraction}")
        _check_naming(self.naming)
        self.seen_pairs, self.held_out_pairs = split_pairs(self.n_held_out, self.split_seed)

    def to_dict(self) -> dict:
        d = {"pair_fraction": self.pair_fraction, "n_held_out": self.n_held_out, "split_seed": self.split_seed,
             "naming": self.naming}
        if self.extra_fraction:  # older run folders have no such key
            d["extra_fraction"] = self.extra_fraction
        return d

    def caption(self, objs: tuple[int, ...] | list[int]) -> str:
        return caption(objs, self.naming)

    def object_tokens(self, objs: tuple[int, ...] | list[int]) -> list[str]:
        """The object token (word) of each object of a prompt: what SepEn's losses act on."""
        return [object_token(o, self.naming) for o in objs]

    # prompt sets (ordered object tuples)
    def singles(self) -> list[tuple[int, ...]]:
        return [(o,) for o in range(len(OBJECTS))]

    def seen_prompts(self) -> list[tuple[int, ...]]:
        return [p for a, b in self.seen_pairs for p in ((a, b), (b, a))]

    def held_out_prompts(self) -> list[tuple[int, ...]]:
        return [p for a, b in self.held_out_pairs for p in ((a, b), (b, a))]

    def all_captions(self) -> list[str]:
        """Every caption the world can produce, the empty one first."""
        return [""] + [self.caption(p) for p in self.singles() + self.seen_prompts() + self.held_out_prompts()]

    def sample_batch(self, batch: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, list[tuple[int, ...]]]:
        """-> images (B, 3, 16, 16), named object tuples (the caption of row b is
        self.caption(objs[b]); an uncaptioned extra is drawn but not listed)."""
        is_pair = torch.rand(batch, generator=generator) < self.pair_fraction
        objs = torch.full((batch, 2), -1, dtype=torch.long)
        single = torch.randint(0, len(OBJECTS), (batch,), generator=generator)
        pair_idx = torch.randint(0, len(self.seen_pairs), (batch,), generator=generator)
        flip = torch.rand(batch, generator=generator) < 0.5
        seen = torch.tensor(self.seen_pairs)[pair_idx]
        seen = torch.where(flip.unsqueeze(1), seen.flip(1), seen)
        objs[:, 0] = torch.where(is_pair, seen[:, 0], single)
        objs[:, 1] = torch.where(is_pair, seen[:, 1], torch.full_like(single, -1))
        named = 1 + is_pair.long()
        if self.extra_fraction > 0:  # a single's companion takes the free second slot, uncaptioned
            extra = ~is_pair & (torch.rand(batch, generator=generator) < self.extra_fraction)
            mates = torch.tensor([companion(o) for o in range(len(OBJECTS))])[single]
            objs[:, 1] = torch.where(extra, mates, objs[:, 1])
        pos, size = random_layout((objs >= 0).sum(1), generator, max_objects=2)
        images = render(objs, pos, size)
        tuples = [tuple(int(o) for o in row[:k]) for row, k in zip(objs, named.tolist())]
        return images, tuples


def random_scenes(batch: int, generator: torch.Generator | None = None, *, max_objects: int = MAX_OBJECTS
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Detector training data: 0..max_objects arbitrary objects (repeats allowed) ->
    images (B, 3, 16, 16), present (B, 9) float multi-hot, count (B,) int64."""
    n = torch.randint(0, max_objects + 1, (batch,), generator=generator)
    objs = torch.randint(0, len(OBJECTS), (batch, max_objects), generator=generator)
    objs = torch.where(torch.arange(max_objects).unsqueeze(0) < n.unsqueeze(1), objs, torch.full_like(objs, -1))
    pos, size = random_layout(n, generator, max_objects=max_objects)
    images = render(objs, pos, size)
    present = torch.zeros(batch, len(OBJECTS))
    for m in range(max_objects):
        ok = objs[:, m] >= 0
        present[ok, objs[ok, m]] = 1.0
    return images, present, n


# -- text side ----------------------------------------------------------------------------------

def build_tokenizer(max_length: int = MAX_LENGTH, naming: str = "attributes"):
    """A word-level ``PreTrainedTokenizerFast`` over ``WORDS`` (+ ``NOUNS`` for the "nouns"
    naming; lower-cased, whitespace split), with <bos>/<eos> added and padding to ``max_length``;
    unknown words map to <unk>."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    _check_naming(naming)
    vocab = {w: i for i, w in enumerate(SPECIAL + WORDS + (NOUNS if naming == "nouns" else ()))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A <eos>", special_tokens=[
        ("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
                                   pad_token="<pad>", model_max_length=max_length)
