"""`crossdiff study analyse`: unblind the readers' answers with the key and report, per question, each
method's scores beside the real images', how often readers scored the real image higher, how well the
readers agree, and paired tests between methods; as CSVs and a report like the benchmark's.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from crossdiff.atomic import write_text
from crossdiff.errors import CrossdiffError
from crossdiff.evaluation import figures
from crossdiff.evaluation.evaluate import csv_text
from crossdiff.evaluation.report import Section, Table, write_report
from crossdiff.evaluation.statistics import describe, pairwise_tests
from crossdiff.provenance import describe_code_version
from crossdiff.study import figures as study_figures
from crossdiff.study.agreement import krippendorff_alpha
from crossdiff.study.layout import REAL, SCALE, SCORES_FILE, KeyEntry, Study, load_key, load_study
from crossdiff.study.store import ScoreStore

ANALYSIS = "analysis"
SCORE_VALUES = range(SCALE[0], SCALE[1] + 1)


@dataclass(frozen=True)
class Answer:
    reader: str
    item: str
    case: str
    slice: int
    source: str
    question: str
    score: int

    @property
    def unit(self) -> str:
        """The slice it shows, 'case:slice': the unit over which methods are paired."""
        return f"{self.case}:{self.slice}"


@dataclass(frozen=True)
class StudyAnalysis:
    study: Study
    sources: list[str]  # REAL first, then the methods
    answers: list[Answer]
    tables: dict[str, list[dict[str, Any]]]  # file name -> rows
    files: list[Path]


def analyse_study(folder: Path, out: Path | None = None) -> StudyAnalysis:
    """Read the answers (the database is opened read-only), write the CSVs, figures and report into
    `out` (default FOLDER/analysis) and return them."""
    folder = Path(folder)
    out = folder / ANALYSIS if out is None else Path(out)
    study, key = load_study(folder), load_key(folder)
    store = ScoreStore(folder / SCORES_FILE, read_only=True)
    questions = [q.id for q in study.questions]
    answers = [_answer(s.reader, s.item, key, s.question, s.score) for s in store.scores() if s.question in questions]
    if not answers:
        raise CrossdiffError(f"{folder / SCORES_FILE}: no reader has scored an image yet")
    sources = list(dict.fromkeys([REAL, *(entry.source for entry in key.values())]))
    tables = {
        "scores.csv": [_row(a) for a in answers],
        "summary.csv": summary_rows(answers, sources, questions),
        "discrimination.csv": discrimination_rows(answers, sources, questions),
        "agreement.csv": agreement_rows(answers, questions),
        "tests.csv": test_rows(answers, sources, questions),
        "readers.csv": reader_rows(answers, study),
        "comments.csv": [{"reader": c.reader, **_where(key[c.item]), "comment": c.comment}
                         for c in store.comments() if c.item in key],
    }
    files = []
    for name, rows in tables.items():
        write_text(out / name, csv_text(rows))
        files.append(out / name)
    drawn = _figures(out / "figures", study, key, answers, sources, questions)
    report = write_report(out, f"{study.title}: results", _sections(study, answers, sources, tables, drawn),
                          intro=_intro(study, answers, sources))
    return StudyAnalysis(study, sources, answers, tables, files + [path for path, _ in drawn] + list(report))


def _answer(reader: str, item: str, key: dict[str, KeyEntry], question: str, score: int) -> Answer:
    if item not in key:
        raise CrossdiffError(f"the scores name item {item}, which the study's key does not know")
    entry = key[item]
    return Answer(reader, item, entry.case, entry.slice, entry.source, question, score)


def _where(entry: KeyEntry) -> dict[str, Any]:
    return {"case": entry.case, "slice": entry.slice, "source": entry.source}


def _row(answer: Answer) -> dict[str, Any]:
    return {"reader": answer.reader, "item": answer.item, "case": answer.case, "slice": answer.slice,
            "source": answer.source, "question": answer.question, "score": answer.score}


# ---------------------------------------------------------------------------------------------- tables


def summary_rows(answers: Sequence[Answer], sources: list[str], questions: list[str]) -> list[dict[str, Any]]:
    """Per source and question: n, mean, SD, median, quartiles, bootstrap CI of the mean, and the count of each score."""
    rows = []
    for question in questions:
        for source in sources:
            scores = [a.score for a in answers if a.source == source and a.question == question]
            counts = Counter(scores)
            rows.append({"question": question, "source": source, **describe([float(s) for s in scores]).as_dict(),
                         **{f"n_{value}": counts[value] for value in SCORE_VALUES}})
    return rows


def discrimination_rows(answers: Sequence[Answer], sources: list[str], questions: list[str]) -> list[dict[str, Any]]:
    """Per method and question, over the (reader, slice) pairs in which the reader scored both the real image
    and the method's: how often the real one scored higher, the same, or lower."""
    given = {(a.reader, a.unit, a.source, a.question): a.score for a in answers}
    rows = []
    for question in questions:
        for method in sources[1:]:
            pairs = [(score, given[(reader, unit, method, question)]) for (reader, unit, source, q), score in given.items()
                     if source == REAL and q == question and (reader, unit, method, question) in given]
            higher = sum(real > synthetic for real, synthetic in pairs)
            same = sum(real == synthetic for real, synthetic in pairs)
            rows.append({"question": question, "method": method, "pairs": len(pairs), "real_higher": higher,
                         "same": same, "real_lower": len(pairs) - higher - same,
                         "real_higher_fraction": higher / len(pairs) if pairs else float("nan")})
    return rows


