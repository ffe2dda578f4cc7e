"""The `lokitool` command line: `app.py` holds the Typer app and shared consoles (and imports no
command); one module per command registers itself on it; `main.py` imports them all and runs."""
