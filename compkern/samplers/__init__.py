"""Samplers: reverse diffusion (DDPM, DDIM) on a composed eps; annealed MCMC (ULA, MALA, HMC) on
product / mixture / negation compositions; n objects composed from a one-object position model."""
from compkern.samplers.composed import ComposedEps, StepRecord
from compkern.samplers.compositions import (
    POSITION_METHODS, Composition, LinearComposition, MixtureComposition, compose_positions, mixture, negation,
    position_conditions, product,
)
from compkern.samplers.diffusion import ddim_sample, ddim_step, ddpm_sample, scheduler_sample
from compkern.samplers.mcmc import MCMCResult, annealed_mcmc

__all__ = [
    "ComposedEps", "Composition", "LinearComposition", "MCMCResult", "MixtureComposition", "StepRecord",
    "POSITION_METHODS", "annealed_mcmc", "compose_positions", "ddim_sample", "ddim_step", "ddpm_sample", "mixture",
    "scheduler_sample",
    "negation", "position_conditions", "product",
]
