"""`compkern eval`: a pip-installable, offline compositional benchmark harness.

- ``suites``: deterministic GenEval-format prompt rows from a list of classes (GenEval's six
  tasks, plus NOT / OR / three-term suites), JSONL files, user prompt files;
- ``scorers``: images -> ``Detection`` lists (``ShapesScorer`` on the shapes world, ``OwlScorer``
  for OWLv2 / OWL-ViT folders, ``ClipColorScorer`` adding CLIP zero-shot colors);
- ``rules``: GenEval's correctness rules (presence, counting, color, position) plus OR;
- ``harness``: every (prompt, method) cell generated on the same seeds, scored, committed to a
  resumable run folder, and summarized with Wilson 95% intervals and contact sheets.
"""
from compkern.eval.rules import evaluate, relative_position
from compkern.eval.scorers import ClipColorScorer, Detection, OwlScorer, Scorer, ShapesScorer
from compkern.eval.suites import Vocabulary, load_prompts, make_suites, read_jsonl, shapes_vocabulary, write_jsonl

__all__ = ["ClipColorScorer", "Detection", "OwlScorer", "Scorer", "ShapesScorer", "Vocabulary", "evaluate",
           "load_prompts", "make_suites", "read_jsonl", "relative_position", "shapes_vocabulary", "write_jsonl"]
