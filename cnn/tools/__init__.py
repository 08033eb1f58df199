"""Tools on top of the library: model summary, plots, sweeps, benchmarks,
run records, time-accuracy curves, visualisation, the detection report."""
