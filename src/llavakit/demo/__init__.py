"""``llavakit demo``: the whole system, for real, on a CPU in minutes.

- `parts`: the tiny random vision encoder and LLM folders the demo model is composed from.
- `run`: data → parts → align + finetune (the real trainer and recipe) → held-out evaluation → run folder.
- `report`: the printed report, ``metrics.json`` and the loss-curve PNG.
"""
