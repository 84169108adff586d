"""Stable Diffusion (diffusers) front ends: composed generation, CompLift lift maps, `compkern generate`."""
from compkern.pipelines.composition import (Composition, CompositionOutput, CompositionPipeline, PromptEmbeddings,
                                            parse_composition)
from compkern.pipelines.lift_maps import (LiftMaps, accept, cached_lift_maps, fixed_lift_maps, fresh_lift_maps,
                                          save_overlays)
from compkern.pipelines.sd3 import SD3CompositionPipeline
from compkern.pipelines.tiny import save_tiny_pipeline, save_tiny_sd3_pipeline

__all__ = ["Composition", "CompositionOutput", "CompositionPipeline", "LiftMaps", "PromptEmbeddings", "accept",
           "cached_lift_maps", "fixed_lift_maps", "fresh_lift_maps", "parse_composition", "save_overlays", "save_tiny_pipeline",
           "save_tiny_sd3_pipeline", "SD3CompositionPipeline"]
