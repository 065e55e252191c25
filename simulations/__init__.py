"""Local simulation: synthetic merchants, the simulation runner and benchmarks."""
