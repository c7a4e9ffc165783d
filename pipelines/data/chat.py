"""Chat records: the ``messages``, sharegpt and alpaca shapes, checked and rendered with the model's chat template.

Every shape becomes one :class:`Conversation`: turns ``{"role", "content": [parts]}`` (a part is
``{"type": "text", "text"}`` or ``{"type": "image"}``) plus the image files in the order their parts appear.

    messages   {"messages": [{"role": "user", "content": "hi" | [parts]}, ...], "images": [...]?}
               an image part names its file (``{"type": "image", "image": "a.png"}``) or takes the next of
               ``images`` (``{"type": "image"}``, TRL's shape); with ``images``, ``<image>`` in a string content
               is an image part too
    sharegpt   {"conversations": [{"from": "human" | "gpt" | "system", "value": ...}], "images": [...]?,
                "system": ...?}   (``<image>`` in a value marks where each of ``images`` goes)
    alpaca     {"instruction", "input"?, "output", "system"?}: one user turn (instruction, blank line, input)
               and one assistant turn

The loss spans are found by rendering: the assistant turn i spans, in the rendered conversation, from the end
of ``messages[:i]`` rendered with the generation prompt to the end of ``messages[:i + 1]`` rendered, without
trailing whitespace (its end-of-turn token included, the newline after it not: generation stops at the token).
Every check that can fail runs before anything is tokenised.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.config.data import DataError

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}
PLACEHOLDER = "<image>"  # marks an image in sharegpt values (and messages strings, with `images`)
SHAPES = ("messages", "sharegpt", "alpaca")


@dataclass
class Conversation:
    messages: list[dict]
    images: list[Path] = field(default_factory=list)
    image_names: list[str] = field(default_factory=list)  # as written in the record (error messages)

    @property
    def n_image_parts(self) -> int:
        return sum(p["type"] == "image" for m in self.messages for p in m["content"])


# ---------------------------------------------------------------- parsing
def _text_parts(text: str, split_images: bool) -> list[dict]:
    if not split_images:
        return [{"type": "text", "text": text}]
    parts = []
    for i, piece in enumerate(text.split(PLACEHOLDER)):
        if i:
            parts.append({"type": "image"})
        if piece:
            parts.append({"type": "text", "text": piece})
    return parts


def _parts(where: str, turn: int, content: Any, split_images: bool) -> list[dict]:
    """The content of turn ``turn`` as a list of parts; image parts keep their file name (``"image"``) if any."""
    if isinstance(content, str):
        return _text_parts(content, split_images)
    if not isinstance(content, list):
        raise DataError(f"{where}: turn {turn}: `content` must be a string or a list of parts, got "
                        f"{type(content).__name__}.")
    parts = []
    for k, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.extend(_text_parts(part["text"], split_images))
        elif kind == "image":
            name = part.get("image", part.get("path"))
            if name is not None and not isinstance(name, str):
                raise DataError(f"{where}: turn {turn}, part {k}: the image must be a file path (a string), got "
                                f"{type(name).__name__}.")
            parts.append({"type": "image", **({"image": name} if name else {})})
        else:
            raise DataError(f"{where}: turn {turn}, part {k}: unknown content part {part!r}; use "
                            "{\"type\": \"text\", \"text\": ...} or {\"type\": \"image\", \"image\": \"file.png\"}.")
    return parts


def _turns(where: str, shape: str, row: dict) -> list[tuple[str, Any]]:
    """(role, content) pairs of a record, roles already mapped onto system / user / assistant."""
    if shape == "alpaca":
        for key in ("instruction", "output", "input", "system"):
            if row.get(key) is not None and not isinstance(row[key], str):
                raise DataError(f"{where}: `{key}` must be a string, got {type(row[key]).__name__}.")
        prompt = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
        turns = [("user", prompt), ("assistant", row["output"])]
        return ([("system", row["system"])] if row.get("system") else []) + turns
    key, role_key, content_key = ("messages", "role", "content") if shape == "messages" else \
        ("conversations", "from", "value")
    turns = row[key]
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: `{key}` must be a non-empty list of turns.")
    out = [("system", row["system"])] if shape == "sharegpt" and isinstance(row.get("system"), str) else []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or role_key not in turn or content_key not in turn:
            raise DataError(f"{where}: turn {i} must be an object with `{role_key}` and `{content_key}`, got "
                            f"{turn!r:.80}.")
        role = turn[role_key]
        known = ROLES if shape == "messages" else tuple(SHAREGPT_ROLES)
        if role not in known:
            raise DataError(f"{where}: turn {i} has the unknown role {role!r}; use one of {', '.join(known)}.")
        out.append((SHAREGPT_ROLES.get(role, role) if shape == "sharegpt" else role, turn[content_key]))
    return out


def _resolve_images(where: str, messages: list[dict], listed: list, root: Path) -> tuple[list[Path], list[str]]:
    """The image files in part order: a part's own file, else the next of the record's ``images``."""
    names, queue = [], list(listed)
    for m in messages:
        for part in m["content"]:
            if part["type"] != "image":
                continue
            if "image" in part:
                names.append(part.pop("image"))
            elif queue:
                names.append(queue.pop(0))
            else:
                n_parts = sum(p["type"] == "image" for t in messages for p in t["content"])
                raise DataError(f"{where}: {n_parts} image parts / `{PLACEHOLDER}` placeholders but "
                                f"{len(listed)} image(s) in `images`; give one image per placeholder, or name the "
                                "file in the part ({\"type\": \"image\", \"image\": \"file.png\"}).")
    if queue:
        raise DataError(f"{where}: {len(listed)} image(s) in `images` but only {len(listed) - len(queue)} image "
                        f"part(s) / `{PLACEHOLDER}` placeholders; put a placeholder where each image goes.")
    for name in names:
        if not isinstance(name, str):
            raise DataError(f"{where}: `images` must list file paths (strings), got {type(name).__name__}.")
    return [image_path(where, n, root) for n in names], names


def image_path(where: str, raw: str, root: Path) -> Path:
    path = Path(raw) if os.path.isabs(raw) else root / raw
    if not path.is_file():
        raise DataError(f"{where}: image `{raw}` not found (looked at {path}); fix the path or set data.image_root.")
    return path


def parse(where: str, shape: str, row: dict, root: Path, images_allowed: bool) -> Conversation:
    """Returns the checked conversation of one record of ``shape`` (see the module docstring).

    Raises ``DataError`` for an unknown role, a malformed turn or part, a conversation without an assistant
    turn (or that opens with one), image parts and images that do not pair up, an image file that is not
    there, or images for a model without an image processor (``images_allowed`` False)."""
    listed = row.get("images") if shape != "alpaca" else None
    if listed is not None and not isinstance(listed, list):
        raise DataError(f"{where}: `images` must be a list of file paths, got {type(listed).__name__}.")
    split = shape == "sharegpt" or bool(listed)
    messages = [{"role": role, "content": _parts(where, i, content, split)}
                for i, (role, content) in enumerate(_turns(where, shape, row))]
    roles = [m["role"] for m in messages]
    if "assistant" not in roles:
        raise DataError(f"{where}: the conversation has no assistant turn (roles: {', '.join(roles)}), so there is "
                        "nothing to learn; add the assistant's reply.")
    if roles[0] == "assistant":
        raise DataError(f"{where}: the conversation opens with an assistant turn; add the user (or system) turn "
                        "it answers before it.")
    images, names = _resolve_images(where, messages, listed or [], root)
    if images and not images_allowed:
        raise DataError(f"{where}: a record with images, but the model's processor has no image processor; use a "
                        "vision-language model or drop the image parts.")
    return Conversation(messages, images, names)


# ---------------------------------------------------------------- rendering
def template_of(processor, explicit: str | None) -> str | None:
    """The chat template to render with: ``explicit`` (data.chat_template) first, else the processor's own,
    else its tokenizer's."""
    if explicit:
        return explicit
    tok = getattr(processor, "tokenizer", processor)
    for owner in (processor, tok):
        value = getattr(owner, "chat_template", None)
        if isinstance(value, dict):  # several named templates: the default one
            value = value.get("default")
        if isinstance(value, str) and value:
            return value
    return None


