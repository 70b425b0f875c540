"""Algorithms: pure functions on tensors (pruners, solvers, the SDS decisions per linear); no files, no models."""
