"""Tokens: byte-level BPE tokenizer training, the tokenize stage (Arrow IPC token shards), the
memory-mapped training reader. See ARCHITECTURE.md, section 5, for the token shard contract.

Light on import: numpy/pyarrow/tokenizers/torch are imported by the submodules that need them.
"""
