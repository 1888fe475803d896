"""Evaluation of trained policies (held-out implicit rewards, downstream accuracy) and the sweep report."""