def _render(tok, template: str, messages: list[dict], generation_prompt: bool) -> str:
    return tok.apply_chat_template(messages, chat_template=template, tokenize=False,
                                   add_generation_prompt=generation_prompt)


def render(where: str, conv: Conversation, tok, template: str) -> tuple[str, list[tuple[int, int]]]:
    """Returns the rendered conversation and the character spans of its assistant turns (end-of-turn token
    included, the whitespace after it not).

    Raises ``DataError`` when the template fails on the record, or renders a conversation's beginning
    differently from the whole (such a template cannot say where a turn starts this way)."""
    try:
        full = _render(tok, template, conv.messages, False)
        spans = []
        for i, message in enumerate(conv.messages):
            if message["role"] != "assistant":
                continue
            before = _render(tok, template, conv.messages[:i], True)
            through = _render(tok, template, conv.messages[: i + 1], False)
            if not (through.startswith(before) and full.startswith(through)):
                raise DataError(f"{where}: the chat template renders the conversation up to turn {i} differently "
                                "from the same turns inside the whole conversation, so the assistant turn cannot be "
                                "located; use a template that renders earlier turns the same whatever follows (set "
                                "data.chat_template), or train.loss_on: all.")
            spans.append((len(before), len(through.rstrip())))
    except DataError:
        raise
    except Exception as err:  # jinja raises TemplateError and whatever the template raises itself
        raise DataError(f"{where}: the chat template fails on this record ({type(err).__name__}: {err}); fix the "
                        "record, or give a template that accepts it in data.chat_template.") from err
    return full, spans


def labelled_mask(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[bool]:
    """Per token (its character ``offsets`` in the rendered text): whether it starts inside an assistant span."""
    out, k = [], 0
    for start, _ in offsets:
        while k < len(spans) and start >= spans[k][1]:
            k += 1
        out.append(k < len(spans) and spans[k][0] <= start)
    return out
