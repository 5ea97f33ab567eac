"""`crossdiff study create | serve | analyse`: the reader study's commands, a typer sub-app of `crossdiff`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from crossdiff.errors import CrossdiffError

study_app = typer.Typer(
    name="study",
    help="A blinded reader study: clinicians score real and synthetic images 1-5 in a browser.",
    no_args_is_help=True,
)
console = Console(soft_wrap=True, highlight=False)

Folder = Annotated[Path, typer.Argument(help="Study folder made by `crossdiff study create`.")]


@study_app.command()
def create(
    out: Annotated[Path, typer.Option(help="Study folder to write (must not exist yet).")],
    from_run: Annotated[Optional[Path], typer.Option("--from", help="A `crossdiff benchmark` results folder.")] = None,
    reference: Annotated[Optional[Path], typer.Option(help="Folder of real target images (instead of --from).")] = None,
    method: Annotated[Optional[list[str]], typer.Option(help="NAME=DIR: a method's outputs named like the references.")] = None,
    mask: Annotated[Optional[Path], typer.Option(help="Folder of body masks named like the references (else automatic).")] = None,
    cases: Annotated[int, typer.Option(help="Cases to pick.")] = 4,
    slices: Annotated[int, typer.Option(help="Slices to pick per case.")] = 5,
    seed: Annotated[int, typer.Option(help="Seed of the picks and the order.")] = 0,
    modality: Annotated[str, typer.Option(help="auto, ct (HU windows) or mr (percentile window).")] = "auto",
    questions: Annotated[Optional[Path], typer.Option(help="YAML list of {id, text, low, high} (default: realism, "
                                                           "artefacts, diagnostic usability).")] = None,
    title: Annotated[str, typer.Option(help="Title shown to the readers.")] = "Reader study",
) -> None:
    """Pick cases and slices, shuffle the real and synthetic images under random ids and write the study folder."""
    from crossdiff.study.create import StudySettings, create_study, inputs_from_folders, inputs_from_run
    from crossdiff.study.layout import DEFAULT_QUESTIONS, read_questions

    if (from_run is None) == (reference is None):
        raise CrossdiffError("give either --from RUN (a benchmark results folder) or --reference DIR with --method NAME=DIR")
    if from_run is not None:
        inputs = inputs_from_run(from_run)
    else:
        inputs = inputs_from_folders(reference, dict(_named_folder(text) for text in method or []), mask)
    chosen = read_questions(questions) if questions is not None else list(DEFAULT_QUESTIONS)
    settings = StudySettings(cases, slices, seed, modality, title, chosen)
    study = create_study(inputs, out, settings)
    sources = 1 + len(inputs.methods)
    console.print(f"wrote {out}: {len(study.items)} images ({cases} cases x {slices} slices x {sources}: the real image "
                  f"and {', '.join(inputs.methods)}), {len(study.questions)} questions, windows "
                  f"{', '.join(w.name for w in study.windows)}")
    console.print(f"next: crossdiff study serve {out}")


def _named_folder(text: str) -> tuple[str, Path]:
    name, _, folder = text.partition("=")
    if not name.strip() or not folder.strip():
        raise CrossdiffError(f"--method expects NAME=DIR, got {text!r}")
    return name.strip(), Path(folder.strip())


@study_app.command()
def serve(
    folder: Folder,
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1 (0: any free port).")] = 8765,
    host: Annotated[str, typer.Option(help="Loopback address to bind; any other is refused.")] = "127.0.0.1",
) -> None:
    """Serve the scoring pages on this machine until Ctrl-C; every answer is saved the moment it is given."""
    from crossdiff.study.server import StudyPages
    from crossdiff.study.server import serve as run_server

    def announce(url: str, pages: StudyPages) -> None:
        study = pages.study
        console.print(f"{study.title}: {len(study.items)} images, {len(study.questions)} questions, scores in "
                      f"{pages.store.path}")
        console.print(f"readers open: {url}")
        console.print("(the address holds the study's access token: give it to the readers only; stop with Ctrl-C)")
        console.file.flush()

    run_server(folder, host, port, announce)


@study_app.command()
def analyse(
    folder: Folder,
    out: Annotated[Optional[Path], typer.Option(help="Folder for the tables and the report (default FOLDER/analysis).")] = None,
) -> None:
    """Unblind the scores: per-method statistics, real-vs-synthetic, reader agreement, tests, report."""
    from crossdiff.study.analyse import analyse_study

    result = analyse_study(folder, out)
    readers = len({a.reader for a in result.answers})
    console.print(f"{len(result.answers)} scores from {readers} reader(s) on {len(result.study.items)} images")
    for row in result.tables["summary.csv"]:
        console.print(f"  {row['question']:<22} {row['source']:<16} n {row['n']:>4}  mean {row['mean']:.2f}  "
                      f"median {row['median']:g}")
    console.print(f"wrote {len(result.files)} files; the report: {result.files[-1]}")
