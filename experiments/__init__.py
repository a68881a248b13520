"""The evidence: FPO against its baselines, each tuned alike (`python -m experiments --help`;
experiments/README.md). The pipeline at the top level never imports this package."""
