"""Speed benchmarks and evaluations: run each as a module, ``python -m benchmarks.NAME``."""
