"""The `lxm` command line: a thin layer over the library's typed functions.

Stages in pipeline order: extract (or convert tsv) -> build-corpus -> pretrain -> finetune -> predict -> evaluate;
quickstart runs them all on a synthetic world. One module per command group (`features`, `extract`, `corpus`,
`train`, `evaluate`, `checkpoint`, `quickstart`), sharing `common`; this module only assembles them, in the order
`lxm --help` lists them, and makes every command's help show as written (`_plain_help`). The library never imports
this package. Heavy imports happen inside each command, so `lxm --help` is instant.
"""

from __future__ import annotations

import inspect
import logging

import click
import typer
import typer.core
from rich.markup import escape

from lxm.cli import ask, checkpoint, corpus, evaluate, extract, features, gallery, quickstart, train

# `lxm --help` lists the commands in this order (typer would list every command group after the plain commands)
COMMANDS = ("quickstart", "extract", "convert", "export", "inspect", "show", "build-corpus", "pretrain", "finetune",
            "predict", "evaluate", "check-submission", "ask", "gallery", "plot", "convert-checkpoint")


def _paragraphs_joined(text: str) -> str:
    """Help text with each paragraph on one line (typer's rich help keeps the docstrings' hard line breaks past the
    first paragraph, so at any other width they fall mid-sentence); a paragraph opening with \\b stays as written."""
    return "\n\n".join(p if p.lstrip().startswith("\b") else " ".join(line.strip() for line in p.splitlines())
                       for p in inspect.cleandoc(text).split("\n\n"))


def _plain_help(command) -> None:
    """Make a command's (and its subcommands') help show as written: no rich markup (`[left, right]` is text, not a
    style tag), paragraphs reflowed to the terminal, and no `<bool>` type shown for an on/off flag."""
    if command.help:
        command.help = escape(_paragraphs_joined(command.help))
    help_option = command.get_help_option(command.context_class(command))  # made once, then kept by the command
    for param in [*command.params, *([help_option] if help_option else [])]:
        if getattr(param, "help", None):
            param.help = escape(param.help)
        if getattr(param, "is_flag", False) and not getattr(param, "count", False):
            param.metavar = ""  # typer's rich help would show the flag's Python type, as if it took a value
    for sub in getattr(command, "commands", {}).values():
        _plain_help(sub)


class _PipelineOrder(typer.core.TyperGroup):
    """The `lxm` group: its commands listed in pipeline order, every help (its own and its commands') plain."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.rich_markup_mode == "rich":  # what typer renders with rich markup; plain click help needs none of it
            _plain_help(self)

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
    # huggingface_hub prints its records (Hub retries) through its own handler: propagated too, each came twice
    logging.getLogger("huggingface_hub").propagate = False


app.command("quickstart")(quickstart.quickstart_cmd)
app.command("extract")(extract.extract_cmd)
app.add_typer(features.convert_app, name="convert")
app.add_typer(features.export_app, name="export")
app.command("inspect")(features.inspect_cmd)
app.command("show")(features.show_cmd)
app.command("build-corpus")(corpus.build_corpus_cmd)
app.command("pretrain", cls=train.PretrainCommand)(train.pretrain_cmd)
app.command("finetune")(train.finetune_cmd)
app.command("predict")(train.predict_cmd)
app.add_typer(evaluate.evaluate_app, name="evaluate")
app.command("check-submission")(evaluate.check_submission_cmd)
app.command("ask")(ask.ask_cmd)
app.command("gallery")(gallery.gallery_cmd)
app.command("plot")(train.plot_cmd)
app.command("convert-checkpoint")(checkpoint.convert_checkpoint_cmd)


def main() -> None:
    app()
