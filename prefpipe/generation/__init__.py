"""`prefpipe generate`: on-policy samples, judged, turned into preference pairs (docs/generate.md)."""
