"""Alignment: reward models, PPO and DPO on preference pairs (light at import; torch loads lazily).

- ``data``: preference files (HH-RLHF, ShareGPT, prompt/chosen/rejected) -> ``PreferencePair``.
- ``reward``: ``train_reward_model`` (pairwise loss), ``RewardScorer``.
- ``ppo``: ``train_ppo`` / ``PPOTrainer`` (rollouts, KL-shaped rewards, GAE, clipped losses).
- ``dpo``: ``train_dpo`` (own loop, frozen reference scored once; ``loss_type``: TRL's DPO losses).
- ``cpo``: ``train_cpo`` / ``train_simpo`` (reference-free pair losses: CPO, SimPO).
- ``grpo``: ``train_grpo`` / ``GRPOTrainer`` (groups sampled through the rollout engine, reward functions).
- ``rloo``: ``train_rloo`` / ``RLOOTrainer`` (GRPO's machinery, leave-one-out advantages, sequence-level loss).
- ``online_dpo``: ``train_online_dpo`` (pairs sampled from the policy each step, ranked by reward
  functions or a reward model, DPO's loss against the starting policy).
- ``common``: ``resolve_model_dir`` (HF folder or refinery dataset), ``model_identity``, saving.
- ``stage``: the ``reward``, ``ppo`` and ``dpo`` stages.
"""
