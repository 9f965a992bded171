"""``dsl evaluate``: the methods x label fractions x seeds grid of fine-tuning runs."""
