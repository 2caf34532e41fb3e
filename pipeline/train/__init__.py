"""Training: the driver (checks, Ray, `build_trainer`), the worker loop, the solver, checkpoints."""
