"""ConditionalMLP, the RRR energy wrapper and the denoising trainer."""
import pytest
import torch

from compkern.models import ConditionalMLP, EnergyEps, EnergyMLP, NoiseSchedule, is_energy_model
from compkern.samplers import ddpm_sample, product
from compkern.train.denoise import train_eps_model

SCHED = NoiseSchedule.cosine(50)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread avoids oversubscription


def _inputs(n=6, classes=3, steps=50):
    return torch.randn(n, 2), torch.randint(0, steps, (n,)), torch.randint(0, classes + 1, (n,))


def test_conditional_mlp_shapes_and_null_id():
    m = ConditionalMLP(3, hidden=32, depth=2, num_steps=50)
    x, t, c = _inputs()
    assert m.null_id == 3 and not is_energy_model(m)
    assert m(x, t, c).shape == (6, 2)
    assert torch.equal(m(x, t, c), torch.zeros(6, 2))  # zero-initialized head
    for p in m.parameters():  # the condition changes the output once the zero inits are perturbed
        torch.nn.init.normal_(p, std=0.3)
    a = m(x, t, torch.zeros(6, dtype=torch.long))
    b = m(x, t, torch.full((6,), 3))
    assert not torch.allclose(a, b)


def test_conditional_mlp_bad_inputs():
    m = ConditionalMLP(3, hidden=16, depth=1, num_steps=50)
    x, t, c = _inputs()
    with pytest.raises(ValueError, match="x_t"):
        m(torch.randn(6, 3), t, c)
    with pytest.raises(ValueError, match="t must have shape"):
        m(x, t[:5], c)
    with pytest.raises(ValueError, match="cond must have shape"):
        m(x, t, c[:4])
    with pytest.raises(ValueError, match="cond ids"):
        m(x, t, torch.full((6,), 4))
    with pytest.raises(TypeError, match="cond"):
        m(x, t, c.float())
    with pytest.raises(TypeError, match="t must be"):
        m(x, t.float(), c)
    with pytest.raises(ValueError, match="t must lie"):
        m(x, torch.full((6,), 50), c)


def test_energy_wrapper_eps_is_scaled_energy_gradient():
    m = EnergyMLP(3, SCHED, hidden=32, depth=2)
    for p in m.parameters():  # leave the zero init so the potential is not trivially 0.5|x|^2
        torch.nn.init.normal_(p, std=0.3)
    x, t, c = _inputs(8)
    x = x.double().requires_grad_(True)
    m = m.double()
    E = m.energy(x, t, c)
    (gE,) = torch.autograd.grad(E.sum(), x)
    sigma = (1 - SCHED.alphas_cumprod[t]).sqrt()[:, None]
    with torch.no_grad():
        eps = m(x.detach(), t, c)
        E2, eps2 = m.energy_and_eps(x.detach(), t, c)
    assert not eps.requires_grad
    torch.testing.assert_close(eps, sigma * gE)              # eps = sqrt(1 - abar) grad E
    torch.testing.assert_close(SCHED.eps_to_score(eps, t), -gE)  # score = -grad E
    torch.testing.assert_close(E2, E.detach())
    torch.testing.assert_close(eps2, eps)
    assert is_energy_model(m) and m.null_id == 3


def test_energy_wrapper_trains_through_the_gradient():
    m = EnergyMLP(2, SCHED, hidden=16, depth=1)
    x, t, c = _inputs(5, classes=2)
    loss = m(x, t, c).pow(2).sum()  # grad enabled: eps keeps its graph (create_graph)
    loss.backward()
    grads = [p.grad for p in m.parameters() if p.grad is not None]
    assert grads and any(float(g.abs().sum()) > 0 for g in grads)


def test_energy_wrapper_checks_potential_shape():
    bad = EnergyEps(lambda x, t, c: x, SCHED)  # (N, 2) instead of (N,)
    x, t, c = _inputs()
    with pytest.raises(ValueError, match="potential must return"):
        bad(x, t, c)


def _two_gaussians(n=2000, g=None):
    g = g or torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (n,), generator=g)
    centers = torch.tensor([[-1.0, 0.5], [1.0, -0.5]])
    return centers[y] + 0.2 * torch.randn(n, 2, generator=g), y


@pytest.mark.parametrize("make", [lambda: ConditionalMLP(2, hidden=32, depth=2, num_steps=50),
                                  lambda: EnergyMLP(2, SCHED, hidden=32, depth=2)], ids=["mlp", "energy"])
