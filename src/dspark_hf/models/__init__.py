"""Draft model families: one folder each (configuration, modeling)."""
