"""Labelled retrieval benchmark corpora built from public text that ships in packages."""
