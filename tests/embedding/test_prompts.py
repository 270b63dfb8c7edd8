import pytest

from moee_ref.errors import InputError
from moee_ref.embedding.prompts import (
    BUILTIN_PROMPTS,
    OFFICIAL_PROMPTS,
    apply_official_prompt,
    apply_prompt,
    list_prompts,
    official_preprocess,
    resolve_prompt,
)

EXPECTED_NAMES = [
    "none",
    "prompteol",
    "style",
    "sentiment",
    "tone",
    "intent",
    "complexity",
    "subjectivity",
    "language_style",
    "grammar_structure",
]


def test_builtin_names_are_the_ten_in_stable_order():
    assert list(BUILTIN_PROMPTS) == EXPECTED_NAMES
    assert [name for name, _ in list_prompts()] == EXPECTED_NAMES
    assert dict(list_prompts()) == BUILTIN_PROMPTS


@pytest.mark.parametrize("name", EXPECTED_NAMES)
def test_every_template_has_exactly_one_placeholder(name):
    assert BUILTIN_PROMPTS[name].count("{text}") == 1
    assert OFFICIAL_PROMPTS[name].count("{text}") == 1


def test_default_none_and_prompteol_templates():
    assert BUILTIN_PROMPTS["none"] == "{text}"
    assert apply_prompt(resolve_prompt("prompteol"), "A cat sits") == (
        'This sentence : "A cat sits" means in one word:"'
    )


def test_official_templates_differ_from_defaults_only_for_none():
    assert OFFICIAL_PROMPTS["none"] == '"{text}"'
    for name in EXPECTED_NAMES[1:]:
        assert OFFICIAL_PROMPTS[name] == BUILTIN_PROMPTS[name]


@pytest.mark.parametrize("spelling", ["PromptEOL", "PROMPTEOL", " prompteol "])
def test_resolve_is_case_insensitive(spelling):
    assert resolve_prompt(spelling) == BUILTIN_PROMPTS["prompteol"]


def test_resolve_accepts_spaced_and_dashed_names():
    assert resolve_prompt("Language Style") == BUILTIN_PROMPTS["language_style"]
    assert resolve_prompt("grammar-structure") == BUILTIN_PROMPTS["grammar_structure"]


def test_resolve_none_means_the_bare_text():
    template = resolve_prompt(None)
    assert template == "{text}"
    assert apply_prompt(template, "just this") == "just this"


def test_apply_inserts_text_into_builtin_template():
    result = apply_prompt(resolve_prompt("sentiment"), "I love it")
    assert result == (
        "In one word, describe the sentiment of the following sentence "
        '(positive, neutral, or negative) - "I love it" :'
    )


def test_custom_template_with_literal_braces_is_safe():
    template = resolve_prompt('Embed {"query": "{text}"} {0} {} {name}')
    assert apply_prompt(template, "hi") == 'Embed {"query": "hi"} {0} {} {name}'


def test_custom_template_replaces_every_placeholder_once():
    template = resolve_prompt("{text} / {text}")
    assert apply_prompt(template, "x") == "x / x"
    # A text that itself contains the placeholder is not expanded again.
    assert apply_prompt(template, "{text}") == "{text} / {text}"


def test_unknown_name_lists_valid_names_and_explains_templates():
    with pytest.raises(InputError) as caught:
        resolve_prompt("sentimental")
    message = str(caught.value)
    assert "sentimental" in message
    for name in EXPECTED_NAMES:
        assert name in message
    assert "{text}" in message


def test_template_without_placeholder_is_rejected():
    with pytest.raises(InputError, match=r"\{text\}"):
        resolve_prompt("Describe this sentence: {sentence}")
    with pytest.raises(InputError):
        resolve_prompt("")
    with pytest.raises(InputError):
        apply_prompt("no placeholder", "x")


def test_non_string_prompt_and_text_are_rejected():
    with pytest.raises(InputError):
        resolve_prompt(3)
    with pytest.raises(InputError):
        apply_prompt("{text}", None)


@pytest.mark.parametrize(
    "sentence, expected",
    [
        ("", ""),  # kept, as the authors' code keeps it ("".split(" ") is [""], not the [] it checks for)
        ("hello", "hello."),
        ("it's", "it's."),
        ("Done.", "Done."),
        ("Really?", "Really?"),
        ("Wow!", "Wow!"),
        ("end'", "end'"),
        # Ends in a double quote: no period, and the quotes become single quotes.
        ('He said "hi"', "He said 'hi'"),
        ('a "b" c', "a 'b' c."),
        ("trailing space ", "trailing space ."),
    ],
)
def test_official_preprocess(sentence, expected):
    assert official_preprocess(sentence) == expected


def test_official_none_wraps_in_double_quotes():
    assert apply_official_prompt("none", "") == '""'
    assert apply_official_prompt("prompteol", "") == 'This sentence : "" means in one word:"'
    assert apply_official_prompt("none", 'say "x"') == "\"say 'x'\""


def test_official_prompteol_uses_preprocessed_sentence():
    assert apply_official_prompt("PromptEOL", "A cat sits") == (
        'This sentence : "A cat sits." means in one word:"'
    )


def test_official_replaces_underscores_everywhere():
    prompt = apply_official_prompt("none", "snake_case_name")
    assert prompt == '"snake case name."'
    assert "_" not in apply_official_prompt("language_style", "a_b")


def test_official_result_is_stripped_and_differs_from_default_mode():
    official = apply_official_prompt("tone", "ok")
    assert official == official.strip()
    assert official != apply_prompt(resolve_prompt("tone"), "ok")  # no appended period by default


def test_official_unknown_name_is_rejected_with_valid_names():
    with pytest.raises(InputError) as caught:
        apply_official_prompt("{text}", "x")
    assert "prompteol" in str(caught.value)
