"""The stages: one module each, opening with its declaration (``STAGE = Stage(...)``, flare_exp/run/stage.py,
which finds them here) and holding its work. A module is imported only when its stage runs, so a prepare job
never pays for importing torch/transformers and Unsloth is never imported by accident."""
