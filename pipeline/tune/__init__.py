"""Ray Tune sweeps: sweep files -> Tuner; a trial is build_trainer(...).fit()."""
