"""Unit tests of fer_tasks.report: content, languages, escaping and written files."""

from __future__ import annotations

import base64
import io
import re
import string
import urllib.parse
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from matplotlib.figure import Figure

from fer_tasks.config import CLASS_NAMES, REPORT_LANGUAGES
from fer_tasks.report import (
    TEXT,
    ModelSummary,
    ReportInput,
    choose_best_model,
    plot_training_curves,
    render_report,
    write_report,
)

VOID_ELEMENTS = {
    "area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "wbr"
}


class TagBalanceChecker(HTMLParser):
    """Record every end tag that does not close the most recently opened element."""

    def __init__(self) -> None:
        super().__init__()
        self.open_tags: list[str] = []
        self.errors: list[str] = []
        self.start_counts: dict[str, int] = {}

    def handle_starttag(self, tag, attrs):
        self.start_counts[tag] = self.start_counts.get(tag, 0) + 1
        if tag not in VOID_ELEMENTS:
            self.open_tags.append(tag)

    def handle_endtag(self, tag):
        if not self.open_tags or self.open_tags[-1] != tag:
            self.errors.append(f"</{tag}> while open: {self.open_tags[-3:]}")
            return
        self.open_tags.pop()


def tiny_png(colour: str) -> bytes:
    figure = Figure(figsize=(0.5, 0.5))
    figure.patch.set_facecolor(colour)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=20)
    return buffer.getvalue()


def per_class_metrics(recall: float) -> dict:
    return {
        name: {"precision": 0.5, "recall": recall, "f1": 0.5, "support": 10}
        for name in CLASS_NAMES
    }


def make_model(name: str, accuracy: float, **changes) -> ModelSummary:
    values = dict(
        name=name,
        description=f"{name} description",
        parameter_count=1_234_567,
        layers=[
            ("image", "InputLayer", "(None, 48, 48, 1)", 0),
            ("predictions", "Dense", "(None, 7)", 1_234_567),
        ],
        epochs_run=12,
        best_epoch=9,
        seconds_per_epoch=42.5,
        history={
            "loss": [1.8, 1.5, 1.3],
            "accuracy": [0.3, 0.45, 0.5],
            "val_loss": [1.7, 1.55, 1.5],
            "val_accuracy": [0.35, 0.44, accuracy],
        },
        validation={
            "accuracy": accuracy,
            "macro_f1": 0.5432,
            "per_class": per_class_metrics(0.375),
        },
        confusion=np.eye(7),
        confused_pairs=[{"true": "Fear", "predicted": "Sad", "rate": 0.2125}],
        test_accuracy={"public": 0.6012, "private": 0.5987},
        mlflow_run_id=f"run-{name}-0001",
        model_uri=f"models:/fer2013-{name}/1",
        submission_file=f"submissions/{name}.csv",
    )
    values.update(changes)
    return ModelSummary(**values)


FIGURE_NAMES = [
    "figures/curves.png",
    "figures/confusion_cnn_aug.png",
    "figures/confusion_cnn.png",
    "figures/confusion_dnn.png",
    "figures/saliency_cnn_aug.png",
    "figures/filters_cnn.png",
    "figures/activations_cnn.png",
]


def make_report(**changes) -> ReportInput:
    colours = ["red", "green", "blue", "orange", "purple", "gray", "black"]
    values = dict(
        dag_id="fer2013_compare",
        run_id="manual__2025-01-01T00:00:00",
        generated_at="2025-01-01T01:02:03+00:00",
        data={
            "train_source": "/data/fer2013/train.csv",
            "test_source": "/data/fer2013/test.csv",
            "train_rows": 25838,
            "validation_rows": 2871,
            "test_rows": 7178,
            "validation_mode": "head",
            "class_counts": {name: 100 + index for index, name in enumerate(CLASS_NAMES)},
            "parse_seconds": 3.25,
            "skipped_rows": 0,
        },
        config={"epochs": 30, "models": ["cnn_aug", "cnn", "dnn"], "confusion_threshold": 0.15},
        models=[
            make_model("cnn_aug", 0.6123),
            make_model("cnn", 0.5871),
            make_model("dnn", 0.4416),
        ],
        best_model="cnn_aug",
        submission_file="submission.csv",
        figures={name: tiny_png(colour) for name, colour in zip(FIGURE_NAMES, colours)},
    )
    values.update(changes)
    return ReportInput(**values)


