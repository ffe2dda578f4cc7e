"""Triton kernels for Loki decode (installed as `lokitool.kernels`; needs triton, imported here).

One file per kernel family, each read top to bottom: jit helpers, autotune configs, kernel,
launcher, public wrapper. `import lokitool` never imports this package.
"""

if __name__ == "lokitool.kernels":
    from .attention import sparse_decode_attention
    from .cache_write import rotate_queries, write_decode_kv
    from .decode_full import full_decode
    from .layout import LokiKeys, joined, split_keys
    from .loki_decode import check_inputs, clear_plans, decode_path, loki_decode
    from .score import loki_scores
    from .select import decode_budgets, kept_mask, select_topk, selection_mode

    __all__ = [
        "LokiKeys", "check_inputs", "clear_plans", "decode_budgets", "decode_path", "full_decode", "joined", "kept_mask", "loki_decode", "loki_scores",
        "rotate_queries", "select_topk", "selection_mode", "sparse_decode_attention", "split_keys", "write_decode_kv",
    ]
# Else this folder was found as a top-level `kernels` (the repository root on sys.path, as under
# `python -m pytest`): transformers imports `kernels` to probe for the Hugging Face package of that
# name. Loading nothing (and no __version__) makes it conclude that package is absent.
