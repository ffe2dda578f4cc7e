"""Speed: `lokitool bench` (one decode step of the attention kernels) and `bench-e2e` (a whole model).

    presets.py      one table of model presets (LlamaConfig fields); attention shapes, random_model
    environment.py  what ran: device, library versions, git commit; the device bench times on
    timing.py       CUDA-graph and plain-launch medians, peak memory, copy bandwidth, sync
    kernels.py      bench: config, byte model (Point), methods, the run
    output.py       bench.csv rows and bench.png
    e2e.py          bench-e2e: greedy decoding with full attention and with Loki, in the static loop
                    (one CUDA graph per step, against the memory floor) or the eager one
"""
