"""`lokitool generate`: greedy text with a Loki KV cache, streamed."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import UserError
from .app import app, console
from .loading import check_context, load_model_and_calibration
from .options import Device, Dtype


@app.command("generate")
def generate_command(
    model: str = typer.Option("default", help="`default` (embedded SmolLM2-135M-Instruct), hub id[@revision], model folder or .gguf file."),
    calibration: Optional[Path] = typer.Option(None, help="Calibration file from `lokitool calibrate` (not needed with --full)."),
    prompt: Optional[str] = typer.Option(None, help="The prompt text."),
    prompt_file: Optional[Path] = typer.Option(None, help="Read the prompt from this file instead."),
    max_new_tokens: int = typer.Option(64, help="Tokens to generate at most (stops at EOS)."),
    kf: float = typer.Option(0.25, help="Token budget fraction: each decode step attends to max(1, floor(kf x context)) tokens."),
    df: float = typer.Option(0.25, help="Dimension budget fraction: keys are scored with round(df x head_dim) PCA dims."),
    basis: str = typer.Option("post", help="pre, post, qa-pre, qa-post, sa-post, or random."),
    group: str = typer.Option("head", help="Select tokens per query head (head) or per KV head (kv)."),
    full: bool = typer.Option(False, "--full", help="Full attention with transformers' default cache (the reference)."),
    loki_prefill: bool = typer.Option(False, "--loki-prefill", help="Also use Loki over the prompt (default: exact prefill)."),
    chat: bool = typer.Option(True, "--chat/--no-chat", help="Wrap the prompt in the tokenizer's chat template, if it has one."),
    device: Device = "auto",
    dtype: Dtype = "auto",
    encoding: str = typer.Option("utf-8", help="Encoding of --prompt-file (e.g. latin-1)."),
    allow_other_model: bool = typer.Option(False, "--allow-other-model", help="Use a calibration made for other weights of the same attention shape."),
) -> None:
    """Greedy generation with a Loki KV cache, printed as it is generated."""
    import torch
    from transformers import TextStreamer

    from ..calib.data import read_text
    from ..sparse import generation as gen
    from ..sparse.reference import LokiSpec

    if (prompt is None) == (prompt_file is None):
        raise UserError("give exactly one of --prompt TEXT and --prompt-file FILE")
    if prompt_file is not None:
        if not prompt_file.is_file():
            raise UserError(f"prompt file {prompt_file} does not exist")
        prompt = read_text(prompt_file, encoding)
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    spec = None if full else LokiSpec(kf=kf, df=df, basis=basis, group=group).for_decoding()
    loaded, cal = load_model_and_calibration(
        model, calibration, full, device, dtype, basis=None if full else basis, allow_other_model=allow_other_model
    )
    ids = gen.encode_prompt(loaded.tokenizer, prompt, loaded.facts.bos_token_id, chat=chat)
    check_context(loaded.facts, len(ids), max_new_tokens)
    x = torch.tensor([ids], device=next(loaded.model.parameters()).device)
    mode = "full attention" if full else f"Loki kf={kf:g} df={df:g} (d={spec.dims(loaded.facts.head_dim)}, {basis} basis)"
    shape = loaded.facts.attention_summary()
    console.print(f"{len(ids)} prompt tokens; {mode}" + (f"; {shape}" if shape else ""))
    streamer = TextStreamer(loaded.tokenizer, skip_special_tokens=True)
    gen.generate_with(
        loaded.model, loaded.facts, x, max_new_tokens, spec, cal, loki_prefill=loki_prefill,
        on_token=lambda token: streamer.put(token.cpu()), stop_token=getattr(loaded.tokenizer, "eos_token_id", None),
    )
    streamer.end()