def agreement_rows(answers: Sequence[Answer], questions: list[str]) -> list[dict[str, Any]]:
    """Krippendorff's alpha (ordinal) per question over all items, readers as observers."""
    readers = sorted({a.reader for a in answers})
    items = sorted({a.item for a in answers})
    rows = []
    for question in questions:
        matrix = np.full((len(readers), len(items)), np.nan)
        for a in (a for a in answers if a.question == question):
            matrix[readers.index(a.reader), items.index(a.item)] = a.score
        shared = int((np.isfinite(matrix).sum(axis=0) >= 2).sum())
        rows.append({"question": question, "readers": len(readers), "items_scored_by_2_or_more": shared,
                     "krippendorff_alpha_ordinal": krippendorff_alpha(matrix, "ordinal") if len(readers) > 1 else float("nan")})
    return rows


def test_rows(answers: Sequence[Answer], sources: list[str], questions: list[str]) -> list[dict[str, Any]]:
    """Two-sided paired Wilcoxon tests between every two sources per question, over the slices (each
    source's score on a slice averaged over the readers who scored it); pairs whose scores are the same on
    every slice have nothing to test and are left out."""
    rows = []
    for question in questions:
        by_source: dict[str, dict[str, float]] = {}
        for source in sources:
            mine = [a for a in answers if a.source == source and a.question == question]
            units = sorted({a.unit for a in mine})
            by_source[source] = {u: float(np.mean([a.score for a in mine if a.unit == u])) for u in units}
        common = set.intersection(*(set(values) for values in by_source.values()))
        paired = {s: {u: v for u, v in values.items() if u in common} for s, values in by_source.items()}
        for first, second in ((a, b) for i, a in enumerate(sources) for b in sources[i + 1:]):
            try:
                test = pairwise_tests(question, {first: paired[first], second: paired[second]}, "slices", True)[0]
            except CrossdiffError:
                continue
            rows.append(test.as_dict())
    return rows


def reader_rows(answers: Sequence[Answer], study: Study) -> list[dict[str, Any]]:
    rows = []
    for reader in sorted({a.reader for a in answers}):
        items = {a.item for a in answers if a.reader == reader}
        rows.append({"reader": reader, "images_scored": len(items), "images": len(study.items),
                     "complete": len(items) == len(study.items)})
    return rows


# --------------------------------------------------------------------------------------------- report


