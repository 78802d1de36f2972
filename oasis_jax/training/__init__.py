"""Training: one loop skeleton (resume, cadence, checkpoints) and the two stages' pmapped steps."""
