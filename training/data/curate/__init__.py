"""Data curation (kind: data): clean a corpus before pretraining reads it. See docs/data.md.

The stage is four steps over restartable tasks; every task publishes its outputs by renaming a finished
temporary folder, so a task that finished is never redone and a half-written one is never read:

    analyze  one task per input shard (in parallel): read, normalize, hash, MinHash, filter, redact PII
    dedup    one task: exact and near duplicates across all shards; the decontamination reference
    write    one task per shard (in parallel): decontaminate, write the cleaned corpus part
    report   one task: stats.json, removed.jsonl, report.md and its plot

Files, one role each:

    plan.py        the input files, their order, the shards; plan.json
    read.py        reading records tolerantly (bad files are counted, never fatal) and Unicode normalization
    exact.py       the content hash for exact deduplication
    minhash.py     n-gram shingles, MinHash signatures (rensa), LSH band keys
    clusters.py    cross-shard grouping: exact groups, LSH candidates verified, one document kept per cluster
    filters/       quality filters: code (The Stack / StarCoder), gopher_quality, gopher_repetition, c4, fineweb
    pii.py         e-mail, IP address and secret redaction
    decontam.py    long n-gram overlap with eval tasks and the held-out split
    tasks.py       the four steps as functions of (run_dir, shard index)
    publish.py     atomic folders, done markers, progress records
    report.py      stats.json, report.md, funnel.png
    local.py       the steps on a process pool on this machine
    job.py         the job's runner (training/main.py RUNNERS["data"])

On Slurm the same task functions run as job arrays: orchestrator/executors/slurm_array.py.
"""
