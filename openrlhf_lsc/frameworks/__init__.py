"""Adapters for frameworks other than OpenRLHF."""
