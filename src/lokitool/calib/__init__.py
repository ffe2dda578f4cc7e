"""Calibration: model + text -> hooks -> streamed moments -> PCA -> the calibration file.

    models.py       load a causal LM (embedded default, .gguf, folder, hub id); ModelFacts; identity
    data.py         text sources -> fixed-length token windows
    dispatch.py     route a model's attention through per-module handlers (transformers' AttentionInterface)
    collect.py      the hooks: pre-RoPE keys (k_proj + k_norm) and post-RoPE keys, queries
    moments.py      streamed count / sum / sum of outer products per (layer, head)
    pca.py          moments -> mean, components, eigenvalues; ranks
    query_aware.py  the query-aware subspace fit (stored in the file at calibrate time)
    selection_aware.py  a (query, key, value) sample and the fit for what top-k selection needs (sa-post)
    calibration.py  the one object handed downstream: safetensors + validated header
    distributed.py  torchrun: shards and all-reduce
    config.py, run.py  the calibrate job
"""
