"""`compkern eval` (compkern.eval): suite generation, GenEval's rules on synthetic detections,
each scorer adapter on tiny random models, the harness (resume, accounting) and bad input."""
from __future__ import annotations

import json

import pytest
import torch

from compkern.cli import main
from compkern.data import shapes
from compkern.eval import harness as H
from compkern.eval import rules as R
from compkern.eval import suites as SU
from compkern.eval.scorers import ClipColorScorer, Detection, OwlScorer, ShapesScorer
from compkern.models.detector import ShapeDetector

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL_UNET = dict(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(8, 16),
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=1,
                  cross_attention_dim=16, attention_head_dim=2, norm_num_groups=8)


# -- suites ---------------------------------------------------------------------------------------
def test_suites_are_deterministic_and_seeded(tmp_path):
    vocab = SU.Vocabulary(SU.COCO_CLASSES)
    a = SU.write_jsonl(SU.make_suites("geneval,not,or,three", vocab, 3, seed=0), tmp_path / "a.jsonl").read_bytes()
    b = SU.write_jsonl(SU.make_suites(["geneval", "not", "or", "three"], vocab, 3, seed=0), tmp_path / "b.jsonl").read_bytes()
    c = SU.write_jsonl(SU.make_suites("geneval,not,or,three", vocab, 3, seed=1), tmp_path / "c.jsonl").read_bytes()
    assert a == b and a != c
    rows = SU.read_jsonl(tmp_path / "a.jsonl")
    assert [r["tag"] for r in rows[::3]] == [*SU.GENEVAL_TAGS, "not", "or", "and_not", "or_not"]
    # a suite's rows do not depend on the other suites asked for
    assert SU.make_suites("not", vocab, 3) == [r for r in rows if r["suite"] == "not"]
    by = {r["tag"]: r for r in rows}
    assert by["counting"]["include"][0]["count"] + 1 == by["counting"]["exclude"][0]["count"]
    assert by["position"]["include"][1]["position"][1] == 0
    assert by["not"]["expression"] == f"{by['not']['prompt']} AND NOT {SU.Vocabulary(SU.COCO_CLASSES).phrase(by['not']['exclude'][0]['class'])}"
    assert len({r["expression"] for r in rows if r["tag"] == "two_object"}) == 3  # no repeats


def test_shapes_vocabulary_limits_geneval_and_pairs_companions():
    v = SU.shapes_vocabulary()
    rows = SU.make_suites("geneval,not,three", v, 9)
    assert {r["tag"] for r in rows if r["suite"] == "geneval"} == {"single_object", "two_object"}
    nots = [r for r in rows if r["tag"] == "not"]
    assert sorted(r["include"][0]["class"] for r in nots) == sorted(shapes.NOUNS)  # every object once
    for r in nots:  # NOT excludes the object's uncaptioned companion
        a = shapes.NOUNS.index(r["include"][0]["class"])
        assert r["exclude"][0]["class"] == shapes.NOUNS[shapes.companion(a)]
        assert r["expression"] == f"a {shapes.NOUNS[a]} AND NOT a {shapes.NOUNS[shapes.companion(a)]}"
    assert all(shapes.parse_caption(r["prompt"], "nouns") for r in rows)  # the world's own captions
    with pytest.raises(ValueError, match="counting.*numbers|numbers"):
        SU.make_suites("counting", v, 2)
    with pytest.raises(ValueError, match="unknown"):
        SU.make_suites("geneval,nand", v, 2)
    with pytest.raises(ValueError, match="n"):
        SU.make_suites("not", v, 0)


