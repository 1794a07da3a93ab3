"""The CPU lab: stock PPO vs the plugin's reward transforms in synthetic, seeded, offline worlds.

`python -m openrlhf_lsc.lab --quick --out lab_out` builds a world (`world`), trains a tiny policy and two
Bradley-Terry reward models (`models`), estimates references, runs a compact PPO (`ppo`) with the plugin's reward
core up a staircase of KL targets, compares the methods at matched KL with bootstrap intervals (`stats`) and writes
plots, `report.md` and raw JSON (`experiments`, `report`). The lab never imports OpenRLHF: it runs without CUDA stubs.
"""
