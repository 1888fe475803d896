"""Preference data: input formats, tokenization, and the Parquet cache schema shared by both phases."""
