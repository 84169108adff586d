"""Scorers: images -> detected objects, behind one small protocol.

    scorer(images (B, 3, H, W) float in [0, 1], labels) -> list (B) of lists of Detection

A scorer returns its candidate detections of the requested ``labels`` with their scores; the
rules (``compkern.eval.rules``) keep those above the scorer's ``threshold`` (its
``counting_threshold`` on counting prompts), as GenEval keeps Mask2Former's. Adapters:

- ``ShapesScorer``: the shapes world's ``ShapeDetector`` (presence per object, no boxes: boxes
  are derived from the object's palette color in the image);
- ``OwlScorer``: a zero-shot open-vocabulary detector from transformers (OWLv2 or OWL-ViT),
  loaded from a local folder;
- ``ClipColorScorer``: wraps another scorer and sets each detection's ``color`` by CLIP zero-shot
  classification of its crop, with GenEval's prompts and colors.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol, Sequence, runtime_checkable

import torch

from compkern.eval.suites import GENEVAL_COLORS

__all__ = ["ClipColorScorer", "Detection", "OwlScorer", "Scorer", "ShapesScorer", "check_images", "check_labels"]


@dataclass(frozen=True)
class Detection:
    """One detected object: ``label`` (a requested class), ``box`` (x0, y0, x1, y1) in pixels of the
    scored image, ``score`` in [0, 1], ``color`` (a color word, or None when the scorer gives none)."""

    label: str
    box: tuple[float, float, float, float]
    score: float
    color: str | None = None

    def __post_init__(self):
        vals = (*self.box, self.score)
        if len(self.box) != 4 or not all(math.isfinite(float(v)) for v in vals):
            raise ValueError(f"Detection needs a finite box (x0, y0, x1, y1) and score, got box={self.box}, "
                             f"score={self.score}")

    def to_dict(self) -> dict:
        return {"label": self.label, "box": [round(float(v), 3) for v in self.box], "score": round(float(self.score), 5),
                "color": self.color}


@runtime_checkable
class Scorer(Protocol):
    """images (B, 3, H, W) float in [0, 1], labels -> per image, the candidate detections of those
    labels. ``threshold`` / ``counting_threshold``: the scores above which a detection counts."""

    threshold: float
    counting_threshold: float

    def __call__(self, images: torch.Tensor, labels: Sequence[str]) -> list[list[Detection]]: ...


def check_images(images: torch.Tensor) -> torch.Tensor:
    """images must be a finite float (B, 3, H, W) tensor in [0, 1]; returned as fp32 on the CPU."""
    if not isinstance(images, torch.Tensor) or not images.is_floating_point():
        raise TypeError(f"images must be a float tensor (B, 3, H, W) in [0, 1], got {type(images).__name__}"
                        + (f" {images.dtype}" if isinstance(images, torch.Tensor) else ""))
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
    x = images.detach().float().cpu()
    if not torch.isfinite(x).all():
        raise ValueError("images hold NaN or inf values")
    if x.numel() and (x.min() < -1e-4 or x.max() > 1 + 1e-4):
        raise ValueError(f"images must lie in [0, 1], got [{float(x.min()):.3g}, {float(x.max()):.3g}]")
    return x.clamp(0, 1)


def check_labels(labels: Sequence[str]) -> list[str]:
    labels = [labels] if isinstance(labels, str) else list(labels)
    if not labels or any(not isinstance(x, str) or not x.strip() for x in labels):
        raise ValueError(f"labels must be a non-empty list of class names, got {labels!r}")
    return list(dict.fromkeys(labels))


# -- the shapes world -------------------------------------------------------------------------------
class ShapesScorer:
    """The shapes world's ``ShapeDetector`` as a scorer.

    The detector predicts, per image, a presence probability for each of the nine objects and a
    total object count; it has no boxes. Each requested label (a noun 'red_square' or 'red square')
    gets one Detection with score = its presence probability, color = the object's color, and
    box = the bounding box of the pixels drawn in that object's palette color (its color channel
    > 0.5, the other two < 0.5; the world draws every object in one pure color on black), the
    whole image when no such pixel exists. So presence, NOT, OR and (for objects of different
    colors) position can be scored; a class is never counted more than once (counting is out of
    reach), and two objects of the same color share a box."""

    def __init__(self, detector: torch.nn.Module, threshold: float | None = None):
        from compkern.models.detector import DETECTION_THRESHOLD

        self.detector = detector.eval()
        self.threshold = DETECTION_THRESHOLD if threshold is None else float(threshold)
        self.counting_threshold = self.threshold

    @classmethod
    def from_folder(cls, path: str | os.PathLike, threshold: float | None = None) -> "ShapesScorer":
        """The detector of a `compkern sepen train` folder (``path/detector.pt``)."""
        from compkern.train.sepen import load_detector

        p = Path(path)
        if not (p / "detector.pt").is_file():
            raise ValueError(f"scorer folder {str(p)!r} holds no detector.pt (run `compkern sepen train --what detector "
                             f"--out {p}`)")
        return cls(load_detector(p), threshold)

    @staticmethod
    def label_ids(labels: Sequence[str]) -> list[int]:
        from compkern.data import shapes

        names = {**{n: i for i, n in enumerate(shapes.NOUNS)},
                 **{shapes.object_name(i): i for i in range(len(shapes.OBJECTS))}}
        bad = [x for x in labels if x not in names]
        if bad:
            raise ValueError(f"labels {bad} are not objects of the shapes world; use {list(shapes.NOUNS)}")
        return [names[x] for x in labels]

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, labels: Sequence[str]) -> list[list[Detection]]:
        from compkern.data import shapes

        x = check_images(images)
        labels = check_labels(labels)
        ids = self.label_ids(labels)
        prob = self.detector(x * 2 - 1)[0].sigmoid()  # (B, 9)
        palette = torch.tensor(list(shapes.COLORS.values())) > 0  # (3 colors, 3 channels) which channels are on
        on = x > 0.5  # (B, 3, H, W)
        B, _, H, W = x.shape
        out: list[list[Detection]] = []
        for b in range(B):
            dets = []
            for label, o in zip(labels, ids):
                c = o // len(shapes.SHAPES)
                mask = (on[b] == palette[c].view(3, 1, 1)).all(0)
                ys, xs = torch.nonzero(mask, as_tuple=True)
                box = (0.0, 0.0, float(W), float(H)) if len(xs) == 0 else \
                    (float(xs.min()), float(ys.min()), float(xs.max()) + 1, float(ys.max()) + 1)
                dets.append(Detection(label, box, float(prob[b, o]), shapes.OBJECTS[o][0]))
            out.append(dets)
        return out


# -- transformers -----------------------------------------------------------------------------------
def _local_folder(path: str | os.PathLike, what: str) -> Path:
    p = Path(path)
    if not (p / "config.json").is_file():
        raise ValueError(f"{what} folder {str(p)!r} does not exist or holds no config.json (a transformers "
                         "save_pretrained folder with its processor)")
    return p


def _to_pil(images: torch.Tensor) -> list:
    from PIL import Image

    arr = (images.permute(0, 2, 3, 1).numpy() * 255).round().astype("uint8")
    return [Image.fromarray(a) for a in arr]


class OwlScorer:
    """A zero-shot open-vocabulary detector: ``Owlv2ForObjectDetection`` or
    ``OwlViTForObjectDetection`` and its processor, from a local folder (``local_files_only``).

    Each label is queried as ``query.format(label)``; the boxes scoring at least ``threshold``
    (OWL's usual 0.1; not calibrated against GenEval's Mask2Former at 0.3 / 0.9) are kept, per
    label greedily de-duplicated at ``nms_iou`` (OWL gives one box per image patch), at most
    ``max_objects`` per label. OWLv2 pads images to a square: its boxes are read on that square and
    clipped to the image."""

    def __init__(self, path: str | os.PathLike, *, threshold: float = 0.1, counting_threshold: float | None = None,
                 query: str = "a photo of a {}", nms_iou: float = 0.5, max_objects: int = 16,
                 device: str | torch.device = "cpu"):
        from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

        p = _local_folder(path, "OWL detector")
        if not 0 <= threshold <= 1:
            raise ValueError(f"threshold must lie in [0, 1], got {threshold}")
        if "{}" not in query:
            raise ValueError(f"query must contain '{{}}', got {query!r}")
        self.processor = AutoProcessor.from_pretrained(p, local_files_only=True)
        self.model = AutoModelForZeroShotObjectDetection.from_pretrained(p, local_files_only=True).to(device).eval()
        kind = type(self.model).__name__
        if kind not in ("Owlv2ForObjectDetection", "OwlViTForObjectDetection"):
            raise ValueError(f"OWL detector folder {str(p)!r} holds a {kind}, expected Owlv2ForObjectDetection or "
                             "OwlViTForObjectDetection")
        self.square = kind.startswith("Owlv2")
        self.threshold = float(threshold)
        self.counting_threshold = float(threshold if counting_threshold is None else counting_threshold)
        self.query, self.nms_iou, self.max_objects = query, nms_iou, max_objects

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, labels: Sequence[str]) -> list[list[Detection]]:
        from compkern.eval.rules import nms

        x = check_images(images)
        labels = check_labels(labels)
        B, _, H, W = x.shape
        queries = [self.query.format(label) for label in labels]
        inputs = self.processor(text=[queries] * B, images=_to_pil(x), return_tensors="pt")
        inputs = {k: v.to(self.model.device) for k, v in inputs.items()}
        outputs = self.model(**inputs)
        side = max(H, W)
        sizes = [(side, side) if self.square else (H, W)] * B
        keep = min(self.threshold, self.counting_threshold)
        res = self.processor.post_process_grounded_object_detection(outputs, threshold=keep, target_sizes=sizes)
        out = []
        for r in res:
            dets = []
            for box, s, k in zip(r["boxes"].tolist(), r["scores"].tolist(), r["labels"].tolist()):
                x0, y0, x1, y1 = (min(max(v, 0.0), lim) for v, lim in zip(box, (W, H, W, H)))
                dets.append(Detection(labels[int(k)], (x0, y0, x1, y1), float(s)))
            out.append(nms(dets, self.nms_iou, self.max_objects))
        return out


class ClipColorScorer:
    """Adds colors to another scorer's detections: CLIP zero-shot classification of each
    detection's crop (those scoring at least the base scorer's lower threshold) over ``colors``
    (GenEval's ten), with GenEval's three prompts per color ("a photo of a {c} {label}", "a photo
    of a {c}-colored {label}", "a photo of a {c} object"; their normalized text embeddings averaged).
    GenEval also masks the crop by Mask2Former's segment; boxes only here. The CLIP model and its
    processor come from a local folder (``local_files_only``)."""

    TEMPLATES = ("a photo of a {c} {label}", "a photo of a {c}-colored {label}", "a photo of a {c} object")

    def __init__(self, base: Scorer, path: str | os.PathLike, *, colors: Sequence[str] = GENEVAL_COLORS,
                 device: str | torch.device = "cpu"):
        from transformers import AutoProcessor, CLIPModel

        if not callable(base):
            raise TypeError(f"base must be a scorer (callable images, labels -> detections), got {type(base).__name__}")
        colors = list(colors)
        if len(colors) < 2:
            raise ValueError(f"colors must hold at least two color words, got {colors}")
        p = _local_folder(path, "CLIP color")
        self.base, self.colors = base, colors
        self.processor = AutoProcessor.from_pretrained(p, local_files_only=True)
        self.model = CLIPModel.from_pretrained(p, local_files_only=True).to(device).eval()
        self._text: dict[str, torch.Tensor] = {}

    @property
    def threshold(self) -> float:
        return self.base.threshold

    @property
    def counting_threshold(self) -> float:
        return self.base.counting_threshold

    def _classifier(self, label: str) -> torch.Tensor:
        """(n colors, D) unit text embeddings for ``label``."""
        if label not in self._text:
            prompts = [t.format(c=c, label=label) for c in self.colors for t in self.TEMPLATES]
            tok = self.processor.tokenizer(prompts, padding=True, truncation=True, return_tensors="pt")
            e = self.model.get_text_features(**{k: v.to(self.model.device) for k, v in tok.items()})
            e = getattr(e, "pooler_output", e)
            e = torch.nn.functional.normalize(e.float(), dim=-1).view(len(self.colors), len(self.TEMPLATES), -1).mean(1)
            self._text[label] = torch.nn.functional.normalize(e, dim=-1)
        return self._text[label]

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, labels: Sequence[str]) -> list[list[Detection]]:
        x = check_images(images)
        dets = self.base(x, labels)
        keep = min(self.threshold, self.counting_threshold)
        crops, where = [], []
        for b, ds in enumerate(dets):
            for j, d in enumerate(ds):
                if d.score >= keep:
                    x0, y0, x1, y1 = d.box
                    xs, ys = int(math.floor(x0)), int(math.floor(y0))
                    xe, ye = max(int(math.ceil(x1)), xs + 1), max(int(math.ceil(y1)), ys + 1)
                    crops.append(x[b:b + 1, :, ys:ye, xs:xe])
                    where.append((b, j))
        if not crops:
            return dets
        pix = self.processor.image_processor(images=[p for c in crops for p in _to_pil(c)], return_tensors="pt")
        img = self.model.get_image_features(pixel_values=pix["pixel_values"].to(self.model.device))
        img = torch.nn.functional.normalize(getattr(img, "pooler_output", img).float(), dim=-1)
        out = [list(ds) for ds in dets]
        for (b, j), e in zip(where, img):
            d = out[b][j]
            c = int((self._classifier(d.label) @ e).argmax())
            out[b][j] = replace(d, color=self.colors[c])
        return out
