"""Adapters for RL frameworks other than OpenRLHF (TRL, verl); each imports its framework lazily."""
