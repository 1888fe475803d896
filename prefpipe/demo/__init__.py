"""The embedded end-to-end demo: a toy arithmetic task, a tiny SFT model, on-policy pairs, the pipeline."""
