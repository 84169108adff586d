"""Separate-and-Enhance: attention capture, token selection, to_k-only finetuning, resume, the
test-time variant, SD-folder loading, and the shapes world (tiny models, seconds)."""
import math

import pytest
import torch

from compkern.data import shapes
from compkern.models.detector import ShapeDetector, score_samples
from compkern.models.shapes import build_components
from compkern.models.unet import SDComponents, UNetEps
from compkern.samplers import ddim_sample
from compkern.train.sepen import (AttentionStore, CaptionCache, PromptSpec, SepEnConfig, SepEnFinetuner, SepEnGuidance,
                                  capture_cross_attention, cross_attention_layers, prompt_losses, token_indices)

TINY_UNET = dict(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=1,
                 cross_attention_dim=16, attention_head_dim=2, norm_num_groups=8)
RES = 4  # cross-attention runs at 4x4 for 8x8 inputs
PROMPT = "a red square and a blue ring"


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread avoids oversubscription


@pytest.fixture()
def parts():
    return build_components(TINY_UNET, seed=0)


def _spec(parts, prompt=PROMPT, words=("square", "ring")):
    return PromptSpec.build(prompt, list(words), parts.tokenizer, parts.encode)


def _direct_maps(unet, x, t, states, names):
    """softmax(Q K^T / sqrt(d)) of the named attn2 layers, from their inputs, averaged over heads and layers."""
    mods = [unet.get_submodule(n.rsplit(".processor", 1)[0]) for n in names]
    got = []

    def hook(mod, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        e = kwargs["encoder_hidden_states"]
        q, k = mod.to_q(h), mod.to_k(e)
        B, P, _ = q.shape
        H = mod.heads
        q = q.view(B, P, H, -1).transpose(1, 2).double()
        k = k.view(B, e.shape[1], H, -1).transpose(1, 2).double()
        got.append(torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1).mean(1))

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in mods]
    try:
        with torch.no_grad():
            unet(x, t, encoder_hidden_states=states)
    finally:
        for h in handles:
            h.remove()
    return torch.stack(got).mean(0)


def test_captured_maps_equal_direct_softmax_and_processors_restored(parts):
    unet = parts.unet.eval()
    names = cross_attention_layers(unet, RES)
    assert len(names) == 4 and all(".attn2." in n for n in names)
    states = parts.encode([PROMPT, "a green cross"])
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([10, 700])
    before = dict(unet.attn_processors)
    with torch.no_grad(), capture_cross_attention(unet, RES, backend="torch") as store:
        out = unet(x, t, encoder_hidden_states=states).sample
        maps = store.maps()
        inside = dict(unet.attn_processors)
    assert store.layers_seen == 4
    assert all(inside[n] is not before[n] for n in names)
    assert all(inside[n] is before[n] for n in before if n not in names)  # other layers keep theirs
    after = dict(unet.attn_processors)
    assert all(after[n] is before[n] for n in before)
    expected = _direct_maps(unet, x, t, states, names)
    assert maps.shape == (2, RES * RES, states.shape[1])
    torch.testing.assert_close(maps.double(), expected, atol=1e-5, rtol=1e-4)
    # the capture processor computes the same attention output as the default one
    with torch.no_grad():
        ref = unet(x, t, encoder_hidden_states=states).sample
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


def test_processors_restored_after_error(parts):
    unet = parts.unet
    before = dict(unet.attn_processors)
    with pytest.raises(RuntimeError):
        with capture_cross_attention(unet, RES):
            raise RuntimeError("boom")
    assert all(unet.attn_processors[n] is p for n, p in before.items())
    with pytest.raises(ValueError, match="no cross-attention layer at resolution 3"):
        with capture_cross_attention(unet, 3):
            pass


