"""Samplers: reverse diffusion (DDPM, DDIM) on a composed eps; annealed MCMC (ULA, MALA, HMC) on
product / mixture / negation compositions."""
from compkern.samplers.composed import ComposedEps, StepRecord
from compkern.samplers.compositions import (
    Composition, LinearComposition, MixtureComposition, mixture, negation, product,
)
from compkern.samplers.diffusion import ddim_sample, ddim_step, ddpm_sample
from compkern.samplers.mcmc import MCMCResult, annealed_mcmc

__all__ = [
    "ComposedEps", "Composition", "LinearComposition", "MCMCResult", "MixtureComposition", "StepRecord",
    "annealed_mcmc", "ddim_sample", "ddim_step", "ddpm_sample", "mixture", "negation", "product",
]
