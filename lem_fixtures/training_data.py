"""LEM training data: reading and validating a directory of chat-format JSONL splits.

A data directory contains `train.jsonl`, `valid.jsonl` and `test.jsonl` (whichever exist), one JSON
object per line: `{"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}]}`,
the chat format that mlx-lm's tuner reads. Validation collects every problem first and then
raises one TrainingDataError that lists them with file and line, so a user fixes a file in one pass.
This module never imports mlx.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lem_fixtures.errors import TrainingDataError

logger = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
DEFAULT_MAX_PROBLEMS = 20
FORMAT_HINT = 'each line must be {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}'


@dataclass(frozen=True)
class DataProblem:
    """One validation failure: where it is, what is wrong and how to fix it."""

    path: Path
    line: int | None
    message: str
    fix: str

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line is not None else str(self.path)
        return f"{where}: {self.message}; {self.fix}"


@dataclass
class Split:
    """The examples of one JSONL file, with the 1-based line number of each."""

    name: str
    path: Path
    examples: list[dict[str, Any]] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)

    def sha256(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()


@dataclass
class TrainingData:
    """A validated data directory and the roles of its splits.

    `train_split` is the split trained on and `valid_split` the one used for validation loss
    (None when the directory has no other split to use). `truncated` counts examples longer
    than max_seq_length, which mlx-lm cuts at that length (a warning, not an error).
    """

    directory: Path
    splits: dict[str, Split]
    train_split: str
    valid_split: str | None
    truncated: int = 0

    @property
    def train(self) -> Split:
        return self.splits[self.train_split]

    @property
    def valid(self) -> Split | None:
        return self.splits[self.valid_split] if self.valid_split else None

    def sha256(self) -> str:
        """Hash the contents of the train and validation files together with their roles."""
        digest = hashlib.sha256()
        for role, split in (("train", self.train), ("valid", self.valid)):
            digest.update(role.encode())
            digest.update(split.sha256().encode() if split is not None else b"none")
        return digest.hexdigest()


def validation_split_for(train_split: str, available: list[str] | tuple[str, ...]) -> str | None:
    """Pick the split for validation loss: `valid`, or `test` when `valid` is the one trained on."""
    for candidate in ("valid", "test"):
        if candidate != train_split and candidate in available:
            return candidate
    return None


def check_messages(messages: Any) -> list[tuple[str, str]]:
    """Check the structure of one `messages` value; return (problem, fix) pairs.

    Roles must alternate user/assistant, starting with user after an optional first system
    message and ending with assistant, because the assistant turn is what training learns.
    """
    if not isinstance(messages, list):
        return [(f'"messages" is a {type(messages).__name__}, not a list', FORMAT_HINT)]
    if not messages:
        return [('"messages" is empty', "add a user message and an assistant message")]

    problems: list[tuple[str, str]] = []
    roles: list[str | None] = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            problems.append((f"message {index} is a {type(message).__name__}, not an object", FORMAT_HINT))
            roles.append(None)
            continue
        role = message.get("role")
        content = message.get("content")
        if not isinstance(role, str):
            problems.append((f'message {index} has no string "role"', 'set "role" to "system", "user" or "assistant"'))
        if not isinstance(content, str):
            problems.append((f'message {index} has no string "content"', 'set "content" to the message text'))
        elif not content.strip():
            problems.append((f"message {index} ({role}) has empty content", "write the message text or remove the example"))
        roles.append(role if isinstance(role, str) else None)
    if problems:
        return problems

    turns = roles[1:] if roles[0] == "system" else roles
    for offset, role in enumerate(turns):
        index = offset + (len(roles) - len(turns))
        expected = "user" if offset % 2 == 0 else "assistant"
        if role != expected:
            problems.append(
                (
                    f"message {index} has role {role!r} where {expected!r} is expected",
                    "roles must alternate user/assistant, with an optional system message first",
                )
            )
            return problems
    if not turns:
        problems.append(("the example has only a system message", "add a user message and an assistant message"))
    elif turns[-1] != "assistant":
        problems.append(("the last message is not from the assistant", "end the example with the assistant's answer, which is what training learns"))
    return problems


def read_split(path: Path, name: str) -> tuple[Split, list[DataProblem]]:
    """Read one JSONL file and check each line's structure; return the examples and the problems."""
    split = Split(name=name, path=path)
    problems: list[DataProblem] = []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        return split, [DataProblem(path, None, f"invalid UTF-8 ({error})", "save the file as UTF-8")]

    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            problems.append(DataProblem(path, number, "blank line", "remove it, because mlx-lm reads every line as JSON"))
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            problems.append(DataProblem(path, number, f"invalid JSON at column {error.colno} ({error.msg})", "write one JSON object per line"))
            continue
        if not isinstance(record, dict):
            problems.append(DataProblem(path, number, f"the line is a JSON {type(record).__name__}, not an object", FORMAT_HINT))
            continue
        if "messages" not in record:
            keys = ", ".join(sorted(record)) or "none"
            problems.append(DataProblem(path, number, f'missing "messages" (keys: {keys})', FORMAT_HINT))
            continue
        line_problems = check_messages(record["messages"])
        problems.extend(DataProblem(path, number, message, fix) for message, fix in line_problems)
        if not line_problems:
            split.examples.append(record)
            split.lines.append(number)

    if not text.strip():
        problems.append(DataProblem(path, None, "the file is empty", "add examples or remove the file"))
    return split, problems


