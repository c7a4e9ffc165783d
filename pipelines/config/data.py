"""The `data:` section of a config: which files, how they are split and cut (no torch)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.config.paths import is_uri
from strategies.errors import SettingsError
from strategies.settings import from_dict
from strategies.settings import setting as _f

SUFFIXES = (".jsonl", ".json", ".parquet")


class DataError(SettingsError):
    """The data cannot be used as given; the message names the file, the line and the fix."""


@dataclass
class DataConfig:
    train: str = _f("", "training data: a .jsonl, .json (an array of records) or .parquet file of chat `messages`, "
                        "sharegpt, alpaca, text, prompt/completion, image-text or text+label records")
    eval: str | None = _f(None, "evaluation data, same format as train (default: split eval_fraction off train)")
    eval_fraction: float = _f(0.1, "share of train held out for evaluation when `eval` is not given; in [0, 1)")
    max_length: int = _f(128, "tokens per example; longer examples are cut at the end (image tokens count too)")
    image_root: str | None = _f(None, "folder that relative image paths start from (default: the data file's folder)")
    cache_dir: str | None = _f(None, "where tokenised data is cached (default: <cache_dir>/data)")
    max_samples: int | None = _f(None, "use at most this many records of each file (quick runs)")
    chat_template: str | None = _f(None, "Jinja chat template for chat records (messages, sharegpt, alpaca), or "
                                         "the path of a .jinja file holding one (default: the model's own)")
    max_record_mb: float = _f(8.0, "largest record (one JSONL line or parquet row) accepted, in MB; a larger one "
                                   "is refused before any tokenisation (long texts are cut to max_length anyway)")
    num_proc: int | None = _f(None, "processes that tokenise a file (and decode its images) when it is not cached; "
                                    "1: this process. Default: automatic, the first 100 records are tokenised here "
                                    "and timed, and min(CPUs, 8) processes take the rest if it would take over 30 s "
                                    "here (a process takes seconds to start); the cache is the same either way")

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, where: str = "data") -> "DataConfig":
        """Returns a validated config; unknown keys are an error with a did-you-mean hint."""
        return from_dict(cls, dict(data or {}), where, DataError)

    def validate(self, where: str = "data") -> "DataConfig":
        """Raises ``DataError`` naming the field and the fix; returns self."""
        for name in ("train", "eval"):
            value = getattr(self, name)
            if value is None and name == "eval":
                continue
            if not value:
                raise DataError(f"{where}.{name} is empty: give the path of a .jsonl, .json or .parquet file.")
            if is_uri(value):  # demo:..., s3://...: checked once resolved, before any tokenisation
                continue
            if Path(value).is_dir():
                raise DataError(f"{where}.{name} = {value!r} is a folder; give the path of a .jsonl, .json or .parquet "
                                "file in it.")
            if Path(value).suffix.lower() not in SUFFIXES:
                raise DataError(f"{where}.{name} = {value!r}: use a .jsonl, .json or .parquet file.")
            if not Path(value).is_file():
                raise DataError(f"{where}.{name} = {value!r}: no such file; fix the path (relative paths in a "
                                "config file start from the file's folder).")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise DataError(f"{where}.eval_fraction = {self.eval_fraction}: use a value in [0, 1), e.g. 0.1.")
        if self.max_length < 8:
            raise DataError(f"{where}.max_length = {self.max_length}: use at least 8 tokens, e.g. 128 (image-text data needs room for the image tokens too).")
        if self.max_samples is not None and self.max_samples < 1:
            raise DataError(f"{where}.max_samples = {self.max_samples}: use a positive number, or leave it unset for all records.")
        if self.num_proc is not None and self.num_proc < 1:
            raise DataError(f"{where}.num_proc = {self.num_proc}: use at least 1 (1 tokenises in this process), or "
                            "leave it unset for automatic.")
        if self.max_record_mb <= 0:
            raise DataError(f"{where}.max_record_mb = {self.max_record_mb}: must be > 0, e.g. 8.")
        if self.chat_template is not None and _names_a_file(self.chat_template) \
                and not Path(self.chat_template).is_file():
            raise DataError(f"{where}.chat_template = {self.chat_template!r}: no such file; fix the path, or give the "
                            "template itself (Jinja text).")
        if self.image_root is not None and not Path(self.image_root).is_dir():
            raise DataError(f"{where}.image_root = {self.image_root!r}: no such folder.")
        return self

    def chat_template_text(self) -> str | None:
        """The chat template itself: the file's text when ``chat_template`` names a .jinja file."""
        if self.chat_template is None or not _names_a_file(self.chat_template):
            return self.chat_template
        return Path(self.chat_template).read_text(encoding="utf-8")


def _names_a_file(value: str) -> bool:
    """A template is Jinja text (it has ``{{`` or ``{%``); anything else is the path of a file holding one."""
    return "{{" not in value and "{%" not in value