def assert_balanced_html(document: str) -> None:
    checker = TagBalanceChecker()
    checker.feed(document)
    checker.close()
    assert checker.errors == []
    assert checker.open_tags == []
    for tag in ("html", "head", "body", "title"):
        assert checker.start_counts.get(tag) == 1, tag


# --- choose_best_model


def test_choose_best_highest_accuracy():
    models = [make_model("dnn", 0.5), make_model("cnn", 0.62), make_model("cnn_aug", 0.61)]

    assert choose_best_model(models) == "cnn"


def test_choose_best_tie_follows_model_order():
    tied = [make_model("dnn", 0.6), make_model("cnn", 0.6), make_model("cnn_aug", 0.6)]

    assert choose_best_model(tied) == "cnn_aug"
    assert choose_best_model(tied[:2]) == "cnn"


def test_choose_best_rejects_empty_list():
    with pytest.raises(ValueError, match="empty"):
        choose_best_model([])


# --- translation table


def test_text_table_has_every_language():
    for key, row in TEXT.items():
        for language in REPORT_LANGUAGES:
            assert row.get(language), f"{key!r} has no {language} text"


def test_text_placeholders_match_across_languages():
    formatter = string.Formatter()
    for key, row in TEXT.items():
        fields = {
            language: {name for _, name, _, _ in formatter.parse(row[language]) if name}
            for language in REPORT_LANGUAGES
        }
        assert fields["zh-TW"] == fields["en"], key


# --- plot_training_curves


def test_training_curves_one_colour_per_model():
    models = [make_model("cnn_aug", 0.6), make_model("cnn", 0.58), make_model("dnn", 0.44)]

    figure = plot_training_curves(models)
    loss_axes, accuracy_axes = figure.axes[:2]
    colours = {line.get_label(): line.get_color() for line in accuracy_axes.lines}

    assert isinstance(figure, Figure)
    assert len(loss_axes.lines) == 6
    assert len(accuracy_axes.lines) == 6
    assert colours["cnn training"] == colours["cnn validation"]
    assert len({colours[f"{name} validation"] for name in ("cnn_aug", "cnn", "dnn")}) == 3
    assert list(accuracy_axes.lines[1].get_xdata()) == [1, 2, 3]
    assert accuracy_axes.lines[1].get_linestyle() == "--"


def test_training_curves_reject_no_models():
    with pytest.raises(ValueError, match="empty"):
        plot_training_curves([])


# --- render_report


@pytest.mark.parametrize("language", REPORT_LANGUAGES)
def test_render_contains_models_and_numbers(language):
    markdown, html_text = render_report(make_report(), language)

    for output in (markdown, html_text):
        for name in ("cnn_aug", "cnn", "dnn"):
            assert name in output
        for number in ("61.23%", "58.71%", "44.16%", "60.12%", "59.87%", "0.543", "1,234,567"):
            assert number in output, number
        assert "run-cnn_aug-0001" in output
        assert "models:/fer2013-dnn/1" in output
        assert "submission.csv" in output
        assert "21.25%" in output  # confused pair Fear -> Sad


@pytest.mark.parametrize("language", REPORT_LANGUAGES)
def test_render_names_best_model_in_summary(language):
    report = make_report(
        models=[make_model("cnn_aug", 0.55), make_model("cnn", 0.6345), make_model("dnn", 0.4)],
        best_model="cnn",
    )

    markdown, html_text = render_report(report, language)
    summary_html = html_text.split("<h2>")[1]
    summary_markdown = markdown.split("\n## ")[1]

    assert "<strong>cnn</strong>" in summary_html
    assert "63.45%" in summary_html
    assert "**cnn**" in summary_markdown
    assert "63.45%" in summary_markdown


