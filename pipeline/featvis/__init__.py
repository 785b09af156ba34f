"""Feature visualization core: objectives, image parameterizations, transforms and the
gradient-ascent loop shared by the data-free techniques `filter_vis` and `class_vis`."""
from pipeline.featvis import objectives, params, transforms
from pipeline.featvis.optimize import PRESETS, base_seed, optimize, row_generators, to_uint8, visualize, with_preset

__all__ = ["PRESETS", "base_seed", "objectives", "optimize", "params", "row_generators", "to_uint8", "transforms", "visualize", "with_preset"]
