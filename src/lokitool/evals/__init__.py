"""Quality: `lokitool eval` and `passkey`.

    config.py    EvalConfig and TaskConfig (light: the CLI reads its defaults here)
    ppl.py       perplexity of each method on held-out windows (eval --ppl)
    tasks.py     synthetic long-context tasks, generated and scored (eval --tasks)
    longctx.py   running the tasks under each method
    lmeval.py    LokiLM: lm-evaluation-harness under a method (eval --lm-eval)
    passkey.py   passkey retrieval (lokitool passkey), its prompts from the passkey task of tasks.py
"""
