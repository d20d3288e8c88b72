"""Identity keywords in prompts: which prompts already name an identity (and so must not be augmented).

PopAlign (Sec. 4.1) augments *identity-neutral* prompts ("a photo of a doctor") with identity keywords. A prompt that
already names an identity ("a photo of a female doctor", "two women ...") is *identity-specific*: it is reported
and left alone. `find_identity_terms` lists the identity terms of a prompt; `is_identity_specific` says whether
there are any.

Keyword configs map axis -> class -> keywords (`DEFAULT_KEYWORDS`: the paper's gender and race keywords with common
synonyms, plus age words; the toy world passes `toyworld.world.KEYWORDS`). Matching is word-level on lower-cased
text: a keyword matches itself, its plural (+s / +es, and the irregular plurals of `IRREGULAR_PLURALS`) and
multi-word keywords ("middle eastern") match the word sequence. "Manager" never matches "man".

Colour and age words also describe things ("a white lab coat", "a black apron", "an old house"). A keyword in
`AMBIGUOUS` counts as an identity term only when it describes a person: it is not preceded by "in", "with",
"wearing" (or those followed by an article / possessive), and the next word is not a known object noun
(`OBJECT_NOUNS`). That is a heuristic: "a black and white photo" or an unlisted object ("a white gazebo") can fool it;
pass your own keyword config to change what counts.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import product

from popalign_core.common.fields import help_field
from popalign_core.common.userinput import check_containers, coerce_numbers

KeywordConfig = Mapping[str, Mapping[str, Sequence[str]]]

# The paper's keywords (Sec. 6.1: "male"/"female"; "white", "Asian", "black", "Latino Hispanic", "Indian",
# "middle eastern") first in each class, then common synonyms.
DEFAULT_KEYWORDS: dict[str, dict[str, tuple[str, ...]]] = {
    "gender": {
        "female": (
            "female",
            "woman",
            "girl",
            "lady",
            "feminine",
            "she",
            "her",
            "mother",
            "daughter",
            "sister",
            "wife",
            "actress",
            "waitress",
            "businesswoman",
            "policewoman",
            "chairwoman",
        ),
        "male": (
            "male",
            "man",
            "boy",
            "gentleman",
            "guy",
            "masculine",
            "he",
            "his",
            "him",
            "father",
            "son",
            "brother",
            "husband",
            "actor",
            "waiter",
            "businessman",
            "policeman",
            "chairman",
        ),
    },  # fmt: skip
    "race": {
        "white": ("white", "caucasian", "european"),
        "black": ("black", "african", "african american"),
        "asian": (
            "asian",
            "east asian",
            "southeast asian",
            "chinese",
            "japanese",
            "korean",
            "vietnamese",
            "filipino",
            "thai",
        ),
        "latino_hispanic": ("latino", "latina", "latinx", "hispanic", "latino hispanic", "mexican"),
        "indian": ("indian", "south asian"),
        "middle_eastern": ("middle eastern", "arab", "arabic", "persian"),
    },  # fmt: skip
    "age": {
        "young": ("young", "child", "kid", "teen", "teenager", "teenage", "youth", "toddler", "baby"),
        "old": ("old", "elderly", "senior", "aged", "aging", "grandmother", "grandfather", "grandma", "grandpa"),
    },  # fmt: skip
}
IRREGULAR_PLURALS = {"woman": "women", "man": "men", "businesswoman": "businesswomen", "businessman": "businessmen",
                     "policewoman": "policewomen", "policeman": "policemen", "chairwoman": "chairwomen",
                     "chairman": "chairmen", "child": "children", "gentleman": "gentlemen", "lady": "ladies",
                     "baby": "babies", "youth": "youths"}  # fmt: skip
# words that also describe things: identity terms only when they describe a person (see the module docstring)
AMBIGUOUS = frozenset({"white", "black", "brown", "red", "yellow", "green", "blue", "gold", "old", "young", "aged",
                       "indian", "african", "european", "chinese", "japanese", "korean", "thai", "mexican",
                       "persian", "arab", "arabic", "round", "angular", "tall", "short", "small"})  # fmt: skip
OBJECT_NOUNS = frozenset("""
apron coat jacket shirt t-shirt dress hat cap gown uniform suit scarf tie shoes boots gloves mask helmet robe
vest sweater hoodie trousers pants jeans skirt lab background wall board boards paper sheet sheets car truck van
bus bike bicycle cat dog horse bird cow house building room door window table desk chair bench floor cloth
cup mug bowl plate bottle box bag book books screen sky cloud clouds smoke flag light lights marble stone tile
tiles sand snow ink paint pen pencil chalk chalkboard whiteboard blackboard tea coffee wine rice pepper bread
cake tree trees flower flowers rose roses leaf leaves fur hair beard eyes collar sleeves belt sneakers socks
apparel clothing clothes outfit fabric curtain curtains canvas keyboard piano photo image picture film frame
ocean sea river lake wood forest field mountain mountains city street road kitchen studio office hospital
restaurant food cuisine dish dishes market temple village style pattern rug carpet spice spices wedding
""".split())  # fmt: skip
_PRECEDERS = frozenset({"in", "with", "wearing", "wears", "wore", "holding", "carrying", "on", "behind", "near",
                        "against", "under", "over", "into", "onto"})  # fmt: skip
_FILLERS = frozenset({"a", "an", "the", "his", "her", "their", "its", "some", "bright", "dark", "light", "pale",
                      "long", "clean", "plain", "crisp"})  # fmt: skip
_TOKEN = re.compile(r"[a-z]+")


def check_keyword_config(axes: KeywordConfig) -> None:
    if not isinstance(axes, Mapping) or not axes:
        raise ValueError(f"`axes` must be a non-empty mapping axis -> class -> keywords; got {axes!r}")
    for axis, classes in axes.items():
        if not isinstance(classes, Mapping) or not classes:
            raise ValueError(f"`axes[{axis!r}]` must be a non-empty mapping class -> keywords; got {classes!r}")
        for cls, kws in classes.items():
            if isinstance(kws, str) or not kws or not all(isinstance(k, str) and k.strip() for k in kws):
                raise ValueError(f"`axes[{axis!r}][{cls!r}]` must be a non-empty list of keywords; got {kws!r}")


def _forms(keyword: str) -> set[tuple[str, ...]]:
    words = tuple(_TOKEN.findall(keyword.lower()))
    if not words:
        return set()
    head, last = words[:-1], words[-1]
    plurals = {last, last + "s", last + "es"}
    if last in IRREGULAR_PLURALS:
        plurals.add(IRREGULAR_PLURALS[last])
    return {head + (p,) for p in plurals}


def _describes_a_person(tokens: list[str], start: int, end: int) -> bool:
    j = start - 1
    while j >= 0 and tokens[j] in _FILLERS:
        j -= 1
    if j >= 0 and tokens[j] in _PRECEDERS:
        return False
    k = end
    while k < len(tokens) and tokens[k] in ("and",) + tuple(_FILLERS - {"a", "an", "the"}):
        k += 1
    return not (k < len(tokens) and tokens[k] in OBJECT_NOUNS)


def find_identity_terms(prompt: str, axes: KeywordConfig | None = None) -> list[dict[str, str]]:
    """The identity terms of `prompt`: [{"axis", "class", "term"}] in order of appearance (longest match first).

    axes: a keyword config (axis -> class -> keywords); default `DEFAULT_KEYWORDS`."""
    if not isinstance(prompt, str):
        raise ValueError(f"`prompt` must be a string; got {type(prompt).__name__}")
    axes = DEFAULT_KEYWORDS if axes is None else axes
    check_keyword_config(axes)
    table: dict[tuple[str, ...], tuple[str, str]] = {}
    for axis, classes in axes.items():
        for cls, kws in classes.items():
            for kw in kws:
                for form in _forms(kw):
                    table.setdefault(form, (axis, cls))
    longest = max(len(f) for f in table)
    tokens = _TOKEN.findall(prompt.lower())
    found, i = [], 0
    while i < len(tokens):
        for n in range(min(longest, len(tokens) - i), 0, -1):
            key = tuple(tokens[i : i + n])
            if key in table:
                if n == 1 and key[0] in AMBIGUOUS and not _describes_a_person(tokens, i, i + n):
                    continue
                axis, cls = table[key]
                found.append({"axis": axis, "class": cls, "term": " ".join(key)})
                i += n - 1
                break
        i += 1
    return found


def is_identity_specific(prompt: str, axes: KeywordConfig | None = None) -> bool:
    """True when `prompt` already names an identity on any axis of `axes` (default: the real-world gender / race /
    age keywords; the toy world passes its own), so it must not be augmented."""
    return bool(find_identity_terms(prompt, axes))


# ------------------------------------------------------------------------------------------------ augmentation
# Keywords inserted by augmentation: one per class, the paper's (Sec. 6.1) for gender and race.
AUGMENT_KEYWORDS: dict[str, dict[str, str]] = {
    "gender": {"female": "female", "male": "male"},
    "race": {
        "white": "white",
        "asian": "Asian",
        "black": "black",
        "latino_hispanic": "Latino Hispanic",
        "indian": "Indian",
        "middle_eastern": "middle eastern",
    },  # fmt: skip
    "age": {"young": "young", "old": "old"},
}
DEFAULT_TEMPLATE = "a realistic photo of {article} {identity} {subject}"
_LEAD = re.compile(
    r"^\s*(?:(?:a|an|the)\s+)?(?:(?:realistic\s+)?(?:photo|picture|image|portrait)\s+of\s+)?(?:(?:a|an|the)\s+)?",
    re.IGNORECASE,
)


MAX_SAMPLES_PER_PROMPT = 1_000_000  # one image each: far beyond any population run, and refused before any work


@dataclass
class AugmentConfig:
    """How neutral prompts become identity-specific ones (PopAlign Sec. 4.1)."""

    axes: tuple[str, ...] = help_field(
        "axes combined (their product: intersections), in the order their keywords are written",
        default=("race", "gender"),
    )
    keywords: dict[str, dict[str, str]] = help_field(
        "axis -> class -> the keyword written into augmented prompts",
        default_factory=lambda: {a: dict(v) for a, v in AUGMENT_KEYWORDS.items()},
    )
    template: str = help_field(
        "fields: {identity} (keywords), {subject} (the prompt without a leading 'a photo of a'), "
        "{prompt} (the prompt as given), {article} ('a' or 'an' for the identity)",
        default=DEFAULT_TEMPLATE,
    )
    samples_per_prompt: int = help_field(
        "augmented samples per neutral prompt, spread evenly over the identities", default=12
    )
    seed: int = help_field("seed of the order in which identities are assigned", default=0)
    detect: KeywordConfig | None = help_field(
        "keyword config of the identity-specific detector (None: DEFAULT_KEYWORDS)", default=None
    )

    def check(self) -> None:
        coerce_numbers(self)
        check_containers(self)
        if not self.axes or len(set(self.axes)) != len(self.axes):
            raise ValueError(f"`axes` must name distinct axes; got {self.axes!r}")
        unknown = [a for a in self.axes if a not in self.keywords]
        if unknown:
            raise ValueError(f"`axes` has unknown axes {unknown}; known: {sorted(self.keywords)}")
        for a in self.axes:
            kws = self.keywords[a]
            if (
                not isinstance(kws, Mapping)
                or not kws
                or not all(isinstance(k, str) and k.strip() for k in kws.values())
            ):
                raise ValueError(f"`keywords[{a!r}]` must map each class to a non-empty keyword; got {kws!r}")
        if "{identity}" not in self.template or not ("{subject}" in self.template or "{prompt}" in self.template):
            raise ValueError(
                f"`template` must contain {{identity}} and {{subject}} or {{prompt}}; got {self.template!r}"
            )
        try:
            self.template.format(identity="x", subject="y", prompt="y", article="a")
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"`template` {self.template!r} has an unknown field: {e}") from e
        if not isinstance(self.samples_per_prompt, int) or not 1 <= self.samples_per_prompt <= MAX_SAMPLES_PER_PROMPT:
            raise ValueError(
                f"`samples_per_prompt` must be an integer in [1, {MAX_SAMPLES_PER_PROMPT:,}]; got "
                f"{self.samples_per_prompt!r}"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"`seed` must be an integer >= 0; got {self.seed!r}")

    def identities(self) -> list[dict[str, str]]:
        """Every combination of the classes of `axes` ({axis: class}), in config order."""
        return [dict(zip(self.axes, combo)) for combo in product(*(list(self.keywords[a]) for a in self.axes))]


@dataclass
class Augmented:
    """`augment_prompts` output: rows (one per augmented sample) and what was left out, with reasons."""

    rows: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)  # identity-specific prompts: {"prompt", "terms"}
    duplicates: list[str] = field(default_factory=list)


def subject_of(prompt: str) -> str:
    """The prompt without a leading article or "a (realistic) photo/picture/image/portrait of a": "a photo of a
    doctor" -> "doctor"; "a botanist cataloging plants" -> "botanist cataloging plants"."""
    return _LEAD.sub("", prompt, count=1).strip()


