"""Flows: load and compile a validated graph of nodes, then run it on a Context with PEKAT's branch rules."""
