"""Samplers: reverse diffusion (DDPM, DDIM) on a composed eps; annealed MCMC (ULA, MALA, HMC)."""
from compkern.samplers.composed import ComposedEps, StepRecord
from compkern.samplers.diffusion import ddim_sample, ddpm_sample

__all__ = ["ComposedEps", "StepRecord", "ddim_sample", "ddpm_sample"]
