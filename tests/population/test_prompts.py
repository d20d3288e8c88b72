"""Identity-specific prompt detection (`popalign_core.population.prompts`)."""

from __future__ import annotations

import pytest

from popalign_core.population.prompts import DEFAULT_KEYWORDS, find_identity_terms, is_identity_specific
from popalign_core.toyworld.world import KEYWORDS as TOY_KEYWORDS


@pytest.mark.parametrize(
    "prompt",
    [
        "a photo of a female doctor",
        "A MALE nurse at work",
        "two women playing chess",
        "a group of men in a boardroom",
        "a girl reading a book",
        "an elderly teacher",
        "a Latino Hispanic chef",
        "a middle eastern engineer",
        "a black doctor in a white lab coat",
        "a doctor examining her patient",
        "portrait of an Asian scientist",
        "a young lawyer",
        "an African-American pilot",
    ],
)
def test_identity_specific(prompt):
    assert is_identity_specific(prompt)


@pytest.mark.parametrize(
    "prompt",
    [
        "a photo of a doctor",
        "a doctor in a white lab coat",
        "a chef wearing a black apron",
        "a manager in a meeting",  # "man" inside "manager"
        "a human resources specialist",
        "a botanist cataloging plant species in a dense forest",
        "a biochemist examining cellular structures, in a high-tech lab",
        "a carpenter with a brown leather belt",
        "a librarian next to an old house",
        "a baker with white flour on a red apron",
        "a programmer in front of a black screen",
    ],
)
def test_identity_neutral(prompt):
    assert not is_identity_specific(prompt), find_identity_terms(prompt)


def test_terms_axes_classes_and_order():
    terms = find_identity_terms("Two elderly Middle Eastern women and a black man, in a white coat")
    assert terms == [
        {"axis": "age", "class": "old", "term": "elderly"},
        {"axis": "race", "class": "middle_eastern", "term": "middle eastern"},
        {"axis": "gender", "class": "female", "term": "women"},
        {"axis": "race", "class": "black", "term": "black"},
        {"axis": "gender", "class": "male", "term": "man"},
    ]
    assert DEFAULT_KEYWORDS["gender"]["female"][0] == "female"  # the paper's keyword first


def test_toy_world_keywords():
    assert find_identity_terms("a photo of a small emerald baker", TOY_KEYWORDS) == [
        {"axis": "stature", "class": "short", "term": "small"},
        {"axis": "hue", "class": "green", "term": "emerald"},
    ]
    assert not is_identity_specific("a photo of a baker", TOY_KEYWORDS)
    assert not is_identity_specific("a photo of a female baker", TOY_KEYWORDS)  # not a toy-world keyword
    assert not is_identity_specific("a photo of a baker in a cloak", TOY_KEYWORDS)


@pytest.mark.parametrize(
    ("axes", "match"),
    [
        ({}, "`axes` must be a non-empty mapping"),
        ({"gender": []}, r"`axes\['gender'\]` must be a non-empty mapping"),
        ({"gender": {"female": "woman"}}, r"`axes\['gender'\]\['female'\]` must be a non-empty list"),
        ({"gender": {"female": ["", "x"]}}, r"`axes\['gender'\]\['female'\]` must be a non-empty list"),
    ],
)
def test_bad_keyword_configs(axes, match):
    with pytest.raises(ValueError, match=match):
        is_identity_specific("a doctor", axes)


def test_bad_prompt():
    with pytest.raises(ValueError, match="`prompt` must be a string"):
        is_identity_specific(None)


# ------------------------------------------------------------------------------------------------ augmentation
from popalign_core.population.prompts import AugmentConfig, augment, augment_prompts, subject_of  # noqa: E402


@pytest.mark.parametrize(
    ("prompt", "subject"),
    [
        ("a photo of a doctor", "doctor"),
        ("A realistic photo of an engineer", "engineer"),
        (
            "a botanist cataloging plant species in a dense forest",
            "botanist cataloging plant species in a dense forest",
        ),
        ("portrait of the chef", "chef"),
        ("doctor", "doctor"),
        ("an image of a nurse", "nurse"),
    ],
)
def test_subject_of(prompt, subject):
    assert subject_of(prompt) == subject