def has_chat_template(tokenizer: Any) -> bool:
    """Tell whether a tokenizer (Hugging Face or mlx-lm's TokenizerWrapper) can render chat messages."""
    flag = getattr(tokenizer, "has_chat_template", None)
    if isinstance(flag, bool):
        return flag
    return getattr(tokenizer, "chat_template", None) is not None


def check_tokenization(
    split: Split, tokenizer: Any, *, max_seq_length: int | None, mask_prompt: bool
) -> tuple[list[DataProblem], int]:
    """Render every example with the chat template as mlx-lm's ChatDataset does; return problems and the truncated count.

    With prompt masking the loss covers only the tokens after the prompt, so an example whose
    prompt alone fills max_seq_length would train on nothing.
    """
    problems: list[DataProblem] = []
    truncated = 0
    for record, number in zip(split.examples, split.lines):
        messages = record["messages"]
        tools = record.get("tools")
        try:
            tokens = tokenizer.apply_chat_template(messages, tools=tools, return_dict=False)
            prompt_tokens = tokenizer.apply_chat_template(
                messages[:-1], tools=tools, add_generation_prompt=True, return_dict=False
            )
        except Exception as error:  # jinja2 TemplateError from raise_exception, or any template bug
            roles = ", ".join(str(message.get("role")) for message in messages)
            problems.append(
                DataProblem(
                    split.path,
                    number,
                    f"the model's chat template rejects the example (roles: {roles}): {error}",
                    "use only the roles this model's template accepts, for example fold a system message into the user turn",
                )
            )
            continue
        if max_seq_length is None:
            continue
        if len(tokens) > max_seq_length:
            truncated += 1
        prompt_length = len(prompt_tokens) if mask_prompt else 0
        if prompt_length >= min(len(tokens), max_seq_length):
            problems.append(
                DataProblem(
                    split.path,
                    number,
                    f"the prompt is {prompt_length} tokens and max_seq_length is {max_seq_length}, "
                    "so prompt masking leaves no token to train on",
                    "shorten the prompt or raise max_seq_length in the training config",
                )
            )
    return problems, truncated


def raise_problems(directory: Path, problems: list[DataProblem], max_problems: int) -> None:
    """Raise one TrainingDataError listing up to `max_problems` problems, when there are any."""
    if not problems:
        return
    listed = problems[:max_problems]
    lines = [f"training data in {directory} failed validation with {len(problems)} problem(s):"]
    lines.extend(f"  {problem}" for problem in listed)
    if len(problems) > len(listed):
        lines.append(f"  ... and {len(problems) - len(listed)} more")
    error = TrainingDataError("\n".join(lines))
    error.problems = problems  # type: ignore[attr-defined]
    raise error