def test_token_indices_and_missing_word(parts):
    tok = parts.tokenizer
    assert token_indices(tok, PROMPT, ["square", "ring"]).tolist() == [3, 7]
    assert token_indices(tok, PROMPT, "blue").tolist() == [6]
    with pytest.raises(ValueError, match="'cat' is not in the tokenizer's vocabulary"):
        token_indices(tok, PROMPT, ["square", "cat"])
    with pytest.raises(ValueError, match="'green' does not occur in the prompt"):
        token_indices(tok, PROMPT, ["green"])


def test_losses_drop_on_fixed_batch_updating_to_k_only(parts):
    torch.manual_seed(0)
    model = parts.eps_model()
    unet = model.unet
    unet.requires_grad_(False)
    params = [p for n, p in unet.named_parameters() if "attn2.to_k" in n]
    for p in params:
        p.requires_grad_(True)
    spec = _spec(parts)
    x, t = torch.randn(4, 3, 8, 8), torch.tensor([100, 400, 700, 950])
    states = spec.states.expand(4, -1, -1)
    opt = torch.optim.Adam(params, lr=3e-2)
    store = AttentionStore(RES, backend="torch")
    totals = []
    for _ in range(12):
        with capture_cross_attention(unet, RES, store):
            model(x, t, states)
            sep, en = prompt_losses(store.maps(), [spec] * 4, backend="torch")
        loss = sep.mean() + en.mean()  # balanced: with Enhance at 0.5, Separate wins by silencing a token
        totals.append(float(loss.detach()))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert totals[-1] < 0.7 * totals[0], totals
    assert float(en.detach().mean()) < 0.5


def _finetuner(parts, out_dir, steps, w_norm=0.0):
    spec = _spec(parts)
    spec2 = _spec(parts, "a blue ring and a red square", ("ring", "square"))
    cfg = SepEnConfig(steps=steps, batch=2, lr=1e-2, resolution=RES, w_norm=w_norm, norm_batch=2, save_every=2,
                      backend="torch")
    cache = CaptionCache(parts, ["a red square", "a blue ring"])
    norm_x0 = torch.rand(4, 3, 8, 8) * 2 - 1
    norm_states = cache(["a red square", "a blue ring"] * 2)
    return SepEnFinetuner(parts.eps_model(), [spec, spec2], out_dir, cfg, norm_x0=norm_x0, norm_states=norm_states,
                          seed=3, progress=False)


def test_finetune_changes_only_attn2_to_k_and_saves(parts, tmp_path):
    before = {n: p.detach().clone() for n, p in parts.unet.named_parameters()}
    ft = _finetuner(parts, tmp_path / "run", steps=3, w_norm=0.5)
    hist = ft.fit()
    assert hist and {"loss", "sep", "en", "norm"} <= set(hist[-1])
    changed = {n for n, p in parts.unet.named_parameters() if not torch.equal(p, before[n])}
    to_k = {n for n in before if "attn2.to_k" in n}
    assert changed and changed <= to_k
    assert to_k == changed  # every cross-attention key projection trains
    assert (tmp_path / "run" / "checkpoint.pt").exists() and (tmp_path / "run" / "metrics.json").exists()
    ft.save_pretrained(tmp_path / "unet")
    from diffusers import UNet2DConditionModel
    back = UNet2DConditionModel.from_pretrained(tmp_path / "unet", local_files_only=True)
    for n, p in back.named_parameters():
        torch.testing.assert_close(p, dict(parts.unet.named_parameters())[n], atol=0, rtol=0)


def test_finetune_resume_matches_uninterrupted(tmp_path):
    a = build_components(TINY_UNET, seed=0)
    _finetuner(a, tmp_path / "straight", steps=4).fit()
    b = build_components(TINY_UNET, seed=0)
    _finetuner(b, tmp_path / "resumed", steps=2).fit()
    c = build_components(TINY_UNET, seed=0)  # a fresh process: fresh weights, state from the checkpoint
    ft = _finetuner(c, tmp_path / "resumed", steps=4)
    assert ft.step == 2
    ft.fit()
    for (n, p), (_, q) in zip(a.unet.named_parameters(), c.unet.named_parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, msg=n)
    b2 = build_components(TINY_UNET, seed=0)
    assert not torch.equal(b2.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn2.to_k.weight,
                           c.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn2.to_k.weight)