def test_render_html_structure_english():
    _, html_text = render_report(make_report(), "en")

    assert html_text.startswith("<!DOCTYPE html>")
    assert '<html lang="en">' in html_text
    assert '<meta charset="utf-8">' in html_text
    assert "<details>" in html_text
    assert_balanced_html(html_text)


def test_render_traditional_chinese():
    markdown, html_text = render_report(make_report(), "zh-TW")

    assert '<html lang="zh-Hant-TW">' in html_text
    for heading in ("摘要", "資料", "模型架構", "訓練過程", "準確率", "混淆矩陣", "模型解釋", "執行設定"):
        assert f"<h2>{heading}</h2>" in html_text, heading
        assert f"## {heading}" in markdown, heading
    assert "Summary" not in html_text
    assert "Angry" in html_text  # class names stay in English
    assert_balanced_html(html_text)


@pytest.mark.parametrize("language", REPORT_LANGUAGES)
def test_render_embeds_every_figure(language):
    report = make_report()

    markdown, html_text = render_report(report, language)
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)

    for name, data in report.figures.items():
        assert f"data:image/png;base64,{base64.b64encode(data).decode('ascii')}" in html_text, name
    assert sorted(urllib.parse.unquote(link) for link in linked) == sorted(report.figures)
    assert "data:image" not in markdown


def test_render_escapes_user_values():
    hostile = "<script>alert('x')</script> & | `tick`"
    report = make_report(
        models=[
            make_model("cnn_aug", 0.6, description=hostile, mlflow_run_id="<b>run</b>"),
            make_model("cnn", 0.5),
            make_model("dnn", 0.4),
        ],
        run_id="run<1>",
        config={"note": "</td><script>"},
        extra_sections=[("Notes <i>", "Text with <img src=x> and `code <x>`.\n\n- item <li>")],
    )

    markdown, html_text = render_report(report)

    assert "<script>" not in html_text
    assert "<b>run</b>" not in html_text
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; | `tick`" in html_text
    assert "<code>run&lt;1&gt;</code>" in html_text
    assert "<h2>Notes &lt;i&gt;</h2>" in html_text
    assert "<code>code &lt;x&gt;</code>" in html_text
    assert "<li>item &lt;li&gt;</li>" in html_text
    assert_balanced_html(html_text)
    # Code spans show their text literally, so only markup outside them matters. The
    # layer tables are the only HTML the report puts into its Markdown on purpose.
    markdown_outside_code = re.sub(r"(`+).*?\1", "", markdown)
    markdown_outside_code = re.sub(r"</?(details|summary|code)>", "", markdown_outside_code)
    assert re.findall(r"(?<!\\)<", markdown_outside_code) == []
    assert "\\<script\\>" in markdown
    assert "\\|" in markdown


def test_render_markdown_tables_keep_columns():
    report = make_report(
        models=[
            make_model("cnn_aug", 0.6, description="a | b"),
            make_model("cnn", 0.5),
            make_model("dnn", 0.4),
        ]
    )

    markdown, _ = render_report(report)
    row = next(line for line in markdown.splitlines() if line.startswith("| `cnn_aug` | a"))

    assert len(re.findall(r"(?<!\\)\|", row)) == 4


def test_render_data_missing_and_extra_keys():
    report = make_report()
    report.data["test_source"] = None
    report.data["parse_seconds"] = None
    report.data["cache_hit"] = True

    markdown, _ = render_report(report)

    assert "| Test data | — |" in markdown
    assert "| CSV parse time (s) | — |" in markdown
    assert "| `cache_hit` | `true` |" in markdown


def test_render_markdown_underscores():
    report = make_report(
        models=[
            make_model("cnn_aug", 0.6, description="_emphasis_ in snake_case"),
            make_model("cnn", 0.5),
        ]
    )

    markdown, _ = render_report(report)

    assert "| \\_emphasis\\_ in snake_case |" in markdown
    assert "### cnn_aug" in markdown


