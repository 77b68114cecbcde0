"""Training: verifiable rewards (and, as it lands, the TRL trainer, callbacks and metrics)."""
