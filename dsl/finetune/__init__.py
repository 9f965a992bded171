"""Fine-tuning and evaluation: label fractions, classifiers, metrics, the Ray Train runner."""
