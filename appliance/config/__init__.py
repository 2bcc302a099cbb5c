"""Typed configuration: project.yaml, flows/*.yaml and firmware profiles, each validated once at load."""
