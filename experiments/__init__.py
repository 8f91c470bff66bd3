"""Orchestration on top of the stages: table reproduction, figures, the demo experiment."""
