"""tokenize: a documents dataset -> a tokenizer (trained or loaded) -> token shards (composition only).

    refinery run tokenize --set input=WORK/dedup/<fp> --set tokenizer.vocab_size=8192 --json
    refinery run tokenize --set input=WORK/dedup/<fp> --set tokenizer.path=/models/gpt2 --json

Outputs: ``tokenizer`` (a Hugging Face tokenizer folder, which is also a dataset) and ``tokenize``
(Arrow IPC token shards with a manifest naming that tokenizer), the primary output last.
"""
from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from refinery.flows.common import FlowParams, emit_completed, refinery_flow, report_stages, result
from refinery.tasks.tokens.holdout import HoldoutConfig, holdout
from refinery.tasks.tokens.stage import Tokenize, TokenizeConfig
from refinery.tasks.tokens.tokenizer import TokenizerConfig, tokenizer_stage


class TokenizeParams(FlowParams):
    flow_name: ClassVar[str] = "tokenize"

    input: str = Field(description="Documents dataset to tokenize (the curate flow's output: a path or fsspec URL).",
                       examples=["refinery-work/dedup/FINGERPRINT"])
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig, description="Tokenizer: tokenizer.path loads "
                                       "an existing one (local folder or hub id); otherwise a byte-level BPE is "
                                       "trained on the input (vocab_size, sentinels, special tokens).")
    tokenize: TokenizeConfig = Field(default_factory=TokenizeConfig, description="Token shards: max_tokens_per_file, "
                                     "batch_docs, dtype (auto/uint16/uint32), text_field.")
    holdout: HoldoutConfig = Field(default_factory=HoldoutConfig, description="Held-out documents, never tokenized "
                                   "for training and published as their own dataset (evaluate scores them): "
                                   "fraction (0 disables), min_docs, max_docs, salt; chosen by a hash of the id.")


@refinery_flow("tokenize", TokenizeParams)
def tokenize_flow(p: TokenizeParams) -> dict:
    """Train (or load) a tokenizer and tokenize a documents dataset into memory-mappable token shards."""
    from refinery.tasks.runtime import make_runner
    from refinery.tasks.store import Dataset

    if not p.input:
        raise ValueError("tokenize needs a documents dataset: --set input=PATH")
    docs = Dataset.open(p.input)
    stages = {}
    with make_runner(p.task_runner) as runner:
        held = []
        if p.holdout.fraction > 0:   # first: the tokenizer is not trained on held-out documents either
            stages["holdout"] = holdout.call(p.workdir, [docs], p.holdout, runner=runner)
            held = [stages["holdout"]]
        tok_inputs = [] if p.tokenizer.path else [docs, *held]
        stages["tokenizer"] = tokenizer_stage.call(p.workdir, tok_inputs, p.tokenizer, runner=runner)
        stages["tokenize"] = Tokenize.call(p.workdir, [docs, stages["tokenizer"], *held], p.tokenize, runner=runner)
    report_stages("tokenize", stages)
    out = result(stages, primary=stages["tokenize"].path)
    emit_completed("tokenize", out, primary=out["primary"])
    return out