def test_finetuner_argument_checks(parts, tmp_path):
    with pytest.raises(ValueError, match="w_norm > 0 needs"):
        SepEnFinetuner(parts.eps_model(), [_spec(parts)], tmp_path, SepEnConfig(w_norm=0.5, resolution=RES))
    with pytest.raises(ValueError, match="specs must hold"):
        SepEnFinetuner(parts.eps_model(), [], tmp_path, SepEnConfig(resolution=RES))


def test_finetuner_losses_on_prompt_samples(parts, tmp_path):
    """With prompt_x0, the attention-loss rows are noised samples of their own prompt (at t = 0
    the noised sample is the sample, up to sqrt(1 - abar_0))."""
    specs = [_spec(parts), _spec(parts, "a blue ring and a red square", ("ring", "square"))]
    level = torch.tensor([0.5, -0.5])
    prompt_x0 = level.view(2, 1, 1, 1, 1).expand(2, 3, 3, 8, 8).clone()
    cfg = SepEnConfig(steps=1, batch=6, resolution=RES, t_min=0, t_max=0, backend="torch")
    with pytest.raises(ValueError, match="prompt_x0 must be a"):
        SepEnFinetuner(parts.eps_model(), specs, tmp_path / "bad", cfg, prompt_x0=prompt_x0[:1])
    ft = SepEnFinetuner(parts.eps_model(), specs, tmp_path / "run", cfg, prompt_x0=prompt_x0, progress=False)
    seen = []
    raw = ft.model.raw
    ft.model.raw = lambda x, t, states: seen.append((x, states)) or raw(x, t, states)
    ft.fit()
    x, states = seen[0]
    for b in range(6):  # the row's prompt (by its states) decides the level of its input
        k = 0 if torch.equal(states[b], specs[0].states) else 1
        assert torch.equal(states[b], specs[k].states)
        torch.testing.assert_close(x[b], torch.full_like(x[b], float(level[k])), atol=0.05, rtol=0)


def test_tta_guidance_lowers_the_losses(parts):
    model = parts.eps_model()
    spec = _spec(parts)
    B = 3
    cond = spec.states.expand(B, -1, -1)
    uncond = parts.encode([""] * B)
    x = torch.randn(B, 3, 8, 8)
    t = torch.full((B,), 900)
    g = SepEnGuidance(model, cond, uncond, [spec] * B, guidance_scale=2.0, step_size=1.0, t_stop=500,
                      resolution=RES, backend="torch")
    g0 = SepEnGuidance(model, cond, uncond, [spec] * B, guidance_scale=2.0, step_size=0.0, resolution=RES)
    e, e0 = g(x, t), g0(x, t)
    assert len(g.history) == 1 and not torch.allclose(e, e0)
    # moving x against the guidance direction (what the sampler does with eps + alpha*s*grad) lowers the loss
    store = AttentionStore(RES, backend="torch")

    def loss_at(z):
        with torch.no_grad(), capture_cross_attention(model.unet, RES, store):
            model(z, t, cond)
            sep, en = prompt_losses(store.maps(), [spec] * B, backend="torch")
        return float((sep + 0.5 * en).sum())
    d = (e - e0)
    assert loss_at(x - 1e-2 * d / d.norm()) < loss_at(x)
    out = ddim_sample(g, torch.randn(B, 3, 8, 8), model.schedule, num_steps=4, eta=1.0, clip_x0=1.0,
                      generator=torch.Generator().manual_seed(0))
    assert out.shape == (B, 3, 8, 8) and torch.isfinite(out).all()