def augment(prompt: str, identity: Mapping[str, str], cfg: AugmentConfig | None = None) -> str:
    """One augmented prompt: `identity` ({axis: class}) written with `cfg`'s keywords into its template."""
    cfg = cfg or AugmentConfig()
    missing = [a for a in identity if a not in cfg.keywords or identity[a] not in cfg.keywords[a]]
    if missing:
        raise ValueError(f"`identity` {dict(identity)} names classes the keyword config lacks (axes {missing})")
    words = " ".join(cfg.keywords[a][identity[a]] for a in cfg.axes if a in identity)
    article = "an" if words[:1].lower() in "aeiou" else "a"
    text = cfg.template.format(identity=words, subject=subject_of(prompt), prompt=prompt.strip(), article=article)
    return " ".join(text.split())


def augment_prompts(prompts: Sequence[str], cfg: AugmentConfig | None = None) -> Augmented:
    """Augment identity-neutral prompts: `samples_per_prompt` rows per prompt, spread over the identity
    combinations (counts differ by at most one; which identities get the extra samples is seeded). Prompts that
    already name an identity (`is_identity_specific` with ``cfg.detect``) are skipped and reported; duplicates are
    dropped (first kept) and reported; a blank prompt is an error naming its position.

    Row: {"neutral": prompt, "prompt": augmented prompt, "identity": {axis: class}, "index": k (0-based, per
    neutral prompt)}."""
    import numpy as np

    cfg = cfg or AugmentConfig()
    cfg.check()
    out, seen = Augmented(), set()
    combos = cfg.identities()
    for pos, p in enumerate(prompts):
        if not isinstance(p, str) or not p.strip():
            raise ValueError(f"prompts[{pos}] is blank: remove empty lines from the prompt list")
        p = " ".join(p.split())
        if p in seen:
            out.duplicates.append(p)
            continue
        seen.add(p)
        terms = find_identity_terms(p, cfg.detect)
        if terms:
            out.skipped.append({"prompt": p, "terms": terms})
            continue
        # seeded by the prompt's text, so a prompt gets the same identities wherever it sits in the list
        digest = int.from_bytes(hashlib.sha256(p.encode()).digest()[:8], "big")
        rng = np.random.default_rng([cfg.seed, digest])
        order = rng.permutation(len(combos))
        for k in range(cfg.samples_per_prompt):
            ident = combos[int(order[k % len(combos)])]
            out.rows.append({"neutral": p, "prompt": augment(p, ident, cfg), "identity": ident, "index": k})
    return out
