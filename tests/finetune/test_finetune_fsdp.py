"""finetune on 2 CPU processes (torchrun, gloo): LoRA under FSDP2 follows the one-process loss curve
with the same global batch (within 1e-4), and the trained adapter comes back into the stage's model."""
from __future__ import annotations

TOL = 1e-4


def test_lora_fsdp_two_processes_match_one(tiny_causal_lm_dir, sft_file, tmp_path):
    from refinery.tasks.finetune.config import FinetuneConfig
    from refinery.tasks.finetune.stage import finetune

    common = dict(model=str(tiny_causal_lm_dir), data=str(sft_file), method="lora", lr=1e-2, max_steps=4,
                  device="cpu", seq_len=64, val_fraction=0.25, warmup_steps=1, eval_every=2, num_samples=1,
                  sample_max_new_tokens=2, grad_accum=1, load_best=False,
                  lora={"dropout": 0.0})   # dropout draws differ between one process and two ranks
    one = finetune.run(tmp_path / "one", cfg=FinetuneConfig(batch_size=6, **common))
    two = finetune.run(tmp_path / "two", cfg=FinetuneConfig(batch_size=3, devices=2, strategy="fsdp", **common))
    a, b = one.manifest["stats"], two.manifest["stats"]
    assert two.manifest["memory_plan"]["setup"]["world_size"] == 2
    assert a["train_loss_first"] is not None
    la, lb = [h["val_loss"] for h in a["val_history"]], [h["val_loss"] for h in b["val_history"]]
    assert len(la) == len(lb) == 2
    for x, y in zip(la + [a["train_loss_first"], a["train_loss_last"], a["val_loss_after"]],
                    lb + [b["train_loss_first"], b["train_loss_last"], b["val_loss_after"]]):
        assert abs(x - y) < TOL, (la, lb, a["train_loss_last"], b["train_loss_last"])
    assert b["val_loss_after"] < b["val_loss_before"] - 0.1
