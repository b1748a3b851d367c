"""Reference trainers on HH-RLHF releases, each readable top to bottom (docs/training.md).

- ``training.reward_model``, ``training.sft``, ``training.ppo``: the trainers; ``main(args)``
  of each is its algorithm.
- ``training.text``: rendering and encoding shared by all (the same words, the same ids).
- ``training.run``: run bookkeeping (resume, checkpoints, settings, TensorBoard, cards, plots).
- ``training.fast``: speed paths beside the plain reference paths they are tested against.
- ``training.preference_eval``, ``training.rollout``, ``training.ppo_eval``: a reward model's
  held-out evaluation; PPO's queries and rollouts; PPO's held-out judgement and reports.
- ``training.models``: the model options every trainer accepts (tiny, minilm, smollm2-135m,
  a local path or a Hub id).
- ``training.common``: a CLI from a documented dataclass, and pair rows with provenance.
"""