def test_prompt_files(tmp_path):
    geneval = tmp_path / "evaluation_metadata.jsonl"
    geneval.write_text(
        '{"tag": "two_object", "include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1}], '
        '"prompt": "a photo of a dog and a cat"}\n'
        '{"tag": "counting", "include": [{"class": "pizza", "count": 3}], "exclude": [{"class": "pizza", "count": 4}], '
        '"prompt": "a photo of three pizzas"}\n')
    vocab = SU.Vocabulary(SU.COCO_CLASSES)
    rows = SU.load_prompts(geneval, vocab)
    assert [r["expression"] for r in rows] == ["a photo of a dog AND a photo of a cat", "a photo of three pizzas"]
    assert rows[1]["exclude"] == [{"class": "pizza", "count": 4}] and rows[0]["suite"] == "file"
    text = tmp_path / "prompts.txt"
    text.write_text("# comment\na photo of a dog AND NOT a photo of a cat\n(a photo of a dog OR a photo of a red car) "
                    "AND NOT a photo of a bus\n")
    a, b = SU.load_prompts(text, vocab)
    assert a["include"] == [{"class": "dog", "count": 1}] and a["exclude"] == [{"class": "cat", "count": 1}]
    assert a["prompt"] == "a photo of a dog"
    assert b["any"] == [{"class": "dog", "count": 1}, {"class": "car", "count": 1, "color": "red"}]
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(ValueError, match="empty"):
        SU.load_prompts(empty, vocab)
    with pytest.raises(ValueError, match="does not exist"):
        SU.load_prompts(tmp_path / "missing.jsonl", vocab)
    bad = tmp_path / "bad.txt"
    bad.write_text("a photo of a unicorn AND NOT a photo of a cat\n")
    with pytest.raises(ValueError, match="unicorn"):
        SU.load_prompts(bad, vocab)
    noclause = tmp_path / "noclause.jsonl"
    noclause.write_text('{"prompt": "a photo of a dog"}\n')
    with pytest.raises(ValueError, match="clause"):
        SU.load_prompts(noclause, vocab)


# -- rules ----------------------------------------------------------------------------------------
def D(label, box, score=0.9, color=None):
    return Detection(label, tuple(float(v) for v in box), score, color)


def test_rules_presence_counting_not_or():
    dog, cat = D("dog", (0, 0, 10, 10)), D("cat", (20, 0, 30, 10), 0.5)
    two = {"tag": "two_object", "include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1}]}
    assert R.evaluate(two, [dog, cat], threshold=0.3)[0]
    ok, why = R.evaluate(two, [dog, cat], threshold=0.6)  # the cat scores below the threshold
    assert not ok and "cat>=1, found 0" in why
    count2 = {"tag": "counting", "include": [{"class": "dog", "count": 2}], "exclude": [{"class": "dog", "count": 3}]}
    dogs = [D("dog", (i * 10, 0, i * 10 + 8, 8), s) for i, s in enumerate((0.95, 0.92, 0.5))]
    assert R.evaluate(count2, dogs, threshold=0.3, counting_threshold=0.9)[0]  # the third is below 0.9
    ok, why = R.evaluate(count2, dogs, threshold=0.3, counting_threshold=0.3)  # exactly two fails with three
    assert not ok and "dog<3, found 3" in why
    assert not R.evaluate(count2, dogs[:1], threshold=0.3, counting_threshold=0.9)[0]
    no_cat = {"tag": "not", "include": [{"class": "dog", "count": 1}], "exclude": [{"class": "cat", "count": 1}]}
    assert not R.evaluate(no_cat, [dog, cat], threshold=0.3)[0]
    assert R.evaluate(no_cat, [dog, cat], threshold=0.6)[0]  # NOT: not detected above the threshold
    either = {"tag": "or", "any": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1}]}
    assert R.evaluate(either, [cat], threshold=0.3)[0] and R.evaluate(either, [dog], threshold=0.3)[0]
    ok, why = R.evaluate(either, [], threshold=0.3)
    assert not ok and why.startswith("none of")
    or_not = {**either, "exclude": [{"class": "bus", "count": 1}]}
    assert not R.evaluate(or_not, [cat, D("bus", (0, 0, 5, 5))], threshold=0.3)[0]


