"""Data: from folders of text and code to curated, tokenized, packed training shards.

    nanoseek data prepare                       # the Python stdlib → runs/data (shards, tokenizer, report)
    from nanoseek.data.prepare import prepare, ensure_prepared
    from nanoseek.data.tokenizer import train_tokenizer, load_tokenizer, Tokenizer
    from nanoseek.data.shards import ShardLoader

Modules: sources (readers, default corpus, train/val split) · curate (filters, exact and near dedup,
report) · tokenizer (byte-level BPE, special tokens, chat template) · shards (memmap shards, index,
resumable rank-aware loader) · prepare (the pipeline, worker processes) · cli (the subcommands).
"""
