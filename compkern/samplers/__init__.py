"""Samplers: reverse diffusion (DDPM, DDIM) on a composed eps; annealed MCMC (ULA, MALA, HMC)."""
from compkern.samplers.composed import ComposedEps, StepRecord
from compkern.samplers.diffusion import ddim_sample, ddpm_sample

__all__ = ["ComposedEps", "StepRecord", "ddim_sample", "ddpm_sample"]

# Annealed MCMC and energy compositions (issue 6).
from compkern.samplers.compositions import (  # noqa: E402
    Composition, LinearComposition, MixtureComposition, mixture, negation, product,
)
from compkern.samplers.diffusion import ddim_step  # noqa: E402
from compkern.samplers.mcmc import MCMCResult, annealed_mcmc  # noqa: E402

__all__ += ["Composition", "LinearComposition", "MCMCResult", "MixtureComposition", "annealed_mcmc", "ddim_step",
            "mixture", "negation", "product"]
