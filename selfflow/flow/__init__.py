"""Flow matching itself: the interpolation path, timestep distributions, dual-timestep scheduling
(two levels per sample over its tokens) and the ODE/SDE solvers.

Imports `selfflow.tokens` only.
"""
