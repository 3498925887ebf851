"""The prompt a model is trained and asked with: its format, system prompt, `<think>` prefill and chat-template
options — the flags (:class:`PromptArgs`, shared by sft, grpo and eval), the settings a stage used
(:class:`PromptSettings`, recorded as ``inputs.prompt`` in its `r1_stage.json`) and the rendering
(:class:`Prompter`).

Formats:

* ``chat``: ``[system, user]`` through the tokenizer's chat template with the generation prompt (a template
  without a system role gets the system prompt folded into the user turn, as Gemma's does itself);
* ``plain``: the DeepSeek-R1(-Zero) guide's text prompt for base models,
  ``"{system}\\nUser: {problem}\\nAssistant: "``, after the tokenizer's BOS when it adds one;
* ``auto``: ``chat`` when the tokenizer has a chat template, else ``plain``. Every Qwen tokenizer, base models'
  included, ships a chat template, so a *base* model needs ``--prompt_format plain`` to get the guide's prompt.

With the `<think>` prefill the prompt ends with ``<think>\\n`` and the model writes only the rest: the SFT
target drops the prefill, and what the rewards, the format check and answer extraction see is the prefill
plus the completion (:meth:`Prompter.response`), the whole ``<think>…</think><answer>…</answer>``. A template
that itself ends its generation prompt with ``<think>`` is treated the same way.

A stage takes each setting from its flag when given, else from the `r1_stage.json` of its
``--model_name_or_path`` folder (GRPO from SFT's, eval from GRPO's), else the default, and logs which.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from trainer.contract import output as contract
from trainer.r1.format import THINK_OPEN, format_completion
from trainer.runtime import ArgsError

logger = logging.getLogger(__name__)

PROMPT_FORMATS: tuple[str, ...] = ("auto", "chat", "plain")
THINK_PREFILL = f"{THINK_OPEN}\n"
R1_SYSTEM_PROMPT = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user with the "
    "answer. The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> "
    "tags, respectively, i.e., <think> reasoning process here </think> <answer> answer here </answer>."
)
# apply_chat_template arguments this module sets itself; --chat_template_kwargs must not name them.
_RESERVED_TEMPLATE_KWARGS = ("conversation", "messages", "tokenize", "add_generation_prompt", "return_dict")


class PromptRecordError(contract.StageOutputError):
    """A model folder's `r1_stage.json` whose ``inputs.prompt`` cannot be read; the message names the file."""


# --------------------------------------------------------------------------------------------------
# The flags
# --------------------------------------------------------------------------------------------------


