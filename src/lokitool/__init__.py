"""lokitool: study and use low-rank key structure in LLM attention (Loki, arXiv 2406.02542)."""

__version__ = "0.1.0"
