"""The CPU lab: stock PPO vs the plugin's reward transforms in a synthetic, seeded, offline world.

`python -m openrlhf_lsc.lab --quick --out lab_out` builds the world (`world`), trains a tiny policy
and two Bradley-Terry reward models (`models`), estimates references, runs a compact PPO (`ppo`)
with the plugin's reward code, and writes plots, `report.md` and raw JSON (`experiments`, `report`).
The lab never imports OpenRLHF: it runs without CUDA stubs.
"""
