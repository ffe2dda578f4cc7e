"""Loki and the selectors it is compared with, and how they run inside a model.

    reference.py   LokiSpec (the one owner of Loki's settings), budgets, scores, selectors, select,
                   attend: the pure-PyTorch oracle of every kernel and the CPU path
    bases.py       PCA, query-aware and random bases from a calibration
    peers.py       SparQ, Quest, Double Sparsity and the byte model per decode step
    attention.py   MethodSpec and `patched`: a model's attention through a method (eval)
    cache.py       LokiCache: keys stored rotated, preallocated
    generation.py  decode handlers over the cache and the greedy loop (eager; picks the static loop on CUDA)
    static.py      the static decode loop: preallocated cache, lengths on the device, one CUDA graph per step
    decode.py      every method at decode time (eval --tasks)
"""
