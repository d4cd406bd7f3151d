"""Glue for the entry points: instantiation from config, reports, early config checks."""
