"""`lokitool passkey`: passkey retrieval under full attention and Loki."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import UserError
from .app import app, console, out
from .loading import check_context, load_model_and_calibration
from .options import Device, Dtype


@app.command("passkey")
def passkey_command(
    model: str = typer.Option("default", help="`default`, hub id[@revision], model folder or .gguf file."),
    calibration: Optional[Path] = typer.Option(None, help="Calibration file from `lokitool calibrate`."),
    lengths: str = typer.Option("512,1024,2048", help="Prompt lengths in tokens, comma-separated."),
    depths: str = typer.Option("0.1,0.5,0.9", help="Where the key sits, as fractions of the filler, comma-separated."),
    kf: float = typer.Option(0.25, help="Token budget fraction for Loki."),
    df: float = typer.Option(0.25, help="Dimension budget fraction for Loki."),
    basis: str = typer.Option("post", help="pre, post, qa-pre, qa-post, sa-post, or random."),
    seed: int = typer.Option(0, help="Seed of the random keys."),
    output_path: Optional[Path] = typer.Option(None, help="Directory for passkey.json and passkey.md."),
    device: Device = "auto",
    dtype: Dtype = "auto",
    allow_other_model: bool = typer.Option(False, "--allow-other-model", help="Use a calibration made for other weights of the same attention shape."),
) -> None:
    """Passkey retrieval under full attention and Loki at several lengths and depths."""
    from dataclasses import asdict

    from ..evals import passkey
    from ..fileio import ensure_writable_dir
    from ..sparse.reference import LokiSpec

    try:
        length_list = [int(x) for x in lengths.split(",") if x.strip()]
        depth_list = [float(x) for x in depths.split(",") if x.strip()]
    except ValueError as err:
        raise UserError(f"--lengths takes whole numbers and --depths fractions, got {lengths!r} / {depths!r}") from err
    if not length_list:
        raise UserError("--lengths is empty; give prompt lengths in tokens, e.g. --lengths 512,1024")
    if not depth_list:
        raise UserError("--depths is empty; give fractions of the filler, e.g. --depths 0.1,0.5,0.9")
    if any(n < 1 for n in length_list):
        raise UserError(f"--lengths must be positive, got {lengths!r}")
    if any(not 0 <= d <= 1 for d in depth_list):
        raise UserError(f"--depths must lie in [0, 1], got {depths!r}")
    spec = LokiSpec(kf=kf, df=df, basis=basis)
    if output_path is not None:
        ensure_writable_dir(output_path)
    loaded, cal = load_model_and_calibration(
        model, calibration, False, device, dtype, basis=basis, allow_other_model=allow_other_model
    )
    for length in length_list:
        check_context(loaded.facts, length, passkey.MAX_NEW_TOKENS, what=f"a passkey prompt of --lengths {length}",
                      fix=f"use --lengths up to {loaded.facts.max_positions - passkey.MAX_NEW_TOKENS}")

    def report(t) -> None:
        console.print(f"  {t.length:>6} tokens  depth {t.depth:<4g} {t.method:<22} {'found' if t.found else 'MISSED':<6} {t.answer[:40]!r}")

    trials = passkey.run(loaded, lengths=length_list, depths=depth_list, spec=spec, calibration=cal, seed=seed, on_trial=report)
    table = passkey.table_markdown(trials)
    out.print(table, markup=False, highlight=False)
    if output_path is not None:
        config = {"calibration": str(calibration), "lengths": length_list, "depths": depth_list, "seed": seed, **asdict(spec)}
        path = passkey.write_results(output_path, config, loaded.facts, trials)
        out.print(f"wrote {path} and passkey.md")