def test_rules_position_and_color():
    # GenEval: offset shrunk by 0.1 x (sum of sizes) per axis, then divided by the offset's length
    a, b = D("dog", (0, 0, 10, 10)), D("cat", (20, 0, 30, 10))
    assert R.relative_position(a, b) == {"left of"} and R.relative_position(b, a) == {"right of"}
    assert R.relative_position(D("x", (0, 0, 10, 10)), D("y", (0, 30, 10, 40))) == {"above"}
    assert R.relative_position(D("x", (0, 0, 10, 10)), D("y", (1, 1, 11, 11))) == set()  # within the margin
    # diagonal at 45 degrees: |dx| = |dy| = (10 - 2) / sqrt(200) = 0.566 > 0.5 on both axes
    assert R.relative_position(D("x", (0, 0, 10, 10)), D("y", (10, 10, 20, 20))) == {"left of", "above"}
    # at a shallower angle only one axis passes 0.5: offset (20, 5), shrunk (18, 3) / 20.6
    assert R.relative_position(D("x", (20, 5, 30, 15)), D("y", (0, 0, 10, 10))) == {"right of"}
    pos = {"tag": "position", "include": [{"class": "cat", "count": 1},
                                          {"class": "dog", "count": 1, "position": ["left of", 0]}]}
    assert R.evaluate(pos, [a, b], threshold=0.3)[0]
    ok, why = R.evaluate(pos, [D("dog", (40, 0, 50, 10)), b], threshold=0.3)
    assert not ok and "expected dog left of target, found right of" in why
    assert "no target" in R.evaluate(pos, [a], threshold=0.3)[1]
    red = {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}]}
    assert R.evaluate(red, [D("car", (0, 0, 5, 5), color="red")], threshold=0.3)[0]
    # only the most confident car's color counts (GenEval)
    cars = [D("car", (0, 0, 5, 5), 0.6, "red"), D("car", (9, 9, 14, 14), 0.8, "blue")]
    assert not R.evaluate(red, cars, threshold=0.3)[0]
    with pytest.raises(ValueError, match="ClipColorScorer"):
        R.evaluate(red, [D("car", (0, 0, 5, 5))], threshold=0.3)
    assert R.nms([D("a", (0, 0, 10, 10), 0.9), D("a", (1, 0, 10, 10), 0.8), D("a", (30, 0, 40, 10), 0.7)], 0.5) == \
        [D("a", (0, 0, 10, 10), 0.9), D("a", (30, 0, 40, 10), 0.7)]
    with pytest.raises(ValueError, match="finite"):
        D("a", (0, 0, float("nan"), 1))


