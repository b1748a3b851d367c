"""Reference trainers on HH-RLHF releases, each readable top to bottom.

- ``training.reward_model``: Bradley-Terry preference model with prefix sharing.
- ``training.models``: the model options every trainer accepts (tiny, minilm, smollm2-135m,
  a local path or a Hub id).
- ``training.common``: a CLI from a documented dataclass, and pair rows with provenance.
"""
