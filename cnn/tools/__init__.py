"""Tools on top of the library: model summary, plots, sweeps, benchmarks."""