def validate_training_data(
    data_dir: str | Path,
    tokenizer: Any = None,
    *,
    train_split: str = "train",
    require_train: bool = True,
    batch_size: int | None = None,
    max_seq_length: int | None = None,
    mask_prompt: bool = True,
    max_problems: int = DEFAULT_MAX_PROBLEMS,
) -> TrainingData:
    """Read and check every split in `data_dir`; return the data or raise one TrainingDataError.

    Without a tokenizer only the JSON structure and the roles are checked. With one, every
    example is also rendered with the model's chat template, and with `max_seq_length` the
    prompt length is checked against prompt masking. `batch_size` is the minimum number of
    examples of the train and validation splits, since mlx-lm batches cannot be smaller.
    `train_split` names the split to train on, for example "valid" for a directory that, like
    the upstream LEM release, ships only valid.jsonl and test.jsonl.
    """
    directory = Path(data_dir)
    if not directory.is_dir():
        raise TrainingDataError(f"training data directory {directory} not found; pass a directory that contains train.jsonl")
    if train_split not in SPLITS:
        raise TrainingDataError(f"unknown train split {train_split!r}; use one of: {', '.join(SPLITS)}")

    available = [name for name in SPLITS if (directory / f"{name}.jsonl").is_file()]
    if not available:
        raise TrainingDataError(f"{directory} has none of train.jsonl, valid.jsonl or test.jsonl; add the data files or pass another directory")
    if require_train and train_split not in available:
        hint = f"; the directory has {', '.join(name + '.jsonl' for name in available)}"
        if train_split == "train":
            hint += ", so train on valid.jsonl instead: `lem train --train-split valid`, or --lem-training-split=valid under pytest"
        else:
            hint += ", so choose one of those with `lem train --train-split`, or --lem-training-split under pytest"
        raise TrainingDataError(f"{directory / (train_split + '.jsonl')} not found{hint}")

    if tokenizer is not None and not has_chat_template(tokenizer):
        raise TrainingDataError(
            f"the model's tokenizer has no chat template, so the chat examples in {directory} cannot be rendered; "
            "train a chat (instruct) model or add a chat_template to its tokenizer_config.json"
        )

    splits: dict[str, Split] = {}
    problems: list[DataProblem] = []
    truncated = 0
    for name in available:
        split, split_problems = read_split(directory / f"{name}.jsonl", name)
        splits[name] = split
        problems.extend(split_problems)
        if tokenizer is not None:
            token_problems, split_truncated = check_tokenization(
                split, tokenizer, max_seq_length=max_seq_length, mask_prompt=mask_prompt
            )
            problems.extend(token_problems)
            truncated += split_truncated

    valid_split = validation_split_for(train_split, available)
    if batch_size is not None:
        for role, name in (("train", train_split), ("validation", valid_split)):
            if name is None or name not in splits:
                continue
            count = len(splits[name].examples)
            if count < batch_size:
                problems.append(
                    DataProblem(
                        splits[name].path,
                        None,
                        f"the {role} split has {count} valid example(s), fewer than batch_size {batch_size}",
                        "add examples or lower batch_size in the training config",
                    )
                )

    raise_problems(directory, problems, max_problems)
    if truncated:
        logger.warning("%d example(s) in %s are longer than max_seq_length %s and will be truncated", truncated, directory, max_seq_length)
    return TrainingData(directory=directory, splits=splits, train_split=train_split, valid_split=valid_split, truncated=truncated)


def write_examples(path: Path, examples: list[dict[str, Any]]) -> None:
    """Write examples as JSONL (one object per line, UTF-8), replacing the file atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    with temporary.open("w", encoding="utf-8") as handle:
        for example in examples:
            handle.write(json.dumps(example, ensure_ascii=False) + "\n")
    temporary.replace(path)
