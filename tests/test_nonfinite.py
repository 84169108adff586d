"""NaN / inf never pass silently: the training loop, DDIM / DDPM sampling and annealed MCMC raise
a FloatingPointError naming where (step, level / t) as soon as the model produces one."""
import json

import pytest
import torch

from compkern.models import NoiseSchedule
from compkern.samplers import annealed_mcmc, ddim_sample, ddpm_sample
from compkern.train import Trainer

SCHED = NoiseSchedule.cosine(100)


def _trainer(out, bad_step, bad_value=float("nan")):
    torch.manual_seed(0)
    net = torch.nn.Linear(2, 1)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)

    def step(i, g):
        loss = net(torch.randn(4, 2, generator=g)).square().mean()
        return {"loss": loss * bad_value if i == bad_step else loss}

    return Trainer(out, {"net": net}, opt, step, progress=False, save_every=2), net


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_trainer_raises_on_a_non_finite_loss_naming_the_step(tmp_path, bad):
    trainer, net = _trainer(tmp_path / "t", bad_step=3, bad_value=bad)
    with pytest.raises(FloatingPointError, match="non-finite loss .* at step 3"):
        trainer.fit(10)
    assert trainer.step == 3 and bool(torch.isfinite(net.weight).all())  # no update from the bad step
    assert json.loads((tmp_path / "t" / "metrics.json").read_text())["step"] == 2  # the last checkpoint kept
    with pytest.raises(TypeError, match="scalar tensor 'loss'"):
        Trainer(tmp_path / "u", {"net": net}, torch.optim.SGD(net.parameters(), lr=0.1),
                lambda i, g: {"loss": torch.ones(2)}, progress=False).fit(1)


class _EpsBadAt:
    """eps = x / 2, except one NaN (or inf) element from the ``at``-th call on."""

    def __init__(self, at, value=float("nan")):
        self.at, self.value, self.calls = at, value, 0

    def __call__(self, x, t):
        self.calls += 1
        eps = x / 2
        if self.calls > self.at:
            eps = eps.clone()
            eps[-1, -1] = self.value
        return eps


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_ddim_and_ddpm_raise_on_non_finite_eps_naming_the_step(value):
    x = torch.randn(5, 3)
    assert bool(torch.isfinite(ddim_sample(_EpsBadAt(10**9), x, SCHED, num_steps=6)).all())
    with pytest.raises(FloatingPointError, match=r"ddim_sample: the eps model returned NaN or inf at step 2 of 6"):
        ddim_sample(_EpsBadAt(2, value), x, SCHED, num_steps=6)
    with pytest.raises(FloatingPointError, match="at step 4 of 100"):
        ddpm_sample(_EpsBadAt(4, value), x, SCHED, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="x_T holds NaN or inf"):
        ddim_sample(_EpsBadAt(10**9), x.masked_fill(x > 1, value), SCHED, num_steps=6)


class _Quadratic:
    """E = |x|^2 / 2 per row, eps = sigma_t x; NaN energy (``nan_energy``) or eps from the
    ``at``-th call on."""

    def __init__(self, at, *, nan_energy):
        self.at, self.nan_energy, self.calls = at, nan_energy, 0
        self.abar = SCHED.alphas_cumprod

    def energy_and_eps(self, x, t):
        self.calls += 1
        E, eps = 0.5 * x.square().sum(1), (1 - self.abar[t]).sqrt()[:, None].to(x.dtype) * x
        if self.calls > self.at:
            if self.nan_energy:
                E = E.clone()
                E[0] = float("nan")
            else:
                eps = eps.clone()
                eps[0, 0] = float("nan")
        return E, eps

    def __call__(self, x, t):
        return self.energy_and_eps(x, t)[1]


@pytest.mark.parametrize("kind", ["ula", "mala", "hmc"])
@pytest.mark.parametrize("nan_energy", [False, True])
def test_annealed_mcmc_raises_on_nan_energy_or_score(kind, nan_energy):
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(0))
    opts = {"kind": kind, "num_levels": 3, "steps_per_level": 4, "generator": torch.Generator().manual_seed(1)}
    res = annealed_mcmc(_Quadratic(10**9, nan_energy=nan_energy), x, SCHED, **opts)
    assert bool(torch.isfinite(res.x).all())
    comp = _Quadratic(7, nan_energy=nan_energy)  # a proposal in the middle of the run
    if kind == "ula" and nan_energy:  # ULA never asks for energies: a NaN there is never seen
        annealed_mcmc(comp, x, SCHED, **opts)
        return
    what = "energy" if nan_energy else r"eps \(score\)"
    with pytest.raises(FloatingPointError, match=f"annealed mcmc: the composition returned NaN {what} at t=.*call 8"):
        annealed_mcmc(comp, x, SCHED, **opts)
