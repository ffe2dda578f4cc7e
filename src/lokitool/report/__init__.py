"""`lokitool rank-report`: how many principal directions keys need, and whether they carry over.

Where a change goes (imports flow down this list, never up):
    settings.py  --variance and --dims: parsed and checked once; d per fraction
    labels.py    words every output shares (pre-RoPE, PCA (Loki), the no-queries note)
    numbers.py   the computations on calibrations: ranks, subspace agreement, captured variance,
                 score variance per basis; loading and checking files; build_report -> RankReport
    layout.py    the output folder's file names
    document.py  report.json          markdown.py  report.md
    figures.py   the PNG figures      tables.py    the terminal tables
    writer.py    run() and write_report(): the command, each file written atomically
"""