def test_wilson_interval():
    assert H.wilson(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert H.wilson(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert H.wilson(16, 16)[1] == 1.0


# -- scorers --------------------------------------------------------------------------------------
def test_shapes_scorer_boxes_and_scores():
    torch.manual_seed(0)
    det = ShapeDetector().eval()
    objs = torch.tensor([[0, 8, -1], [4, -1, -1]])  # red_square + blue_ring; green_cross
    pos = torch.tensor([[[1, 2], [8, 9], [0, 0]], [[5, 3], [0, 0], [0, 0]]])
    size = torch.tensor([[6, 7, 6], [6, 6, 6]])
    x = shapes.render(objs, pos, size)  # [-1, 1]
    scorer = ShapesScorer(det)
    dets = scorer((x + 1) / 2, ["red_square", "blue_ring", "green cross"])
    prob = det(x)[0].sigmoid()
    assert [d.label for d in dets[0]] == ["red_square", "blue_ring", "green cross"]
    assert [d.score for d in dets[0]] == pytest.approx(prob[0, [0, 8, 4]].tolist())
    assert dets[0][0].box == (2.0, 1.0, 8.0, 7.0)  # x0, y0, x1, y1 of the square drawn at (y, x) = (1, 2), side 6
    assert dets[0][1].box[0] >= 9 and dets[0][1].box[2] <= 16  # the ring inside its 7 x 7 box at x = 9
    assert dets[0][0].color == "red" and dets[1][2].box == (3.0, 5.0, 9.0, 11.0)
    assert dets[1][0].box == (0.0, 0.0, 16.0, 16.0)  # no red pixel: the whole image
    assert R.relative_position(dets[0][0], dets[0][1]) == {"left of", "above"}
    with pytest.raises(ValueError, match="not objects"):
        scorer((x + 1) / 2, ["unicorn"])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        scorer(x, ["red_square"])
    with pytest.raises(ValueError, match="NaN"):
        scorer(torch.full((1, 3, 16, 16), float("nan")), ["red_square"])
    with pytest.raises(ValueError, match="detector.pt"):
        ShapesScorer.from_folder("/nonexistent/world")


def _tiny_tokenizer(tmp_path):
    from transformers import CLIPTokenizer

    from compkern.pipelines.tiny import write_tiny_clip_tokenizer_files

    vocab, merges = write_tiny_clip_tokenizer_files(tmp_path / "tok")
    return CLIPTokenizer(str(vocab), str(merges), model_max_length=16)


def _configs(tok):
    text = dict(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=16, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)
    return text, vision


@pytest.mark.parametrize("kind", ["owlv2", "owlvit"])
def test_owl_scorer_on_tiny_random_model(tmp_path, kind):
    import transformers as T

    tok = _tiny_tokenizer(tmp_path)
    text, vision = _configs(tok)
    size = {"height": 32, "width": 32}
    if kind == "owlv2":
        model = T.Owlv2ForObjectDetection(T.Owlv2Config(text_config=text, vision_config=vision, projection_dim=16))
        proc = T.Owlv2Processor(image_processor=T.Owlv2ImageProcessorPil(size=size), tokenizer=tok)
    else:
        model = T.OwlViTForObjectDetection(T.OwlViTConfig(text_config=text, vision_config=vision, projection_dim=16))
        proc = T.OwlViTProcessor(image_processor=T.OwlViTImageProcessorPil(size=size, crop_size=size), tokenizer=tok)
    model.eval().save_pretrained(tmp_path / kind)
    proc.save_pretrained(tmp_path / kind)
    scorer = OwlScorer(tmp_path / kind, threshold=0.0, nms_iou=1.0)
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    labels = ["dog", "cat"]
    dets = scorer(images, labels)
    assert len(dets) == 2 and all(d.label in labels for ds in dets for d in ds)
    assert all(0 <= d.box[0] <= d.box[2] <= 16 and 0 <= d.box[1] <= d.box[3] <= 16 for ds in dets for d in ds)
    # each patch's box carries its best query (transformers' post-processing): the best score of a
    # label is the model's best sigmoid logit among the patches whose best query it is
    inputs = proc(text=[["a photo of a dog", "a photo of a cat"]] * 2, images=[(images[b].permute(1, 2, 0).numpy() * 255)
                  .round().astype("uint8") for b in range(2)], return_tensors="pt")
    with torch.no_grad():
        best, arg = model(**inputs).logits.max(-1)  # (B, patches)
    best = best.sigmoid()
    for b in range(2):
        for k, label in enumerate(labels):
            mine = [d.score for d in dets[b] if d.label == label]
            if (arg[b] == k).any():
                assert max(mine) == pytest.approx(float(best[b][arg[b] == k].max()), abs=1e-5)
            assert len(mine) == int((arg[b] == k).sum())
    assert sum(map(len, OwlScorer(tmp_path / kind, threshold=0.999)(images, labels))) < sum(map(len, dets))
    with pytest.raises(ValueError, match="config.json"):
        OwlScorer(tmp_path / "missing")


def test_clip_color_scorer_on_tiny_random_model(tmp_path):
    import transformers as T

    tok = _tiny_tokenizer(tmp_path)
    text, vision = _configs(tok)
    clip = T.CLIPModel(T.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    proc = T.CLIPProcessor(image_processor=T.CLIPImageProcessorPil(size={"shortest_edge": 32},
                                                                  crop_size={"height": 32, "width": 32}), tokenizer=tok)
    clip.save_pretrained(tmp_path / "clip")
    proc.save_pretrained(tmp_path / "clip")

    class Fixed:  # a base scorer with known boxes
        threshold = counting_threshold = 0.5

        def __call__(self, images, labels):
            return [[D("car", (2, 2, 10, 12), 0.9), D("car", (0, 0, 16, 16), 0.1)] for _ in range(len(images))]

    colors = ["red", "blue", "green"]
    scorer = ClipColorScorer(Fixed(), tmp_path / "clip", colors=colors)
    scorer.TEMPLATES = ("a photo of a {c} {label}",)  # one prompt per color: CLIP's own logits decide
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 3, 16, 16, generator=g)
    images[1, :, 2:12, 2:10] = images[0, :, 2:12, 2:10]  # same crop, different surroundings
    out = scorer(images, ["car"])
    assert out[0][1].color is None  # below the base scorer's threshold: not classified
    assert out[0][0].color == out[1][0].color  # the crop alone decides
    crops = [(images[b, :, 2:12, 2:10].permute(1, 2, 0).numpy() * 255).round().astype("uint8") for b in range(3)]
    inputs = proc(text=[f"a photo of a {c} car" for c in colors], images=crops, return_tensors="pt", padding=True, truncation=True)
    with torch.no_grad():
        want = clip(**inputs).logits_per_image.argmax(1)
    assert [o[0].color for o in out] == [colors[int(k)] for k in want]
    with pytest.raises(ValueError, match="config.json"):
        ClipColorScorer(Fixed(), tmp_path / "nope")


# -- the harness ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """An untrained pixel-space shapes world (small UNet) with a random detector."""
    from compkern.models.shapes import build_components
    from compkern.utils.checkpoint import atomic_save

    path = tmp_path_factory.mktemp("eval") / "world"
    build_components(SMALL_UNET, naming="nouns").save_pretrained(path / "base" / "model")
    atomic_save({"state_dict": ShapeDetector().state_dict()}, path / "detector.pt")
    return path


TINY = ["--n-prompts", "1", "--n", "2", "--sample-steps", "2", "--batch-size", "2", "--no-progress"]


def test_cli_end_to_end_and_accounting(world, tmp_path):
    out = tmp_path / "ev"
    args = ["eval", "--model", str(world / "base" / "model"), "--suites", "not,or", "--methods", "none,complift,perp",
            "--out", str(out), *TINY]
    assert main(args) == 0
    cells = sorted(p.name for p in (out / "cells").glob("*.pt"))
    assert cells == ["not-not-000-complift.pt", "not-not-000-none.pt", "not-not-000-perp.pt",
                     "or-or-000-complift.pt", "or-or-000-none.pt"]  # perp only where there is a NOT
    res = json.loads((out / "results.json").read_text())
    rows = {(r["suite"], r["method"]): r for r in res["rows"]}
    assert rows[("not", "none")]["rows_per_image"] == 2 * 2  # (uncond + prompt) x 2 steps
    assert rows[("not", "perp")]["rows_per_image"] == 3 * 2  # + the NOT term
    # complift on a NOT: 3 rows x 2 steps of generation + 3 rows x FIXED_TRIALS fixed trials
    from compkern.pipelines.lift_maps import FIXED_TRIALS

    assert rows[("not", "complift")]["rows_per_image"] == 3 * 2 + 3 * FIXED_TRIALS
    per_image = [json.loads(x) for x in (out / "images.jsonl").read_text().splitlines()]
    assert len(per_image) == 5 * 2 and all((out / r["image"]).is_file() for r in per_image)
    assert {r["accepted"] is None for r in per_image if r["method"] != "complift"} == {True}
    lift = [r for r in per_image if r["method"] == "complift"]
    for s in ("not", "or"):
        acc = [r for r in lift if r["suite"] == s and r["accepted"]]
        assert rows[(s, "complift")]["judged"] == len(acc)
        assert rows[(s, "complift")]["acceptance"] == len(acc) / 2
    assert (out / "sheets" / "not-complift.png").is_file() and (out / "table.md").is_file()
    assert SU.read_jsonl(out / "suites.jsonl") == SU.make_suites("not,or", SU.shapes_vocabulary(), 1)
    # same settings: nothing left to do; other settings: refused
    stamp = (out / "cells" / cells[0]).stat().st_mtime_ns
    assert main(args) == 0
    assert (out / "cells" / cells[0]).stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="other settings"):
        main([*args, "--seed", "3"])


def test_resume_after_interruption_equals_uninterrupted(world, tmp_path):
    from compkern.pipelines.composition import CompositionPipeline
    from compkern.utils.run_folder import RunFolder

    pipe = CompositionPipeline.from_pretrained(world / "base" / "model")
    scorer = ShapesScorer.from_folder(world)
    rows = SU.make_suites("not", SU.shapes_vocabulary(), 1)
    opts = H.EvalOptions(model=str(world), n=2, steps=2, batch_size=1, guidance=3.0, eta=1.0)
    methods = ["none", "complift"]
    full = RunFolder(tmp_path / "full", {"x": 1})
    H.run(pipe, scorer, rows, methods, opts, full, progress=False)

    class Stop(Exception):
        pass

    def stop(key):
        raise Stop(key)

    part = RunFolder(tmp_path / "part", {"x": 1})
    with pytest.raises(Stop):
        H.run(pipe, scorer, rows, methods, opts, part, progress=False, on_cell=stop)
    assert len(list((tmp_path / "part" / "cells").glob("*.pt"))) == 1
    done = H.run(pipe, scorer, rows, methods, opts, part, progress=False)
    assert done == [H.cell_key(rows[0], "complift")]
    for f in sorted((tmp_path / "full" / "cells").glob("*.pt")):
        a, b = full.load(f"cells/{f.name}"), part.load(f"cells/{f.name}")
        assert a["records"] == b["records"] and torch.equal(a["images"], b["images"])
        assert a["rows_per_image"] == b["rows_per_image"]
    strip = lambda t: [ln.rsplit("|", 2)[0] for ln in t.splitlines()]  # noqa: E731 (wall time differs)
    assert strip(H.report(full, sheets=False)) == strip(H.report(part, sheets=False))


def test_bad_input(world, tmp_path):
    model = str(world / "base" / "model")
    base = ["eval", "--model", model, "--out", str(tmp_path / "o"), *TINY]
    with pytest.raises(ValueError, match="suites: unknown"):
        main([*base, "--suites", "geneval,xor"])
    with pytest.raises(ValueError, match="methods: unknown"):
        main([*base, "--methods", "none,magic"])
    with pytest.raises(ValueError, match="detector.pt"):
        main([*base, "--scorer", f"shapes:{tmp_path / 'nowhere'}"])
    with pytest.raises(ValueError, match="config.json"):
        main([*base, "--scorer", f"owl:{tmp_path / 'nowhere'}"])
    with pytest.raises(ValueError, match="--scorer"):
        main([*base, "--scorer", "yolo:x"])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty"):
        main([*base, "--prompts", str(empty)])
    with pytest.raises(ValueError, match="--model"):
        main(["eval", "--model", str(tmp_path), "--out", str(tmp_path / "o2"), *TINY])
    with pytest.raises(ValueError, match="n must be"):
        H.EvalOptions(model=model, n=0)
