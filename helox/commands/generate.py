"""`helox generate`: stream a continuation from an export (verified first) or a checkpoint."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Literal

import typer
from rich.markup import escape

from .. import common
from ..common import RUN_SAMPLING, err


def local_model_dir(location: str, settings: common.HeloxSettings) -> Path:
    """MODEL as a local directory: a path as given; an s3:// URI of an export or checkpoint in the
    artifact store (its directory or its manifest.json) downloaded into the verified cache."""
    from ..sample import SampleError

    if not location.startswith("s3://"):
        return Path(location)
    from shared.artifacts import ArtifactDigestError, ArtifactOutsideStoreError, ArtifactStore

    store = ArtifactStore.from_settings(settings)
    try:
        if not store.is_remote:
            raise ArtifactOutsideStoreError(f"{location!r}: the artifact store is {settings.artifacts}, not s3://")
        key = store.key(location).rstrip("/")
        if not key.endswith("/manifest.json") and key != "manifest.json":
            key += "/manifest.json"
        return common.s3_directory(store, store.current_ref(key))
    except (ArtifactOutsideStoreError, ArtifactDigestError, FileNotFoundError) as exc:
        raise SampleError(f"{location}: {exc}") from exc


def _positive(value: float) -> float:
    if not value > 0:
        raise typer.BadParameter(f"must be > 0 (1: off), got {value}")
    return value


def generate(
    location: Annotated[str, typer.Argument(metavar="MODEL", help="An export directory (manifest.json) or a trainer checkpoint directory; "
                                              "s3://… inside the artifact store: fetched and verified first.")],
    prompt: Annotated[str, typer.Option(help="Text to continue.")],
    max_tokens: Annotated[int, typer.Option(min=1, help="Tokens to generate at most (EOS stops earlier).")] = 64,
    temperature: Annotated[float, typer.Option(min=0.0, help="0: greedy.")] = RUN_SAMPLING["temperature"],
    top_k: Annotated[int, typer.Option(min=0, help="Sample from the k likeliest tokens; 0: all.")] = RUN_SAMPLING["top_k"],
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0, help="Nucleus mass; 1: off.")] = RUN_SAMPLING["top_p"],
    repetition_penalty: Annotated[float, typer.Option(
        callback=_positive, help="Logits of tokens already in the text divided by this (x it when negative); 1: off.")] = RUN_SAMPLING["repetition_penalty"],
    seed: Annotated[int, typer.Option(help="Sampling seed: one seed, one text.")] = RUN_SAMPLING["seed"],
    format: Annotated[Literal["native", "onnx", "gguf"], typer.Option(
        "--format", help="Which exported files to run (a checkpoint is native).")] = "native",
    tokenizer: Annotated[Path | None, typer.Option(
        help="sentencepiece model for a checkpoint (default: its dataset's, from the artifact store).")] = None,
    rag: Annotated[bool, typer.Option(
        "--rag", help="Prepend retrieved context as training packed it (needs rag_template.json and --index).")] = False,
    index: Annotated[Path | None, typer.Option(help="Local retrieval index for --rag (a dataset's rag_index/).")] = None,
) -> None:
    """Stream tokens as they come. An export that fails verification is refused (exit 1)."""
    from ..sample import SampleError, is_export, open_checkpoint, open_export, rag_prompt_ids, rag_template, stream_text

    settings = common.settings()
    try:
        model = local_model_dir(location, settings)
        if is_export(model):
            opened = open_export(model, common.signing_key(settings), format, warn=err.print)
        elif (model / "manifest.json").is_file():
            if format != "native":
                raise SampleError(f"{model} is a checkpoint: only --format native applies (export it for {format})")
            opened = open_checkpoint(model, settings, tokenizer)
        else:
            raise SampleError(f"{model} is neither an export nor a checkpoint directory (no manifest.json)")
        prompt_ids = None
        if rag:
            if index is None:
                raise SampleError("--rag needs --index DIR (the local retrieval index, a dataset's rag_index/)")
            prompt_ids, used = rag_prompt_ids(opened.tokenizer, rag_template(opened.export_dir), index, prompt,
                                              opened.decoder.max_seq_len)
            err.print(f"[dim]rag: {used} retrieved chunk(s) before the prompt[/dim]", highlight=False)
        out = sys.stdout
        out.write(prompt)
        out.flush()
        for piece in stream_text(opened, prompt, max_new_tokens=max_tokens, temperature=temperature,
                                 top_k=top_k or None, top_p=top_p if top_p < 1.0 else None, seed=seed,
                                 repetition_penalty=repetition_penalty, prompt_ids=prompt_ids):
            out.write(piece)
            out.flush()
        out.write("\n")
        out.flush()
    except SampleError as exc:
        line = " ".join(str(exc).split())  # one line
        err.print(f"[red]error:[/red] {escape(line)}", soft_wrap=True, highlight=False)
        raise typer.Exit(1) from exc