def test_augment_writes_keywords_in_axis_order_with_the_right_article():
    assert augment("a photo of a doctor", {"race": "asian", "gender": "female"}) == (
        "a realistic photo of an Asian female doctor"
    )
    assert augment("a botanist in a forest", {"gender": "male"}) == "a realistic photo of a male botanist in a forest"
    cfg = AugmentConfig(template="{prompt}, {identity}")
    assert augment("a photo of a doctor", {"race": "indian", "gender": "male"}, cfg) == (
        "a photo of a doctor, Indian male"
    )
    with pytest.raises(ValueError, match="names classes the keyword config lacks"):
        augment("a doctor", {"gender": "other"})


def test_augment_prompts_spreads_evenly_skips_specific_and_duplicates():
    cfg = AugmentConfig(samples_per_prompt=14, seed=3)
    res = augment_prompts(["a photo of a doctor", "a photo of a female nurse", "a photo of a doctor", "a chef"], cfg)
    assert res.duplicates == ["a photo of a doctor"]
    assert [s["prompt"] for s in res.skipped] == ["a photo of a female nurse"]
    assert res.skipped[0]["terms"] == [{"axis": "gender", "class": "female", "term": "female"}]
    for neutral in ("a photo of a doctor", "a chef"):
        rows = [r for r in res.rows if r["neutral"] == neutral]
        assert [r["index"] for r in rows] == list(range(14))
        counts = {}
        for r in rows:
            key = (r["identity"]["race"], r["identity"]["gender"])
            counts[key] = counts.get(key, 0) + 1
            assert is_identity_specific(r["prompt"])
        assert len(counts) == 12 and set(counts.values()) == {1, 2}  # 14 over 6 x 2 identities
    # seeded by the prompt's text, not its position
    again = augment_prompts(["a chef"], cfg)
    assert again.rows == [r for r in res.rows if r["neutral"] == "a chef"]
    assert augment_prompts(["a chef"], AugmentConfig(samples_per_prompt=14, seed=4)).rows != again.rows


def test_augment_prompts_toy_world_axes():
    from popalign_core.toyworld.world import KEYWORDS

    toy = {a: {c: kws[0] for c, kws in v.items()} for a, v in KEYWORDS.items()}
    cfg = AugmentConfig(axes=("form",), keywords=toy, template="a photo of {article} {identity} {subject}",
                        samples_per_prompt=4, detect=KEYWORDS)  # fmt: skip
    res = augment_prompts(["a photo of a baker", "a photo of a tall pilot"], cfg)
    assert (
        sorted(r["prompt"] for r in res.rows) == ["a photo of a round baker"] * 2 + ["a photo of an angular baker"] * 2
    )
    assert [s["prompt"] for s in res.skipped] == ["a photo of a tall pilot"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"axes": ()}, "`axes` must name distinct axes"),
        ({"axes": ("gender", "gender")}, "`axes` must name distinct axes"),
        ({"axes": ("religion",)}, r"`axes` has unknown axes \['religion'\]"),
        ({"keywords": {"gender": {"female": ""}}, "axes": ("gender",)}, r"`keywords\['gender'\]` must map"),
        ({"template": "a photo of a {subject}"}, "`template` must contain {identity}"),
        ({"template": "{identity} {subject} {mood}"}, "has an unknown field"),
        ({"samples_per_prompt": 0}, r"`samples_per_prompt` must be an integer in \[1, 1,000,000\]"),
    ],
)
def test_augment_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        augment_prompts(["a doctor"], AugmentConfig(**kwargs))


def test_blank_prompt_is_an_error_naming_its_position():
    with pytest.raises(ValueError, match=r"prompts\[1\] is blank"):
        augment_prompts(["a doctor", "  "])
