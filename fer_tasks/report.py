"""The comparison report of one pipeline run, in Markdown and in HTML.

The report is built once as a small document tree (headings, paragraphs, tables,
figures) and rendered twice. The Markdown file references figures as relative files
next to it. The HTML file is self-contained, with figures embedded as base64 data
URIs. Both outputs escape every value that comes from the run.

All visible text of both languages lives in `TEXT`, one row per phrase and one column
per language. Adding a language means adding a column there and the language code to
`REPORT_LANGUAGES` in `fer_tasks.config`. Technical terms (model and class names, CNN,
DNN, MLflow, Keras layer names, epoch, macro F1) stay as they are in the field.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import mimetypes
import re
import string
import tempfile
import urllib.parse
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from fer_tasks import checkpoints, files, tracking
from fer_tasks import config as settings
from fer_tasks.config import CLASS_NAMES, MODEL_NAMES, NUM_CLASSES, REPORT_LANGUAGES, PipelineConfig
from fer_tasks.datasets import load_splits
from fer_tasks.tracking import RunContext

logger = logging.getLogger(__name__)

CURVES_FIGURE = "figures/curves.png"
SUBMISSION_FILE = "submission.csv"
DEFAULT_CONFUSION_THRESHOLD = 0.15
MISSING = "—"

# Figure names follow "<folder>/<kind>_<model>.png", for example figures/saliency_cnn.png.
MODEL_FIGURE_KINDS = ("confusion", "saliency", "filters", "activations")
EXPLANATION_FIGURE_KINDS = ("saliency", "filters", "activations")

TEXT: dict[str, dict[str, str]] = {
    "html_lang": {"en": "en", "zh-TW": "zh-Hant-TW"},
    "list_separator": {"en": ", ", "zh-TW": "、"},
    "title": {
        "en": "FER2013 facial expression classifiers: model comparison",
        "zh-TW": "FER2013 臉部表情分類器：模型比較",
    },
    "run_info": {
        "en": "DAG {dag_id}, run {run_id}, generated at {generated_at}.",
        "zh-TW": "DAG {dag_id}，執行 {run_id}，產生時間 {generated_at}。",
    },
    # Summary
    "summary_heading": {"en": "Summary", "zh-TW": "摘要"},
    "summary_best": {
        "en": "Best model by validation accuracy: {model} ({accuracy}).",
        "zh-TW": "依驗證集準確率選出的最佳模型：{model}（{accuracy}）。",
    },
    "summary_test": {
        "en": "Test accuracy of {model}: {scores}.",
        "zh-TW": "{model} 的測試集準確率：{scores}。",
    },
    "summary_submission": {
        "en": "Kaggle submission file: {path}.",
        "zh-TW": "Kaggle 提交檔：{path}。",
    },
    "summary_model_line": {
        "en": "{model}: validation accuracy {accuracy}, macro F1 {macro_f1}",
        "zh-TW": "{model}：驗證集準確率 {accuracy}，macro F1 {macro_f1}",
    },
    # Data
    "data_heading": {"en": "Data", "zh-TW": "資料"},
    "item_header": {"en": "Item", "zh-TW": "項目"},
    "value_header": {"en": "Value", "zh-TW": "值"},
    "data_train_source": {"en": "Training data", "zh-TW": "訓練資料來源"},
    "data_test_source": {"en": "Test data", "zh-TW": "測試資料來源"},
    "data_train_rows": {"en": "Training rows", "zh-TW": "訓練集筆數"},
    "data_validation_rows": {"en": "Validation rows", "zh-TW": "驗證集筆數"},
    "data_test_rows": {"en": "Test rows", "zh-TW": "測試集筆數"},
    "data_validation_mode": {"en": "Validation split", "zh-TW": "驗證集切分方式"},
    "data_parse_seconds": {"en": "CSV parse time (s)", "zh-TW": "CSV 解析時間（秒）"},
    "data_skipped_rows": {"en": "Skipped invalid rows", "zh-TW": "略過的無效列數"},
    "data_labelled_tests": {"en": "Labelled test rows", "zh-TW": "有標籤的測試列數"},
    "data_sha256": {"en": "Training file SHA-256", "zh-TW": "訓練檔 SHA-256"},
    "class_counts_heading": {"en": "Images per class", "zh-TW": "各類別影像數"},
    "class_header": {"en": "Class", "zh-TW": "類別"},
    "images_header": {"en": "Images", "zh-TW": "影像數"},
    "share_header": {"en": "Share", "zh-TW": "比例"},
    # Architecture
    "architecture_heading": {"en": "Architectures", "zh-TW": "模型架構"},
    "model_header": {"en": "Model", "zh-TW": "模型"},
    "description_header": {"en": "Description", "zh-TW": "說明"},
    "parameters_header": {"en": "Parameters", "zh-TW": "參數量"},
    "layers_summary": {
        "en": "Layers of {model} ({count})",
        "zh-TW": "{model} 的各層（共 {count} 層）",
    },
    "layer_header": {"en": "Layer", "zh-TW": "層名稱"},
    "layer_type_header": {"en": "Type", "zh-TW": "類型"},
    "output_shape_header": {"en": "Output shape", "zh-TW": "輸出形狀"},
    # Training
    "training_heading": {"en": "Training", "zh-TW": "訓練過程"},
    "curves_caption": {
        "en": "Loss and accuracy per epoch. "
        "Solid lines: training data. Dashed lines: validation data.",
        "zh-TW": "每個 epoch 的 loss 與 accuracy。實線為訓練集，虛線為驗證集。",
    },
    "epochs_run_header": {"en": "Epochs run", "zh-TW": "執行 epoch 數"},
    "best_epoch_header": {"en": "Best epoch", "zh-TW": "最佳 epoch"},
    "seconds_per_epoch_header": {"en": "Seconds per epoch", "zh-TW": "每個 epoch 秒數"},
    "training_minutes_header": {"en": "Training time (min)", "zh-TW": "訓練時間（分鐘）"},
    # Accuracy
    "accuracy_heading": {"en": "Accuracy", "zh-TW": "準確率"},
    "validation_accuracy_header": {"en": "Validation accuracy", "zh-TW": "驗證集準確率"},
    "macro_f1_header": {"en": "Macro F1", "zh-TW": "Macro F1"},
    "test_accuracy_header": {"en": "Test accuracy ({split})", "zh-TW": "測試集準確率（{split}）"},
    "split_public": {"en": "public", "zh-TW": "公開"},
    "split_private": {"en": "private", "zh-TW": "非公開"},
    "no_test_labels": {
        "en": "The test data has no labels, so no test accuracy is reported.",
        "zh-TW": "測試資料沒有標籤，因此不列出測試集準確率。",
    },
    "recall_heading": {
        "en": "Recall per class (validation data)",
        "zh-TW": "各類別召回率（recall，驗證集）",
    },
    # Confusion
    "confusion_heading": {"en": "Confusion matrices", "zh-TW": "混淆矩陣"},
    "confusion_intro": {
        "en": "Rows are true classes and columns are predicted classes. "
        "Each row is divided by the number of validation images of its class.",
        "zh-TW": "列為真實類別，欄為預測類別。每一列皆除以該類別的驗證集影像數。",
    },
    "confusion_caption": {
        "en": "Normalised confusion matrix of {model}",
        "zh-TW": "{model} 的正規化混淆矩陣",
    },
    "confused_pairs_intro": {
        "en": "Classes of which at least {threshold} of the images "
        "are predicted as one other class:",
        "zh-TW": "真實類別中至少 {threshold} 的影像被預測為同一個其他類別的組合：",
    },
    "confused_pair": {
        "en": "{true} predicted as {predicted}: {rate}",
        "zh-TW": "{true} 被預測為 {predicted}：{rate}",
    },
    "no_confused_pairs": {
        "en": "No class has {threshold} or more of its images predicted as one other class.",
        "zh-TW": "沒有任何類別有 {threshold} 以上的影像被預測為同一個其他類別。",
    },
    # Explanations
    "explanations_heading": {"en": "Explanations", "zh-TW": "模型解釋"},
    "saliency_heading": {"en": "Saliency maps", "zh-TW": "顯著圖（saliency map）"},
    "saliency_intro": {
        "en": "Each map shows how strongly each input pixel affects "
        "the score of the predicted class.",
        "zh-TW": "每張圖顯示各輸入像素對預測類別分數的影響程度。",
    },
    "saliency_caption": {"en": "Saliency maps of {model}", "zh-TW": "{model} 的顯著圖"},
    "filters_heading": {
        "en": "Gradient ascent on convolution filters",
        "zh-TW": "卷積濾波器的梯度上升（gradient ascent）視覺化",
    },
    "filters_intro": {
        "en": "Each image is an input generated by gradient ascent "
        "to maximise the response of one filter.",
        "zh-TW": "每張影像都是以梯度上升產生、使單一濾波器反應最大化的輸入。",
    },
    "filters_caption": {"en": "Filter visualisations of {model}", "zh-TW": "{model} 的濾波器視覺化"},
    "activations_heading": {"en": "Layer outputs", "zh-TW": "中間層輸出"},
    "activations_intro": {
        "en": "Feature maps that one layer outputs for sample images.",
        "zh-TW": "樣本影像在單一層輸出的特徵圖（feature map）。",
    },
    "activations_caption": {"en": "Layer outputs of {model}", "zh-TW": "{model} 的中間層輸出"},
    "other_figures_heading": {"en": "Other figures", "zh-TW": "其他圖表"},
    # Settings and MLflow
    "settings_heading": {"en": "Settings", "zh-TW": "執行設定"},
    "setting_header": {"en": "Setting", "zh-TW": "設定"},
    "mlflow_heading": {"en": "MLflow runs", "zh-TW": "MLflow 執行紀錄"},
    "mlflow_run_header": {"en": "MLflow run id", "zh-TW": "MLflow run id"},
    "model_uri_header": {"en": "Model URI", "zh-TW": "模型 URI"},
    "submission_header": {"en": "Submission file", "zh-TW": "提交檔"},
}

# Keys of ReportInput.data in display order, with the TEXT key of their label.
DATA_LABELS = {
    "train_source": "data_train_source",
    "test_source": "data_test_source",
    "train_rows": "data_train_rows",
    "validation_rows": "data_validation_rows",
    "test_rows": "data_test_rows",
    "validation_mode": "data_validation_mode",
    "parse_seconds": "data_parse_seconds",
    "skipped_rows": "data_skipped_rows",
    "labelled_tests": "data_labelled_tests",
    "sha256": "data_sha256",
}


@dataclass
class ModelSummary:
    """Everything the report shows about one trained model."""

    name: str
    description: str
    parameter_count: int
    layers: list[tuple[str, str, str, int]]  # (layer name, layer type, output shape, parameters)
    epochs_run: int
    best_epoch: int
    seconds_per_epoch: float
    history: dict[str, list[float]]  # per epoch: "loss", "accuracy", "val_loss", "val_accuracy"
    validation: dict[str, Any]  # output of fer_tasks.evaluation.classification_metrics
    confusion: np.ndarray  # (7, 7), row-normalised
    confused_pairs: list[dict[str, Any]]
    test_accuracy: dict[str, float]  # {"public": 0.61, "private": 0.60}, empty without test labels
    mlflow_run_id: str
    model_uri: str
    submission_file: str  # relative path of this model's submission CSV


@dataclass
class ReportInput:
    """Results of one DAG run, collected for the report."""

    dag_id: str
    run_id: str
    generated_at: str  # ISO 8601 time
    data: dict[str, Any]
    config: dict[str, Any]  # the run's settings, JSON-ready
    models: list[ModelSummary]
    best_model: str
    submission_file: str  # relative path of the Kaggle submission
    figures: dict[str, bytes]  # PNG bytes keyed by relative file name, e.g. "figures/curves.png"
    extra_sections: list[tuple[str, str]] = field(default_factory=list)  # (heading, text)


# ---------------------------------------------------------------------------
# Model choice and the training-curves figure


def _model_order(name: str) -> int:
    return MODEL_NAMES.index(name) if name in MODEL_NAMES else len(MODEL_NAMES)


def _validation_accuracy(model: ModelSummary) -> float:
    try:
        return float(model.validation["accuracy"])
    except (KeyError, TypeError) as error:
        raise ValueError(f"model {model.name!r} has no validation accuracy: {error!r}") from error


def choose_best_model(models: Sequence[ModelSummary]) -> str:
    """Return the name of the model with the highest validation accuracy.

    Ties go to the model that comes first in `MODEL_NAMES` (cnn_aug, cnn, dnn). Other
    names rank after those, in the order given.
    """
    if not models:
        raise ValueError("no models to choose from: models is empty")
    ranked = sorted(
        enumerate(models),
        key=lambda item: (-_validation_accuracy(item[1]), _model_order(item[1].name), item[0]),
    )
    return ranked[0][1].name


def _model_colour(name: str, position: int) -> str:
    # Fixed colours per model name, so the same model looks the same in every report.
    index = MODEL_NAMES.index(name) if name in MODEL_NAMES else len(MODEL_NAMES) + position
    return f"C{index % 10}"


def plot_training_curves(models: Sequence[ModelSummary]) -> Figure:
    """Plot loss and accuracy per epoch for training and validation data, one colour per model.

    Training data is drawn solid and validation data dashed. Series missing from a
    model's history are left out.
    """
    if not models:
        raise ValueError("no models to plot: models is empty")
    # NOTE: figure text stays English in every report language, because matplotlib's
    # default font (DejaVu Sans) has no CJK glyphs.
    figure = Figure(figsize=(11.0, 4.2), layout="constrained")
    loss_axes, accuracy_axes = figure.subplots(1, 2)

    for position, model in enumerate(models):
        colour = _model_colour(model.name, position)
        for axes, metric in ((loss_axes, "loss"), (accuracy_axes, "accuracy")):
            for prefix, style, split in (("", "-", "training"), ("val_", "--", "validation")):
                values = model.history.get(prefix + metric) or []
                epochs = range(1, len(values) + 1)
                axes.plot(epochs, values, style, color=colour, label=f"{model.name} {split}")

    for axes, metric in ((loss_axes, "Loss"), (accuracy_axes, "Accuracy")):
        axes.set_xlabel("Epoch")
        axes.set_ylabel(metric)
        axes.set_title(metric)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
    accuracy_axes.legend(fontsize=8, loc="lower right")
    return figure


def _figure_png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


# ---------------------------------------------------------------------------
# Document tree shared by the Markdown and HTML renderers


@dataclass(frozen=True)
class _Code:
    text: str


@dataclass(frozen=True)
class _Strong:
    text: str


_Inline = str | _Code | _Strong
_Content = _Inline | tuple[_Inline, ...]


@dataclass
class _Heading:
    level: int
    text: str


@dataclass
class _Paragraph:
    content: _Content


@dataclass
class _BulletList:
    items: list[_Content]


@dataclass
class _Table:
    headers: list[str]
    rows: list[list[_Content]]
    numeric_columns: frozenset[int] = frozenset()


@dataclass
class _Image:
    name: str  # key in the figures dict
    caption: str


@dataclass
class _Collapsible:
    summary: _Content
    blocks: list[Any]


def _pieces(content: _Content) -> tuple[_Inline, ...]:
    return content if isinstance(content, tuple) else (content,)


class _Phrases:
    """Lookup of `TEXT` phrases in one language."""

    def __init__(self, language: str) -> None:
        self.language = language

    def plain(self, key: str, **fields: str) -> str:
        return TEXT[key][self.language].format(**fields)

    def rich(self, key: str, **fields: _Inline) -> tuple[_Inline, ...]:
        """Fill a phrase's placeholders and return its pieces in order.

        Values stay separate pieces, so a `_Code` value renders as code in both formats.
        """
        pieces: list[_Inline] = []
        for literal, field_name, _, _ in string.Formatter().parse(TEXT[key][self.language]):
            if literal:
                pieces.append(literal)
            if field_name is not None:
                pieces.append(fields[field_name])
        return tuple(pieces)


_INLINE_MARKUP = re.compile(r"(`[^`]+`|\*\*[^*]+\*\*)")


def _parse_inline(text: str) -> tuple[_Inline, ...]:
    pieces: list[_Inline] = []
    # re.split with one group puts the matched markup at the odd positions.
    for position, part in enumerate(_INLINE_MARKUP.split(text)):
        if not part:
            continue
        if position % 2 == 0:
            pieces.append(part)
        elif part.startswith("`"):
            pieces.append(_Code(part[1:-1]))
        else:
            pieces.append(_Strong(part[2:-2]))
    return tuple(pieces)


def _parse_extra_text(text: str) -> list[Any]:
    """Turn the text of an extra section into paragraphs and bullet lists.

    Blank lines separate blocks. A block whose lines all start with "- " or "* " is
    a list. Inline `code` and **bold** are kept. Any other markup is shown as text.
    """
    blocks: list[Any] = []
    for chunk in re.split(r"\n\s*\n", text.strip()):
        lines = [line.strip() for line in chunk.splitlines() if line.strip()]
        if not lines:
            continue
        if all(line.startswith(("- ", "* ")) for line in lines):
            blocks.append(_BulletList([_parse_inline(line[2:]) for line in lines]))
        else:
            blocks.append(_Paragraph(_parse_inline(" ".join(lines))))
    return blocks


# ---------------------------------------------------------------------------
# Markdown renderer

# Backslash escapes of ASCII punctuation are part of CommonMark, so "\<" shows "<".
_MARKDOWN_SPECIAL = re.compile(r"([\\`*\[\]<>|&#!])")
# An underscore between two letters or digits cannot start or end emphasis, so
# "cnn_aug" stays readable and only underscores at word edges are escaped.
_MARKDOWN_EDGE_UNDERSCORE = re.compile(r"(?<![0-9A-Za-z])_|_(?![0-9A-Za-z])")


def _single_line(text: str) -> str:
    return " ".join(str(text).split())


def _markdown_code(text: str) -> str:
    text = _single_line(text)
    longest_run = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * (longest_run + 1)
    if text.startswith("`") or text.endswith("`"):
        text = f" {text} "
    return f"{fence}{text}{fence}"


def _escape_markdown(text: str) -> str:
    # Whitespace runs become one space. Edge spaces stay because they join neighbouring pieces.
    escaped = _MARKDOWN_SPECIAL.sub(r"\\\1", re.sub(r"\s+", " ", text))
    return _MARKDOWN_EDGE_UNDERSCORE.sub(r"\\_", escaped)


def _markdown_inline(content: _Content, in_table: bool = False) -> str:
    parts = []
    for piece in _pieces(content):
        if isinstance(piece, _Code):
            rendered = _markdown_code(piece.text)
            # GitHub-flavoured tables split cells on "|" even inside code spans.
            parts.append(rendered.replace("|", "\\|") if in_table else rendered)
        elif isinstance(piece, _Strong):
            parts.append(f"**{_escape_markdown(piece.text.strip())}**")
        else:
            parts.append(_escape_markdown(piece))
    return "".join(parts)


def _markdown_table(table: _Table) -> str:
    def line(cells: Iterable[str]) -> str:
        return "| " + " | ".join(cells) + " |"

    rules = [
        "---:" if index in table.numeric_columns else "---" for index in range(len(table.headers))
    ]
    lines = [line(_markdown_inline(header, in_table=True) for header in table.headers), line(rules)]
    lines += [line(_markdown_inline(cell, in_table=True) for cell in row) for row in table.rows]
    return "\n".join(lines)


def _render_markdown_block(block: Any) -> str:
    if isinstance(block, _Heading):
        return "#" * block.level + " " + _markdown_inline(block.text)
    if isinstance(block, _Paragraph):
        return _markdown_inline(block.content)
    if isinstance(block, _BulletList):
        return "\n".join("- " + _markdown_inline(item) for item in block.items)
    if isinstance(block, _Table):
        return _markdown_table(block)
    if isinstance(block, _Image):
        caption = _markdown_inline(block.caption)
        return f"![{caption}]({urllib.parse.quote(block.name)})\n\n*{caption}*"
    if isinstance(block, _Collapsible):
        # Renderers that pass raw HTML through, such as GitHub's, show <details> collapsed.
        # The blank lines let the Markdown inside it render as Markdown.
        parts = [f"<details>\n<summary>{_html_inline(block.summary)}</summary>"]
        parts += [_render_markdown_block(inner) for inner in block.blocks]
        parts.append("</details>")
        return "\n\n".join(parts)
    raise TypeError(f"unknown report block type {type(block).__name__}")


def _render_markdown(blocks: Sequence[Any]) -> str:
    return "\n\n".join(_render_markdown_block(block) for block in blocks) + "\n"


# ---------------------------------------------------------------------------
# HTML renderer

_HTML_PAGE = string.Template(
    """<!DOCTYPE html>