def test_train_then_sample_each_class(tmp_path, make):
    x, y = _two_gaussians()
    m = make()
    hist = train_eps_model(m, x, y, SCHED, tmp_path / "run", steps=300, batch_size=128, lr=5e-3, seed=0, progress=False)
    assert hist[-1]["loss"] < 0.7 * hist[0]["loss"]
    g = torch.Generator().manual_seed(1)
    for k, center in enumerate(([-1.0, 0.5], [1.0, -0.5])):
        with torch.no_grad():
            xs = ddpm_sample(product(m, [k]), torch.randn(500, 2, generator=g), SCHED, clip_x0=3.0, generator=g)
        assert torch.allclose(xs.mean(0), torch.tensor(center), atol=0.12), (k, xs.mean(0))
        assert 0.1 < float(xs.std(0).min()) and float(xs.std(0).max()) < 0.3, xs.std(0)
    # a rerun with the same folder loads the finished run instead of training again
    m2 = make()
    hist2 = train_eps_model(m2, x, y, SCHED, tmp_path / "run", steps=300, batch_size=128, lr=5e-3, seed=0, progress=False)
    assert hist2 == hist
    for a, b in zip(m.state_dict().values(), m2.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="made with other settings"):
        train_eps_model(make(), x, y, SCHED, tmp_path / "run", steps=300, batch_size=64, lr=5e-3, progress=False)


def test_train_bad_inputs(tmp_path):
    m = ConditionalMLP(2, hidden=8, depth=1, num_steps=50)
    x, y = _two_gaussians(20)
    with pytest.raises(ValueError, match="y must"):
        train_eps_model(m, x, y.int(), SCHED, tmp_path, steps=1, progress=False)
    with pytest.raises(ValueError, match="class ids"):
        train_eps_model(m, x, y + 2, SCHED, tmp_path, steps=1, progress=False)
    with pytest.raises(ValueError, match="p_uncond"):
        train_eps_model(m, x, y, SCHED, tmp_path, steps=1, p_uncond=1.5, progress=False)
    with pytest.raises(TypeError, match="null_id"):
        train_eps_model(torch.nn.Linear(2, 2), x, y, SCHED, tmp_path, steps=1, progress=False)


def _perturbed(m):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return m.eval()


@pytest.mark.parametrize("kind", ["mlp", "flow", "attribute_unet", "attribute_mlp", "position_unet", "classifier"])
def test_compkern_models_save_and_load_as_diffusers_models(tmp_path, kind):
    """Every trainable compkern model is a diffusers ModelMixin / ConfigMixin: save_pretrained
    writes config.json + safetensors, from_pretrained rebuilds the same function; ``config_dict``
    is the constructor's arguments (what run folders record)."""
    from diffusers import ModelMixin

    from compkern.models.attribute_unet import AttributeMLP, AttributeUNet
    from compkern.models.base import config_dict
    from compkern.models.classifier import AttributeClassifier
    from compkern.models.flow import FlowVelocityMLP
    from compkern.models.position_unet import PositionUNet

    g = torch.Generator().manual_seed(1)
    cases = {
        "mlp": (ConditionalMLP, dict(num_classes=3, hidden=16, depth=1, num_steps=50),
                (torch.randn(4, 2, generator=g), torch.randint(0, 50, (4,), generator=g), torch.tensor([0, 1, 2, 3]))),
        "flow": (FlowVelocityMLP, dict(num_classes=3, hidden=16, depth=1),
                 (torch.randn(4, 2, generator=g), torch.rand(4, generator=g), torch.tensor([0, 1, 2, 3]))),
        "attribute_unet": (AttributeUNet, dict(n_values=[3, 2], channels=[8, 16], heads=2, groups=4),
                           (torch.randn(2, 3, 8, 8, generator=g), torch.tensor([3, 40]), torch.tensor([[0, 1], [3, 2]]))),
        "attribute_mlp": (AttributeMLP, dict(n_values=[3, 2], hidden=16, depth=1),
                          (torch.randn(2, 2, generator=g), torch.tensor([3, 40]), torch.tensor([[0, 1], [3, 2]]))),
        "position_unet": (PositionUNet, dict(channels=[8, 16], heads=2, groups=4),
                          (torch.randn(2, 3, 8, 8, generator=g), torch.tensor([3, 40]), torch.tensor([[0.2, -0.3, 0.0], [0, 0, 2.0]]))),
        "classifier": (AttributeClassifier, dict(n_values=[3, 2], width=8), (torch.randn(2, 3, 8, 8, generator=g),)),
    }
    cls, kw, inputs = cases[kind]
    m = _perturbed(cls(**kw))
    assert isinstance(m, ModelMixin)
    assert config_dict(m) == {**config_dict(cls(**kw)), **kw}
    m.save_pretrained(tmp_path / kind)
    assert {p.name for p in (tmp_path / kind).iterdir()} == {"config.json", "diffusion_pytorch_model.safetensors"}
    again = cls.from_pretrained(tmp_path / kind, low_cpu_mem_usage=False).eval()
    assert {k: list(v) if isinstance(v, tuple) else v for k, v in config_dict(again).items()} == \
        {k: list(v) if isinstance(v, tuple) else v for k, v in config_dict(m).items()}
    out, back = m(*inputs), again(*inputs)
    for a, b in zip(out if isinstance(out, list) else [out], back if isinstance(back, list) else [back]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