def _figures(folder: Path, study: Study, key: dict[str, KeyEntry], answers: Sequence[Answer], sources: list[str],
             questions: list[str]) -> list[tuple[Path, str]]:
    titles = {q.id: q.text for q in study.questions}
    counts = {q: {s: [sum(1 for a in answers if a.question == q and a.source == s and a.score == v) for v in SCORE_VALUES]
                  for s in sources} for q in questions}
    per_slice = {q: {s: [float(np.mean([a.score for a in answers if a.question == q and a.source == s and a.unit == u]))
                                 for u in sorted({a.unit for a in answers if a.question == q and a.source == s})]
                             for s in sources} for q in questions}
    drawn = [
        (study_figures.score_distributions(folder / "scores.png", counts, titles), "Share of each score per source and question"),
        (figures.box_plots(folder / "scores-per-slice.png", per_slice),
         "Score per slice (mean over its readers) per source and question; every slice a dot"),
    ]
    first = min(key.values(), key=lambda e: (e.case, e.slice))
    shown = {e.source: study.image(item, study.windows[0].name) for item, e in key.items()
             if (e.case, e.slice) == (first.case, first.slice)}
    ordered = {s: shown[s] for s in sources if s in shown and shown[s] is not None}
    if ordered:
        caption = f"What readers saw of {first.case}, slice {first.slice} ({study.windows[0].label}), unblinded"
        drawn.append((study_figures.unblinded_slice(folder / "example.png", ordered, caption), caption))
    return drawn


def _intro(study: Study, answers: Sequence[Answer], sources: list[str]) -> str:
    readers = len({a.reader for a in answers})
    slices = len({(a.case, a.slice) for a in answers})
    questions = "; ".join(f"{q.id}: {q.text} (1 = {q.low}, 5 = {q.high})" for q in study.questions)
    return (f"{len(study.items)} images ({slices} slices scored, each shown as the real image and as the output of "
            f"{', '.join(sources[1:])}), shuffled and shown under random ids in an order of each reader's own; "
            f"{readers} reader(s), {len(answers)} scores. Questions: {questions}. Display windows: "
            f"{', '.join(w.label for w in study.windows)}. Code: {describe_code_version()}.")


def _sections(study: Study, answers: Sequence[Answer], sources: list[str], tables: dict[str, list[dict[str, Any]]],
              drawn: list[tuple[Path, str]]) -> list[Section]:
    overview = []
    for source in sources:
        row: dict[str, Any] = {"source": source}
        for q in study.questions:
            stats_row = next(r for r in tables["summary.csv"] if r["question"] == q.id and r["source"] == source)
            row[q.id] = "n/a" if not stats_row["n"] else (f"{stats_row['mean']:.2f} ± {stats_row['sd']:.2f}, "
                                                         f"median {stats_row['median']:g}")
        overview.append(row)
    distribution = [{k: v for k, v in r.items() if k in ("question", "source", "n") or k.startswith("n_")}
                    for r in tables["summary.csv"]]
    slices = len({a.unit for a in answers})
    smallest = f"the smallest possible two-sided p-value over {slices} slices is {2 / 2 ** slices:.3g}"
    figures_by_name = {path.name: (path, caption) for path, caption in drawn}
    sections = [
        Section("Scores", "Mean ± SD and median of every score given, per source (the real images first).",
                [Table.from_records(overview), Table.from_records(distribution, caption="How often each score was given")],
                [figures_by_name["scores.png"], figures_by_name["scores-per-slice.png"]]),
        Section("Real or synthetic?",
                "For each reader and slice, the real image's score against the method's score of the same slice: "
                "a method whose images readers cannot tell from real ones has the real image higher about as often "
                "as lower.", [Table.from_records(tables["discrimination.csv"])]),
        Section("Agreement between readers",
                "Krippendorff's alpha for ordinal data over all images, readers as observers (1 is perfect agreement, "
                "0 is what chance gives; Krippendorff suggests relying on data from 0.8 and tentative conclusions "
                "from 0.667).", [Table.from_records(tables["agreement.csv"])]),
        Section("Statistical tests",
                f"Paired two-sided Wilcoxon signed-rank tests between every two sources per question, over the slices, "
                f"each source's score on a slice being the mean of its readers' scores; {smallest}. Higher scores are "
                "better.", [Table.from_records(tables["tests.csv"])] if tables["tests.csv"] else []),
        Section("Readers", "", [Table.from_records(tables["readers.csv"])]),
    ]
    if "example.png" in figures_by_name:
        sections.append(Section("Images", "", [], [figures_by_name["example.png"]]))
    if tables["comments.csv"]:
        sections.append(Section("Comments", "", [Table.from_records(tables["comments.csv"])]))
    return sections