def test_unet_eps_prediction_types():
    sched = build_components(TINY_UNET).schedule

    class Stub(torch.nn.Module):  # "predicts" a fixed tensor
        def __init__(self, y):
            super().__init__()
            self.y = y

        def forward(self, x, t, encoder_hidden_states):
            return type("Out", (), {"sample": self.y})()

    x0, noise = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    t = torch.tensor([5, 600])
    x_t = sched.add_noise(x0, noise, t)
    states = torch.zeros(2, 4, 16)
    for kind, y in (("epsilon", noise), ("v_prediction", sched.v_target(x0, noise, t)), ("sample", x0)):
        m = UNetEps(Stub(y), sched, kind)
        torch.testing.assert_close(m(x_t, t, states), noise, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(m.target(x0, noise, t), y)
    with pytest.raises(ValueError, match="prediction_type"):
        UNetEps(Stub(x0), sched, "flow")
    with pytest.raises(ValueError, match="encoder_states"):
        UNetEps(Stub(x0), sched)(x_t, t, torch.zeros(3, 4, 16))


def test_sd_folder_roundtrip_offline_and_finetune(tmp_path):
    from compkern.pipelines.tiny import save_tiny_pipeline

    path = save_tiny_pipeline(tmp_path / "sd", prediction_type="v_prediction")
    parts = SDComponents.from_pretrained(path, with_vae=True)
    assert parts.prediction_type == "v_prediction" and parts.vae is not None
    model = parts.eps_model()
    states = parts.encode(["a cat and a dog"])
    eps = model(torch.randn(1, 4, 8, 8), torch.tensor([500]), states)
    assert eps.shape == (1, 4, 8, 8) and torch.isfinite(eps).all()
    assert parts.decode(torch.randn(1, 4, 8, 8)).shape == (1, 3, 16, 16)
    # SD-style BPE: "dog" is one token, a multi-token word gives its last token
    ids = parts.tokenizer("a cat and a dog").input_ids
    idx = token_indices(parts.tokenizer, "a cat and a dog", ["cat", "dog"])
    assert ids[int(idx[1])] == parts.tokenizer.convert_tokens_to_ids("dog</w>")
    res = parts.unet.config.sample_size  # CrossAttnDownBlock2D first: attention at full latent size
    spec = PromptSpec.build("a cat and a dog", ["cat", "dog"], parts.tokenizer, parts.encode)
    ft = SepEnFinetuner(model, [spec], tmp_path / "ft", SepEnConfig(steps=2, batch=2, lr=1e-2, resolution=res,
                                                                  backend="torch"), progress=False)
    ft.fit()
    parts.vae = None  # written without vae/: decoding needs it, loading the rest does not
    parts.save_pretrained(tmp_path / "sd2")
    back = SDComponents.from_pretrained(tmp_path / "sd2")
    for (n, p), (_, q) in zip(parts.unet.named_parameters(), back.unet.named_parameters()):
        assert torch.equal(p, q), n
    with pytest.raises(ValueError, match="has no vae/"):
        SDComponents.from_pretrained(tmp_path / "sd2", with_vae=True)
    with pytest.raises(ValueError, match="not a directory"):
        SDComponents.from_pretrained(tmp_path / "nope")


def test_shapes_world_and_scoring():
    w = shapes.ShapesWorld()
    assert len(w.seen_pairs) == 12 and len(w.held_out_pairs) == 6
    assert not set(w.seen_pairs) & set(w.held_out_pairs)
    g = torch.Generator().manual_seed(0)
    imgs, objs = w.sample_batch(64, g)
    assert imgs.shape == (64, 3, 16, 16) and imgs.min() >= -1 and imgs.max() <= 1
    for o in objs:  # pairs come only from the seen split
        assert len(o) == 1 or tuple(sorted(o)) in w.seen_pairs
    assert shapes.caption((0, 5)) == "a red square and a green ring"
    # a rendered single object: its color channel is on exactly on its pixels
    one = shapes.render(torch.tensor([[4]]), torch.tensor([[[3, 3]]]), torch.tensor([[7]]))
    assert (one[0, 1] > 0).sum() == 7 * 3 * 2 - 9 and (one[0, 0] > 0).sum() == 0  # green cross, 3-wide arms

    class Oracle(torch.nn.Module):  # presence logits and counts given per image
        def __init__(self, present, count):
            super().__init__()
            self.p, self.c = present, count

        def forward(self, x):
            return (self.p * 20 - 10), torch.nn.functional.one_hot(self.c, 4).float() * 10

    prompts = [(0, 5), (0, 5), (0, 5), (0,)]
    present = torch.zeros(4, 9)
    present[0, [0, 5]] = 1          # both: success
    present[1, 0] = 1               # one object only: missing
    present[2, [2, 3]] = 1          # two objects, wrong bindings: swapped
    present[3, 0] = 1
    r = score_samples(Oracle(present, torch.tensor([2, 1, 2, 1])), torch.zeros(4, 3, 16, 16), prompts)
    assert r["success"].tolist() == [True, False, False, True]
    assert r["missing"].tolist() == [False, True, False, False]
    assert r["swapped_or_duplicated"].tolist() == [False, False, True, False]
    assert r["detected"].tolist() == [[True, True], [True, False], [False, False], [True, False]]  # past the end: False
    from compkern.train.sepen import success_rates
    res = success_rates(Oracle(present, torch.tensor([2, 1, 2, 1])), w, torch.zeros(4, 3, 16, 16), prompts)
    assert res["success"] == 0.5 and res["missing"] == 0.25
    assert res["detected_by_position"] == pytest.approx([0.75, 1 / 3])  # 2nd position: over the three pair rows only


def test_noun_naming_and_caption_parsing():
    w = shapes.ShapesWorld(naming="nouns")
    assert w.caption((0, 8)) == "a red_square and a blue_ring"
    assert w.object_tokens((0, 8)) == ["red_square", "blue_ring"]
    assert shapes.ShapesWorld().object_tokens((0, 8)) == ["square", "ring"]
    for naming in shapes.NAMINGS:
        for p in [(3,), (0, 8), (2, 4, 6)]:
            assert shapes.parse_caption(shapes.caption(p, naming), naming) == p
    tok = shapes.build_tokenizer(naming="nouns")
    ids = tok(w.caption((0, 8))).input_ids
    assert len(ids) == 7 and tok.unk_token_id not in ids  # <bos> a red_square and a blue_ring <eos>
    with pytest.raises(ValueError, match="names no object"):
        shapes.parse_caption("a red_square and a purple_ring", "nouns")
    with pytest.raises(ValueError, match="naming must be one of"):
        shapes.ShapesWorld(naming="words")


def test_frozen_samples_are_cached(tmp_path, monkeypatch):
    from compkern.train import sepen as E

    parts = build_components(TINY_UNET, seed=0)
    world = shapes.ShapesWorld()
    x0, caps = E.frozen_samples(parts, world, [(0,), (0, 8)], tmp_path / "s.pt", n=3, seed=1, steps=2)
    assert x0.shape == (6, 3, shapes.IMAGE_SIZE, shapes.IMAGE_SIZE) and caps == ["a red square"] * 3 + ["a red square and a blue ring"] * 3
    monkeypatch.setattr(E, "sample", lambda *a, **k: pytest.fail("sampled again instead of reading the cache"))
    again, caps2 = E.frozen_samples(parts, world, [(0,), (0, 8)], tmp_path / "s.pt", n=3, seed=1, steps=2)
    assert torch.equal(again, x0) and caps2 == caps


def test_sepen_cli_keeps_the_world_of_a_run(tmp_path):
    """train writes world.json; eval / finetune read it (no flags repeated); a second train of
    another world into the same folder is refused."""
    import argparse
    import json

    from compkern.experiments import sepen as E
    from compkern.utils.checkpoint import atomic_save

    def cli(*argv):
        p = argparse.ArgumentParser()
        E.add_arguments(p)
        return E.run(p.parse_args([*argv, "--out", str(tmp_path), "--no-progress"]))

    cli("train", "--what", "base", "--steps", "2", "--naming", "nouns", "--pair-fraction", "0")
    assert json.loads((tmp_path / "world.json").read_text())["naming"] == "nouns"
    atomic_save({"state_dict": ShapeDetector().state_dict()}, tmp_path / "detector.pt")
    cli("eval", "--model", "base", "--sets", "single", "--n", "1", "--sample-steps", "2")
    res = json.loads((tmp_path / "eval-base-seed0.json").read_text())
    assert "a red_square" in res["single"]["per_prompt"] and res["single"]["n"] == 9
    cli("eval", "--model", "base", "--sets", "heldout", "--n", "1", "--sample-steps", "2")  # adds, keeps "single"
    res = json.loads((tmp_path / "eval-base-seed0.json").read_text())
    assert res["single"]["n"] == 9 and res["heldout"]["n"] == 12 and res["heldout"]["settings"]["n_per_prompt"] == 1
    table = E.report(tmp_path).splitlines()
    assert len(table) == 3 and table[2].startswith("| base | 0 | ") and "(n=12)" in table[2] and "(n=9)" in table[2]
    with pytest.raises(ValueError, match="--sets"):
        cli("eval", "--model", "base", "--sets", "heldout,pairs")
    cli("finetune", "--name", "t", "--steps", "2", "--w-norm", "0")
    prompts = json.loads((tmp_path / "finetune-t" / "config.json").read_text())["prompts"]
    assert prompts == [E.shapes.caption(p, "nouns") for p in shapes.ShapesWorld().held_out_prompts()]
    assert (tmp_path / "finetune-t" / "model" / "unet").is_dir()
    cli("figure", "--name", "t", "--sample-steps", "2", "--png", str(tmp_path / "fig.png"))  # base / finetuned / TTA, detector verdicts
    assert (tmp_path / "fig.png").stat().st_size > 10_000
    with pytest.raises(ValueError, match="another world"):
        cli("train", "--what", "base", "--steps", "2")


def test_uncaptioned_companions():
    """extra_fraction: a single-object scene also holds its companion (next color, next shape),
    which its caption does not name; pairs stay as captioned; old run folders read the same."""
    palette = torch.tensor(list(shapes.COLORS.values()))

    def colors(img):  # which of the three colors an image shows
        return [bool(((img - c.view(3, 1, 1)).abs().sum(0) < 1e-6).any()) for c in palette]

    w = shapes.ShapesWorld(pair_fraction=0.0, naming="nouns", extra_fraction=1.0)
    imgs, objs = w.sample_batch(64, torch.Generator().manual_seed(0))
    assert all(len(o) == 1 for o in objs)
    for img, (o,) in zip(imgs, objs):
        c, mate = o // 3, shapes.companion(o) // 3
        assert mate != c and colors(img) == [i in (c, mate) for i in range(3)]
    none = shapes.ShapesWorld(pair_fraction=0.0, naming="nouns")
    imgs, objs = none.sample_batch(32, torch.Generator().manual_seed(0))
    assert all(sum(colors(img)) == 1 for img in imgs)
    assert sorted(shapes.companion(o) for o in range(9)) == list(range(9))  # a permutation
    assert all(shapes.OBJECTS[o][1] != shapes.OBJECTS[shapes.companion(o)][1] for o in range(9))
    assert "extra_fraction" not in none.to_dict() and shapes.ShapesWorld(**w.to_dict()) == w
    with pytest.raises(ValueError, match="extra_fraction"):
        shapes.ShapesWorld(extra_fraction=1.5)
