"""Evaluation: knowledge probes (what a method taught) and retention measures (what it kept)."""
