"""The `lxm` command line: a thin layer over the library's typed functions.

Stages in pipeline order: extract (or convert tsv) -> build-corpus -> pretrain -> finetune -> predict -> evaluate;
quickstart runs them all on a synthetic world. One module per command group (`features`, `extract`, `corpus`,
`train`, `evaluate`, `checkpoint`, `quickstart`), sharing `common`; this module only assembles them, in the order
`lxm --help` lists them. The library never imports this package. Heavy imports happen inside each command, so
`lxm --help` is instant.
"""

from __future__ import annotations

import logging

import click
import typer
import typer.core

from lxm.cli import ask, checkpoint, corpus, evaluate, extract, features, gallery, quickstart, train

# `lxm --help` lists the commands in this order (typer would list every command group after the plain commands)
COMMANDS = ("quickstart", "extract", "convert", "export", "inspect", "show", "build-corpus", "pretrain", "finetune",
            "predict", "evaluate", "ask", "gallery", "plot", "convert-checkpoint")


class _PipelineOrder(typer.core.TyperGroup):
    def list_commands(self, ctx: click.Context) -> list[str]:
        order = {name: i for i, name in enumerate(COMMANDS)}  # a command not listed goes last
        return sorted(super().list_commands(ctx), key=lambda name: order.get(name, len(COMMANDS)))


app = typer.Typer(
    name="lxm",
    help="LXMERT reproduced end to end: region features, pretraining corpus, pretraining, finetuning, evaluation.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=_PipelineOrder,
)


@app.callback()
def _root(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log library messages at INFO level.")) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(name)s: %(message)s")


app.command("quickstart")(quickstart.quickstart_cmd)
app.command("extract")(extract.extract_cmd)
app.add_typer(features.convert_app, name="convert")
app.add_typer(features.export_app, name="export")
app.command("inspect")(features.inspect_cmd)
app.command("show")(features.show_cmd)
app.command("build-corpus")(corpus.build_corpus_cmd)
app.command("pretrain")(train.pretrain_cmd)
app.command("finetune")(train.finetune_cmd)
app.command("predict")(train.predict_cmd)
app.add_typer(evaluate.evaluate_app, name="evaluate")
app.command("ask")(ask.ask_cmd)
app.command("gallery")(gallery.gallery_cmd)
app.command("plot")(train.plot_cmd)
app.command("convert-checkpoint")(checkpoint.convert_checkpoint_cmd)


def main() -> None:
    app()
