"""`lokitool generate` (greedy text with a Loki KV cache) and `lokitool passkey` (retrieval check)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .cli import app, console, out
from .errors import UserError
from .options import Device, Dtype


def _load(model: str, calibration: Optional[Path], full: bool, device: str, dtype: str):
    from .calibration import Calibration
    from .models import load_model

    if not full and calibration is None:
        raise UserError("Loki needs --calibration FILE (make one with `lokitool calibrate`), or pass --full")
    cal = Calibration.load(calibration) if calibration is not None and not full else None
    with console.status(f"loading {model}"):
        loaded = load_model(model, device, dtype)
    if cal is not None:
        cal.check_model(loaded.facts, str(calibration))
    return loaded, cal


@app.command("generate")
def generate_command(
    model: str = typer.Option("default", help="`default` (embedded SmolLM2-135M-Instruct), hub id[@revision], model folder or .gguf file."),
    calibration: Optional[Path] = typer.Option(None, help="Calibration file from `lokitool calibrate` (not needed with --full)."),
    prompt: Optional[str] = typer.Option(None, help="The prompt text."),
    prompt_file: Optional[Path] = typer.Option(None, help="Read the prompt from this file instead."),
    max_new_tokens: int = typer.Option(64, help="Tokens to generate at most (stops at EOS)."),
    kf: float = typer.Option(0.25, help="Token budget fraction: each decode step attends to max(1, floor(kf x context)) tokens."),
    df: float = typer.Option(0.25, help="Dimension budget fraction: keys are scored with round(df x head_dim) PCA dims."),
    basis: str = typer.Option("post", help="pre, post, qa-pre, qa-post, or random."),
    group: str = typer.Option("head", help="Select tokens per query head (head) or per KV head (kv)."),
    full: bool = typer.Option(False, "--full", help="Full attention with transformers' default cache (the reference)."),
    loki_prefill: bool = typer.Option(False, "--loki-prefill", help="Also use Loki over the prompt (default: exact prefill)."),
    chat: bool = typer.Option(True, "--chat/--no-chat", help="Wrap the prompt in the tokenizer's chat template, if it has one."),
    device: Device = "auto",
    dtype: Dtype = "auto",
) -> None:
    """Greedy generation with a Loki KV cache, printed as it is generated."""
    import torch
    from transformers import TextStreamer

    from . import generate as gen

    if (prompt is None) == (prompt_file is None):
        raise UserError("give exactly one of --prompt TEXT and --prompt-file FILE")
    if prompt_file is not None:
        if not prompt_file.is_file():
            raise UserError(f"prompt file {prompt_file} does not exist")
        prompt = prompt_file.read_text(encoding="utf-8")
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    settings = None if full else gen.LokiSettings(kf=kf, df=df, basis=basis, group=group, loki_prefill=loki_prefill)
    loaded, cal = _load(model, calibration, full, device, dtype)
    ids = gen.encode_prompt(loaded.tokenizer, prompt, loaded.facts.bos_token_id, chat=chat)
    x = torch.tensor([ids], device=next(loaded.model.parameters()).device)
    mode = "full attention" if full else f"Loki kf={kf:g} df={df:g} (d={settings.dims(loaded.facts.head_dim)}, {basis} basis)"
    console.print(f"{len(ids)} prompt tokens; {mode}")
    streamer = TextStreamer(loaded.tokenizer, skip_special_tokens=True)
    gen.generate_with(
        loaded.model, loaded.facts, x, max_new_tokens, settings, cal,
        on_token=lambda token: streamer.put(token.cpu()), stop_token=getattr(loaded.tokenizer, "eos_token_id", None),
    )
    streamer.end()


@app.command("passkey")
def passkey_command(
    model: str = typer.Option("default", help="`default`, hub id[@revision], model folder or .gguf file."),
    calibration: Optional[Path] = typer.Option(None, help="Calibration file from `lokitool calibrate`."),
    lengths: str = typer.Option("512,1024,2048", help="Prompt lengths in tokens, comma-separated."),
    depths: str = typer.Option("0.1,0.5,0.9", help="Where the key sits, as fractions of the filler, comma-separated."),
    kf: float = typer.Option(0.25, help="Token budget fraction for Loki."),
    df: float = typer.Option(0.25, help="Dimension budget fraction for Loki."),
    basis: str = typer.Option("post", help="pre, post, qa-pre, qa-post, or random."),
    seed: int = typer.Option(0, help="Seed of the random keys."),
    output_path: Optional[Path] = typer.Option(None, help="Directory for passkey.json and passkey.md."),
    device: Device = "auto",
    dtype: Dtype = "auto",
) -> None:
    """Passkey retrieval under full attention and Loki at several lengths and depths."""
    from . import generate as gen
    from . import passkey
    from .fileio import ensure_writable_dir, write_json_atomic, write_text_atomic

    try:
        length_list = [int(x) for x in lengths.split(",") if x.strip()]
        depth_list = [float(x) for x in depths.split(",") if x.strip()]
    except ValueError as err:
        raise UserError(f"--lengths takes whole numbers and --depths fractions, got {lengths!r} / {depths!r}") from err
    settings = gen.LokiSettings(kf=kf, df=df, basis=basis)
    if output_path is not None:
        ensure_writable_dir(output_path)
    loaded, cal = _load(model, calibration, False, device, dtype)

    def report(t) -> None:
        console.print(f"  {t.length:>6} tokens  depth {t.depth:<4g} {t.method:<22} {'found' if t.found else 'MISSED':<6} {t.answer[:40]!r}")

    trials = passkey.run(loaded, lengths=length_list, depths=depth_list, settings=settings, calibration=cal, seed=seed, on_trial=report)
    table = passkey.table_markdown(trials)
    out.print(table, markup=False, highlight=False)
    if output_path is not None:
        config = {"model": loaded.facts.model_id, "calibration": str(calibration), "lengths": length_list,
                  "depths": depth_list, "kf": kf, "df": df, "basis": basis, "seed": seed}
        write_json_atomic(output_path / "passkey.json", {"config": config, "trials": passkey.trials_json(trials)})
        write_text_atomic(output_path / "passkey.md", table + "\n")
        out.print(f"wrote {output_path / 'passkey.json'} and passkey.md")
