"""The CPU lab: stock PPO vs the plugin's reward transforms in synthetic, seeded, offline worlds.

`python -m openrlhf_lsc.lab --quick --out lab_out` (`pipeline.run_lab`; sizes and seeds in `config`) builds each world
(`world`, `world_setup`): a tiny policy and two Bradley-Terry reward models (`models`), references and SFT pools; runs
the PPO runs of `run_specs` with a compact PPO (`ppo`, `runner`) and the plugin's reward core up a staircase of KL
targets; tunes on validation (`tuning`); compares the methods at matched KL with bootstrap intervals (`evaluation`,
`analysis`, `best_of_k`, `stats`) and writes plots, `report.md` and raw JSON (`report`, `files`). The lab never imports
OpenRLHF: it runs without CUDA stubs.
"""