<html lang="$lang">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>$title</title>
<style>
$style
</style>
</head>
<body>
<main>
$body
</main>
</body>
</html>
"""
)

_HTML_STYLE = """\
body { margin: 0; color: #1f2328; background: #ffffff; line-height: 1.5;
  font-family: system-ui, -apple-system, "Segoe UI", "Noto Sans TC", "PingFang TC",
  "Microsoft JhengHei", sans-serif; }
main { max-width: 64rem; margin: 0 auto; padding: 1.5rem; }
h1 { font-size: 1.7rem; }
h2 { margin-top: 2.2rem; padding-bottom: 0.2rem; border-bottom: 1px solid #d0d7de; }
.table-scroll { overflow-x: auto; }
table { border-collapse: collapse; margin: 0.75rem 0; font-size: 0.95rem; }
th, td { border: 1px solid #d0d7de; padding: 0.3rem 0.6rem; text-align: left; vertical-align: top; }
th { background: #f6f8fa; }
th.number, td.number { text-align: right; font-variant-numeric: tabular-nums; }
code { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 0.9em;
  background: #f6f8fa; padding: 0 0.2em; border-radius: 3px; overflow-wrap: anywhere; }
figure { margin: 1rem 0; }
img { max-width: 100%; height: auto; border: 1px solid #d0d7de; }
figcaption { color: #57606a; font-size: 0.9rem; }
details { margin: 0.5rem 0; }
summary { cursor: pointer; }"""


def _html_inline(content: _Content) -> str:
    parts = []
    for piece in _pieces(content):
        if isinstance(piece, _Code):
            parts.append(f"<code>{html.escape(piece.text)}</code>")
        elif isinstance(piece, _Strong):
            parts.append(f"<strong>{html.escape(piece.text)}</strong>")
        else:
            parts.append(html.escape(piece))
    return "".join(parts)


def _html_table(table: _Table) -> str:
    def cell(tag: str, index: int, content: _Content) -> str:
        attribute = ' class="number"' if index in table.numeric_columns else ""
        return f"<{tag}{attribute}>{_html_inline(content)}</{tag}>"

    header = "".join(cell("th", index, text) for index, text in enumerate(table.headers))
    rows = [
        "<tr>" + "".join(cell("td", index, content) for index, content in enumerate(row)) + "</tr>"
        for row in table.rows
    ]
    return (
        '<div class="table-scroll"><table>\n'
        f"<thead><tr>{header}</tr></thead>\n"
        "<tbody>\n" + "\n".join(rows) + "\n</tbody>\n</table></div>"
    )


def _data_uri(name: str, data: bytes) -> str:
    media_type = mimetypes.guess_type(name)[0]
    return f"data:{media_type};base64,{base64.b64encode(data).decode('ascii')}"


def _render_html_block(block: Any, figures: dict[str, bytes]) -> str:
    if isinstance(block, _Heading):
        return f"<h{block.level}>{html.escape(block.text)}</h{block.level}>"
    if isinstance(block, _Paragraph):
        return f"<p>{_html_inline(block.content)}</p>"
    if isinstance(block, _BulletList):
        items = "".join(f"<li>{_html_inline(item)}</li>" for item in block.items)
        return f"<ul>{items}</ul>"
    if isinstance(block, _Table):
        return _html_table(block)
    if isinstance(block, _Image):
        caption = html.escape(block.caption)
        source = _data_uri(block.name, figures[block.name])
        return (
            f'<figure><img src="{source}" alt="{caption}">'
            f"<figcaption>{caption}</figcaption></figure>"
        )
    if isinstance(block, _Collapsible):
        inner = "\n".join(_render_html_block(item, figures) for item in block.blocks)
        return f"<details>\n<summary>{_html_inline(block.summary)}</summary>\n{inner}\n</details>"
    raise TypeError(f"unknown report block type {type(block).__name__}")


def _render_html(blocks: Sequence[Any], figures: dict[str, bytes], phrases: _Phrases) -> str:
    body = "\n".join(_render_html_block(block, figures) for block in blocks)
    return _HTML_PAGE.substitute(
        lang=html.escape(phrases.plain("html_lang")),
        title=html.escape(phrases.plain("title")),
        style=_HTML_STYLE,
        body=body,
    )


# ---------------------------------------------------------------------------
# Value formatting


def _percent(value: Any) -> str:
    return MISSING if value is None else f"{float(value):.2%}"


def _score(value: Any) -> str:
    return MISSING if value is None else f"{float(value):.3f}"


def _count(value: Any) -> str:
    return MISSING if value is None else f"{int(value):,}"


def _threshold_text(threshold: float) -> str:
    # "%g" keeps every significant digit, so 0.125 shows as "12.5%" and not "12%".
    return f"{float(threshold) * 100:g}%"


def _json_text(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, default=str)


def _split_label(phrases: _Phrases, split: str) -> str:
    key = f"split_{split}"
    return phrases.plain(key) if key in TEXT else split


def _test_splits(models: Sequence[ModelSummary]) -> list[str]:
    splits = {split for model in models for split in model.test_accuracy}
    known = [split for split in ("public", "private") if split in splits]
    return known + sorted(splits - set(known))


def _by_validation_accuracy(models: Sequence[ModelSummary]) -> list[ModelSummary]:
    return sorted(
        models, key=lambda model: (-_validation_accuracy(model), _model_order(model.name))
    )


# ---------------------------------------------------------------------------
# Figures: names, validation and captions


def _validate_figure_name(name: str) -> None:
    path = PurePosixPath(name)
    if not name or "\\" in name or path.is_absolute() or ".." in path.parts:
        raise ValueError(
            f"invalid figure name {name!r}: use a relative path inside the report folder, "
            "such as 'figures/curves.png'"
        )
    media_type = mimetypes.guess_type(name)[0]
    if media_type is None or not media_type.startswith("image/"):
        raise ValueError(
            f"invalid figure name {name!r}: the suffix must be an image type such as .png"
        )


def _figure_kind(name: str) -> tuple[str, str]:
    """Split "figures/saliency_cnn_aug.png" into ("saliency", "cnn_aug")."""
    kind, _, model = PurePosixPath(name).stem.partition("_")
    return kind, model


def _index_figures(
    figures: dict[str, bytes], model_names: Sequence[str]
) -> tuple[dict[tuple[str, str], str], list[str]]:
    """Sort figure names into (kind, model) slots. Names that fit no slot are "others"."""
    slots: dict[tuple[str, str], str] = {}
    others: list[str] = []
    for name in sorted(figures):
        kind, model = _figure_kind(name)
        is_curves = name == CURVES_FIGURE
        fits = is_curves or (kind in MODEL_FIGURE_KINDS and model in model_names)
        slot = ("curves", "") if is_curves else (kind, model)
        if fits and slot not in slots:
            slots[slot] = name
        else:
            others.append(name)
    return slots, others


def _figures_with_curves(report: ReportInput) -> dict[str, bytes]:
    """Return the report's figures, adding the training curves when they are missing."""
    figures = dict(report.figures)
    has_history = any(model.history for model in report.models)
    if CURVES_FIGURE not in figures and has_history:
        figures[CURVES_FIGURE] = _figure_png(plot_training_curves(report.models))
    return figures


# ---------------------------------------------------------------------------
# Sections


def _title_section(report: ReportInput, phrases: _Phrases) -> list[Any]:
    run_info = phrases.rich(
        "run_info",
        dag_id=_Code(report.dag_id),
        run_id=_Code(report.run_id),
        generated_at=report.generated_at,
    )
    return [_Heading(1, phrases.plain("title")), _Paragraph(run_info)]


def _summary_section(report: ReportInput, phrases: _Phrases) -> list[Any]:
    best = next(model for model in report.models if model.name == report.best_model)
    blocks: list[Any] = [
        _Heading(2, phrases.plain("summary_heading")),
        _Paragraph(
            phrases.rich(
                "summary_best",
                model=_Strong(best.name),
                accuracy=_percent(_validation_accuracy(best)),
            )
        ),
    ]
    if best.test_accuracy:
        separator = phrases.plain("list_separator")
        scores = separator.join(
            f"{_split_label(phrases, split)} {_percent(best.test_accuracy[split])}"
            for split in _test_splits([best])
        )
        test_line = phrases.rich("summary_test", model=_Code(best.name), scores=scores)
        blocks.append(_Paragraph(test_line))
    blocks.append(
        _Paragraph(phrases.rich("summary_submission", path=_Code(report.submission_file)))
    )

    lines = [
        phrases.rich(
            "summary_model_line",
            model=_Code(model.name),
            accuracy=_percent(_validation_accuracy(model)),
            macro_f1=_score(model.validation.get("macro_f1")),
        )
        for model in _by_validation_accuracy(report.models)
    ]
    blocks.append(_BulletList(lines))
    return blocks


def _data_value(key: str, value: Any) -> _Content:
    if value is None:
        return MISSING
    if key in ("train_source", "test_source", "validation_mode"):
        return _Code(str(value))
    if key == "parse_seconds":
        return f"{float(value):.1f}"
    if key.endswith("_rows"):
        return _count(value)
    return _Code(_json_text(value))


def _data_section(report: ReportInput, phrases: _Phrases) -> list[Any]:
    rows: list[list[_Content]] = [
        [phrases.plain(label), _data_value(key, report.data[key])]
        for key, label in DATA_LABELS.items()
        if key in report.data
    ]
    # Keys added by later stages still show, under their own names.
    rows += [
        [_Code(key), _data_value(key, value)]
        for key, value in report.data.items()
        if key not in DATA_LABELS and key != "class_counts"
    ]
    blocks: list[Any] = [
        _Heading(2, phrases.plain("data_heading")),
        _Table([phrases.plain("item_header"), phrases.plain("value_header")], rows),
    ]

    class_counts = report.data.get("class_counts") or {}
    if class_counts:
        names = [name for name in CLASS_NAMES if name in class_counts]
        names += sorted(set(class_counts) - set(CLASS_NAMES))
        total = sum(class_counts.values())
        count_rows: list[list[_Content]] = [
            [
                name,
                _count(class_counts[name]),
                _percent(class_counts[name] / total if total else 0.0),
            ]
            for name in names
        ]
        headers = [phrases.plain(key) for key in ("class_header", "images_header", "share_header")]
        blocks += [
            _Heading(3, phrases.plain("class_counts_heading")),
            _Table(headers, count_rows, numeric_columns=frozenset({1, 2})),
        ]
    return blocks


def _layer_table(model: ModelSummary, phrases: _Phrases) -> _Table:
    headers = [
        phrases.plain(key)
        for key in ("layer_header", "layer_type_header", "output_shape_header", "parameters_header")
    ]
    rows: list[list[_Content]] = [
        [_Code(str(name)), _Code(str(kind)), _Code(str(shape)), _count(parameters)]
        for name, kind, shape, parameters in model.layers
    ]
    return _Table(headers, rows, numeric_columns=frozenset({3}))


def _architecture_section(report: ReportInput, phrases: _Phrases) -> list[Any]:
    header_keys = ("model_header", "description_header", "parameters_header")
    headers = [phrases.plain(key) for key in header_keys]
    rows: list[list[_Content]] = [
        [_Code(model.name), model.description, _count(model.parameter_count)]
        for model in report.models
    ]
    blocks: list[Any] = [
        _Heading(2, phrases.plain("architecture_heading")),
        _Table(headers, rows, numeric_columns=frozenset({2})),
    ]
    for model in report.models:
        if not model.layers:
            continue
        summary = phrases.rich(
            "layers_summary", model=_Code(model.name), count=str(len(model.layers))
        )
        blocks.append(_Collapsible(summary, [_layer_table(model, phrases)]))
    return blocks


def _training_section(
    report: ReportInput, phrases: _Phrases, slots: dict[tuple[str, str], str]
) -> list[Any]:
    blocks: list[Any] = [_Heading(2, phrases.plain("training_heading"))]
    if ("curves", "") in slots:
        blocks.append(_Image(slots[("curves", "")], phrases.plain("curves_caption")))

    header_keys = (
        "model_header",
        "epochs_run_header",
        "best_epoch_header",
        "seconds_per_epoch_header",
        "training_minutes_header",
    )
    rows: list[list[_Content]] = [
        [
            _Code(model.name),
            _count(model.epochs_run),
            _count(model.best_epoch),
            f"{model.seconds_per_epoch:.1f}",
            f"{model.epochs_run * model.seconds_per_epoch / 60:.1f}",
        ]
        for model in report.models
    ]
    headers = [phrases.plain(key) for key in header_keys]
    blocks.append(_Table(headers, rows, numeric_columns=frozenset({1, 2, 3, 4})))
    return blocks


def _accuracy_section(report: ReportInput, phrases: _Phrases) -> list[Any]:
    splits = _test_splits(report.models)
    headers = [
        phrases.plain("model_header"),
        phrases.plain("validation_accuracy_header"),
        phrases.plain("macro_f1_header"),
    ]
    for split in splits:
        headers.append(phrases.plain("test_accuracy_header", split=_split_label(phrases, split)))
    rows: list[list[_Content]] = []
    for model in report.models:
        row: list[_Content] = [
            _Code(model.name),
            _percent(_validation_accuracy(model)),
            _score(model.validation.get("macro_f1")),
        ]
        row += [_percent(model.test_accuracy.get(split)) for split in splits]
        rows.append(row)
    blocks: list[Any] = [
        _Heading(2, phrases.plain("accuracy_heading")),
        _Table(headers, rows, numeric_columns=frozenset(range(1, len(headers)))),
    ]
    if not splits:
        blocks.append(_Paragraph(phrases.plain("no_test_labels")))

    recall_headers = [phrases.plain("class_header")] + [model.name for model in report.models]
    recall_rows: list[list[_Content]] = []
    for class_name in CLASS_NAMES:
        row = [class_name]
        for model in report.models:
            per_class = model.validation.get("per_class", {}).get(class_name, {})
            row.append(_percent(per_class.get("recall")))
        recall_rows.append(row)
    blocks += [
        _Heading(3, phrases.plain("recall_heading")),
        _Table(recall_headers, recall_rows, frozenset(range(1, len(recall_headers)))),
    ]
    return blocks


def _confusion_section(
    report: ReportInput, phrases: _Phrases, slots: dict[tuple[str, str], str]
) -> list[Any]:
    threshold_value = report.config.get("confusion_threshold", DEFAULT_CONFUSION_THRESHOLD)
    threshold = _threshold_text(threshold_value)
    blocks: list[Any] = [
        _Heading(2, phrases.plain("confusion_heading")),
        _Paragraph(phrases.plain("confusion_intro")),
    ]
    for model in report.models:
        blocks.append(_Heading(3, model.name))
        if ("confusion", model.name) in slots:
            caption = phrases.plain("confusion_caption", model=model.name)
            blocks.append(_Image(slots[("confusion", model.name)], caption))
        if not model.confused_pairs:
            blocks.append(_Paragraph(phrases.plain("no_confused_pairs", threshold=threshold)))
            continue
        pairs = [
            phrases.rich(
                "confused_pair",
                true=str(pair["true"]),
                predicted=str(pair["predicted"]),
                rate=_percent(pair["rate"]),
            )
            for pair in model.confused_pairs
        ]
        blocks += [
            _Paragraph(phrases.plain("confused_pairs_intro", threshold=threshold)),
            _BulletList(pairs),
        ]
    return blocks


def _explanation_section(
    report: ReportInput, phrases: _Phrases, slots: dict[tuple[str, str], str]
) -> list[Any]:
    blocks: list[Any] = []
    for kind in EXPLANATION_FIGURE_KINDS:
        images = [
            _Image(slots[(kind, model.name)], phrases.plain(f"{kind}_caption", model=model.name))
            for model in report.models
            if (kind, model.name) in slots
        ]
        if images:
            blocks += [
                _Heading(3, phrases.plain(f"{kind}_heading")),
                _Paragraph(phrases.plain(f"{kind}_intro")),
                *images,
            ]
    if not blocks:
        return []
    return [_Heading(2, phrases.plain("explanations_heading")), *blocks]


def _other_figures_section(phrases: _Phrases, others: Sequence[str]) -> list[Any]:
    if not others:
        return []
    images = [_Image(name, name) for name in others]
    return [_Heading(2, phrases.plain("other_figures_heading")), *images]


def _settings_section(report: ReportInput, phrases: _Phrases) -> list[Any]:
    headers = [phrases.plain("setting_header"), phrases.plain("value_header")]
    rows: list[list[_Content]] = [
        [_Code(str(key)), _Code(_json_text(value))] for key, value in report.config.items()
    ]
    return [_Heading(2, phrases.plain("settings_heading")), _Table(headers, rows)]


def _mlflow_section(report: ReportInput, phrases: _Phrases) -> list[Any]:
    header_keys = ("model_header", "mlflow_run_header", "model_uri_header", "submission_header")
    rows: list[list[_Content]] = [
        [
            _Code(model.name),
            _Code(model.mlflow_run_id),
            _Code(model.model_uri),
            _Code(model.submission_file),
        ]
        for model in report.models
    ]
    return [
        _Heading(2, phrases.plain("mlflow_heading")),
        _Table([phrases.plain(key) for key in header_keys], rows),
    ]


def _extra_sections(report: ReportInput) -> list[Any]:
    blocks: list[Any] = []
    for heading, text in report.extra_sections:
        blocks.append(_Heading(2, heading))
        blocks += _parse_extra_text(text)
    return blocks


def _build_document(report: ReportInput, figures: dict[str, bytes], phrases: _Phrases) -> list[Any]:
    slots, others = _index_figures(figures, [model.name for model in report.models])
    return [
        *_title_section(report, phrases),
        *_summary_section(report, phrases),
        *_data_section(report, phrases),
        *_architecture_section(report, phrases),
        *_training_section(report, phrases, slots),
        *_accuracy_section(report, phrases),
        *_confusion_section(report, phrases, slots),
        *_explanation_section(report, phrases, slots),
        *_other_figures_section(phrases, others),
        *_settings_section(report, phrases),
        *_mlflow_section(report, phrases),
        *_extra_sections(report),
    ]


# ---------------------------------------------------------------------------
# Entry points


def _validate_report(report: ReportInput, language: str) -> None:
    if language not in REPORT_LANGUAGES:
        raise ValueError(
            f"unknown report language {language!r}, expected one of: {', '.join(REPORT_LANGUAGES)}"
        )
    if not report.models:
        raise ValueError("the report has no models: ReportInput.models is empty")
    names = [model.name for model in report.models]
    if len(set(names)) != len(names):
        raise ValueError(f"model names must be unique, got {names}")
    if report.best_model not in names:
        raise ValueError(
            f"best_model {report.best_model!r} is not one of the report's models {names}"
        )
    for name in report.figures:
        _validate_figure_name(name)


def _render(report: ReportInput, figures: dict[str, bytes], language: str) -> tuple[str, str]:
    phrases = _Phrases(language)
    blocks = _build_document(report, figures, phrases)
    return _render_markdown(blocks), _render_html(blocks, figures, phrases)


def render_report(report: ReportInput, language: str = "en") -> tuple[str, str]:
    """Render the report as (markdown, html) in `language` ("en" or "zh-TW").

    The training curves are drawn from the models' histories when `report.figures`
    has no "figures/curves.png". The Markdown refers to figures by their relative
    names, so it needs the files that `write_report` writes next to it.

    Raises:
        ValueError: for an unknown language, no models, a `best_model` that is not
        among the models, or a figure name that is not a relative image path.
    """
    _validate_report(report, language)
    return _render(report, _figures_with_curves(report), language)


def write_report(
    report: ReportInput, directory: str | Path, language: str = "en"
) -> dict[str, Path]:
    """Write report.md, report.html and every figure under `directory`, each atomically.

    Figures are written first, so a reader who finds report.md also finds its images.

    Returns:
        The written paths keyed by their names relative to `directory`:
        "report.md", "report.html" and each figure name such as "figures/curves.png".
    """
    _validate_report(report, language)
    directory = Path(directory)
    figures = _figures_with_curves(report)
    markdown, html_text = _render(report, figures, language)

    paths = {name: files.write_bytes(directory / name, data) for name, data in figures.items()}
    paths["report.md"] = files.write_text(directory / "report.md", markdown)
    paths["report.html"] = files.write_text(directory / "report.html", html_text)
    logger.info(
        "Wrote the %s report of DAG %s run %s to %s with %d figures",
        language,
        report.dag_id,
        report.run_id,
        directory,
        len(figures),
    )
    return paths


# ---------------------------------------------------------------------------
# Stage entry points: submissions, report and the run's output folder


MODEL_DESCRIPTIONS = {
    "cnn_aug": "CNN trained with augmentation (flips, rotations, shifts)",
    "cnn": "CNN trained without augmentation",
    "dnn": "Dense network of about the same parameter count",
}
FAILED_MARKER = "FAILED"


def run_folder_name(dag_run_id: str) -> str:
    """Return a file-system-safe folder name for a DAG run id (":" and "+" become "_")."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", dag_run_id)


def run_output_dir(dag_run_id: str) -> Path:
    return settings.output_root() / run_folder_name(dag_run_id)


def _check_submission(frame: pd.DataFrame, test_ids: np.ndarray, source: str) -> None:
    if list(frame.columns) != ["id", "label"]:
        raise ValueError(f"{source}: expected columns id,label, got {','.join(map(str, frame.columns))}")
    if len(frame) != len(test_ids) or not np.array_equal(np.sort(frame["id"].to_numpy()), np.sort(test_ids)):
        raise ValueError(
            f"{source}: the predicted ids do not match the {len(test_ids)} ids of the test file; "
            "rerun evaluate_models"
        )
    labels = frame["label"].to_numpy()
    if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 or labels.max() >= NUM_CLASSES:
        raise ValueError(f"{source}: labels must be integers 0..{NUM_CLASSES - 1}")


def _model_summary(run: dict) -> ModelSummary:
    history = tracking.load_json(run["run_id"], tracking.HISTORY_ARTIFACT)
    architecture = tracking.load_json(run["run_id"], tracking.ARCHITECTURE_ARTIFACT)
    details = tracking.load_json(run["run_id"], tracking.EVALUATION_ARTIFACT)
    return ModelSummary(
        name=run["model"],
        description=MODEL_DESCRIPTIONS[run["model"]],
        parameter_count=run["parameters"],
        layers=[tuple(row) for row in architecture],
        epochs_run=history["epochs"],
        best_epoch=history["best_epoch"],
        seconds_per_epoch=history["seconds_per_epoch"],
        history=history["history"],
        validation=details["validation"],
        confusion=np.asarray(details["confusion"]),
        confused_pairs=details["confused_pairs"],
        test_accuracy=details["test_accuracy"],
        mlflow_run_id=run["run_id"],
        model_uri=run["model_uri"],
        submission_file=f"submissions/{run['model']}.csv",
    )


def _collect_figures(trained: list[dict], explanations: dict, workdir: Path) -> dict[str, bytes]:
    figures: dict[str, bytes] = {}
    wanted = [(run["run_id"], tracking.CONFUSION_FIGURE_ARTIFACT, f"figures/confusion_{run['model']}.png") for run in trained]
    for kind, per_model in explanations.items():
        for model_name, entry in per_model.items():
            for key, artifact in entry.items():
                if key != "run_id":
                    wanted.append((entry["run_id"], artifact, f"figures/{key}_{model_name}.png"))
    for run_id, artifact, name in wanted:
        local = tracking.download(run_id, artifact, workdir / run_id)
        figures[name] = local.read_bytes()
    return figures


def publish(
    config: PipelineConfig,
    context: RunContext,
    data_summary: dict,
    parent: dict,
    trained: list[dict],
    evaluation: dict,
    explanations: dict,
    registry: dict | None = None,
) -> dict:
    """Write the submissions and the report to `output/<dag run id>/`, log them, close the parent run.

    Each model's test predictions come from its MLflow run; the ids are checked
    against the test file before anything is written. `output/latest` moves to this
    run's folder only after every file is in place.
    """
    output_dir = run_output_dir(context.dag_run_id)
    splits = load_splits(config)
    with tempfile.TemporaryDirectory(prefix="fer-report-") as workdir_name:
        workdir = Path(workdir_name)
        models = [_model_summary(run) for run in trained]
        best = registry["model"] if registry else choose_best_model(models)
        for run in trained:
            local = tracking.download(run["run_id"], tracking.PREDICTIONS_ARTIFACT, workdir / run["run_id"])
            frame = pd.read_csv(local)
            _check_submission(frame, splits.test_ids, f"predictions of {run['model']}")
            files.write_text(output_dir / "submissions" / f"{run['model']}.csv", frame.to_csv(index=False))
            if run["model"] == best:
                files.write_text(output_dir / SUBMISSION_FILE, frame.to_csv(index=False))
        figures = _collect_figures(trained, explanations, workdir)

    report = ReportInput(
        dag_id=context.dag_id,
        run_id=context.dag_run_id,
        generated_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        data={**data_summary, "validation_mode": config.validation_mode},
        config=config.to_dict(),
        models=models,
        best_model=best,
        submission_file=SUBMISSION_FILE,
        figures=figures,
        extra_sections=[tuple(registry["report_section"])] if registry else [],
    )
    paths = write_report(report, output_dir, language=config.report_language)
    summary = {
        "dag_run_id": context.dag_run_id,
        "best_model": best,
        "models": {model.name: {"run_id": model.mlflow_run_id, "model_uri": model.model_uri,
                                 "val_accuracy": model.validation["accuracy"],
                                 "test_accuracy": model.test_accuracy,
                                 "epochs": model.epochs_run, "seconds_per_epoch": model.seconds_per_epoch}
                   for model in models},
        "data": data_summary,
        "submission_model": _submission_model(best, trained, registry),
    }
    files.write_text(output_dir / "summary.json", json.dumps(summary, indent=2))

    for path in [*paths.values(), output_dir / SUBMISSION_FILE, output_dir / "summary.json"]:
        relative = Path(path).relative_to(output_dir)
        artifact_dir = str(Path("report") / relative.parent) if str(relative.parent) != "." else "report"
        tracking.log_file(path, artifact_dir, run_id=parent["parent_run_id"])
    tracking.finish_pipeline_run(parent["parent_run_id"])
    # A DAG run that failed and was then cleared and rerun is complete now, so drop its marker.
    (output_dir / FAILED_MARKER).unlink(missing_ok=True)
    files.replace_symlink(settings.output_root() / "latest", output_dir.name)
    checkpoints.remove_dag_run(context.dag_id, context.dag_run_id)
    logger.info("Best model: %s. Submission: %s. Report: %s", best, output_dir / SUBMISSION_FILE, paths["report.html"])
    return {
        "output_dir": str(output_dir),
        "submission": str(output_dir / SUBMISSION_FILE),
        "report_html": str(paths["report.html"]),
        "best_model": best,
    }


def _submission_model(best: str, trained: list[dict], registry: dict | None) -> dict:
    """Describe the model behind submission.csv: its training run and registry version."""
    run = next(run for run in trained if run["model"] == best)
    described = {"model": best, "mlflow_run_id": run["run_id"], "model_uri": run["model_uri"]}
    if registry:
        described["registered_model"] = registry["registered_model"]
        described["version"] = registry["version"]
        described["promoted_to_champion"] = registry["promoted"]
    return described


def mark_run_failed(dag_id: str, dag_run_id: str) -> None:
    """Record a failed DAG run: close its MLflow parent run as FAILED and mark its output folder."""
    tracking.fail_pipeline_runs(dag_id, dag_run_id)
    output_dir = run_output_dir(dag_run_id)
    if output_dir.exists():
        files.write_text(output_dir / FAILED_MARKER, f"DAG run {dag_run_id} failed; its outputs are incomplete.\n")
        logger.warning("Marked %s as failed", output_dir)
