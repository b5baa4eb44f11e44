"""``wakelab export``: a run's trained vocabulary as a transformers folder, a PEFT adapter, a GGUF file, or a full
MLflow model. The work is in :mod:`wakelab.export.formats` (and :mod:`wakelab.export.gguf`)."""

from __future__ import annotations

from pathlib import Path

import click


def _say(message: str) -> None:
    click.echo(f"wakelab: {message}", err=True)


@click.command("export", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("run", metavar="RUN|CHECKPOINT")
@click.option(
    "--to",
    "dest",
    required=True,
    metavar="DIR|FILE|mlflow",
    help="A new or empty folder (a .gguf file with --format gguf), or `mlflow` to log the full model "
    "(transformers flavour; with --format gguf the GGUF file too) to the run.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["hf", "peft", "gguf"]),
    default="hf",
    show_default=True,
    help="hf: a from_pretrained folder with the merged model; peft: a TrainableTokens adapter + tokenizer; "
    "gguf: one file for llama.cpp / Ollama (Llama and GPT-2 models).",
)
@click.option(
    "--outtype",
    type=click.Choice(["f32", "f16", "bf16", "q8_0"]),
    default="f16",
    show_default=True,
    help="With --format gguf: the type of the 2-D weights (norms stay f32).",
)
@click.option("--overwrite", is_flag=True, help="Replace a non-empty --to folder (or an existing --to file).")
@click.option(
    "--base",
    default=None,
    type=click.Path(file_okay=False),
    help="The base model's folder, when it is no longer where the run's model.name_or_path points.",
)
@click.option(
    "--quantized",
    is_flag=True,
    help="Keep a 4-bit base 4-bit (bitsandbytes serialisation) instead of its compute dtype.",
)
@click.option("--registered-model-name", default=None, help="With --to mlflow: also register it under this name.")
def export(run, dest, fmt, outtype, overwrite, base, quantized, registered_model_name):
    """Export a run's model so it loads without wakelab: RUN is a run's output directory, an MLflow run id, or a
    checkpoint-N folder. A FAILED or KILLED run is exported from its latest complete checkpoint.

    \b
    hf    AutoModelForCausalLM.from_pretrained(DIR), AutoTokenizer.from_pretrained(DIR); logits equal wakelab's
    peft  tok = AutoTokenizer.from_pretrained(DIR); base.resize_token_embeddings(len(tok));
          PeftModel.from_pretrained(base, DIR)
    gguf  llama-cli -m FILE, Ollama (FROM ./FILE), llama_cpp.Llama(FILE); added words are single tokens
    mlflow  mlflow.transformers.load_model("models:/<model id>"), pyfunc, the registry

    \b
    Examples:
      wakelab export runs/demo --to exported/demo
      wakelab export runs/demo --to exported/demo-peft --format peft
      wakelab export runs/demo --to exported/demo.gguf --format gguf --outtype q8_0
      wakelab export runs/demo/checkpoint-200 --to exported/step200 --overwrite
      wakelab export 3f2c9a... --to mlflow --registered-model-name wake-demo
    """
    from ..export.formats import ExportError
    from ..export.formats import export as do_export

    if fmt == "gguf":
        if quantized:
            raise ExportError("--quantized keeps a 4-bit base 4-bit in an hf folder; for gguf use --outtype q8_0")
        from ..export.gguf import export_gguf

        result = export_gguf(
            run,
            dest,
            overwrite=overwrite,
            base=base,
            outtype=outtype,
            registered_model_name=registered_model_name,
            say=_say,
        )
    else:
        result = do_export(
            run,
            dest,
            fmt,
            overwrite=overwrite,
            base=base,
            quantized=quantized,
            registered_model_name=registered_model_name,
            say=_say,
        )
    if result.fmt == "mlflow":
        click.echo(f"logged the full model: {result.dest}")
        click.echo(f"  load it: mlflow.transformers.load_model('{result.dest}')")
        if fmt == "gguf":
            click.echo(f"  the GGUF file: the logged model's artifact gguf/model-{outtype}.gguf")
        return
    click.echo(
        f"exported {result.new_tokens:,} new tokens ({result.vocab_size:,} in all) as {result.fmt} to {result.dest}"
    )
    if result.fmt == "hf":
        click.echo(f"  load it: AutoModelForCausalLM.from_pretrained('{result.dest}')")
    elif result.fmt == "gguf":
        click.echo(f"  run it: llama-cli -m {result.dest}   (Ollama: FROM ./{Path(result.dest).name} in a Modelfile)")
    else:
        click.echo(
            f"  load it: PeftModel.from_pretrained(base resized to {result.vocab_size:,} tokens, '{result.dest}')"
        )
