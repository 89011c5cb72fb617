"""Builders: turn a BuildSpec into a module on a build host."""