@dataclass
class PromptArgs:
    """The prompt flags shared by sft, grpo and eval. Unset (None): the model folder's record, else the
    default."""

    prompt_format: str | None = field(
        default=None,
        metadata={
            "help": "auto | chat | plain. chat: the tokenizer's chat template; plain: the R1 guide's "
            "'{system}\\nUser: {problem}\\nAssistant: ' for base models (every Qwen tokenizer, base "
            "models' too, has a chat template, so auto gives them chat); auto: chat when the tokenizer "
            "has a template. Default: the model folder's r1_stage.json, else auto"
        },
    )
    system_prompt: str | None = field(
        default=None,
        metadata={
            "help": "System prompt text, or @path to read it from a UTF-8 file (trailing newlines dropped; "
            "@@ starts a text with a literal @); '' for none. Default: the model folder's r1_stage.json, "
            "else the R1 guide's system prompt"
        },
    )
    think_prefill: bool | None = field(
        default=None,
        metadata={
            "help": "End the prompt with '<think>\\n' so the completion starts inside the reasoning (SFT "
            "targets drop it; rewards see it). Default: the model folder's r1_stage.json, else false"
        },
    )
    chat_template_kwargs: str | None = field(
        default=None,
        metadata={
            "help": "JSON object of extra chat-template variables, e.g. '{\"enable_thinking\": false}' "
            "(Qwen3); chat format only. Default: the model folder's r1_stage.json, else {}"
        },
    )

    def __post_init__(self) -> None:
        if self.prompt_format is not None and self.prompt_format not in PROMPT_FORMATS:
            raise ArgsError(
                f"--prompt_format {self.prompt_format!r}: expected one of {', '.join(PROMPT_FORMATS)}"
            )
        self.system_prompt_text()
        self.template_kwargs()

    @classmethod
    def from_stage_args(cls, args: Mapping[str, Any]) -> PromptArgs:
        """The prompt flags in a stage's ``args`` map (pipeline config, chart values), other keys ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in args.items() if key in names})

    def system_prompt_text(self) -> str | None:
        """The system prompt the flag gives (a file's text for ``@path``), None when unset."""
        value = self.system_prompt
        if value is None or not value.startswith("@"):
            return value
        if value.startswith("@@"):
            return value[1:]
        path = Path(value[1:])
        try:
            return path.read_text(encoding="utf-8").rstrip("\r\n")
        except FileNotFoundError:
            raise ArgsError(f"--system_prompt @{path}: no such file") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ArgsError(f"--system_prompt @{path}: cannot read it as UTF-8 text: {e}") from None

    def template_kwargs(self) -> dict[str, Any] | None:
        """--chat_template_kwargs parsed, None when unset."""
        if self.chat_template_kwargs is None:
            return None
        try:
            value = json.loads(self.chat_template_kwargs)
        except json.JSONDecodeError as e:
            raise ArgsError(
                f"--chat_template_kwargs {self.chat_template_kwargs!r}: not valid JSON ({e})"
            ) from None
        if not isinstance(value, dict):
            raise ArgsError(
                f"--chat_template_kwargs {self.chat_template_kwargs!r}: expected a JSON object, "
                f"e.g. '{{\"enable_thinking\": false}}'"
            )
        reserved = sorted(set(value) & set(_RESERVED_TEMPLATE_KWARGS))
        if reserved:
            raise ArgsError(
                f"--chat_template_kwargs: {', '.join(reserved)} are set by the trainer, not by this flag"
            )
        return value


# --------------------------------------------------------------------------------------------------
# The settings a stage used (its record)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptSettings:
    """Resolved prompt settings: ``prompt_format`` is ``chat`` or ``plain`` once resolved against a tokenizer
    (``auto`` only before); ``system_prompt`` "" means none."""

    prompt_format: str = "auto"
    system_prompt: str = R1_SYSTEM_PROMPT
    think_prefill: bool = False
    chat_template_kwargs: Mapping[str, Any] = field(default_factory=dict)

    def to_record(self) -> dict[str, Any]:
        return {
            "prompt_format": self.prompt_format,
            "system_prompt": self.system_prompt,
            "think_prefill": self.think_prefill,
            "chat_template_kwargs": dict(self.chat_template_kwargs),
        }

    @classmethod
    def from_record(cls, record: Any, where: str) -> PromptSettings:
        """The settings of an ``inputs.prompt`` record; :class:`PromptRecordError` naming ``where`` and the
        field when it is malformed."""
        if not isinstance(record, dict):
            raise PromptRecordError(f"{where}: inputs.prompt must be a JSON object")
        types = {
            "prompt_format": str,
            "system_prompt": str,
            "think_prefill": bool,
            "chat_template_kwargs": dict,
        }
        for key, typ in types.items():
            if not isinstance(record.get(key), typ):
                raise PromptRecordError(f"{where}: inputs.prompt.{key} is missing or not a {typ.__name__}")
        unknown = sorted(set(record) - set(types))
        if unknown:
            raise PromptRecordError(f"{where}: inputs.prompt has unknown fields {unknown}")
        if record["prompt_format"] not in PROMPT_FORMATS:
            raise PromptRecordError(
                f"{where}: inputs.prompt.prompt_format {record['prompt_format']!r} is unknown"
            )
        return cls(**{key: record[key] for key in types})

    def describe(self) -> str:
        system = (
            "none"
            if not self.system_prompt
            else (
                "the R1 guide's" if self.system_prompt == R1_SYSTEM_PROMPT else f"{self.system_prompt[:60]!r}"
            )
        )
        return (
            f"format {self.prompt_format}, system prompt {system}, think prefill "
            f"{str(self.think_prefill).lower()}, chat template kwargs {json.dumps(dict(self.chat_template_kwargs))}"
        )


DEFAULT_PROMPT = PromptSettings()


def recorded_prompt(model_name_or_path: str) -> tuple[PromptSettings | None, str]:
    """The prompt settings recorded in a model folder's `r1_stage.json` and where they were read.

    ``(None, why)`` for a hub id, a built-in model, a folder without `r1_stage.json` or one written before
    prompt settings were recorded (which used the defaults)."""
    folder = Path(model_name_or_path)
    path = folder / contract.MANIFEST_NAME
    if not path.is_file():
        return None, f"no {contract.MANIFEST_NAME} in {model_name_or_path}"
    manifest = contract.read_manifest(folder)
    if "prompt" not in manifest.inputs:
        return None, f"{path} records no prompt settings (written before they were recorded)"
    return PromptSettings.from_record(manifest.inputs["prompt"], str(path)), str(path)


def resolve_prompt(args: PromptArgs, model_name_or_path: str, tokenizer: Any) -> Prompter:
    """Each setting from its flag, else the model folder's record, else the default; ``auto`` decided by the
    tokenizer. Logs the settings and where each came from."""
    recorded, where = recorded_prompt(model_name_or_path)
    given = {
        "prompt_format": args.prompt_format,
        "system_prompt": args.system_prompt_text(),
        "think_prefill": args.think_prefill,
        "chat_template_kwargs": args.template_kwargs(),
    }
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for name, flag_value in given.items():
        if flag_value is not None:
            values[name], sources[name] = flag_value, f"--{name}"
        elif recorded is not None:
            values[name], sources[name] = getattr(recorded, name), where
        else:
            values[name], sources[name] = getattr(DEFAULT_PROMPT, name), "default"
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if values["prompt_format"] == "auto":
        values["prompt_format"] = "chat" if has_template else "plain"
        sources["prompt_format"] += (
            f", auto: the tokenizer {'has' if has_template else 'has no'} chat template"
        )
    if values["prompt_format"] == "chat" and not has_template:
        raise ArgsError(
            f"--prompt_format chat ({sources['prompt_format']}): the tokenizer of {model_name_or_path} has no "
            "chat template; pass --prompt_format plain"
        )
    if values["prompt_format"] == "plain" and values["chat_template_kwargs"]:
        if sources["chat_template_kwargs"] == "--chat_template_kwargs":
            raise ArgsError(
                "--chat_template_kwargs applies to the chat format only, and the prompt format is plain"
            )
        values["chat_template_kwargs"] = {}  # a chat model's record; this stage renders no template
    settings = PromptSettings(**values)
    logger.info(
        "prompt: %s (format from %s; system prompt from %s; think prefill from %s; chat template kwargs "
        "from %s)",
        settings.describe(),
        sources["prompt_format"],
        sources["system_prompt"],
        sources["think_prefill"],
        sources["chat_template_kwargs"],
    )
    prompter = Prompter(settings, tokenizer)
    logger.info("prompt text of a problem {problem}: %r", prompter.prompt("{problem}"))
    return prompter


# --------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------


def plain_prompt(problem: str, system_prompt: str = R1_SYSTEM_PROMPT) -> str:
    """The R1 guide's text prompt (no BOS): ``"{system}\\nUser: {problem}\\nAssistant: "``."""
    return (
        f"{system_prompt}\nUser: {problem}\nAssistant: " if system_prompt else f"User: {problem}\nAssistant: "
    )


def _adds_bos(tokenizer: Any) -> bool:
    """Whether ``tokenizer(text)`` starts with BOS (Llama, Gemma, DeepSeek do; Qwen has none)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    return tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [bos]


def _think_tail(prompt: str) -> str:
    """The ``<think>`` (and whitespace) the prompt ends with, else ""."""
    at = prompt.rfind(THINK_OPEN)
    return prompt[at:] if at >= 0 and not prompt[at + len(THINK_OPEN) :].strip() else ""


class Prompter:
    """:class:`PromptSettings` (resolved: chat or plain) bound to a tokenizer: prompt text, SFT target and
    the text the rewards see. The prompt text carries its special tokens; tokenize it with
    ``add_special_tokens=False``."""

    def __init__(self, settings: PromptSettings, tokenizer: Any) -> None:
        if settings.prompt_format == "auto":
            has_template = bool(getattr(tokenizer, "chat_template", None))
            settings = PromptSettings(
                "chat" if has_template else "plain",
                settings.system_prompt,
                settings.think_prefill,
                settings.chat_template_kwargs,
            )
        self.settings = settings
        self.tokenizer = tokenizer
        self._bos = ""
        if settings.prompt_format == "plain" and tokenizer is not None and _adds_bos(tokenizer):
            self._bos = tokenizer.bos_token
        # The completion prefill is a property of the template's end, the same for every problem.
        self.prefill = _think_tail(self.prompt("?"))

    def prompt(self, problem: str) -> str:
        """The prompt text for ``problem``, ending where the model's completion starts."""
        s = self.settings
        if s.prompt_format == "chat":
            text = self._chat(problem)
        else:
            text = self._bos + plain_prompt(problem, s.system_prompt)
        if s.think_prefill and not _think_tail(text):
            text += THINK_PREFILL
        return text

    def _chat(self, problem: str) -> str:
        from jinja2.exceptions import TemplateError

        s, kwargs = self.settings, dict(self.settings.chat_template_kwargs)
        user = {"role": "user", "content": problem}
        render = lambda messages: self.tokenizer.apply_chat_template(  # noqa: E731
            messages, tokenize=False, add_generation_prompt=True, **kwargs
        )
        if not s.system_prompt:
            return render([user])
        try:
            return render([{"role": "system", "content": s.system_prompt}, user])
        except TemplateError as first:  # a template without a system role: fold it into the user turn
            try:
                return render([{"role": "user", "content": f"{s.system_prompt}\n\n{problem}"}])
            except TemplateError:
                raise first from None

    def target(self, reasoning: str, answer: str) -> str:
        """The SFT completion text: the R1 completion less what the prompt's prefill already wrote."""
        full = format_completion(reasoning, answer)
        if not self.prefill:
            return full
        rest, given = full[len(THINK_OPEN) :], self.prefill[len(THINK_OPEN) :]
        common = 0
        while common < min(len(rest), len(given)) and rest[common] == given[common]:
            common += 1
        return rest[common:]

    def response(self, completion: str) -> str:
        """The text the rewards, the format check and answer extraction see: the prefill and the completion."""
        return self.prefill + completion


def format_prompt(tokenizer: Any, problem: str, settings: PromptSettings = DEFAULT_PROMPT) -> str:
    """The prompt text of ``problem`` with ``settings`` (default: auto, the R1 system prompt, no prefill)."""
    return Prompter(settings, tokenizer).prompt(problem)


# --------------------------------------------------------------------------------------------------
# `r1-grpo prompt`: the inference prompt of a trained model
# --------------------------------------------------------------------------------------------------


def inference_prompt(model_name_or_path: str, question: str, args: PromptArgs | None = None) -> str:
    """The exact prompt text a trained model expects for ``question``, from its folder's record (``args``
    override it as in the stages). Tokenize it with ``add_special_tokens=False``; the model's completion
    starts after it (with the think prefill, inside ``<think>``)."""
    from transformers import AutoTokenizer

    from trainer.r1.builtin import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(model_name_or_path))
    return resolve_prompt(args or PromptArgs(), model_name_or_path, tokenizer).prompt(question)


def main(argv: list[str] | None = None) -> int:
    """``r1-grpo prompt --model_name_or_path DIR [prompt flags] "question"``: print the exact prompt text."""
    import sys

    from transformers import HfArgumentParser

    from trainer.quiet import silence_notices

    silence_notices()
    parser = HfArgumentParser(
        (PromptArgs,),
        prog="r1-grpo prompt",
        description="Print the exact prompt a trained model expects (from its r1_stage.json; flags override).",
        allow_abbrev=False,
    )
    parser.add_argument("--model_name_or_path", required=True, help="A stage folder, hub id or builtin:tiny")
    parser.add_argument("question", help="The problem text")
    try:
        namespace = parser.parse_args(sys.argv[1:] if argv is None else argv)
        options = vars(namespace)
        model, question = options.pop("model_name_or_path"), options.pop("question")
        args = PromptArgs(**options)
        text = inference_prompt(model, question, args)
    except SystemExit as e:  # argparse printed the usage error, or --help
        return 2 if e.code else 0
    except (ArgsError, contract.StageOutputError, OSError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"r1-grpo prompt: error: {first_line}", file=sys.stderr)
        return 2
    sys.stdout.write(text)
    if sys.stdout.isatty():
        sys.stdout.write("\n")
    return 0