def test_render_markdown_layers_collapsible():
    markdown, _ = render_report(make_report())

    assert markdown.count("<details>") == 3
    assert markdown.count("</details>") == 3
    assert "<summary>Layers of <code>cnn_aug</code> (2)</summary>" in markdown
    assert "| `predictions` | `Dense` | `(None, 7)` | 1,234,567 |" in markdown


@pytest.mark.parametrize("language", REPORT_LANGUAGES)
def test_render_without_test_labels(language):
    models = [
        make_model("cnn_aug", 0.6, test_accuracy={}),
        make_model("cnn", 0.5, test_accuracy={}),
    ]
    report = make_report(models=models)

    markdown, html_text = render_report(report, language)

    assert TEXT["no_test_labels"][language] in markdown
    assert TEXT["no_test_labels"][language] in html_text
    assert TEXT["test_accuracy_header"][language].split("{")[0] not in markdown


def test_render_lists_confused_pairs_or_none():
    models = [
        make_model("cnn_aug", 0.6, confused_pairs=[]),
        make_model(
            "cnn", 0.5, confused_pairs=[{"true": "Disgust", "predicted": "Angry", "rate": 0.4}]
        ),
    ]

    markdown, _ = render_report(make_report(models=models))

    assert "- Disgust predicted as Angry: 40.00%" in markdown
    assert "No class has 15% or more" in markdown


def test_render_draws_missing_curves():
    report = make_report()
    del report.figures["figures/curves.png"]

    markdown, html_text = render_report(report)

    assert "](figures/curves.png)" in markdown
    assert html_text.count("data:image/png;base64,") == len(FIGURE_NAMES)


def test_render_unknown_figure_in_other_section():
    report = make_report()
    report.figures["figures/histogram.png"] = tiny_png("yellow")

    markdown, _ = render_report(report)

    assert "## Other figures" in markdown
    assert "](figures/histogram.png)" in markdown


def test_render_rejects_unknown_language():
    with pytest.raises(ValueError, match="en, zh-TW"):
        render_report(make_report(), "fr")


@pytest.mark.parametrize("name", ["../outside.png", "/tmp/absolute.png", "figures/notes.txt", ""])
def test_render_rejects_bad_figure_name(name):
    report = make_report()
    report.figures[name] = b"data"

    with pytest.raises(ValueError, match="figure name"):
        render_report(report)


def test_render_rejects_unknown_best_model():
    with pytest.raises(ValueError, match="best_model"):
        render_report(make_report(best_model="resnet"))


# --- write_report


@pytest.mark.parametrize("language", REPORT_LANGUAGES)
def test_write_report_files(tmp_path, language):
    report = make_report()

    paths = write_report(report, tmp_path / "report", language)
    markdown = paths["report.md"].read_text(encoding="utf-8")
    html_text = paths["report.html"].read_text(encoding="utf-8")

    assert paths["report.md"] == tmp_path / "report" / "report.md"
    assert (markdown, html_text) == render_report(report, language)
    for name, data in report.figures.items():
        assert paths[name] == tmp_path / "report" / name
        assert paths[name].read_bytes() == data
    for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown):
        assert (tmp_path / "report" / urllib.parse.unquote(link)).is_file(), link


def test_write_report_leaves_no_partial_files(tmp_path):
    write_report(make_report(), tmp_path)
    write_report(make_report(), tmp_path, "zh-TW")  # overwrite in place

    leftovers = [path.name for path in tmp_path.rglob("*") if ".partial" in path.name]

    assert leftovers == []
    assert Path(tmp_path / "figures" / "confusion_dnn.png").is_file()


def test_write_report_draws_missing_curves(tmp_path):
    report = make_report()
    del report.figures["figures/curves.png"]

    paths = write_report(report, tmp_path)

    assert paths["figures/curves.png"].read_bytes().startswith(b"\x89PNG")


def test_write_report_rejects_unknown_language(tmp_path):
    with pytest.raises(ValueError, match="language"):
        write_report(make_report(), tmp_path, "de")

    assert list(tmp_path.iterdir()) == []
