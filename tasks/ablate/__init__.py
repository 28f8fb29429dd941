"""Data ablations: variants of a curate config, each trained and evaluated the same way, compared
side by side (see refinery.flows.ablate). ``variants``: dotted overrides; ``heldout``: the held-out
documents as a decontamination source; ``stage``: the ``ablation`` comparison dataset; ``table``:
its rows, seed spread and picture."""
