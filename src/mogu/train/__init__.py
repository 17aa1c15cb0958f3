"""Training: losses, the stages, fine-tuning, probes, calibration, data and the recipes the CLI calls.
"""
