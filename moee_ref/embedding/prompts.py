"""Prompt templates: the paper's Table 2 plus "none" and PromptEOL.

Two families live here:

* ``BUILTIN_PROMPTS`` -- the principled default. Templates carry a ``{text}``
  placeholder and the text is inserted unchanged.
* ``OFFICIAL_PROMPTS`` -- what the authors' public code (tianyi-lab/MoE-Embedding)
  feeds the model, for a "reproduce the official code" mode. Their sentence is
  preprocessed first (see ``official_preprocess``), their "none" prompt wraps
  the sentence in double quotes, and underscores in the final prompt become
  spaces.

Placeholders are filled with ``str.replace``, never ``str.format``, so a custom
template may contain literal braces (JSON examples, code) without escaping.
"""

from __future__ import annotations

from ..errors import InputError

PLACEHOLDER = "{text}"

# Insertion order is the order of the paper (none, PromptEOL, then Table 2 rows).
BUILTIN_PROMPTS: dict[str, str] = {
    "none": "{text}",
    "prompteol": 'This sentence : "{text}" means in one word:"',
    # The stray trailing quote of "style" is in the authors' template; kept so
    # the default differs from the official mode only where it is principled.
    "style": 'In one word, describe the style of the following sentence - "{text}" :"',
    "sentiment": (
        "In one word, describe the sentiment of the following sentence "
        '(positive, neutral, or negative) - "{text}" :'
    ),
    "tone": (
        'In one word, describe the tone of the following sentence - "{text}" '
        "(e.g., formal, informal, humorous, serious):"
    ),
    "intent": (
        "In one word, describe the intent behind the following sentence "
        '(e.g., request, suggestion, command) - "{text}" :'
    ),
    "complexity": (
        "In one word, rate the complexity of the following sentence "
        '(simple, moderate, complex) - "{text}" :'
    ),
    "subjectivity": (
        "In one word, describe whether the following sentence is subjective "
        'or objective - "{text}" :'
    ),
    "language_style": (
        "In one word, describe the language style of the following sentence "
        '(e.g., academic, conversational, literary) - "{text}" :'
    ),
    "grammar_structure": (
        "In one word, describe the grammatical structure of the following "
        'sentence (simple, compound, complex) - "{text}" :'
    ),
}

# The authors' templates differ from the defaults only for "none", which they
# wrap in double quotes. Same placeholder, so one filling routine serves both.
OFFICIAL_PROMPTS: dict[str, str] = {**BUILTIN_PROMPTS, "none": '"{text}"'}

# Characters after which the authors' code does not append a period.
_OFFICIAL_SENTENCE_ENDINGS = ".?!\"'"


def list_prompts() -> list[tuple[str, str]]:
    """Return the built-in ``(name, template)`` pairs in their stable order."""
    return list(BUILTIN_PROMPTS.items())


def _normalise_name(name: str) -> str:
    # "PromptEOL", "Language Style" and "grammar-structure" all mean a built-in.
    return name.strip().lower().replace("-", "_").replace(" ", "_")


def _valid_names() -> str:
    return ", ".join(BUILTIN_PROMPTS)


def _lookup_builtin(name: str, table: dict[str, str]) -> str | None:
    return table.get(_normalise_name(name))


def resolve_prompt(prompt: str | None) -> str:
    """Turn a prompt option into a template containing ``{text}``.

    ``None`` means no prompt (``"{text}"``). A built-in name is matched
    case-insensitively. Any other string must be a custom template holding
    ``{text}`` at least once; every occurrence is replaced by the text.
    """
    if prompt is None:
        return PLACEHOLDER
    if not isinstance(prompt, str):
        raise InputError(
            f"prompt must be a string or None, got {type(prompt).__name__}; "
            f"use one of: {_valid_names()}, or a template containing {PLACEHOLDER}"
        )
    # A name is checked first so that "none" stays a name; names never contain
    # the placeholder, so a string holding it is always a template.
    builtin = _lookup_builtin(prompt, BUILTIN_PROMPTS)
    if builtin is not None:
        return builtin
    if PLACEHOLDER in prompt:
        return prompt
    raise InputError(
        f"unknown prompt {prompt!r}: it is not a built-in name and contains no "
        f"{PLACEHOLDER} placeholder. Built-in names: {_valid_names()}. "
        f"A custom template must contain {PLACEHOLDER} where the text goes, "
        f'e.g. \'Summarise: "{PLACEHOLDER}"\'.'
    )


def apply_prompt(template: str, text: str) -> str:
    """Insert ``text`` at every ``{text}`` of ``template``; other braces stay literal."""
    if not isinstance(text, str):
        raise InputError(f"text must be a string, got {type(text).__name__}")
    if PLACEHOLDER not in template:
        raise InputError(
            f"template {template!r} has no {PLACEHOLDER} placeholder; "
            "pass it through resolve_prompt() first or add the placeholder"
        )
    # One pass over the template: a text that itself contains "{text}" is not
    # expanded again.
    return template.replace(PLACEHOLDER, text)


def official_preprocess(sentence: str) -> str:
    """Clean a sentence as the authors' code does before prompting.

    A period is appended unless the sentence already ends in one of . ? ! " ';
    then every double quote becomes a single quote (so it cannot close the
    template's own quotes). An empty sentence stays empty: their code means to
    turn an empty word list into ".", but ``"".split(" ")`` is ``[""]``, not
    ``[]``, so "" passes through -- and that is what their numbers were
    computed from.
    """
    if not isinstance(sentence, str):
        raise InputError(f"sentence must be a string, got {type(sentence).__name__}")
    if sentence and sentence[-1] not in _OFFICIAL_SENTENCE_ENDINGS:
        sentence += "."
    return sentence.replace('"', "'")


def apply_official_prompt(name: str, sentence: str, instruction: str = "") -> str:
    """Build the exact prompt string the authors' code feeds the model.

    ``name`` is a built-in prompt name (case-insensitive). ``instruction`` is
    put before the sentence and preprocessed with it, as their code does
    (official_instructions.py formats it). The result is inserted, then
    underscores anywhere in the prompt become spaces and surrounding
    whitespace is stripped -- as in the official code.
    """
    if not isinstance(name, str):
        raise InputError(f"prompt name must be a string, got {type(name).__name__}")
    template = _lookup_builtin(name, OFFICIAL_PROMPTS)
    if template is None:
        raise InputError(
            f"unknown official prompt {name!r}; official-code mode only supports "
            f"the built-in names: {_valid_names()}"
        )
    prompt = template.replace(PLACEHOLDER, official_preprocess(instruction + sentence))
    return prompt.replace("_", " ").strip()
